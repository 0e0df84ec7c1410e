//! microbox-runtime: turns a `BoxConfig` into a running microVM and talks to its agent.
//!
//! - [`VmManager`]: the embeddable lifecycle API (boot, exec, compact, stop, destroy).
//! - [`hypervisor`]: the backend trait with the QEMU `microvm` and libkrun backends.
//! - [`assets`]: guest kernel discovery and the initramfs microbox assembles.
//! - [`accel`]: KVM/TCG decision. [`paths`]: on-disk layout. [`process`]: helper processes.

pub mod accel;
pub mod agent_client;
mod agent_link;
pub mod assets;
pub mod error;
pub mod eventlog;
pub mod hypervisor;
mod image_source;
pub mod info;
mod manager;
pub mod metrics;
pub mod paths;
pub mod process;
pub mod vsock_gate;

pub use accel::{Accel, AccelDecision};
pub use error::RuntimeError;
pub use hypervisor::krun::shim_main_if_requested;
pub use info::{host_info, HostInfo};
pub use manager::{
    BootReport, BoxStateFile, CompactReport, ExecGuard, ExecRequest, ExecResult, ResolvedExec,
    VmManager,
};
