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

/// Builds (or reuses) the static part for this kernel and agent.
pub fn ensure_static(
    cache_dir: &Path,
    kernel: &Kernel,
    agent: &Path,
) -> Result<StaticInitramfs, AssetError> {
    let mods = modules::resolve(&kernel.modules_dir, modules::GUEST_MODULES)?;
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
    let guest_paths: Vec<String> = mods.iter().map(guest_module_path).collect();
    let path = cache_dir.join(format!("initramfs-{}.cpio", &digest[..32]));
    if path.is_file() {
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
