//! Assembling the guest initramfs.
//!
//! Two concatenated cpio archives: a static part (agent as `/init` plus the kernel modules),
//! cached under `$MICROBOX_ROOT/cache` by the SHA-256 of its inputs so later boots reuse it,
//! and a tiny per-box part carrying the agent's `BootConfig` at `BOOT_CONFIG_PATH`.

use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::cpio::CpioWriter;
use super::kernel::Kernel;
use super::modules::{self, ModuleFile};
use super::AssetError;

/// Bumped when the archive layout changes so old cache entries are not reused.
const LAYOUT_VERSION: &str = "microbox-initramfs-v1";

/// The cached static archive and what it contains.
#[derive(Debug, Clone)]
pub struct StaticInitramfs {
    pub path: PathBuf,
    /// Module paths inside the initramfs, in load order (goes into `BootConfig::modules`).
    pub modules: Vec<String>,
    /// Whether this call reused an existing cache entry.
    pub cache_hit: bool,
}

/// Path of a module inside the initramfs.
fn guest_module_path(m: &ModuleFile) -> String {
    format!("/lib/modules/{}", m.rel_path)
}

/// A cheap fingerprint of the inputs (path, size, mtime, inode of each file): when it matches
/// a previous build, the content hash is not recomputed (hashing ~10 MB costs ~20 ms per boot).
fn quick_key(kernel: &Kernel, agent: &Path, mods: &[ModuleFile]) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let mut h = Sha256::new();
    h.update(LAYOUT_VERSION);
    h.update(kernel.version.as_bytes());
    let files = std::iter::once(agent.to_path_buf()).chain(
        mods.iter()
            .map(|m| modules::host_path(&kernel.modules_dir, m)),
    );
    for f in files {
        let md = std::fs::metadata(&f).ok()?;
        h.update(f.as_os_str().as_encoded_bytes());
        h.update(format!(
            "{}:{}:{}:{}\0",
            md.len(),
            md.mtime(),
            md.mtime_nsec(),
            md.ino()
        ));
    }
    Some(hex::encode(h.finalize())[..32].to_string())
}

/// Builds (or reuses) the static part for this kernel and agent. Cached under `cache_dir` by
/// the SHA-256 of its contents (`initramfs-<hash>.cpio`), found through a metadata fingerprint.
pub fn ensure_static(
    cache_dir: &Path,
    kernel: &Kernel,
    agent: &Path,
) -> Result<StaticInitramfs, AssetError> {
    let mods = modules::resolve(&kernel.modules_dir, modules::GUEST_MODULES)?;
    let guest_paths: Vec<String> = mods.iter().map(guest_module_path).collect();
    let quick = quick_key(kernel, agent, &mods);
    if let Some(q) = &quick {
        if let Ok(name) = std::fs::read_to_string(cache_dir.join(format!("initramfs-key-{q}"))) {
            let path = cache_dir.join(name.trim());
            if name.starts_with("initramfs-") && path.is_file() {
                return Ok(StaticInitramfs {
                    path,
                    modules: guest_paths,
                    cache_hit: true,
                });
            }
        }
    }
    let agent_bytes = std::fs::read(agent).map_err(|e| AssetError::io(agent, e))?;
    let mut contents = Vec::with_capacity(mods.len());
    let mut h = Sha256::new();
    h.update(LAYOUT_VERSION);
    h.update(kernel.version.as_bytes());
    h.update(Sha256::digest(&agent_bytes));
    for m in &mods {
        let p = modules::host_path(&kernel.modules_dir, m);
        let data = std::fs::read(&p).map_err(|e| AssetError::io(&p, e))?;
        h.update(m.rel_path.as_bytes());
        h.update(Sha256::digest(&data));
        contents.push(data);
    }
    let digest = hex::encode(h.finalize());
    let name = format!("initramfs-{}.cpio", &digest[..32]);
    let path = cache_dir.join(&name);
    let remember = |q: &Option<String>| {
        if let Some(q) = q {
            let tmp = cache_dir.join(format!(".key-{q}.{}.tmp", std::process::id()));
            if std::fs::write(&tmp, &name).is_ok() {
                let _ = std::fs::rename(&tmp, cache_dir.join(format!("initramfs-key-{q}")));
            }
        }
    };
    if path.is_file() {
        remember(&quick);
        return Ok(StaticInitramfs {
            path,
            modules: guest_paths,
            cache_hit: true,
        });
    }
    std::fs::create_dir_all(cache_dir).map_err(|e| AssetError::io(cache_dir, e))?;
    let mut w = CpioWriter::new(Vec::with_capacity(
        agent_bytes.len() + contents.iter().map(Vec::len).sum::<usize>(),
    ));
    let io = |e| AssetError::io(&path, e);
    for d in ["dev", "proc", "sys", "tmp", "run", "mnt", "etc/microbox"] {
        w.dir(d).map_err(io)?;
    }
    w.file("init", 0o755, &agent_bytes).map_err(io)?;
    for (gp, data) in guest_paths.iter().zip(&contents) {
        w.file(gp, 0o644, data).map_err(io)?;
    }
    let bytes = w.finish().map_err(io)?;
    // Write to a temporary name then rename: concurrent boots never see a partial archive.
    let tmp = cache_dir.join(format!(
        ".initramfs-{}.{}.tmp",
        &digest[..32],
        std::process::id()
    ));
    std::fs::write(&tmp, &bytes).map_err(|e| AssetError::io(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| AssetError::io(&path, e))?;
    remember(&quick);
    Ok(StaticInitramfs {
        path,
        modules: guest_paths,
        cache_hit: false,
    })
}

/// Writes `static part + per-box config archive` to `out` (QEMU takes a single initrd file).
pub fn write_box_initrd(
    static_part: &Path,
    boot_config_json: &[u8],
    out: &Path,
) -> Result<(), AssetError> {
    let mut w = CpioWriter::new(Vec::new());
    let cfg_path = microbox_agent_proto::BOOT_CONFIG_PATH;
    w.file(cfg_path, 0o600, boot_config_json)
        .map_err(|e| AssetError::io(out, e))?;
    let tail = w.finish().map_err(|e| AssetError::io(out, e))?;
    let mut f = std::fs::File::create(out).map_err(|e| AssetError::io(out, e))?;
    let mut src = std::fs::File::open(static_part).map_err(|e| AssetError::io(static_part, e))?;
    std::io::copy(&mut src, &mut f).map_err(|e| AssetError::io(out, e))?;
    f.write_all(&tail).map_err(|e| AssetError::io(out, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake kernel + modules tree and a fake agent: first call builds, second reuses, a
    /// changed agent builds a new archive.
    #[test]
    fn second_build_reuses_the_cache_and_changes_invalidate_it() {
        let tmp = tempfile::tempdir().unwrap();
        let mdir = tmp.path().join("modules");
        let mut dep = String::new();
        for m in modules::GUEST_MODULES {
            std::fs::create_dir_all(mdir.join("kernel")).unwrap();
            std::fs::write(mdir.join(format!("kernel/{m}.ko")), m.as_bytes()).unwrap();
            dep.push_str(&format!("kernel/{m}.ko:\n"));
        }
        std::fs::write(mdir.join("modules.dep"), dep).unwrap();
        let kernel = Kernel {
            path: tmp.path().join("vmlinuz"),
            version: "6.1.0-test".into(),
            modules_dir: mdir,
        };
        let agent = tmp.path().join("agent");
        std::fs::write(&agent, b"agent-v1").unwrap();
        let cache = tmp.path().join("cache");
        let a = ensure_static(&cache, &kernel, &agent).unwrap();
        assert!(!a.cache_hit);
        assert_eq!(a.modules.len(), modules::GUEST_MODULES.len());
        assert_eq!(a.modules[0], "/lib/modules/kernel/virtio_mmio.ko");
        let b = ensure_static(&cache, &kernel, &agent).unwrap();
        assert!(b.cache_hit);
        assert_eq!(a.path, b.path);
        std::fs::write(&agent, b"agent-v2-longer").unwrap();
        let c = ensure_static(&cache, &kernel, &agent).unwrap();
        assert!(!c.cache_hit);
        assert_ne!(c.path, a.path);

        let out = tmp.path().join("box.cpio");
        write_box_initrd(&c.path, b"{}", &out).unwrap();
        let listing = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("cpio -it < {} 2>/dev/null", out.display()))
            .output()
            .unwrap();
        let names = String::from_utf8_lossy(&listing.stdout);
        assert!(names.lines().any(|l| l == "init"), "{names}");
    }
}
