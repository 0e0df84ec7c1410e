//! Where microbox keeps its state on the host: the root directory, per-box directories and caches.
//!
//! Layout under the root (`$MICROBOX_ROOT`, else `/var/lib/microbox` as root, else
//! `$XDG_DATA_HOME/microbox` or `~/.local/share/microbox`):
//! `boxes/<id>/` (0700: sockets, console log, pidfiles, state) and `cache/` (initramfs).

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The root directory microbox uses when the caller does not set one.
pub fn default_root() -> PathBuf {
    if let Some(root) = std::env::var_os("MICROBOX_ROOT").filter(|v| !v.is_empty()) {
        return PathBuf::from(root);
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/var/lib/microbox");
    }
    if let Some(xdg) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(xdg).join("microbox");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into());
    PathBuf::from(home).join(".local/share/microbox")
}

/// Paths below one microbox root.
#[derive(Debug, Clone)]
pub struct Paths {
    root: PathBuf,
}

impl Paths {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn boxes_dir(&self) -> PathBuf {
        self.root.join("boxes")
    }

    pub fn box_dir(&self, id: &str) -> PathBuf {
        self.boxes_dir().join(id)
    }

    pub fn cache_dir(&self) -> PathBuf {
        self.root.join("cache")
    }

    pub fn images_dir(&self) -> PathBuf {
        self.root.join("images")
    }

    /// Creates the box directory with mode 0700 (sockets and state must not be reachable by others).
    pub fn create_box_dir(&self, id: &str) -> io::Result<PathBuf> {
        fs::create_dir_all(self.boxes_dir())?;
        let dir = self.box_dir(id);
        fs::DirBuilder::new()
            .mode(0o700)
            .recursive(true)
            .create(&dir)?;
        // `mode` is filtered by the umask and ignored for existing dirs: enforce it.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))?;
        Ok(dir)
    }
}

/// Files inside one box directory.
#[derive(Debug, Clone)]
pub struct BoxPaths {
    pub dir: PathBuf,
}

impl BoxPaths {
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }
    pub fn qmp_socket(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }
    /// Hybrid-vsock socket of the vsock device (`CONNECT <port>` handshake).
    pub fn vsock_uds(&self) -> PathBuf {
        self.dir.join("vsock.sock")
    }
    /// Where guest-initiated connections to host vsock `port` arrive: hybrid vsock names them
    /// `<vsock_uds>_<port>` (vhost-device-vsock, Firecracker); libkrun maps the port here too.
    pub fn guest_to_host_socket(&self, port: u32) -> PathBuf {
        self.dir.join(format!("vsock.sock_{port}"))
    }
    /// vhost-user control socket between QEMU and vhost-device-vsock.
    pub fn vhost_vsock_socket(&self) -> PathBuf {
        self.dir.join("vhost-vsock.sock")
    }
    pub fn virtiofs_socket(&self, tag: &str) -> PathBuf {
        self.dir.join(format!("fs-{tag}.sock"))
    }
    /// The plain gRPC bridge to the agent, for tools that do not speak hybrid vsock.
    pub fn agent_socket(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }
    pub fn pidfile(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.pid"))
    }
    pub fn initrd(&self) -> PathBuf {
        self.dir.join("initrd.cpio")
    }
    pub fn state_file(&self) -> PathBuf {
        self.dir.join("state.json")
    }
    pub fn upper_dir(&self) -> PathBuf {
        self.dir.join("upper")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn box_dir_is_private() {
        let tmp = tempfile::tempdir().unwrap();
        let paths = Paths::new(tmp.path());
        let dir = paths.create_box_dir("abc").unwrap();
        let mode = fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        assert_eq!(dir, tmp.path().join("boxes/abc"));
    }
}
