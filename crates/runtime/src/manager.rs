//! [`VmManager`]: the embeddable lifecycle API of one box.
//!
//! `boot()` prepares everything lazily (image, shared rootfs, kernel + initramfs), starts the
//! backend and waits for the agent; `exec()` runs commands (the box is Busy while any run);
//! `compact()` gives guest memory back to the host; `stop()` shuts down in order; `destroy()`
//! removes every process and file of the box. A watcher task notices the VMM dying from
//! outside and moves the box to Stopped with the reason.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use microbox_agent_proto::{
    BootConfig, BootNetwork, BootVolume, AGENT_READY_VSOCK_PORT, AGENT_VSOCK_PORT,
};
use microbox_core::{
    AccelChoice, BootPhase, BoxConfig, BoxEvent, BoxId, BoxState, EventEmitter, NetworkMode,
    Protocol, Subscription,
};

use crate::accel::{self, Accel, AccelDecision};
use crate::agent_link::{AgentLink, ReadyListener};
use crate::assets::{agent, initramfs, kernel};
use crate::error::{Result, RuntimeError};
use crate::hypervisor::{self, tail_of, AgentEndpoint, Share, UserNet, VmHandle, VmSpec};
use crate::image_source::{self, ImageInfo};
use crate::paths::{default_root, BoxPaths, Paths};
use crate::process::kill_stale_pidfiles;

/// Lines of console output quoted in boot errors.
const CONSOLE_TAIL_LINES: usize = 15;

/// A command to run in the box.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    /// Extra `KEY=VALUE` entries on top of the image's and the box's environment.
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    /// Bytes fed to the process's stdin (then EOF); None: stdin is /dev/null.
    /// (Streaming execs take their stdin as a reader instead.)
    pub stdin: Option<Vec<u8>>,
    /// Run on a pseudo terminal of (rows, cols) (stdout and stderr are then merged).
    pub tty: Option<(u32, u32)>,
}

impl ExecRequest {
    pub fn new<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            argv: argv.into_iter().map(Into::into).collect(),
            ..Default::default()
        }
    }
    pub fn env(mut self, kv: impl Into<String>) -> Self {
        self.env.push(kv.into());
        self
    }
    pub fn working_dir(mut self, dir: impl Into<String>) -> Self {
        self.working_dir = Some(dir.into());
        self
    }
    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.user = Some(user.into());
        self
    }
    pub fn stdin(mut self, data: impl Into<Vec<u8>>) -> Self {
        self.stdin = Some(data.into());
        self
    }
    pub fn tty(mut self, rows: u32, cols: u32) -> Self {
        self.tty = Some((rows, cols));
        self
    }
}

/// The fully resolved command the agent runs (argv, merged env, cwd, user).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResolvedExec {
    pub argv: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub user: String,
    pub stdin: Option<Vec<u8>>,
    pub tty: Option<(u32, u32)>,
}

impl ResolvedExec {
    /// The agent protocol's start message.
    pub fn to_spec(&self) -> crate::agent_client::ExecSpec {
        crate::agent_client::ExecSpec {
            argv: self.argv.clone(),
            env: self.env.clone(),
            cwd: self.cwd.clone(),
            user: self.user.clone(),
            stdin: self.stdin.is_some(),
            tty: self.tty.is_some(),
            rows: self.tty.map(|t| t.0).unwrap_or(0),
            cols: self.tty.map(|t| t.1).unwrap_or(0),
        }
    }
}

/// How an exec ended and what it printed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecResult {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub duration: Duration,
}

impl ExecResult {
    pub fn success(&self) -> bool {
        self.exit_code == Some(0)
    }
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    pub fn stderr_str(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// Measured durations of the last boot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BootReport {
    pub phases: Vec<(BootPhase, Duration)>,
    pub total: Duration,
    pub backend: String,
    pub accel: Option<AccelDecision>,
    pub initramfs_cache_hit: bool,
}

/// What `compact()` achieved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompactReport {
    pub rss_before_bytes: u64,
    pub rss_after_bytes: u64,
    pub method: String,
}

/// `state.json` in the box directory: lets other processes (e.g. `microbox ps`) see a box that
/// this process runs. Rewritten atomically on every state change.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BoxStateFile {
    pub id: String,
    pub image: String,
    pub state: BoxState,
    pub reason: Option<String>,
    /// The process running the VmManager (the boxes die with it).
    pub owner_pid: u32,
    /// (name, pid) of the VMM and helpers.
    pub processes: Vec<(String, u32)>,
    pub updated_ms: u64,
}

impl BoxStateFile {
    /// Reads a box directory's `state.json`.
    pub fn read(box_dir: &Path) -> Option<Self> {
        serde_json::from_slice(&std::fs::read(box_dir.join("state.json")).ok()?).ok()
    }

    /// Whether the owning process still exists (if not, the box is gone: its helpers died with
    /// the owner through PR_SET_PDEATHSIG).
    pub fn owner_alive(&self) -> bool {
        Path::new(&format!("/proc/{}", self.owner_pid)).exists()
    }
}

struct StateCell {
    state: BoxState,
    running_execs: u64,
    reason: Option<String>,
}

struct Running {
    vm: Arc<dyn VmHandle>,
    agent: AgentLink,
    bridge: Option<crate::agent_link::Bridge>,
    /// Keeps `prune` from deleting the image rootfs the VM serves.
    _rootfs_lease: Option<microbox_image::RootfsLease>,
}

struct Inner {
    id: BoxId,
    config: BoxConfig,
    emitter: EventEmitter,
    paths: Paths,
    box_paths: BoxPaths,
    cell: Mutex<StateCell>,
    running: Mutex<Option<Running>>,
    boot_lock: tokio::sync::Mutex<()>,
    next_exec_id: AtomicU64,
    /// Set while the runtime itself ends the VMM (the watcher then stays quiet).
    stopping: AtomicBool,
    image: Mutex<Option<ImageInfo>>,
    report: Mutex<BootReport>,
    kernel_args: Mutex<String>,
}

/// One box: its configuration, state, VM and agent connection. Cheap to clone (shared).
#[derive(Clone)]
pub struct VmManager {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for VmManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmManager")
            .field("id", &self.inner.id)
            .field("state", &self.state())
            .finish()
    }
}

impl VmManager {
    /// A box in state Created under the default root (`$MICROBOX_ROOT`, ...). Nothing starts yet.
    pub fn new(config: BoxConfig, emitter: EventEmitter) -> Self {
        Self::with_root(config, emitter, default_root())
    }

    /// Like [`VmManager::new`] with an explicit microbox root directory.
    pub fn with_root(config: BoxConfig, emitter: EventEmitter, root: impl Into<PathBuf>) -> Self {
        Self::with_id(config, emitter, root, BoxId::random())
    }

    /// Like [`VmManager::with_root`] with a given box id (e.g. chosen by the CLI).
    pub fn with_id(
        config: BoxConfig,
        emitter: EventEmitter,
        root: impl Into<PathBuf>,
        id: BoxId,
    ) -> Self {
        let paths = Paths::new(root);
        let box_paths = BoxPaths::new(paths.box_dir(id.as_str()));
        VmManager {
            inner: Arc::new(Inner {
                id,
                config,
                emitter,
                paths,
                box_paths,
                cell: Mutex::new(StateCell {
                    state: BoxState::Created,
                    running_execs: 0,
                    reason: None,
                }),
                running: Mutex::new(None),
                boot_lock: tokio::sync::Mutex::new(()),
                next_exec_id: AtomicU64::new(1),
                stopping: AtomicBool::new(false),
                image: Mutex::new(None),
                report: Mutex::new(BootReport::default()),
                kernel_args: Mutex::new(String::new()),
            }),
        }
    }

    /// Extra guest kernel arguments for the next boot, appended last (so they win), e.g.
    /// `loglevel=7` to debug a boot.
    pub fn set_kernel_args(&self, args: impl Into<String>) {
        *lock(&self.inner.kernel_args) = args.into();
    }

    pub fn id(&self) -> &BoxId {
        &self.inner.id
    }

    pub fn config(&self) -> &BoxConfig {
        &self.inner.config
    }

    pub fn state(&self) -> BoxState {
        lock(&self.inner.cell).state
    }

    /// Why the box stopped (None while it runs or when stopped on request without detail).
    pub fn stop_reason(&self) -> Option<String> {
        lock(&self.inner.cell).reason.clone()
    }

    /// Number of execs currently running.
    pub fn running_execs(&self) -> u64 {
        lock(&self.inner.cell).running_execs
    }

    pub fn subscribe(&self) -> Subscription {
        self.inner.emitter.subscribe()
    }

    /// The per-box directory (sockets, console log, pidfiles).
    pub fn box_dir(&self) -> &Path {
        &self.inner.box_paths.dir
    }

    /// The console log of the guest.
    pub fn console_log(&self) -> PathBuf {
        self.inner.box_paths.console_log()
    }

    /// `agent.sock`: a plain Unix socket speaking the agent's gRPC (no vsock handshake), present
    /// while the box runs.
    pub fn agent_socket(&self) -> PathBuf {
        self.inner.box_paths.agent_socket()
    }

    /// Phase durations, backend and acceleration of the last boot.
    pub fn boot_report(&self) -> BootReport {
        lock(&self.inner.report).clone()
    }

    /// The image's default command (entrypoint + cmd, overridden by the box config), after boot.
    pub fn default_argv(&self) -> Option<Vec<String>> {
        let img = lock(&self.inner.image).clone();
        let c = &self.inner.config;
        let entry = c
            .entrypoint
            .clone()
            .or_else(|| img.as_ref().and_then(|i| i.entrypoint.clone()))
            .unwrap_or_default();
        // A config entrypoint resets the image's cmd (as docker does).
        let cmd = c
            .cmd
            .clone()
            .or_else(|| {
                if c.entrypoint.is_some() {
                    None
                } else {
                    img.as_ref().and_then(|i| i.cmd.clone())
                }
            })
            .unwrap_or_default();
        let argv: Vec<String> = entry.into_iter().chain(cmd).collect();
        (!argv.is_empty()).then_some(argv)
    }

    /// PIDs of the VMM and its helpers (empty when not running).
    pub fn processes(&self) -> Vec<hypervisor::VmProcess> {
        lock(&self.inner.running)
            .as_ref()
            .map(|r| r.vm.processes())
            .unwrap_or_default()
    }

    /// Summed host RSS of all the box's processes.
    pub fn host_rss_bytes(&self) -> u64 {
        lock(&self.inner.running)
            .as_ref()
            .map(|r| r.vm.rss_bytes())
            .unwrap_or(0)
    }

    /// Boots the box (no-op when it already runs). Emits one `BootPhase` event per phase.
    pub async fn boot(&self) -> Result<()> {
        let _guard = self.inner.boot_lock.lock().await;
        match self.state() {
            BoxState::Created => {}
            BoxState::Ready | BoxState::Busy | BoxState::Compacting => return Ok(()),
            s @ BoxState::Stopped => {
                return Err(RuntimeError::InvalidState {
                    op: "boot",
                    state: s,
                })
            }
        }
        self.inner.config.validate()?;
        match self.boot_inner().await {
            Ok(()) => Ok(()),
            Err(e) => {
                // Leave nothing running; the box stays Created so destroy() (or a retry) works.
                let running = lock(&self.inner.running).take();
                if let Some(r) = running {
                    self.inner.stopping.store(true, Ordering::SeqCst);
                    r.vm.terminate(Duration::ZERO).await;
                    self.inner.stopping.store(false, Ordering::SeqCst);
                }
                self.inner.emit(BoxEvent::Error {
                    message: format!("boot failed: {e}"),
                });
                Err(e)
            }
        }
    }

    async fn boot_inner(&self) -> Result<()> {
        let inner = &self.inner;
        let cfg = &inner.config;
        let boot_start = Instant::now();
        let mut report = BootReport::default();
        let mut phase_start = Instant::now();
        let mut phase_done = |phase: BootPhase, report: &mut BootReport| {
            let d = phase_start.elapsed();
            report.phases.push((phase, d));
            inner.emit(BoxEvent::BootPhase {
                phase,
                duration_ms: d.as_millis() as u64,
            });
            phase_start = Instant::now();
        };

        // Everything that can fail without starting a process is checked first.
        let requested = match cfg.accel {
            AccelChoice::Auto => None,
            AccelChoice::Kvm => Some(Accel::Kvm),
            AccelChoice::Tcg => Some(Accel::Tcg),
        };
        let accel = accel::detect(requested).map_err(RuntimeError::Accel)?;
        let backend =
            hypervisor::select_backend(cfg.backend, &accel, cfg.network != NetworkMode::None)?;
        backend.check(accel.accel)?;
        let kern = kernel::find_kernel(cfg.kernel.as_deref())?;
        let agent_bin = agent::find_agent()?;
        report.backend = backend.name().to_string();
        report.accel = Some(accel.clone());

        // Image and rootfs.
        let image = image_source::ensure(&cfg.image, &inner.paths).await?;
        phase_done(BootPhase::Image, &mut report);
        let (rootfs, rootfs_lease) = image_source::rootfs(&image, &inner.paths).await?;
        *lock(&inner.image) = Some(image.clone());
        phase_done(BootPhase::Rootfs, &mut report);

        // Boot assets.
        let bp = inner.box_paths.clone();
        kill_stale_pidfiles(&bp.dir);
        inner
            .paths
            .create_box_dir(inner.id.as_str())
            .map_err(|e| RuntimeError::io(&bp.dir, e))?;
        let stat = initramfs::ensure_static(&inner.paths.cache_dir(), &kern, &agent_bin)?;
        report.initramfs_cache_hit = stat.cache_hit;
        let mut shares = vec![Share {
            tag: "rootfs".into(),
            host_dir: rootfs,
            read_only: true,
            // A store rootfs never changes once built; a plain host directory might.
            immutable: rootfs_lease.is_some(),
        }];
        let upper_tag = if cfg.persistent {
            let up = bp.upper_dir();
            std::fs::create_dir_all(&up).map_err(|e| RuntimeError::io(&up, e))?;
            shares.push(Share {
                tag: "upper".into(),
                host_dir: up,
                read_only: false,
                immutable: false,
            });
            Some("upper".to_string())
        } else {
            None
        };
        let mut volumes = Vec::new();
        for (i, v) in cfg.volumes.iter().enumerate() {
            let tag = format!("vol{i}");
            shares.push(Share {
                tag: tag.clone(),
                host_dir: v.host.clone(),
                read_only: v.read_only,
                immutable: false,
            });
            volumes.push(BootVolume {
                tag,
                guest_path: v.guest.to_string_lossy().into_owned(),
                read_only: v.read_only,
            });
        }
        let (net, boot_net) = match cfg.network {
            NetworkMode::None => (None, None),
            NetworkMode::User | NetworkMode::Passt => {
                let forwards = cfg
                    .ports
                    .iter()
                    .map(|p| {
                        let proto = match p.protocol {
                            Protocol::Udp => "udp",
                            _ => "tcp",
                        };
                        (proto.to_string(), p.host_ip, p.host_port, p.guest_port)
                    })
                    .collect();
                // A user-mode network: the same fixed addresses inside the box's private NAT
                // whichever stack serves them.
                let bn = BootNetwork {
                    interface: "eth0".into(),
                    address_cidr: "10.0.2.15/24".into(),
                    gateway: "10.0.2.2".into(),
                    dns: vec!["10.0.2.3".into()],
                };
                let stack = if cfg.network == NetworkMode::Passt {
                    hypervisor::NetStack::Passt
                } else {
                    hypervisor::NetStack::Slirp
                };
                (Some(UserNet { forwards, stack }), Some(bn))
            }
        };
        let boot_cfg = BootConfig {
            hostname: cfg
                .hostname
                .clone()
                .unwrap_or_else(|| inner.id.short().to_string()),
            modules: stat.modules.clone(),
            rootfs_tag: "rootfs".into(),
            upper_tag,
            volumes,
            network: boot_net,
            vsock_port: AGENT_VSOCK_PORT,
            ready_port: Some(AGENT_READY_VSOCK_PORT),
        };
        initramfs::write_box_initrd(&stat.path, boot_cfg.to_json().as_bytes(), &bp.initrd())?;
        phase_done(BootPhase::BootAssets, &mut report);

        // VMM and helpers.
        let spec = VmSpec {
            box_paths: bp.clone(),
            kernel: kern.path.clone(),
            initrd: bp.initrd(),
            extra_cmdline: lock(&inner.kernel_args).clone(),
            vcpus: cfg.vcpus,
            memory_mib: cfg.memory_mib,
            accel: accel.accel,
            shares,
            net,
            agent_port: AGENT_VSOCK_PORT,
        };
        let _ = std::fs::remove_file(bp.console_log());
        // Bound before the guest can connect; gone (with its socket file) once booted.
        let ready_path = bp.guest_to_host_socket(AGENT_READY_VSOCK_PORT);
        let ready =
            ReadyListener::bind(&ready_path).map_err(|e| RuntimeError::io(&ready_path, e))?;
        let vm: Arc<dyn VmHandle> = Arc::from(backend.launch(&spec).await?);
        phase_done(BootPhase::VmmSpawn, &mut report);

        // Kernel boot: until the agent says it listens (where the backend carries that
        // notification) and its vsock port accepts a connection.
        let deadline = boot_start + cfg.boot_timeout;
        let endpoint = vm.agent_endpoint();
        let exit = vm.vmm_exit();
        if vm.ready_notification() {
            if let Err(e) = ready.wait(&exit, deadline).await {
                vm.terminate(Duration::ZERO).await;
                return Err(self.boot_failure(
                    e,
                    cfg.boot_timeout,
                    "the agent's ready notification",
                ));
            }
        }
        drop(ready);
        let agent = match AgentLink::connect_when_listening(&endpoint, &exit, deadline).await {
            Ok(a) => a,
            Err(e) => {
                vm.terminate(Duration::ZERO).await;
                return Err(self.boot_failure(e, cfg.boot_timeout, "the agent's vsock port"));
            }
        };
        phase_done(BootPhase::KernelBoot, &mut report);

        // Agent ready: health SERVING.
        if let Err(e) = agent.wait_healthy(&exit, deadline).await {
            vm.terminate(Duration::ZERO).await;
            return Err(self.boot_failure(e, cfg.boot_timeout, "the agent's health SERVING"));
        }
        phase_done(BootPhase::AgentReady, &mut report);
        // A backend whose endpoint already is agent.sock (libkrun listens there) needs none.
        let bridge = if endpoint == AgentEndpoint::Unix(bp.agent_socket()) {
            None
        } else {
            match crate::agent_link::Bridge::start(&bp.agent_socket(), &endpoint).await {
                Ok(b) => Some(b),
                Err(e) => {
                    tracing::warn!(error = %e, "agent.sock bridge not started");
                    None
                }
            }
        };
        report.total = boot_start.elapsed();
        *lock(&inner.report) = report;
        *lock(&inner.running) = Some(Running {
            vm: vm.clone(),
            agent,
            bridge,
            _rootfs_lease: rootfs_lease,
        });
        inner.set_state(BoxState::Ready, None)?;
        self.spawn_watcher(vm);
        Ok(())
    }

    fn boot_failure(&self, e: WaitError, timeout: Duration, waiting_for: &str) -> RuntimeError {
        let console_tail = tail_of(&self.inner.box_paths.console_log(), CONSOLE_TAIL_LINES);
        match e {
            WaitError::Timeout => RuntimeError::BootTimeout {
                timeout,
                waiting_for: waiting_for.to_string(),
                console_tail,
            },
            WaitError::Exited(status) => RuntimeError::VmmExitedDuringBoot {
                status,
                console_tail,
            },
            WaitError::Agent(msg) => RuntimeError::AgentUnhealthy(msg),
        }
    }

    fn spawn_watcher(&self, vm: Arc<dyn VmHandle>) {
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        let mut rx = vm.vmm_exit();
        // Weak: the watcher must not keep a VM alive that the manager has let go.
        let vm = Arc::downgrade(&vm);
        tokio::spawn(async move {
            let status = crate::process::wait_exit(&mut rx).await;
            let Some(inner) = weak.upgrade() else { return };
            if inner.stopping.load(Ordering::SeqCst) {
                return;
            }
            let console = tail_of(&inner.box_paths.console_log(), 3);
            let reason = match vm.upgrade().and_then(|v| v.exit_cause()) {
                Some(cause) => format!("{cause}; last console lines: {console}"),
                None => {
                    format!("the VMM exited unexpectedly ({status}); last console lines: {console}")
                }
            };
            tracing::warn!(box_id = %inner.id, %reason, "box died");
            let running = lock(&inner.running).take();
            if let Some(r) = running {
                r.vm.terminate(Duration::ZERO).await;
                drop(r.bridge);
            }
            inner.emit(BoxEvent::Error {
                message: reason.clone(),
            });
            let _ = inner.set_state(BoxState::Stopped, Some(reason));
        });
    }

    fn agent(&self) -> Result<AgentLink> {
        lock(&self.inner.running)
            .as_ref()
            .map(|r| r.agent.clone())
            .ok_or(RuntimeError::InvalidState {
                op: "talk to the agent of",
                state: self.state(),
            })
    }

    /// Asks the agent whether it is SERVING.
    pub async fn health_check(&self) -> Result<bool> {
        let agent = self.agent()?;
        agent.health().await.map_err(RuntimeError::Agent)
    }

    /// Merges the request with the image's and box's defaults.
    pub fn resolve_exec(&self, req: &ExecRequest) -> ResolvedExec {
        let img = lock(&self.inner.image).clone().unwrap_or_default();
        let c = &self.inner.config;
        let mut env: Vec<String> = Vec::new();
        for kv in img.env.iter().chain(c.env.iter()).chain(req.env.iter()) {
            let key = kv.split('=').next().unwrap_or_default();
            env.retain(|e| e.split('=').next() != Some(key));
            env.push(kv.clone());
        }
        if !env.iter().any(|e| e.starts_with("PATH=")) {
            env.insert(
                0,
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
            );
        }
        ResolvedExec {
            argv: req.argv.clone(),
            env,
            cwd: req
                .working_dir
                .clone()
                .or_else(|| c.working_dir.clone())
                .or(img.working_dir)
                .unwrap_or_default(),
            user: req
                .user
                .clone()
                .or_else(|| c.user.clone())
                .or(img.user)
                .unwrap_or_default(),
            stdin: req.stdin.clone(),
            tty: req.tty,
        }
    }

    /// Runs a command to completion and collects its output. Boots the box first if needed.
    pub async fn exec(&self, req: ExecRequest) -> Result<ExecResult> {
        let (agent, resolved, guard) = self.prepare_exec(&req).await?;
        let start = Instant::now();
        let res = agent.exec(&resolved).await;
        let (code, sig) = res
            .as_ref()
            .map(|r| (r.exit_code, r.signal))
            .unwrap_or((None, None));
        guard.finish(code, sig);
        let mut r = res.map_err(RuntimeError::Agent)?;
        r.duration = start.elapsed();
        Ok(r)
    }

    /// Runs a command with streamed stdin/stdout/stderr (e.g. `microbox run`), with the same
    /// events and Busy accounting as [`VmManager::exec`]. `req.stdin` is ignored; pass a reader.
    pub async fn exec_streaming<I, O, E>(
        &self,
        req: ExecRequest,
        stdin: Option<I>,
        stdout: O,
        stderr: E,
    ) -> Result<crate::agent_client::ExitStatus>
    where
        I: tokio::io::AsyncRead + Unpin + Send + 'static,
        O: tokio::io::AsyncWrite + Unpin,
        E: tokio::io::AsyncWrite + Unpin,
    {
        let (agent, resolved, guard) = self.prepare_exec(&req).await?;
        let res = agent
            .client()
            .exec(resolved.to_spec(), stdin, stdout, stderr)
            .await;
        let (code, sig) = res
            .as_ref()
            .map(|s| (s.exit_code, s.signal))
            .unwrap_or((None, None));
        guard.finish(code, sig);
        res.map_err(|e| RuntimeError::Agent(e.to_string()))
    }

    /// Starts a command and hands back the live session (stdin, resize, signals, output events)
    /// for interactive use. The box stays Busy until the returned guard is finished or dropped.
    pub async fn exec_session(
        &self,
        req: ExecRequest,
    ) -> Result<(crate::agent_client::ExecSession, ExecGuard)> {
        let (agent, resolved, guard) = self.prepare_exec(&req).await?;
        let mut spec = resolved.to_spec();
        spec.stdin = true;
        match agent.client().exec_session(spec).await {
            Ok(s) => Ok((s, guard)),
            Err(e) => {
                guard.finish(None, None);
                Err(RuntimeError::Agent(e.to_string()))
            }
        }
    }

    async fn prepare_exec(
        &self,
        req: &ExecRequest,
    ) -> Result<(AgentLink, ResolvedExec, ExecGuard)> {
        if req.argv.is_empty() {
            return Err(RuntimeError::Agent("exec: argv must not be empty".into()));
        }
        if self.state() == BoxState::Created {
            self.boot().await?;
        }
        let agent = self.agent()?;
        let resolved = self.resolve_exec(req);
        let mut guard = self.begin_exec()?;
        let exec_id = self.inner.next_exec_id.fetch_add(1, Ordering::Relaxed);
        self.inner.emit(BoxEvent::ExecStarted {
            exec_id,
            argv: req.argv.clone(),
        });
        guard.exec = Some((exec_id, Instant::now()));
        Ok((agent, resolved, guard))
    }

    /// Marks one exec running (Ready -> Busy on the first); the guard ends it. For execs run
    /// directly through [`VmManager::agent_client`].
    pub fn begin_exec(&self) -> Result<ExecGuard> {
        let mut cell = lock(&self.inner.cell);
        match cell.state {
            BoxState::Ready => {
                cell.state = BoxState::Ready.transition(BoxState::Busy)?;
                cell.running_execs = 1;
                drop(cell);
                self.inner.write_state_file();
                self.inner.emit(BoxEvent::StateChanged {
                    from: BoxState::Ready,
                    to: BoxState::Busy,
                    reason: None,
                });
            }
            BoxState::Busy => cell.running_execs += 1,
            s => {
                return Err(RuntimeError::InvalidState {
                    op: "exec in",
                    state: s,
                })
            }
        }
        Ok(ExecGuard {
            inner: self.inner.clone(),
            exec: None,
        })
    }

    /// Drops guest caches and returns free guest memory to the host (Ready -> Compacting -> Ready).
    pub async fn compact(&self) -> Result<CompactReport> {
        {
            let mut cell = lock(&self.inner.cell);
            if cell.state != BoxState::Ready {
                return Err(RuntimeError::InvalidState {
                    op: "compact",
                    state: cell.state,
                });
            }
            cell.state = BoxState::Compacting;
        }
        self.inner.emit(BoxEvent::StateChanged {
            from: BoxState::Ready,
            to: BoxState::Compacting,
            reason: None,
        });
        let res = self.compact_inner().await;
        let _ = self.inner.set_state(BoxState::Ready, None);
        let rep = res?;
        self.inner.emit(BoxEvent::Compacted {
            rss_before_bytes: rep.rss_before_bytes,
            rss_after_bytes: rep.rss_after_bytes,
        });
        Ok(rep)
    }

    async fn compact_inner(&self) -> Result<CompactReport> {
        let (vm, agent) = {
            let g = lock(&self.inner.running);
            let r = g.as_ref().ok_or(RuntimeError::InvalidState {
                op: "compact",
                state: BoxState::Stopped,
            })?;
            (r.vm.clone(), r.agent.clone())
        };
        let before = vm.rss_bytes();
        let drop_caches = ResolvedExec {
            argv: vec![
                "/bin/sh".into(),
                "-c".into(),
                "sync; echo 3 > /proc/sys/vm/drop_caches; echo 1 > /proc/sys/vm/compact_memory"
                    .into(),
            ],
            env: vec!["PATH=/usr/sbin:/usr/bin:/sbin:/bin".into()],
            ..Default::default()
        };
        match agent.exec(&drop_caches).await {
            Ok(r) if r.exit_code == Some(0) => {}
            Ok(r) => {
                tracing::warn!(stderr = %String::from_utf8_lossy(&r.stderr), "drop_caches in the guest failed")
            }
            Err(e) => tracing::warn!(error = %e, "drop_caches in the guest failed"),
        }
        let available = match agent.client().stats().await {
            Ok(st) => Some(st.mem_available_bytes),
            Err(e) => {
                tracing::warn!(error = %e, "guest stats unavailable; balloon cycle skipped");
                None
            }
        };
        let method = vm.reclaim_memory(available).await?;
        let after = vm.rss_bytes();
        Ok(CompactReport {
            rss_before_bytes: before,
            rss_after_bytes: after,
            method,
        })
    }

    /// Stops the box: agent Shutdown (clean unmount + power off), then ACPI power-down, then
    /// quit/kill when `timeout` runs out. Idempotent.
    pub async fn stop(&self, timeout: Duration) -> Result<()> {
        let _guard = self.inner.boot_lock.lock().await;
        let running = lock(&self.inner.running).take();
        let Some(r) = running else {
            if self.state() != BoxState::Stopped {
                self.inner
                    .set_state(BoxState::Stopped, Some("stopped before it ran".into()))?;
            }
            return Ok(());
        };
        self.inner.stopping.store(true, Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + timeout;
        let mut exit = r.vm.vmm_exit();
        let exited = |rx: &WatchRx| rx.borrow().is_some();
        // Every step is bounded by the deadline: a hung VMM does not answer QMP either.
        let within = |d: Duration| deadline.min(tokio::time::Instant::now() + d);
        let half = timeout / 2;
        // A paused guest cannot shut down: let it run again first, as `docker stop` does.
        let status = tokio::time::timeout_at(within(half), r.vm.vmm_status()).await;
        if matches!(&status, Ok(Ok(s)) if s == "paused") {
            let _ = tokio::time::timeout_at(deadline, r.vm.resume()).await;
        }
        // Only an agent that accepted Shutdown is worth waiting for.
        if matches!(
            tokio::time::timeout_at(within(half), r.agent.shutdown()).await,
            Ok(Ok(()))
        ) {
            let _ =
                tokio::time::timeout_at(within(half), crate::process::wait_exit(&mut exit)).await;
        }
        if !exited(&exit) {
            let _ = tokio::time::timeout_at(deadline, r.vm.powerdown()).await;
            let _ = tokio::time::timeout_at(deadline, crate::process::wait_exit(&mut exit)).await;
        }
        drop(r.bridge);
        r.vm.terminate(Duration::from_secs(1)).await;
        self.inner
            .set_state(BoxState::Stopped, Some("stopped on request".into()))?;
        Ok(())
    }

    /// Kills every process of the box and removes its directory (sockets, logs, writable layer).
    pub async fn destroy(&self) -> Result<()> {
        let running = lock(&self.inner.running).take();
        if let Some(r) = running {
            self.inner.stopping.store(true, Ordering::SeqCst);
            drop(r.bridge);
            r.vm.terminate(Duration::ZERO).await;
        }
        kill_stale_pidfiles(&self.inner.box_paths.dir);
        if self.state() != BoxState::Stopped {
            self.inner
                .set_state(BoxState::Stopped, Some("destroyed".into()))?;
        }
        // A helper that is still being reaped may append to its log while the tree is removed
        // (ENOTEMPTY): retry briefly.
        let dir = &self.inner.box_paths.dir;
        let mut attempt = 0;
        loop {
            match std::fs::remove_dir_all(dir) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(_) if attempt < 5 => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(RuntimeError::io(dir, e)),
            }
        }
    }

    /// Pauses the vCPUs (QMP `stop`). Agent calls made while paused (exec, health, the
    /// `agent.sock` bridge) wait for [`VmManager::resume`]; a health check times out meanwhile.
    pub async fn pause(&self) -> Result<()> {
        let vm = self.vm()?;
        vm.pause().await.map_err(Into::into)
    }

    /// Resumes the vCPUs (QMP `cont`).
    pub async fn resume(&self) -> Result<()> {
        let vm = self.vm()?;
        vm.resume().await.map_err(Into::into)
    }

    /// What the VMM says of the VM ("running", "paused", ...).
    pub async fn vmm_status(&self) -> Result<String> {
        let vm = self.vm()?;
        vm.vmm_status().await.map_err(Into::into)
    }

    /// The connected agent client (streaming execs, files, stats). Only while the box runs.
    pub fn agent_client(&self) -> Result<crate::agent_client::AgentClient> {
        Ok(self.agent()?.client())
    }

    fn vm(&self) -> Result<Arc<dyn VmHandle>> {
        lock(&self.inner.running)
            .as_ref()
            .map(|r| r.vm.clone())
            .ok_or(RuntimeError::InvalidState {
                op: "control the VM of",
                state: self.state(),
            })
    }
}

type WatchRx = tokio::sync::watch::Receiver<Option<crate::process::ExitInfo>>;

/// One running exec: ends it (Busy -> Ready when it was the last) when finished or dropped.
pub struct ExecGuard {
    inner: Arc<Inner>,
    /// (exec id, start) when an `ExecStarted` event was emitted for it.
    exec: Option<(u64, Instant)>,
}

impl ExecGuard {
    /// The id in the `ExecStarted`/`ExecFinished` events, if any.
    pub fn exec_id(&self) -> Option<u64> {
        self.exec.map(|e| e.0)
    }

    /// Ends the exec, reporting how the process ended.
    pub fn finish(mut self, exit_code: Option<i32>, signal: Option<i32>) {
        self.emit_finished(exit_code, signal);
    }

    fn emit_finished(&mut self, exit_code: Option<i32>, signal: Option<i32>) {
        if let Some((exec_id, start)) = self.exec.take() {
            self.inner.emit(BoxEvent::ExecFinished {
                exec_id,
                exit_code,
                signal,
                duration_ms: start.elapsed().as_millis() as u64,
            });
        }
    }
}

impl Drop for ExecGuard {
    fn drop(&mut self) {
        self.emit_finished(None, None);
        let mut cell = lock(&self.inner.cell);
        cell.running_execs = cell.running_execs.saturating_sub(1);
        if cell.running_execs == 0 && cell.state == BoxState::Busy {
            cell.state = BoxState::Ready;
            drop(cell);
            self.inner.write_state_file();
            self.inner.emit(BoxEvent::StateChanged {
                from: BoxState::Busy,
                to: BoxState::Ready,
                reason: None,
            });
        }
    }
}

impl Inner {
    fn emit(&self, ev: BoxEvent) {
        self.emitter.emit(&self.id, ev);
    }

    fn set_state(&self, to: BoxState, reason: Option<String>) -> Result<()> {
        let from = {
            let mut cell = lock(&self.cell);
            let from = cell.state;
            cell.state = from.transition(to)?;
            if to == BoxState::Stopped {
                cell.running_execs = 0;
                cell.reason = reason.clone();
            }
            from
        };
        // File first: whoever reacts to the event (e.g. destroy()) sees a settled directory.
        self.write_state_file();
        self.emit(BoxEvent::StateChanged { from, to, reason });
        Ok(())
    }

    fn write_state_file(&self) {
        let dir = &self.box_paths.dir;
        if !dir.is_dir() {
            return;
        }
        let (state, reason) = {
            let c = lock(&self.cell);
            (c.state, c.reason.clone())
        };
        let processes = lock(&self.running)
            .as_ref()
            .map(|r| {
                r.vm.processes()
                    .into_iter()
                    .map(|p| (p.name, p.pid))
                    .collect()
            })
            .unwrap_or_default();
        let f = BoxStateFile {
            id: self.id.to_string(),
            image: self.config.image.clone(),
            state,
            reason,
            owner_pid: std::process::id(),
            processes,
            updated_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        };
        let tmp = dir.join(".state.json.tmp");
        if let Ok(text) = serde_json::to_vec_pretty(&f) {
            if std::fs::write(&tmp, text).is_ok() {
                let _ = std::fs::rename(&tmp, self.box_paths.state_file());
            }
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The last handle is gone while the VM still runs: kill it rather than leak processes.
        let running = self.running.get_mut().ok().and_then(|r| r.take());
        if let Some(r) = running {
            for p in r.vm.processes() {
                // SAFETY: kill(2) on pids of our own unreaped children (their reaper tasks hold
                // them until they exit).
                unsafe {
                    libc::kill(p.pid as libc::pid_t, libc::SIGKILL);
                }
            }
        }
    }
}

pub(crate) enum WaitError {
    Timeout,
    Exited(String),
    Agent(String),
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding these locks leaves consistent data (plain assignments).
    m.lock().unwrap_or_else(|e| e.into_inner())
}
