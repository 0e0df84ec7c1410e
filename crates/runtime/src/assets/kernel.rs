//! Finding the guest kernel and its modules directory.
//!
//! Order: an explicit path (box config or `MICROBOX_KERNEL`), else the newest `/boot/vmlinuz-*`,
//! preferring Debian's `*-cloud-amd64` flavour (small, virtio drivers as modules). The kernel
//! version is read from the bzImage setup header so any file name works.

use std::path::{Path, PathBuf};

use super::AssetError;

/// A kernel and the modules that belong to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kernel {
    pub path: PathBuf,
    pub version: String,
    pub modules_dir: PathBuf,
}

/// Finds the kernel: `explicit` (config) wins, then `MICROBOX_KERNEL`, then `/boot`.
pub fn find_kernel(explicit: Option<&Path>) -> Result<Kernel, AssetError> {
    let env = std::env::var_os("MICROBOX_KERNEL")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
    let path = match explicit.map(Path::to_path_buf).or(env) {
        Some(p) => {
            if !p.is_file() {
                return Err(AssetError::NoKernel(format!(
                    "{} does not exist or is not a file",
                    p.display()
                )));
            }
            p
        }
        None => pick_from_boot(Path::new("/boot"))?,
    };
    let version = kernel_version(&path)?;
    let modules_dir = match std::env::var_os("MICROBOX_MODULES_DIR").filter(|v| !v.is_empty()) {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from("/lib/modules").join(&version),
    };
    if !modules_dir.join("modules.dep").is_file() {
        return Err(AssetError::NoModules {
            path: modules_dir,
            version,
        });
    }
    Ok(Kernel {
        path,
        version,
        modules_dir,
    })
}

/// Picks `vmlinuz-*` in `dir`: cloud flavour first, then the highest version.
pub fn pick_from_boot(dir: &Path) -> Result<PathBuf, AssetError> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| AssetError::NoKernel(format!("cannot list {}: {e}", dir.display())))?;
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with("vmlinuz-"))
        .collect();
    if names.is_empty() {
        return Err(AssetError::NoKernel(format!(
            "no vmlinuz-* in {}",
            dir.display()
        )));
    }
    names.sort_by(|a, b| {
        let ca = a.ends_with("-cloud-amd64");
        let cb = b.ends_with("-cloud-amd64");
        ca.cmp(&cb)
            .then_with(|| version_key(a).cmp(&version_key(b)))
    });
    Ok(dir.join(names.last().expect("non-empty")))
}

/// Numeric-aware key so 6.10 sorts after 6.9.
fn version_key(name: &str) -> Vec<(u64, String)> {
    name.split(['.', '-'])
        .map(|p| (p.parse::<u64>().unwrap_or(0), p.to_string()))
        .collect()
}

/// Whether `path` is an ELF image (an uncompressed `vmlinux`, which libkrun needs) rather
/// than a bzImage.
pub fn is_elf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && &magic == b"\x7fELF"
}

/// The kernel's version: from the bzImage setup header, or for an ELF `vmlinux` from its
/// `Linux version ...` banner.
pub fn kernel_version(path: &Path) -> Result<String, AssetError> {
    if !is_elf(path) {
        return bzimage_version(path);
    }
    use std::io::Read;
    const BANNER: &[u8] = b"Linux version ";
    let mut f = std::fs::File::open(path).map_err(|e| AssetError::io(path, e))?;
    // Scan in chunks that overlap by the banner plus a version's length.
    let mut window: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut chunk).map_err(|e| AssetError::io(path, e))?;
        window.extend_from_slice(&chunk[..n]);
        if let Some(at) = window.windows(BANNER.len()).position(|w| w == BANNER) {
            let rest = &window[at + BANNER.len()..];
            let end = rest.iter().position(|b| *b == b' ' || *b == 0);
            if let Some(end) = end.filter(|_| n > 0 || !rest.is_empty()) {
                let v = String::from_utf8_lossy(&rest[..end]).into_owned();
                if !v.is_empty() && v.chars().all(|c| c.is_ascii_graphic()) {
                    return Ok(v);
                }
            }
        }
        if n == 0 {
            return Err(AssetError::BadKernel {
                path: path.to_path_buf(),
                reason: "an ELF image without a 'Linux version' banner".into(),
            });
        }
        let keep = window.len().saturating_sub(BANNER.len() + 256);
        window.drain(..keep);
    }
}

/// Reads the version string from a bzImage setup header (`HdrS` at 0x202, the version
/// pointer at 0x20E, relative to 0x200).
pub fn bzimage_version(path: &Path) -> Result<String, AssetError> {
    use std::io::{Read, Seek, SeekFrom};
    let bad = |reason: String| AssetError::BadKernel {
        path: path.to_path_buf(),
        reason,
    };
    let mut f = std::fs::File::open(path).map_err(|e| AssetError::io(path, e))?;
    let mut hdr = [0u8; 0x210];
    f.read_exact(&mut hdr)
        .map_err(|e| bad(format!("too short for a setup header ({e})")))?;
    if &hdr[0x202..0x206] != b"HdrS" {
        return Err(bad("no HdrS magic at offset 0x202".into()));
    }
    let ptr = u16::from_le_bytes([hdr[0x20E], hdr[0x20F]]) as u64;
    if ptr == 0 {
        return Err(bad("the setup header has no kernel version string".into()));
    }
    f.seek(SeekFrom::Start(ptr + 0x200))
        .map_err(|e| AssetError::io(path, e))?;
    let mut buf = [0u8; 256];
    let n = f.read(&mut buf).map_err(|e| AssetError::io(path, e))?;
    let s = String::from_utf8_lossy(&buf[..n]);
    let version = s.split([' ', '\0']).next().unwrap_or_default().to_string();
    if version.is_empty() || !version.chars().all(|c| c.is_ascii_graphic()) {
        return Err(bad(format!("unreadable kernel version string {version:?}")));
    }
    Ok(version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefers_cloud_then_newest() {
        let tmp = tempfile::tempdir().unwrap();
        for n in [
            "vmlinuz-6.1.0-9-amd64",
            "vmlinuz-6.1.0-10-cloud-amd64",
            "vmlinuz-6.1.0-9-cloud-amd64",
            "config-x",
        ] {
            std::fs::write(tmp.path().join(n), b"").unwrap();
        }
        let p = pick_from_boot(tmp.path()).unwrap();
        assert_eq!(p.file_name().unwrap(), "vmlinuz-6.1.0-10-cloud-amd64");
    }

    #[test]
    fn empty_boot_is_a_specific_error() {
        let tmp = tempfile::tempdir().unwrap();
        let err = pick_from_boot(tmp.path()).unwrap_err();
        assert!(matches!(err, AssetError::NoKernel(_)), "{err}");
    }

    #[test]
    fn non_kernel_file_is_rejected() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("vmlinuz");
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        assert!(matches!(
            bzimage_version(&p),
            Err(AssetError::BadKernel { .. })
        ));
        assert!(matches!(
            find_kernel(Some(&tmp.path().join("nope"))),
            Err(AssetError::NoKernel(_))
        ));
    }

    #[test]
    fn elf_vmlinux_version_comes_from_its_banner() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("vmlinux");
        let mut img = b"\x7fELF".to_vec();
        img.resize(3 << 20, 0); // the banner lands past the first read
        img.extend_from_slice(b"Linux version 6.1.0-42-cloud-amd64 (x@y) (gcc) #1 SMP\0");
        std::fs::write(&p, &img).unwrap();
        assert!(is_elf(&p));
        assert_eq!(kernel_version(&p).unwrap(), "6.1.0-42-cloud-amd64");
        std::fs::write(&p, b"\x7fELF no banner here").unwrap();
        assert!(matches!(
            kernel_version(&p),
            Err(AssetError::BadKernel { .. })
        ));
    }

    #[test]
    fn host_kernel_version_matches_file_name() {
        // Real host kernel: the version in the header is the one in the file name.
        if let Ok(p) = pick_from_boot(Path::new("/boot")) {
            let v = bzimage_version(&p).unwrap();
            assert!(p.to_string_lossy().ends_with(&v), "{} vs {v}", p.display());
        }
    }
}
