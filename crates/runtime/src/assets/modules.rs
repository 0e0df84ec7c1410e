//! Resolving kernel modules and their dependencies from `modules.dep`.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use super::AssetError;

/// Modules the guest needs: virtio transport, virtio-fs + overlay for the root, vsock for the
/// agent, balloon for compaction, net/blk/console for the optional devices.
pub const GUEST_MODULES: &[&str] = &[
    "virtio_mmio",
    "virtiofs",
    "overlay",
    "vmw_vsock_virtio_transport",
    "virtio_balloon",
    "virtio_net",
    "virtio_blk",
    "virtio_console",
];

/// One module to load, relative to the modules directory (e.g. `kernel/fs/fuse/fuse.ko`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleFile {
    pub rel_path: String,
}

/// Normalized module name: file stem without `.ko*`, `-` as `_`.
fn module_name(rel_path: &str) -> String {
    let base = rel_path.rsplit('/').next().unwrap_or(rel_path);
    let stem = base.split(".ko").next().unwrap_or(base);
    stem.replace('-', "_")
}

/// Resolves `wanted` into the files to load, dependencies first, each once.
/// Modules listed in `modules.builtin` are skipped (nothing to load).
pub fn resolve(modules_dir: &Path, wanted: &[&str]) -> Result<Vec<ModuleFile>, AssetError> {
    let dep_path = modules_dir.join("modules.dep");
    let dep_text = std::fs::read_to_string(&dep_path).map_err(|e| AssetError::io(&dep_path, e))?;
    let builtin_text =
        std::fs::read_to_string(modules_dir.join("modules.builtin")).unwrap_or_default();
    resolve_from(&dep_text, &builtin_text, wanted, &dep_path)
}

pub(crate) fn resolve_from(
    dep_text: &str,
    builtin_text: &str,
    wanted: &[&str],
    dep_path: &Path,
) -> Result<Vec<ModuleFile>, AssetError> {
    let mut deps: HashMap<String, (String, Vec<String>)> = HashMap::new();
    for (lineno, line) in dep_text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let (module, rest) = line.split_once(':').ok_or_else(|| AssetError::ModulesDep {
            path: dep_path.to_path_buf(),
            reason: format!("line {}: expected `module.ko: deps...`", lineno + 1),
        })?;
        let module = module.trim().to_string();
        let list = rest.split_whitespace().map(str::to_string).collect();
        deps.insert(module_name(&module), (module, list));
    }
    let builtin: HashSet<String> = builtin_text.lines().map(module_name).collect();

    let mut order = Vec::new();
    let mut done = HashSet::new();
    for name in wanted {
        let name = name.replace('-', "_");
        if builtin.contains(&name) && !deps.contains_key(&name) {
            continue;
        }
        let (path, _) = deps.get(&name).ok_or_else(|| AssetError::ModuleNotFound {
            name: name.clone(),
            dep: dep_path.to_path_buf(),
        })?;
        visit(
            path,
            &deps,
            &mut done,
            &mut Vec::new(),
            &mut order,
            dep_path,
        )?;
    }
    Ok(order
        .into_iter()
        .map(|rel_path| ModuleFile { rel_path })
        .collect())
}

fn visit(
    path: &str,
    deps: &HashMap<String, (String, Vec<String>)>,
    done: &mut HashSet<String>,
    stack: &mut Vec<String>,
    order: &mut Vec<String>,
    dep_path: &Path,
) -> Result<(), AssetError> {
    if done.contains(path) {
        return Ok(());
    }
    if stack.iter().any(|p| p == path) {
        return Err(AssetError::ModulesDep {
            path: dep_path.to_path_buf(),
            reason: format!("dependency cycle through {path}"),
        });
    }
    stack.push(path.to_string());
    let list = deps
        .get(&module_name(path))
        .map(|(_, l)| l.clone())
        .unwrap_or_default();
    for d in &list {
        visit(d, deps, done, stack, order, dep_path)?;
    }
    stack.pop();
    done.insert(path.to_string());
    order.push(path.to_string());
    Ok(())
}

/// Absolute path of a resolved module on the host.
pub fn host_path(modules_dir: &Path, m: &ModuleFile) -> PathBuf {
    modules_dir.join(&m.rel_path)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "kernel/fs/fuse/virtiofs.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko kernel/fs/fuse/fuse.ko
kernel/fs/fuse/fuse.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
";

    #[test]
    fn dependencies_come_first_once() {
        let r = resolve_from(DEP, "", &["virtio_mmio", "virtiofs"], Path::new("m.dep")).unwrap();
        let names: Vec<_> = r.iter().map(|m| module_name(&m.rel_path)).collect();
        assert_eq!(
            names,
            ["virtio_ring", "virtio", "virtio_mmio", "fuse", "virtiofs"]
        );
    }

    #[test]
    fn builtin_is_skipped_unknown_is_an_error() {
        let r = resolve_from(
            DEP,
            "kernel/fs/overlayfs/overlay.ko\n",
            &["overlay"],
            Path::new("m.dep"),
        )
        .unwrap();
        assert!(r.is_empty());
        let e = resolve_from(DEP, "", &["nope"], Path::new("m.dep")).unwrap_err();
        assert!(e.to_string().contains("\"nope\""), "{e}");
        let e = resolve_from("garbage line\n", "", &["x"], Path::new("m.dep")).unwrap_err();
        assert!(e.to_string().contains("line 1"), "{e}");
    }

    #[test]
    fn cycle_is_reported() {
        let dep = "a.ko: b.ko\nb.ko: a.ko\n";
        assert!(resolve_from(dep, "", &["a"], Path::new("m.dep"))
            .unwrap_err()
            .to_string()
            .contains("cycle"));
    }
}
