//! The hypervisor backend trait and backend selection.
//!
//! The rest of the runtime talks to a VM only through [`Hypervisor`] and [`VmHandle`]; QEMU and
//! libkrun are named only in their modules.

pub mod krun;
pub mod passt;
pub mod qemu;
pub mod qmp;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::watch;

use crate::accel::{Accel, AccelDecision};
use crate::paths::BoxPaths;
use crate::process::{ExitInfo, ManagedProcess};

/// Why a backend could not be used or a VM could not be controlled.
#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    #[error("QEMU not found: {0}")]
    QemuMissing(String),
    #[error("virtiofsd not found: {0}")]
    VirtiofsdMissing(String),
    #[error("vhost-device-vsock not found: {0}")]
    VsockDeviceMissing(String),
    #[error("libkrun is not usable: {0}")]
    KrunUnavailable(String),
    #[error("libkrun call {call} failed with error {code}")]
    KrunCall { call: &'static str, code: i32 },
    #[error("failed to start {what}: {source}")]
    Spawn {
        what: String,
        source: std::io::Error,
    },
    #[error("{what} did not come up: {detail}")]
    HelperFailed { what: String, detail: String },
    #[error("QMP: {0}")]
    Qmp(String),
    #[error("invalid VM spec: {0}")]
    InvalidSpec(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A host directory exported to the guest over virtio-fs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    pub tag: String,
    pub host_dir: PathBuf,
    pub read_only: bool,
    /// Nothing changes the directory while the VM runs (the shared image rootfs): the guest
    /// may cache it fully. Volumes are not immutable: the host may change them.
    pub immutable: bool,
}

/// Which user-mode network stack backs a box's NIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NetStack {
    /// QEMU's built-in slirp.
    #[default]
    Slirp,
    /// passt, a separate sandboxed process, connected to QEMU over a socket pair.
    Passt,
}

/// A user-mode NIC with forwarded host ports. The guest side is the same for every stack:
/// 10.0.2.15/24, gateway 10.0.2.2 (reaches the host's loopback), DNS 10.0.2.3.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UserNet {
    /// (protocol "tcp"/"udp", host ip, host port, guest port)
    pub forwards: Vec<(String, std::net::IpAddr, u16, u16)>,
    pub stack: NetStack,
}

/// Everything a backend needs to start one VM.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub box_paths: BoxPaths,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// Kernel arguments beyond the backend's own console/timer arguments.
    pub extra_cmdline: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub accel: Accel,
    pub shares: Vec<Share>,
    pub net: Option<UserNet>,
    /// Guest vsock port of the agent.
    pub agent_port: u32,
}

/// How the host reaches the agent's vsock port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentEndpoint {
    /// Firecracker-style hybrid vsock: connect to `uds`, send `CONNECT <port>\n`, read `OK ..`.
    /// All host-side I/O on `uds` passes `gate`, which the backend closes while the VM is paused.
    HybridVsock {
        uds: PathBuf,
        port: u32,
        gate: crate::vsock_gate::IoGate,
    },
    /// A plain Unix socket that is already the guest port (libkrun's port mapping).
    Unix(PathBuf),
}

/// A process belonging to a running VM (for hygiene checks and RSS accounting).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmProcess {
    pub name: String,
    pub pid: u32,
}

/// A VM started by a backend.
pub trait VmHandle: Send + Sync {
    /// The VMM and its helpers, VMM first.
    fn processes(&self) -> Vec<VmProcess>;
    /// Resolves to the VMM's exit status when it ends (for any reason).
    fn vmm_exit(&self) -> watch::Receiver<Option<ExitInfo>>;
    fn agent_endpoint(&self) -> AgentEndpoint;
    /// Whether the guest's connection to host vsock port
    /// [`microbox_agent_proto::AGENT_READY_VSOCK_PORT`] reaches
    /// [`BoxPaths::guest_to_host_socket`]. When it does, the runtime waits for the agent's ready
    /// notification before it connects.
    fn ready_notification(&self) -> bool {
        false
    }
    /// Why the VMM was stopped by microbox itself, when it was (see [`fail_stop`]).
    fn exit_cause(&self) -> Option<String> {
        None
    }
    /// Asks the guest to power off (ACPI power button).
    fn powerdown(&self) -> BoxFuture<'_, Result<(), HypervisorError>>;
    fn pause(&self) -> BoxFuture<'_, Result<(), HypervisorError>>;
    fn resume(&self) -> BoxFuture<'_, Result<(), HypervisorError>>;
    /// The VMM's own view of the VM: "running", "paused", ... (QMP `query-status`).
    fn vmm_status(&self) -> BoxFuture<'_, Result<String, HypervisorError>>;
    /// Lets the host take back guest memory the guest has freed (balloon free page reporting
    /// and an inflate/deflate cycle sized by `guest_available_bytes` when known). Returns a
    /// description of what was done.
    fn reclaim_memory(
        &self,
        guest_available_bytes: Option<u64>,
    ) -> BoxFuture<'_, Result<String, HypervisorError>>;
    /// Ends the VMM (quit, then SIGKILL after `grace`) and every helper; waits for all of them.
    fn terminate(&self, grace: Duration) -> BoxFuture<'_, ()>;
    /// Summed resident memory of the VMM and helpers.
    fn rss_bytes(&self) -> u64 {
        self.processes()
            .iter()
            .filter_map(|p| crate::process::rss_bytes(p.pid))
            .sum()
    }
}

/// A hypervisor backend.
pub trait Hypervisor: Send + Sync {
    fn name(&self) -> &'static str;
    /// Checks that the backend can run here (binaries, libraries, acceleration) before any
    /// process is started.
    fn check(&self, accel: Accel) -> Result<(), HypervisorError>;
    fn launch<'a>(
        &'a self,
        spec: &'a VmSpec,
    ) -> BoxFuture<'a, Result<Box<dyn VmHandle>, HypervisorError>>;
}

/// Which backend to use: `MICROBOX_BACKEND` beats the config; auto picks libkrun only when it
/// is installed, KVM is usable (it has no software emulation) and, for a box with a network,
/// passt is installed (libkrun has no built-in stack), QEMU otherwise.
pub fn select_backend(
    choice: microbox_core::BackendChoice,
    accel: &AccelDecision,
    needs_user_net: bool,
) -> Result<Box<dyn Hypervisor>, HypervisorError> {
    use microbox_core::BackendChoice;
    let env = std::env::var("MICROBOX_BACKEND")
        .ok()
        .filter(|s| !s.is_empty());
    let choice = match env.as_deref() {
        Some("qemu") => BackendChoice::Qemu,
        Some("krun") | Some("libkrun") => BackendChoice::Krun,
        Some("auto") | None => choice,
        Some(other) => {
            return Err(HypervisorError::InvalidSpec(format!(
                "MICROBOX_BACKEND={other:?}: expected qemu, krun or auto"
            )))
        }
    };
    match choice {
        BackendChoice::Qemu => Ok(Box::new(qemu::QemuBackend::new())),
        BackendChoice::Krun => Ok(Box::new(krun::KrunBackend::new())),
        BackendChoice::Auto => {
            let krun = krun::KrunBackend::new();
            // libkrun's network is passt: without it, a networked box stays on QEMU (slirp).
            let net_ok = !needs_user_net || passt::program().is_ok();
            if net_ok && accel.accel == Accel::Kvm && krun.check(Accel::Kvm).is_ok() {
                Ok(Box::new(krun))
            } else {
                Ok(Box::new(qemu::QemuBackend::new()))
            }
        }
    }
}

/// The running ones of a VM's processes, VMM first (for [`VmHandle::processes`]).
pub(crate) fn running_processes<'a>(
    all: impl Iterator<Item = &'a ManagedProcess>,
) -> Vec<VmProcess> {
    all.filter(|p| p.is_running())
        .map(|p| VmProcess {
            name: p.name().to_string(),
            pid: p.pid(),
        })
        .collect()
}

/// What a box loses when a helper ends.
fn helper_role(name: &str) -> &'static str {
    if name.starts_with("virtiofsd") {
        "a shared filesystem"
    } else if name == passt::NAME {
        "its network"
    } else if name.contains("vsock") {
        "the channel to its agent"
    } else {
        "a device"
    }
}

/// Why microbox itself ended a VMM, once it has (shared with the [`fail_stop`] task).
#[derive(Debug, Clone, Default)]
pub(crate) struct ExitCause(Arc<std::sync::Mutex<Option<String>>>);

impl ExitCause {
    pub(crate) fn get(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set(&self, why: String) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
    }
}

/// Fail-stop: when a helper (virtiofsd, vhost-device-vsock, passt) ends while the VMM runs,
/// the guest has lost a filesystem, its agent channel or its network and would linger half
/// broken, so the VMM is killed and the box ends Stopped with the reason. Returns where the
/// reason is kept (read by [`VmHandle::exit_cause`]). A VMM that ends first ends the watch.
pub(crate) fn fail_stop(vmm: &ManagedProcess, helpers: &[ManagedProcess]) -> ExitCause {
    let cause = ExitCause::default();
    if helpers.is_empty() {
        return cause;
    }
    let mut vmm_exit = vmm.exit_watch();
    let vmm_signal = vmm.signaller();
    let helper_exits: Vec<_> = helpers
        .iter()
        .map(|h| {
            let (name, mut rx) = (h.name().to_string(), h.exit_watch());
            Box::pin(async move {
                let info = crate::process::wait_exit(&mut rx).await;
                (name, info)
            })
        })
        .collect();
    let out = cause.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = crate::process::wait_exit(&mut vmm_exit) => {}
            ((name, info), _, _) = futures::future::select_all(helper_exits) => {
                if vmm_exit.borrow().is_none() {
                    let why = format!(
                        "{name} exited ({info}), so the box lost {}; microbox stopped the VM",
                        helper_role(&name)
                    );
                    tracing::warn!(%why, "helper died");
                    out.set(why);
                    vmm_signal.signal(libc::SIGKILL);
                }
            }
        }
    });
    cause
}

/// Waits until `path` exists (a helper's listening socket) or the helper exits.
pub(crate) async fn wait_for_socket(
    path: &std::path::Path,
    helper: &crate::process::ManagedProcess,
    log: &std::path::Path,
    timeout: Duration,
) -> Result<(), HypervisorError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if path.exists() {
            return Ok(());
        }
        if let Some(info) = helper.exit_info() {
            return Err(HypervisorError::HelperFailed {
                what: helper.name().to_string(),
                detail: format!(
                    "it exited ({info}); log {}: {}",
                    log.display(),
                    tail_of(log, 5)
                ),
            });
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(HypervisorError::HelperFailed {
                what: helper.name().to_string(),
                detail: format!("{} did not appear within {timeout:?}", path.display()),
            });
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The last `n` lines of a text file (for error messages).
pub fn tail_of(path: &std::path::Path, n: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sleeper(name: &str, secs: &str) -> ManagedProcess {
        ManagedProcess::spawn(
            name,
            std::path::Path::new("/bin/sleep"),
            &[secs.to_string()],
            None,
            None,
        )
        .unwrap()
    }

    #[tokio::test]
    async fn a_dying_helper_stops_the_vmm_with_the_reason() {
        let vmm = sleeper("qemu", "30");
        let helpers = vec![sleeper("virtiofsd-rootfs", "30"), sleeper("passt", "0.1")];
        let cause = fail_stop(&vmm, &helpers);
        let info = tokio::time::timeout(Duration::from_secs(10), vmm.wait())
            .await
            .expect("the VMM is killed when passt ends");
        assert_eq!(info.signal, Some(libc::SIGKILL));
        let why = cause.get().unwrap();
        assert!(why.contains("passt exited (exit code 0)"), "{why}");
        assert!(why.contains("its network"), "{why}");
        helpers[0].kill().await;
    }

    #[tokio::test]
    async fn a_vmm_that_ends_first_leaves_its_helpers_alone() {
        let vmm = sleeper("qemu", "0.1");
        let helpers = vec![sleeper("passt", "30")];
        let cause = fail_stop(&vmm, &helpers);
        vmm.wait().await;
        helpers[0].kill().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(cause.get().is_none());
    }
}
