//! QEMU `microvm` backend.
//!
//! Per box: one virtiofsd per shared directory (image root, writable layer, volumes), one
//! vhost-device-vsock (userspace virtio-vsock with the hybrid-vsock Unix socket the agent client
//! uses), and QEMU itself with:
//! memfd shared guest memory (vhost-user devices map it), the serial console in `console.log`,
//! a QMP socket, a virtio-balloon with free page reporting (compaction), `-nodefaults`, and the
//! seccomp sandbox (`-sandbox on,...`).

use std::path::PathBuf;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt;
use tokio::sync::{watch, Mutex};

use super::qmp::Qmp;
use super::{
    wait_for_socket, AgentEndpoint, Hypervisor, HypervisorError, NetStack, VmHandle, VmProcess,
    VmSpec,
};
use crate::accel::{host_tsc_khz, Accel};
use crate::process::{find_program, wait_asleep, ExitInfo, ManagedProcess, PASSED_FD};
use crate::vsock_gate::IoGate;

/// Guest context id of every box (each box has its own vsock device, so they never clash).
pub const GUEST_CID: u32 = 3;
const HELPER_START_TIMEOUT: Duration = Duration::from_secs(10);
const VSOCK_DEVICE: &str = "vhost-device-vsock";
/// How long a pause waits for the vsock device to go idle.
const VSOCK_SETTLE_LIMIT: Duration = Duration::from_secs(2);
/// The guest can write to its serial console without end; past this size the host's copy is
/// cut back to empty (QEMU appends, so it goes on writing at the new end).
const CONSOLE_LOG_MAX: u64 = 16 << 20;

/// The QEMU backend (stateless: everything per VM lives in [`QemuVm`]).
#[derive(Debug, Default)]
pub struct QemuBackend;

impl QemuBackend {
    pub fn new() -> Self {
        Self
    }

    fn qemu() -> Result<PathBuf, HypervisorError> {
        find_program("qemu-system-x86_64", "MICROBOX_QEMU").ok_or_else(|| {
            HypervisorError::QemuMissing(
                "qemu-system-x86_64 is not in PATH (install qemu-system-x86 or set MICROBOX_QEMU)"
                    .into(),
            )
        })
    }

    fn virtiofsd() -> Result<PathBuf, HypervisorError> {
        find_program("virtiofsd", "MICROBOX_VIRTIOFSD").ok_or_else(|| {
            HypervisorError::VirtiofsdMissing(
                "virtiofsd is not in PATH, ~/.cargo/bin or /usr/libexec (`cargo install virtiofsd` or set MICROBOX_VIRTIOFSD)"
                    .into(),
            )
        })
    }

    fn vsock_device() -> Result<PathBuf, HypervisorError> {
        find_program(VSOCK_DEVICE, "MICROBOX_VHOST_VSOCK").ok_or_else(|| {
            HypervisorError::VsockDeviceMissing(
                "vhost-device-vsock is not in PATH or ~/.cargo/bin (`cargo install vhost-device-vsock` or set MICROBOX_VHOST_VSOCK)"
                    .into(),
            )
        })
    }
}

/// Kernel command line for a microvm guest.
pub fn kernel_cmdline(accel: Accel, tsc_khz: Option<u64>, extra: &str) -> String {
    // panic=-1 + -no-reboot: a guest panic ends QEMU at once instead of hanging the box.
    let mut c = String::from(
        "console=ttyS0 panic=-1 reboot=t loglevel=4 i8042.noaux i8042.nomux i8042.nopnp",
    );
    if accel == Accel::Tcg {
        // TCG's emulated PIT makes TSC calibration fail now and then (boot hangs); the guest TSC
        // under TCG runs at the host rate, so tell the kernel.
        if let Some(khz) = tsc_khz {
            c.push_str(&format!(" tsc_early_khz={khz}"));
        }
    }
    if !extra.is_empty() {
        c.push(' ');
        c.push_str(extra);
    }
    c
}

/// QEMU arguments for `spec` (pure; unit-tested).
///
/// vsock is always vhost-device-vsock, also where kernel vhost-vsock (`/dev/vhost-vsock`)
/// exists: kernel vsock needs a host-wide unique CID per box and AF_VSOCK connections from the
/// host, while the userspace device gives each box a private Unix socket in its 0700 directory
/// and behaves the same on every host.
pub fn qemu_args(spec: &VmSpec, tsc_khz: Option<u64>) -> Vec<String> {
    let bp = &spec.box_paths;
    let mem = spec.memory_mib;
    let mut a: Vec<String> = Vec::new();
    let mut push = |parts: &[&str]| a.extend(parts.iter().map(|s| s.to_string()));
    push(&[
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ]);
    push(&["-machine", "microvm,memory-backend=mem,rtc=on"]);
    push(&[
        "-object",
        &format!("memory-backend-memfd,id=mem,size={mem}M,share=on"),
    ]);
    push(&["-m", &format!("{mem}M"), "-smp", &spec.vcpus.to_string()]);
    match spec.accel {
        Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
        // A bounded translation cache keeps the RSS of TCG boxes predictable: measured here,
        // 32 MiB gave 203 MiB per idle box instead of 228, and 203 instead of 294 after a busy
        // minute, for 5% more time on a CPU-heavy shell workload.
        Accel::Tcg => push(&["-accel", "tcg,tb-size=32"]),
    }
    push(&[
        "-kernel",
        &spec.kernel.to_string_lossy(),
        "-initrd",
        &spec.initrd.to_string_lossy(),
    ]);
    push(&[
        "-append",
        &kernel_cmdline(spec.accel, tsc_khz, &spec.extra_cmdline),
    ]);
    push(&[
        "-chardev",
        &format!(
            "file,id=console,path={},append=on",
            bp.console_log().display()
        ),
    ]);
    push(&["-serial", "chardev:console"]);
    push(&[
        "-qmp",
        &format!("unix:{},server=on,wait=off", bp.qmp_socket().display()),
    ]);
    for (i, s) in spec.shares.iter().enumerate() {
        push(&[
            "-chardev",
            &format!(
                "socket,id=fs{i},path={}",
                bp.virtiofs_socket(&s.tag).display()
            ),
        ]);
        push(&[
            "-device",
            &format!("vhost-user-fs-device,chardev=fs{i},tag={}", s.tag),
        ]);
    }
    push(&[
        "-chardev",
        &format!("socket,id=vsock,path={}", bp.vhost_vsock_socket().display()),
    ]);
    push(&["-device", "vhost-user-vsock-device,chardev=vsock"]);
    push(&["-device", "virtio-balloon-device,free-page-reporting=on"]);
    if let Some(net) = &spec.net {
        let nd = match net.stack {
            NetStack::Slirp => {
                let mut nd = String::from("user,id=net0");
                for (proto, ip, hp, gp) in &net.forwards {
                    nd.push_str(&format!(",hostfwd={proto}:{ip}:{hp}-:{gp}"));
                }
                nd
            }
            // passt's end of a socket pair, handed to QEMU as this descriptor.
            NetStack::Passt => format!("stream,id=net0,addr.type=fd,addr.str={PASSED_FD}"),
        };
        push(&["-netdev", &nd, "-device", "virtio-net-device,netdev=net0"]);
    }
    push(&[
        "-sandbox",
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
    ]);
    a
}

/// What QEMU cannot do with a spec, said before anything starts.
fn check_spec(spec: &VmSpec) -> Result<(), HypervisorError> {
    for (proto, ip, hp, gp) in spec.net.iter().flat_map(|n| n.forwards.iter()) {
        if ip.is_ipv6() {
            return Err(HypervisorError::InvalidSpec(format!(
                "published port [{ip}]:{hp}:{gp}/{proto}: the box's network is IPv4 only and \
                 QEMU 7.2's slirp cannot forward IPv6 host addresses (use 127.0.0.1 or 0.0.0.0)"
            )));
        }
    }
    Ok(())
}

/// Keeps the console log of a running VM below [`CONSOLE_LOG_MAX`] (a hostile guest flooding
/// its serial port must not fill the host's disk). Ends with QEMU.
async fn bound_console_log(path: PathBuf, mut exit: watch::Receiver<Option<ExitInfo>>) {
    loop {
        tokio::select! {
            _ = exit.wait_for(|e| e.is_some()) => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let too_big = std::fs::metadata(&path).is_ok_and(|m| m.len() > CONSOLE_LOG_MAX);
        if too_big {
            if let Ok(f) = std::fs::OpenOptions::new().write(true).open(&path) {
                let _ = f.set_len(0);
                let mut f = f;
                let _ = std::io::Write::write_all(
                    &mut f,
                    format!("[microbox: console log cut at {CONSOLE_LOG_MAX} bytes]\n").as_bytes(),
                );
                tracing::warn!(path = %path.display(), "console log over its limit; cut");
            }
        }
    }
}

impl Hypervisor for QemuBackend {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn check(&self, _accel: Accel) -> Result<(), HypervisorError> {
        Self::qemu()?;
        Self::virtiofsd()?;
        Self::vsock_device()?;
        Ok(())
    }

    fn launch<'a>(
        &'a self,
        spec: &'a VmSpec,
    ) -> BoxFuture<'a, Result<Box<dyn VmHandle>, HypervisorError>> {
        async move {
            check_spec(spec)?;
            let mut vm = QemuVm {
                helpers: Vec::new(),
                qemu: None,
                qmp: Mutex::new(None),
                cause: Default::default(),
                vsock_gate: IoGate::default(),
                spec: spec.clone(),
            };
            match vm.start().await {
                Ok(()) => Ok(Box::new(vm) as Box<dyn VmHandle>),
                Err(e) => {
                    // A failed start leaves no process behind.
                    vm.terminate_all(Duration::ZERO).await;
                    Err(e)
                }
            }
        }
        .boxed()
    }
}

/// One running QEMU VM and its helpers.
pub struct QemuVm {
    helpers: Vec<ManagedProcess>,
    qemu: Option<ManagedProcess>,
    qmp: Mutex<Option<Qmp>>,
    /// Set when microbox killed QEMU because a helper died.
    cause: super::ExitCause,
    /// Closed while the VM is paused (see [`crate::vsock_gate`]).
    vsock_gate: IoGate,
    spec: VmSpec,
}

impl QemuVm {
    async fn start(&mut self) -> Result<(), HypervisorError> {
        let qemu_bin = QemuBackend::qemu()?;
        let virtiofsd = QemuBackend::virtiofsd()?;
        let vsock_dev = QemuBackend::vsock_device()?;
        let bp = self.spec.box_paths.clone();

        // Start all helpers first, then wait for their sockets together (they start in parallel).
        let mut waits: Vec<(PathBuf, usize, PathBuf)> = Vec::new();
        for s in &self.spec.shares {
            let sock = bp.virtiofs_socket(&s.tag);
            let _ = std::fs::remove_file(&sock);
            let log = bp.dir.join(format!("virtiofsd-{}.log", s.tag));
            let mut args = vec![
                format!("--socket-path={}", sock.display()),
                format!("--shared-dir={}", s.host_dir.display()),
                // An immutable tree (the image rootfs) may be cached without revalidation:
                // lookups and opens then stay in the guest (exec p50 86 -> 18 ms measured
                // in the agent's smoke runs). Volumes can change on the host: auto.
                format!("--cache={}", if s.immutable { "always" } else { "auto" }),
                "--log-level=warn".to_string(),
            ];
            if s.read_only {
                args.push("--readonly".into());
            } else {
                // A persistent writable layer is an overlayfs upper: overlayfs keeps its
                // metadata (whiteouts, opaque dirs) in xattrs.
                args.push("--xattr".into());
            }
            // SAFETY: geteuid has no preconditions.
            if unsafe { libc::geteuid() } != 0 {
                // The namespace sandbox needs root (or a user namespace setup we do not do).
                args.push("--sandbox=none".into());
            }
            let p = ManagedProcess::spawn(
                &format!("virtiofsd-{}", s.tag),
                &virtiofsd,
                &args,
                Some(&log),
                Some(bp.pidfile(&format!("virtiofsd-{}", s.tag))),
            )
            .map_err(|e| HypervisorError::Spawn {
                what: format!("virtiofsd for {}", s.host_dir.display()),
                source: e,
            })?;
            self.helpers.push(p);
            waits.push((sock, self.helpers.len() - 1, log));
        }
        // vhost-device-vsock: the guest's vsock, and agent.sock's far end.
        {
            let sock = bp.vhost_vsock_socket();
            let _ = std::fs::remove_file(&sock);
            let _ = std::fs::remove_file(bp.vsock_uds());
            let log = bp.dir.join(format!("{VSOCK_DEVICE}.log"));
            let args = vec![
                "--vm".to_string(),
                format!(
                    "guest-cid={GUEST_CID},socket={},uds-path={}",
                    sock.display(),
                    bp.vsock_uds().display()
                ),
            ];
            let p = ManagedProcess::spawn(
                VSOCK_DEVICE,
                &vsock_dev,
                &args,
                Some(&log),
                Some(bp.pidfile(VSOCK_DEVICE)),
            )
            .map_err(|e| HypervisorError::Spawn {
                what: VSOCK_DEVICE.into(),
                source: e,
            })?;
            self.helpers.push(p);
            waits.push((sock, self.helpers.len() - 1, log));
        }
        let qemu_net_fd = match self.spec.net.as_ref() {
            Some(net) if net.stack == NetStack::Passt => {
                let (p, fd) = super::passt::spawn(net, &bp)?;
                self.helpers.push(p);
                Some(fd)
            }
            _ => None,
        };
        for (sock, idx, log) in &waits {
            wait_for_socket(sock, &self.helpers[*idx], log, HELPER_START_TIMEOUT).await?;
        }

        let _ = std::fs::remove_file(bp.qmp_socket());
        let tsc = if self.spec.accel == Accel::Tcg {
            host_tsc_khz()
        } else {
            None
        };
        let args = qemu_args(&self.spec, tsc);
        let log = bp.dir.join("qemu.log");
        tracing::debug!(args = ?args, "starting qemu");
        let q = ManagedProcess::spawn_with_fd(
            "qemu",
            &qemu_bin,
            &args,
            Some(&log),
            Some(bp.pidfile("qemu")),
            qemu_net_fd.as_ref(),
        )
        .map_err(|e| HypervisorError::Spawn {
            what: "qemu-system-x86_64".into(),
            source: e,
        })?;
        self.qemu = Some(q);
        let q = self.qemu.as_ref().expect("just set");
        tokio::spawn(bound_console_log(bp.console_log(), q.exit_watch()));
        self.cause = super::fail_stop(q, &self.helpers);
        let qmp_up = wait_for_socket(&bp.qmp_socket(), q, &log, HELPER_START_TIMEOUT).await;
        // passt binds the published ports first thing and exits when it cannot (a port taken
        // since microbox checked it); by now it has done so, so say why instead of booting on.
        // Checked before QEMU's own result: a passt that dies at once gets QEMU killed by the
        // fail-stop, and then passt's reason is the one worth reporting.
        if let Some(passt) = self.helper(super::passt::NAME) {
            super::passt::check_running(passt, &bp)?;
        }
        qmp_up?;
        Ok(())
    }

    async fn qmp_execute(
        &self,
        cmd: &str,
        args: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, HypervisorError> {
        let mut guard = self.qmp.lock().await;
        if guard.is_none() {
            *guard = Some(Qmp::connect(&self.spec.box_paths.qmp_socket()).await?);
        }
        let r = guard.as_mut().expect("connected").execute(cmd, args).await;
        if r.is_err() {
            // Reconnect next time (QEMU may have closed the connection).
            *guard = None;
        }
        r
    }

    fn helper(&self, name: &str) -> Option<&ManagedProcess> {
        self.helpers.iter().find(|h| h.name() == name)
    }

    /// Waits until the vsock device has handled everything it was woken for (host I/O, QEMU's
    /// vhost-user messages): every one of its threads asleep.
    async fn vsock_device_settled(&self, doing: &str) {
        let Some(dev) = self.helper(VSOCK_DEVICE) else {
            return;
        };
        if !wait_asleep(dev.pid(), VSOCK_SETTLE_LIMIT).await {
            tracing::warn!(
                "{VSOCK_DEVICE} was still busy after {VSOCK_SETTLE_LIMIT:?}; {doing} anyway"
            );
        }
    }

    async fn terminate_all(&self, grace: Duration) {
        if let Some(q) = &self.qemu {
            if q.is_running() && !grace.is_zero() {
                let _ = tokio::time::timeout(grace, self.qmp_execute("quit", None)).await;
                let _ = tokio::time::timeout(grace, q.wait()).await;
            }
            q.kill().await;
        }
        *self.qmp.lock().await = None;
        for h in &self.helpers {
            h.stop(Duration::from_millis(if grace.is_zero() { 0 } else { 500 }))
                .await;
        }
        for s in &self.spec.shares {
            let _ = std::fs::remove_file(self.spec.box_paths.virtiofs_socket(&s.tag));
        }
        let _ = std::fs::remove_file(self.spec.box_paths.vhost_vsock_socket());
        let _ = std::fs::remove_file(self.spec.box_paths.vsock_uds());
        let _ = std::fs::remove_file(self.spec.box_paths.qmp_socket());
    }

    /// Inflates the balloon over what the guest can spare (its available memory minus a
    /// reserve), so the host discards those pages even where free page reporting cannot (free
    /// memory scattered below the 2 MiB reporting granularity), then deflates it again: the guest
    /// keeps its full size and pages come back only when it touches them. Returns the MiB taken.
    async fn balloon_cycle(&self, guest_available: u64) -> Result<Option<u64>, HypervisorError> {
        const RESERVE: u64 = 48 << 20;
        let ram = (self.spec.memory_mib as u64) << 20;
        let take = guest_available.saturating_sub(RESERVE);
        if take < (16 << 20) {
            return Ok(None);
        }
        let target = ram - take.min(ram / 2 + ram / 4);
        self.qmp_execute("balloon", Some(serde_json::json!({ "value": target })))
            .await?;
        let start = tokio::time::Instant::now();
        let mut last = u64::MAX;
        let mut still = 0;
        while start.elapsed() < Duration::from_secs(8) {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let actual = self.qmp_execute("query-balloon", None).await?["actual"]
                .as_u64()
                .unwrap_or(ram);
            if actual <= target + (2 << 20) {
                break;
            }
            // The guest may refuse to give more; stop when it no longer moves.
            if actual >= last {
                still += 1;
                if still >= 4 {
                    break;
                }
            } else {
                still = 0;
            }
            last = actual;
        }
        let reached = self.qmp_execute("query-balloon", None).await?["actual"]
            .as_u64()
            .unwrap_or(ram);
        self.qmp_execute("balloon", Some(serde_json::json!({ "value": ram })))
            .await?;
        Ok(Some(ram.saturating_sub(reached) >> 20))
    }

    /// Waits until the RSS stops falling: free page reporting starts 2 s after pages are freed
    /// (the guest's reporting delay) and then works through the free lists in batches.
    async fn settle_rss(&self, min: Duration, max: Duration) -> u64 {
        let start = tokio::time::Instant::now();
        let mut last = self.rss_bytes();
        let mut stable = 0;
        while start.elapsed() < max {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let now = self.rss_bytes();
            if now + (1 << 20) >= last {
                stable += 1;
                if stable >= 4 && start.elapsed() >= min {
                    return now;
                }
            } else {
                stable = 0;
            }
            last = now;
        }
        last
    }
}

impl VmHandle for QemuVm {
    fn processes(&self) -> Vec<VmProcess> {
        super::running_processes(self.qemu.iter().chain(self.helpers.iter()))
    }

    fn exit_cause(&self) -> Option<String> {
        self.cause.get()
    }

    fn vmm_exit(&self) -> watch::Receiver<Option<ExitInfo>> {
        match &self.qemu {
            Some(q) => q.exit_watch(),
            None => {
                watch::channel(Some(ExitInfo {
                    code: None,
                    signal: None,
                }))
                .1
            }
        }
    }

    fn agent_endpoint(&self) -> AgentEndpoint {
        AgentEndpoint::HybridVsock {
            uds: self.spec.box_paths.vsock_uds(),
            port: self.spec.agent_port,
            gate: self.vsock_gate.clone(),
        }
    }

    fn ready_notification(&self) -> bool {
        // vhost-device-vsock routes guest-to-host connections to `<uds>_<port>`.
        true
    }

    fn powerdown(&self) -> BoxFuture<'_, Result<(), HypervisorError>> {
        async move { self.qmp_execute("system_powerdown", None).await.map(drop) }.boxed()
    }

    fn pause(&self) -> BoxFuture<'_, Result<(), HypervisorError>> {
        async move {
            // The vsock device must see no host-side event once its queues are stopped (see
            // crate::vsock_gate): hold our I/O, let it finish what it was woken for, then stop.
            self.vsock_gate.close();
            self.vsock_device_settled("pausing").await;
            let r = self.qmp_execute("stop", None).await.map(drop);
            if r.is_err() {
                self.vsock_gate.open();
            }
            r
        }
        .boxed()
    }

    fn resume(&self) -> BoxFuture<'_, Result<(), HypervisorError>> {
        async move {
            // `cont` returns once QEMU has sent the messages that restart the device's queues,
            // not once the device has handled them: wait for that before letting our I/O go.
            self.qmp_execute("cont", None).await?;
            self.vsock_device_settled("resuming").await;
            self.vsock_gate.open();
            Ok(())
        }
        .boxed()
    }

    fn vmm_status(&self) -> BoxFuture<'_, Result<String, HypervisorError>> {
        async move {
            let r = self.qmp_execute("query-status", None).await?;
            r["status"]
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| HypervisorError::Qmp(format!("query-status answered {r}")))
        }
        .boxed()
    }

    fn reclaim_memory(
        &self,
        guest_available_bytes: Option<u64>,
    ) -> BoxFuture<'_, Result<String, HypervisorError>> {
        async move {
            let mut method = String::from("virtio-balloon free page reporting");
            if let Some(avail) = guest_available_bytes {
                match self.balloon_cycle(avail).await {
                    Ok(Some(mib)) => {
                        method.push_str(&format!(" + balloon inflate/deflate of {mib} MiB"))
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!(error = %e, "balloon inflate/deflate failed"),
                }
            }
            // Free page reporting hands freed guest pages back to QEMU, which punches them out of
            // the memfd; wait until the RSS stops falling.
            let _ = self
                .settle_rss(Duration::from_secs(3), Duration::from_secs(15))
                .await;
            Ok(method)
        }
        .boxed()
    }

    fn terminate(&self, grace: Duration) -> BoxFuture<'_, ()> {
        self.terminate_all(grace).boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::{Share, UserNet};
    use crate::paths::BoxPaths;

    fn spec() -> VmSpec {
        VmSpec {
            box_paths: BoxPaths::new("/r/boxes/b1".into()),
            kernel: "/boot/vmlinuz".into(),
            initrd: "/r/boxes/b1/initrd.cpio".into(),
            extra_cmdline: "microbox.x=1".into(),
            vcpus: 2,
            memory_mib: 384,
            accel: Accel::Tcg,
            shares: vec![Share {
                tag: "rootfs".into(),
                host_dir: "/img/root".into(),
                read_only: true,
                immutable: false,
            }],
            net: Some(UserNet {
                forwards: vec![("tcp".into(), "127.0.0.1".parse().unwrap(), 8080, 80)],
                stack: NetStack::Slirp,
            }),
            agent_port: 4088,
        }
    }

    #[test]
    fn args_have_limits_sandbox_and_devices() {
        let a = qemu_args(&spec(), Some(2_500_000)).join(" ");
        assert!(a.contains("-m 384M -smp 2"), "{a}");
        assert!(a.contains("memory-backend-memfd,id=mem,size=384M,share=on"));
        assert!(a.contains(
            "-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
        ));
        assert!(a.contains("vhost-user-fs-device,chardev=fs0,tag=rootfs"));
        assert!(a.contains("path=/r/boxes/b1/fs-rootfs.sock"));
        assert!(a.contains("vhost-user-vsock-device,chardev=vsock"));
        assert!(a.contains("tsc_early_khz=2500000"));
        assert!(a.contains("microbox.x=1"));
        assert!(a.contains("hostfwd=tcp:127.0.0.1:8080-:80"));
        let mut v6 = spec();
        v6.net = Some(UserNet {
            forwards: vec![("tcp".into(), "::1".parse().unwrap(), 8080, 80)],
            stack: NetStack::Slirp,
        });
        // passt: the socket pair's end as the netdev, ports as passt arguments.
        let mut p = spec();
        p.net.as_mut().unwrap().stack = NetStack::Passt;
        let a = qemu_args(&p, None).join(" ");
        assert!(
            a.contains("-netdev stream,id=net0,addr.type=fd,addr.str=3"),
            "{a}"
        );
        assert!(!a.contains("hostfwd"));
        let e = check_spec(&v6).unwrap_err().to_string();
        assert!(e.contains("::1") && e.contains("IPv4"), "{e}");
        assert!(check_spec(&spec()).is_ok());
        assert!(a.contains("-nodefaults"));
        let k = qemu_args(&spec(), None).join(" ");
        assert!(!k.contains("tsc_early_khz"));
    }

    #[test]
    fn kvm_has_no_tsc_hint() {
        assert!(!kernel_cmdline(Accel::Kvm, Some(1), "").contains("tsc_early_khz"));
    }
}
