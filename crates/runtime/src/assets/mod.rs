//! Boot assets: the guest kernel (with its modules directory), the agent binary and the
//! initramfs microbox assembles from them.

pub mod agent;
pub mod cpio;
pub mod initramfs;
pub mod kernel;
pub mod modules;

use std::path::PathBuf;

/// Why boot assets could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum AssetError {
    #[error("no guest kernel found: {0} (set MICROBOX_KERNEL or the box's kernel to a bzImage)")]
    NoKernel(String),
    #[error("{path}: not a Linux bzImage kernel: {reason}")]
    BadKernel { path: PathBuf, reason: String },
    #[error("modules directory {path} for kernel {version} is missing (set MICROBOX_MODULES_DIR)")]
    NoModules { path: PathBuf, version: String },
    #[error("{path}: {reason}")]
    ModulesDep { path: PathBuf, reason: String },
    #[error("kernel module {name:?} is neither in {dep} nor built in (modules.builtin)")]
    ModuleNotFound { name: String, dep: PathBuf },
    #[error("guest agent not found: {0}")]
    AgentMissing(String),
    #[error("guest agent {path} is not a static x86-64 ELF executable: {reason}")]
    AgentNotStatic { path: PathBuf, reason: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl AssetError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        AssetError::Io {
            path: path.into(),
            source,
        }
    }
}
