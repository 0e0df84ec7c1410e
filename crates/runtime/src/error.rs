//! Errors of the runtime's public API.

use std::path::PathBuf;
use std::time::Duration;

use microbox_core::{BoxState, ConfigError, TransitionError};

use crate::assets::AssetError;
use crate::hypervisor::HypervisorError;

/// Everything [`crate::VmManager`] can fail with.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Assets(#[from] AssetError),
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    #[error("acceleration: {0}")]
    Accel(String),
    #[error("image {reference}: {message}")]
    Image { reference: String, message: String },
    #[error("boot timed out after {timeout:?} waiting for {waiting_for}; last console lines:\n{console_tail}")]
    BootTimeout {
        timeout: Duration,
        waiting_for: String,
        console_tail: String,
    },
    #[error("the VM exited during boot ({status}); last console lines:\n{console_tail}")]
    VmmExitedDuringBoot {
        status: String,
        console_tail: String,
    },
    #[error("agent unhealthy: {0}")]
    AgentUnhealthy(String),
    #[error("agent: {0}")]
    Agent(String),
    #[error("cannot {op} a box in state {state}")]
    InvalidState { op: &'static str, state: BoxState },
    #[error(transparent)]
    Transition(#[from] TransitionError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl RuntimeError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        RuntimeError::Io {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;
