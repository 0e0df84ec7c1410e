//! libkrun backend.
//!
//! libkrun is loaded at run time with `dlopen` (libloading) rather than linked:
//! microbox then has no build-time dependency on libkrun (which is rarely packaged and whose
//! crate builds a large C/Rust tree), one microbox binary works on every host, and users who
//! install `libkrun.so` get the backend without rebuilding. `MICROBOX_LIBKRUN` names the library
//! file; otherwise `libkrun.so.1` / `libkrun.so` are looked up by the dynamic loader.
//!
//! libkrun's `krun_start_enter` takes over the calling process (it becomes the VMM and exits with
//! the guest), so the VM runs in a child: the embedding executable is re-run with
//! `MICROBOX_KRUN_SHIM=<config.json>` and must call [`shim_main_if_requested`] first thing in
//! `main`. libkrun has no software emulation: it needs a usable KVM, which these CI machines lack,
//! so here only the configuration path and the errors are exercised.

use std::ffi::{c_char, CString};
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{AgentEndpoint, Hypervisor, HypervisorError, VmHandle, VmProcess, VmSpec};
use crate::accel::{Accel, HostVirt};
use crate::process::{ExitInfo, ManagedProcess};

/// Environment variable that turns the current executable into the libkrun VMM shim.
pub const SHIM_ENV: &str = "MICROBOX_KRUN_SHIM";
/// libkrun's kernel format constant for an ELF `vmlinux` (x86-64 libkrun cannot load bzImage).
pub const KRUN_KERNEL_FORMAT_ELF: u32 = 1;

/// Everything the shim passes to libkrun (serialized to the box directory).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KrunConfig {
    pub vcpus: u8,
    pub ram_mib: u32,
    pub kernel: PathBuf,
    pub kernel_format: u32,
    pub initramfs: PathBuf,
    pub cmdline: String,
    /// (tag, host dir) pairs; libkrun has no read-only flag, the guest mounts them read-only.
    pub virtiofs: Vec<(String, PathBuf)>,
    /// Guest vsock port -> host Unix socket path.
    /// (guest port, host socket, listen): `listen` = the guest listens and libkrun accepts host
    /// connections on the socket (the agent's port); otherwise the guest connects out and
    /// libkrun connects to a host listener there (the ready notification).
    pub vsock_ports: Vec<(u32, PathBuf, bool)>,
    /// The descriptor (inherited by the shim) of passt's socket: libkrun has no built-in
    /// user-mode stack, so every box with a network uses passt here.
    #[serde(default)]
    pub passt_fd: Option<i32>,
}

impl KrunConfig {
    pub fn from_spec(spec: &VmSpec) -> Result<Self, HypervisorError> {
        let vcpus = u8::try_from(spec.vcpus).map_err(|_| {
            HypervisorError::InvalidSpec(format!(
                "libkrun supports at most 255 vCPUs, got {}",
                spec.vcpus
            ))
        })?;
        if !crate::assets::kernel::is_elf(&spec.kernel) {
            return Err(HypervisorError::InvalidSpec(format!(
                "libkrun loads only an uncompressed ELF vmlinux, and {} is not one (set \
                 MICROBOX_KERNEL to a vmlinux of the same version as the modules)",
                spec.kernel.display()
            )));
        }
        Ok(Self {
            vcpus,
            ram_mib: spec.memory_mib,
            kernel: spec.kernel.clone(),
            kernel_format: KRUN_KERNEL_FORMAT_ELF,
            initramfs: spec.initrd.clone(),
            cmdline: format!("console=hvc0 panic=-1 {}", spec.extra_cmdline)
                .trim()
                .to_string(),
            virtiofs: spec
                .shares
                .iter()
                .map(|s| (s.tag.clone(), s.host_dir.clone()))
                .collect(),
            vsock_ports: vec![
                (spec.agent_port, krun_agent_socket(spec), true),
                (
                    microbox_agent_proto::AGENT_READY_VSOCK_PORT,
                    spec.box_paths
                        .guest_to_host_socket(microbox_agent_proto::AGENT_READY_VSOCK_PORT),
                    false,
                ),
            ],
            // TSI (libkrun's socket impersonation) needs libkrunfw's patched guest kernel;
            // passt works with the stock kernel and the agent's static eth0 setup.
            passt_fd: spec.net.as_ref().map(|_| crate::process::PASSED_FD),
        })
    }
}

/// libkrun itself listens on the box's `agent.sock` for the agent's port, so the plain
/// socket tools use is the one the runtime uses: no bridge needed.
fn krun_agent_socket(spec: &VmSpec) -> PathBuf {
    spec.box_paths.agent_socket()
}

type FnCreate = unsafe extern "C" fn() -> i32;
type FnVmConfig = unsafe extern "C" fn(u32, u8, u32) -> i32;
type FnAddVirtiofs = unsafe extern "C" fn(u32, *const c_char, *const c_char) -> i32;
type FnAddVsockPort2 = unsafe extern "C" fn(u32, u32, *const c_char, bool) -> i32;
type FnSetKernel =
    unsafe extern "C" fn(u32, *const c_char, u32, *const c_char, *const c_char) -> i32;
type FnStartEnter = unsafe extern "C" fn(u32) -> i32;
type FnSetPasstFd = unsafe extern "C" fn(u32, i32) -> i32;

/// The loaded library.
pub struct Libkrun {
    lib: libloading::Library,
}

impl Libkrun {
    /// Loads libkrun and checks that every symbol microbox needs is present.
    pub fn load() -> Result<Self, HypervisorError> {
        let candidates: Vec<String> = match std::env::var("MICROBOX_LIBKRUN")
            .ok()
            .filter(|s| !s.is_empty())
        {
            Some(p) => vec![p],
            None => vec!["libkrun.so.1".into(), "libkrun.so".into()],
        };
        let mut errors = Vec::new();
        for c in &candidates {
            // SAFETY: loading a shared library runs its initializers; libkrun's are plain Rust/C
            // static setup. The handle is kept for as long as symbols are used.
            match unsafe { libloading::Library::new(c) } {
                Ok(lib) => {
                    let l = Libkrun { lib };
                    for sym in [
                        "krun_create_ctx",
                        "krun_set_vm_config",
                        "krun_add_virtiofs",
                        "krun_add_vsock_port2",
                        "krun_set_kernel",
                        "krun_start_enter",
                    ] {
                        // SAFETY: only checks presence; the pointer is not called here.
                        unsafe { l.lib.get::<*const ()>(sym.as_bytes()) }.map_err(|e| {
                            HypervisorError::KrunUnavailable(format!(
                                "{c} lacks {sym} (libkrun too old?): {e}"
                            ))
                        })?;
                    }
                    return Ok(l);
                }
                Err(e) => errors.push(format!("{c}: {e}")),
            }
        }
        Err(HypervisorError::KrunUnavailable(format!(
            "libkrun shared library not found ({}); install libkrun or set MICROBOX_LIBKRUN",
            errors.join("; ")
        )))
    }

    /// Creates a context and applies `cfg`; returns the context id.
    pub fn configure(&self, cfg: &KrunConfig) -> Result<u32, HypervisorError> {
        let cstr = |p: &Path| {
            CString::new(p.as_os_str().as_encoded_bytes()).map_err(|_| {
                HypervisorError::InvalidSpec(format!("{} contains a NUL byte", p.display()))
            })
        };
        let check = |call: &'static str, code: i32| {
            if code < 0 {
                Err(HypervisorError::KrunCall { call, code })
            } else {
                Ok(code)
            }
        };
        // SAFETY: the symbols have the C signatures of libkrun.h; all strings are valid
        // NUL-terminated CStrings that outlive each call (libkrun copies them).
        unsafe {
            let create: libloading::Symbol<FnCreate> = self.sym("krun_create_ctx")?;
            let ctx = check("krun_create_ctx", create())? as u32;
            let vm: libloading::Symbol<FnVmConfig> = self.sym("krun_set_vm_config")?;
            check("krun_set_vm_config", vm(ctx, cfg.vcpus, cfg.ram_mib))?;
            let kernel = cstr(&cfg.kernel)?;
            let initrd = cstr(&cfg.initramfs)?;
            let cmdline = CString::new(cfg.cmdline.as_str()).map_err(|_| {
                HypervisorError::InvalidSpec("kernel command line contains a NUL byte".into())
            })?;
            let set_kernel: libloading::Symbol<FnSetKernel> = self.sym("krun_set_kernel")?;
            check(
                "krun_set_kernel",
                set_kernel(
                    ctx,
                    kernel.as_ptr(),
                    cfg.kernel_format,
                    initrd.as_ptr(),
                    cmdline.as_ptr(),
                ),
            )?;
            let add_fs: libloading::Symbol<FnAddVirtiofs> = self.sym("krun_add_virtiofs")?;
            for (tag, dir) in &cfg.virtiofs {
                let t = CString::new(tag.as_str()).map_err(|_| {
                    HypervisorError::InvalidSpec(format!("virtio-fs tag {tag:?} contains NUL"))
                })?;
                let d = cstr(dir)?;
                check("krun_add_virtiofs", add_fs(ctx, t.as_ptr(), d.as_ptr()))?;
            }
            let add_port: libloading::Symbol<FnAddVsockPort2> = self.sym("krun_add_vsock_port2")?;
            for (port, path, listen) in &cfg.vsock_ports {
                let p = cstr(path)?;
                check(
                    "krun_add_vsock_port2",
                    add_port(ctx, *port, p.as_ptr(), *listen),
                )?;
            }
            if let Some(fd) = cfg.passt_fd {
                // Looked up only when needed: boxes without a network work on older libkrun.
                let set_passt: libloading::Symbol<FnSetPasstFd> = self.sym("krun_set_passt_fd")?;
                check("krun_set_passt_fd", set_passt(ctx, fd))?;
            }
            Ok(ctx)
        }
    }

    /// Starts the VM in this process; returns only on failure.
    pub fn start_enter(&self, ctx: u32) -> HypervisorError {
        // SAFETY: ctx was returned by krun_create_ctx and configured; on success this call never
        // returns (libkrun exits the process when the guest stops).
        let code = unsafe {
            match self.sym::<FnStartEnter>("krun_start_enter") {
                Ok(f) => f(ctx),
                Err(e) => return e,
            }
        };
        HypervisorError::KrunCall {
            call: "krun_start_enter",
            code,
        }
    }

    /// # Safety
    /// `T` must be the symbol's real C function type.
    unsafe fn sym<T>(&self, name: &str) -> Result<libloading::Symbol<'_, T>, HypervisorError> {
        // SAFETY: forwarded to the caller (matching type).
        unsafe { self.lib.get(name.as_bytes()) }
            .map_err(|e| HypervisorError::KrunUnavailable(format!("symbol {name}: {e}")))
    }
}

/// Call first thing in `main` of any binary that embeds microbox: when the runtime re-executes
/// it as the libkrun VMM shim, this runs the VM and never returns.
pub fn shim_main_if_requested() {
    let Some(path) = std::env::var_os(SHIM_ENV) else {
        return;
    };
    let code = match run_shim(Path::new(&path)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("microbox libkrun shim: {e}");
            1
        }
    };
    std::process::exit(code);
}

fn run_shim(path: &Path) -> Result<(), HypervisorError> {
    let text = std::fs::read_to_string(path)?;
    let cfg: KrunConfig = serde_json::from_str(&text)
        .map_err(|e| HypervisorError::InvalidSpec(format!("{}: {e}", path.display())))?;
    let lib = Libkrun::load()?;
    let ctx = lib.configure(&cfg)?;
    Err(lib.start_enter(ctx))
}

/// The libkrun backend.
#[derive(Debug, Default)]
pub struct KrunBackend;

impl KrunBackend {
    pub fn new() -> Self {
        Self
    }
}

impl Hypervisor for KrunBackend {
    fn name(&self) -> &'static str {
        "krun"
    }

    fn check(&self, accel: Accel) -> Result<(), HypervisorError> {
        check_with(accel, &HostVirt::probe(), Libkrun::load().map(drop))
    }

    fn launch<'a>(
        &'a self,
        spec: &'a VmSpec,
    ) -> BoxFuture<'a, Result<Box<dyn VmHandle>, HypervisorError>> {
        async move {
            self.check(spec.accel)?;
            let cfg = KrunConfig::from_spec(spec)?;
            let cfg_path = spec.box_paths.dir.join("krun.json");
            std::fs::write(&cfg_path, serde_json::to_vec(&cfg).expect("serializable"))?;
            let exe = std::env::current_exe()?;
            let (helpers, passt_fd) = match &spec.net {
                Some(net) => {
                    let (p, fd) = super::passt::spawn(net, &spec.box_paths)?;
                    (vec![p], Some(fd))
                }
                None => (Vec::new(), None),
            };
            // The child inherits SHIM_ENV through a wrapper: ManagedProcess takes no env, so use
            // /usr/bin/env to set it without touching our own environment.
            let args = vec![
                format!("{SHIM_ENV}={}", cfg_path.display()),
                exe.to_string_lossy().into_owned(),
            ];
            let p = match ManagedProcess::spawn_with_fd(
                "krun",
                Path::new("/usr/bin/env"),
                &args,
                Some(&spec.box_paths.console_log()),
                Some(spec.box_paths.pidfile("krun")),
                passt_fd.as_ref(),
            ) {
                Ok(p) => p,
                Err(e) => {
                    for h in &helpers {
                        h.kill().await;
                    }
                    return Err(HypervisorError::Spawn {
                        what: "libkrun shim".into(),
                        source: e,
                    });
                }
            };
            let cause = super::fail_stop(&p, &helpers);
            Ok(Box::new(KrunVm {
                vmm: p,
                helpers,
                cause,
                endpoint: krun_agent_socket(spec),
            }) as Box<dyn VmHandle>)
        }
        .boxed()
    }
}

/// The decision logic of `check` (separate so the errors are unit-testable).
pub fn check_with(
    accel: Accel,
    host: &HostVirt,
    lib: Result<(), HypervisorError>,
) -> Result<(), HypervisorError> {
    if accel != Accel::Kvm {
        return Err(HypervisorError::KrunUnavailable(
            "libkrun needs KVM and this box runs under TCG (software emulation); use the qemu backend".into(),
        ));
    }
    host.kvm_usable().map_err(|why| {
        HypervisorError::KrunUnavailable(format!("libkrun needs a usable KVM: {why}"))
    })?;
    lib
}

struct KrunVm {
    vmm: ManagedProcess,
    /// passt, when the box has a network.
    helpers: Vec<ManagedProcess>,
    cause: super::ExitCause,
    endpoint: PathBuf,
}

impl VmHandle for KrunVm {
    fn processes(&self) -> Vec<VmProcess> {
        super::running_processes(std::iter::once(&self.vmm).chain(self.helpers.iter()))
    }
    fn exit_cause(&self) -> Option<String> {
        self.cause.get()
    }
    fn vmm_exit(&self) -> watch::Receiver<Option<ExitInfo>> {
        self.vmm.exit_watch()
    }
    fn agent_endpoint(&self) -> AgentEndpoint {
        AgentEndpoint::Unix(self.endpoint.clone())
    }
    fn ready_notification(&self) -> bool {
        true
    }
    fn powerdown(&self) -> BoxFuture<'_, Result<(), HypervisorError>> {
        // libkrun has no control socket: SIGTERM makes it stop the guest.
        async move {
            self.vmm.signal(libc::SIGTERM);
            Ok(())
        }
        .boxed()
    }
    fn pause(&self) -> BoxFuture<'_, Result<(), HypervisorError>> {
        async move {
            Err(HypervisorError::InvalidSpec(
                "pause is not supported by the libkrun backend".into(),
            ))
        }
        .boxed()
    }
    fn vmm_status(&self) -> BoxFuture<'_, Result<String, HypervisorError>> {
        // libkrun has no control channel; the VMM process either runs the VM or has ended.
        async move {
            Ok(if self.vmm.is_running() {
                "running"
            } else {
                "ended"
            }
            .to_string())
        }
        .boxed()
    }
    fn resume(&self) -> BoxFuture<'_, Result<(), HypervisorError>> {
        async move {
            Err(HypervisorError::InvalidSpec(
                "resume is not supported by the libkrun backend".into(),
            ))
        }
        .boxed()
    }
    fn reclaim_memory(
        &self,
        _guest_available_bytes: Option<u64>,
    ) -> BoxFuture<'_, Result<String, HypervisorError>> {
        // libkrun enables free page reporting on its balloon itself.
        async move { Ok("libkrun virtio-balloon free page reporting".to_string()) }.boxed()
    }
    fn terminate(&self, grace: Duration) -> BoxFuture<'_, ()> {
        async move {
            self.vmm.stop(grace).await;
            for h in &self.helpers {
                h.stop(Duration::from_millis(500)).await;
            }
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::Share;
    use crate::paths::BoxPaths;

    /// A file that starts like an ELF vmlinux (all the config mapping looks at).
    fn fake_vmlinux() -> PathBuf {
        let p =
            std::env::temp_dir().join(format!("microbox-krun-test-vmlinux-{}", std::process::id()));
        std::fs::write(&p, b"\x7fELF").unwrap();
        p
    }

    fn spec() -> VmSpec {
        VmSpec {
            box_paths: BoxPaths::new("/r/boxes/k".into()),
            kernel: fake_vmlinux(),
            initrd: "/r/boxes/k/initrd.cpio".into(),
            extra_cmdline: "a=b".into(),
            vcpus: 2,
            memory_mib: 512,
            accel: Accel::Kvm,
            shares: vec![
                Share {
                    tag: "rootfs".into(),
                    host_dir: "/img".into(),
                    read_only: true,
                    immutable: false,
                },
                Share {
                    tag: "vol0".into(),
                    host_dir: "/data".into(),
                    read_only: false,
                    immutable: false,
                },
            ],
            net: None,
            agent_port: 4088,
        }
    }

    #[test]
    fn config_maps_root_volumes_and_agent_port() {
        let c = KrunConfig::from_spec(&spec()).unwrap();
        assert_eq!(c.vcpus, 2);
        assert_eq!(c.ram_mib, 512);
        assert_eq!(
            c.virtiofs,
            vec![
                ("rootfs".into(), "/img".into()),
                ("vol0".into(), "/data".into())
            ]
        );
        assert_eq!(
            c.vsock_ports,
            vec![
                (4088, PathBuf::from("/r/boxes/k/agent.sock"), true),
                (4089, PathBuf::from("/r/boxes/k/vsock.sock_4089"), false)
            ]
        );
        assert!(c.cmdline.ends_with("a=b"));
        assert_eq!(c.passt_fd, None);
        // A network is passt's, on the descriptor the shim inherits.
        let mut with_net = spec();
        with_net.net = Some(crate::hypervisor::UserNet::default());
        let c = KrunConfig::from_spec(&with_net).unwrap();
        assert_eq!(c.passt_fd, Some(crate::process::PASSED_FD));
        // No bzImage: said before anything starts.
        let mut bz = spec();
        bz.kernel = "/nonexistent/vmlinuz".into();
        let e = KrunConfig::from_spec(&bz).unwrap_err().to_string();
        assert!(e.contains("ELF vmlinux"), "{e}");
        let mut s = spec();
        s.vcpus = 300;
        assert!(KrunConfig::from_spec(&s).is_err());
    }

    #[test]
    fn clear_errors_without_kvm_or_library() {
        let pvm = HostVirt {
            cpu_flags_virt: false,
            kvm_opens: Ok(()),
        };
        let e = check_with(Accel::Kvm, &pvm, Ok(()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("usable KVM") && e.contains("vmx/svm"), "{e}");
        let e = check_with(Accel::Tcg, &pvm, Ok(()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("TCG"), "{e}");
        let good = HostVirt {
            cpu_flags_virt: true,
            kvm_opens: Ok(()),
        };
        let missing = Err(HypervisorError::KrunUnavailable(
            "libkrun shared library not found".into(),
        ));
        assert!(check_with(Accel::Kvm, &good, missing)
            .unwrap_err()
            .to_string()
            .contains("not found"));
        assert!(check_with(Accel::Kvm, &good, Ok(())).is_ok());
    }

    #[test]
    fn missing_library_is_reported_by_name() {
        std::env::set_var("MICROBOX_LIBKRUN", "/nonexistent/libkrun.so.1");
        let e = Libkrun::load().err().expect("cannot load").to_string();
        std::env::remove_var("MICROBOX_LIBKRUN");
        assert!(e.contains("/nonexistent/libkrun.so.1"), "{e}");
    }
}
