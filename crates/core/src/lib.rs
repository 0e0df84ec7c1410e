//! microbox-core: the vocabulary every other crate shares. Box configuration and its validation,
//! the box state machine, lifecycle events and their fan-out, and box identifiers.
//!
//! This crate does no I/O: it only describes boxes. Running them is `microbox-runtime`'s job.

pub mod config;
pub mod event;
pub mod id;
pub mod state;

pub use config::{
    AccelChoice, BackendChoice, BoxConfig, ConfigError, NetworkMode, PortMapping, Protocol,
    VolumeMount,
};
pub use event::{BootPhase, BoxEvent, Delivered, EventEmitter, EventRecord, Subscription};
pub use id::{BoxId, IdError};
pub use state::{BoxState, TransitionError};
