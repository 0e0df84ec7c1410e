//! What this host offers microbox (for `microbox info`): acceleration and why, backends and
//! their helper binaries, the guest kernel and agent that boots would use.

use std::path::PathBuf;

use crate::accel::{self, AccelDecision};
use crate::assets::{agent, kernel};
use crate::hypervisor::{self, Hypervisor};
use crate::process::find_program;

/// A snapshot of the host's capabilities. Each entry says what was found or why not.
#[derive(Debug, Clone)]
pub struct HostInfo {
    pub root: PathBuf,
    pub accel: Result<AccelDecision, String>,
    /// The backend `BackendChoice::Auto` would pick (after `MICROBOX_BACKEND`).
    pub backend: Result<String, String>,
    pub qemu: Option<PathBuf>,
    pub virtiofsd: Option<PathBuf>,
    pub vhost_device_vsock: Option<PathBuf>,
    /// Whether the libkrun backend could run here, or why not.
    pub krun: Result<(), String>,
    pub kernel: Result<kernel::Kernel, String>,
    pub agent: Result<PathBuf, String>,
}

/// Probes the host (no process is started).
pub fn host_info() -> HostInfo {
    let accel = accel::detect(None);
    let backend = match &accel {
        Ok(a) => hypervisor::select_backend(microbox_core::BackendChoice::Auto, a, true)
            .map(|b| b.name().to_string())
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.clone()),
    };
    let krun = match &accel {
        Ok(a) => hypervisor::krun::KrunBackend::new()
            .check(a.accel)
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.clone()),
    };
    HostInfo {
        root: crate::paths::default_root(),
        accel,
        backend,
        qemu: find_program("qemu-system-x86_64", "MICROBOX_QEMU"),
        virtiofsd: find_program("virtiofsd", "MICROBOX_VIRTIOFSD"),
        vhost_device_vsock: find_program("vhost-device-vsock", "MICROBOX_VHOST_VSOCK"),
        krun,
        kernel: kernel::find_kernel(None).map_err(|e| e.to_string()),
        agent: agent::find_agent().map_err(|e| e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn probes_this_host() {
        let i = super::host_info();
        // This machine class: TCG, QEMU installed, libkrun unusable with a reason.
        let a = i.accel.expect("decision");
        assert!(!a.reason.is_empty());
        assert!(i.qemu.is_some());
        if a.accel == crate::accel::Accel::Tcg {
            assert!(i.krun.unwrap_err().contains("KVM"));
            assert_eq!(i.backend.unwrap(), "qemu");
        }
    }
}
