//! Runs workload processes inside the box root: validates an `ExecStart`, resolves the user and
//! the executable against the image's files, forks the process (chroot, own session, optional
//! pty), and streams its stdin/stdout/stderr and exit status over an Exec call.

use std::collections::HashMap;
use std::ffi::{CString, OsString};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use microbox_agent_proto::v1::{
    exec_request, exec_response, exited, ExecRequest, ExecResponse, ExecStart, Exited, Started,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, watch};
use tonic::{Status, Streaming};

use crate::reaper::{ExitInfo, Reaper};
use crate::rootpath::resolve_in_root;
use crate::users;

/// PATH used when the exec's environment has none (the usual container default).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Size of one stdout/stderr chunk.
const CHUNK: usize = 32 * 1024;
/// Responses buffered per exec before the process is slowed down (backpressure).
pub const RESPONSE_BUFFER: usize = 16;
/// After the process exits, how long its output pipes may stay silent before the agent stops
/// waiting for EOF (a background child may keep them open forever).
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// Processes started by Exec that are still running, by pid.
#[derive(Default)]
pub struct ProcTable {
    procs: Mutex<HashMap<u32, ProcEntry>>,
}

struct ProcEntry {
    pty: Option<Arc<OwnedFd>>,
}

impl ProcTable {
    fn insert(&self, pid: u32, pty: Option<Arc<OwnedFd>>) {
        self.lock().insert(pid, ProcEntry { pty });
    }
    fn remove(&self, pid: u32) {
        self.lock().remove(&pid);
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, ProcEntry>> {
        self.procs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends `signal` to an exec'd process (or its process group).
    pub fn signal(&self, pid: u32, signal: i32, group: bool) -> Result<(), Status> {
        if !self.lock().contains_key(&pid) {
            return Err(Status::not_found(format!(
                "no running process with pid {pid} was started by Exec"
            )));
        }
        send_signal(pid, signal, group)
    }

    /// Sends `signal` to the process group of every running exec.
    pub fn signal_all(&self, signal: i32) {
        let pids: Vec<u32> = self.lock().keys().copied().collect();
        for pid in pids {
            let _ = send_signal(pid, signal, true);
        }
    }

    /// Resizes the pty of an exec'd tty process.
    pub fn resize(&self, pid: u32, rows: u32, cols: u32) -> Result<(), Status> {
        let pty = match self.lock().get(&pid) {
            None => {
                return Err(Status::not_found(format!(
                    "no running process with pid {pid} was started by Exec"
                )))
            }
            Some(ProcEntry { pty: None }) => {
                return Err(Status::failed_precondition(format!(
                    "process {pid} was not started with tty = true"
                )))
            }
            Some(ProcEntry { pty: Some(p) }) => p.clone(),
        };
        set_winsize(&pty, rows, cols)
    }
}

fn send_signal(pid: u32, signal: i32, group: bool) -> Result<(), Status> {
    if !(1..=64).contains(&signal) {
        return Err(Status::invalid_argument(format!(
            "signal {signal} is not a valid signal number (1-64)"
        )));
    }
    let target = i32::try_from(pid)
        .map_err(|_| Status::invalid_argument(format!("pid {pid} is out of range")))?;
    let target = if group { -target } else { target };
    // SAFETY: kill(2) takes plain integers; pid was checked to be one of our children.
    let rc = unsafe { libc::kill(target, signal) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return Err(Status::internal(format!(
            "kill({target}, {signal}) failed: {e}"
        )));
    }
    Ok(())
}

fn set_winsize(fd: &OwnedFd, rows: u32, cols: u32) -> Result<(), Status> {
    let ws = libc::winsize {
        ws_row: u16::try_from(rows)
            .map_err(|_| Status::invalid_argument(format!("rows {rows} exceeds 65535")))?,
        ws_col: u16::try_from(cols)
            .map_err(|_| Status::invalid_argument(format!("cols {cols} exceeds 65535")))?,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a `winsize` from the pointer, which is valid for the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    if rc < 0 {
        return Err(Status::internal(format!(
            "setting the terminal size failed: {}",
            io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// A validated exec request, ready to fork.
#[derive(Debug)]
pub struct Prepared {
    /// Executable path inside the box root.
    pub program: String,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Working directory inside the box root.
    pub cwd: String,
    /// uid, gid, supplementary groups; None keeps the agent's identity.
    pub identity: Option<(u32, u32, Vec<u32>)>,
    pub tty: Option<(u32, u32)>,
    pub stdin: bool,
}

/// Validates `start` against the box root `root`, with errors that say what was wrong.
pub fn prepare(root: &Path, start: &ExecStart) -> Result<Prepared, Status> {
    if start.argv.is_empty() || start.argv[0].is_empty() {
        return Err(Status::invalid_argument(
            "argv is empty: the first element must name the program to run",
        ));
    }
    if let Some(i) = start.argv.iter().position(|a| a.contains('\0')) {
        return Err(Status::invalid_argument(format!(
            "argv[{i}] contains a NUL byte"
        )));
    }
    let mut env: Vec<(String, String)> = Vec::with_capacity(start.env.len() + 2);
    for (i, entry) in start.env.iter().enumerate() {
        match entry.split_once('=') {
            Some((k, v)) if !k.is_empty() && !k.contains('\0') && !v.contains('\0') => {
                // Later entries override earlier ones, as in a shell.
                env.retain(|(ek, _)| ek != k);
                env.push((k.to_string(), v.to_string()));
            }
            _ => {
                return Err(Status::invalid_argument(format!(
                    "env[{i}] = {entry:?} is not of the form KEY=VALUE"
                )))
            }
        }
    }
    let cwd = if start.cwd.is_empty() {
        "/".to_string()
    } else {
        start.cwd.clone()
    };
    if !cwd.starts_with('/') || cwd.contains('\0') {
        return Err(Status::invalid_argument(format!(
            "cwd {cwd:?} must be an absolute path"
        )));
    }
    let cwd_host = resolve_in_root(root, &cwd, true)
        .map_err(|e| Status::invalid_argument(format!("cwd {cwd:?}: {e}")))?;
    if !cwd_host.is_dir() {
        return Err(Status::not_found(format!(
            "working directory {cwd} does not exist in the box (or is not a directory)"
        )));
    }

    let identity = if start.user.trim().is_empty() {
        None
    } else {
        let passwd = read_root_file(root, "/etc/passwd");
        let group = read_root_file(root, "/etc/group");
        let id = users::resolve(
            &start.user,
            &users::parse_passwd(&passwd),
            &users::parse_group(&group),
        )
        .map_err(|e| match e {
            users::UserError::Malformed(_) => Status::invalid_argument(e.to_string()),
            _ => Status::not_found(e.to_string()),
        })?;
        if !env.iter().any(|(k, _)| k == "HOME") {
            env.push(("HOME".into(), id.home.clone()));
        }
        Some((id.uid, id.gid, id.groups))
    };
    if identity.is_none() && !env.iter().any(|(k, _)| k == "HOME") {
        let passwd = users::parse_passwd(&read_root_file(root, "/etc/passwd"));
        let home = passwd
            .iter()
            .find(|p| p.uid == 0)
            .map(|p| p.home.clone())
            .unwrap_or_else(|| "/root".into());
        env.push(("HOME".into(), home));
    }
    if start.tty && !env.iter().any(|(k, _)| k == "TERM") {
        env.push(("TERM".into(), "xterm".into()));
    }
    let path_var = env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| DEFAULT_PATH.to_string());
    let program = find_executable(root, &start.argv[0], &path_var, &cwd)?;
    let tty = start.tty.then_some((start.rows, start.cols));
    if let Some((r, c)) = tty {
        if r > u32::from(u16::MAX) || c > u32::from(u16::MAX) {
            return Err(Status::invalid_argument(format!(
                "terminal size {r}x{c} exceeds 65535"
            )));
        }
    }
    Ok(Prepared {
        program,
        argv: start.argv.clone(),
        env,
        cwd,
        identity,
        tty,
        stdin: start.stdin || start.tty,
    })
}

/// Reads a small file of the box image; missing or unreadable gives "" (an image without
/// /etc/passwd only knows numeric users).
fn read_root_file(root: &Path, path: &str) -> String {
    resolve_in_root(root, path, true)
        .ok()
        .and_then(|p| std::fs::read(p).ok())
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// Finds `argv0` the way execvp would, but inside the box root; returns the in-box path.
pub fn find_executable(
    root: &Path,
    argv0: &str,
    path_var: &str,
    cwd: &str,
) -> Result<String, Status> {
    let check = |in_box: &str| -> Result<Option<String>, Status> {
        let host = resolve_in_root(root, in_box, true)
            .map_err(|e| Status::invalid_argument(format!("{in_box}: {e}")))?;
        match std::fs::metadata(&host) {
            Ok(m) if m.is_dir() => Err(Status::permission_denied(format!(
                "{in_box} is a directory, not an executable"
            ))),
            Ok(m) if m.permissions().mode() & 0o111 == 0 => {
                Err(Status::permission_denied(format!(
                    "{in_box} is not executable (mode {:o})",
                    m.permissions().mode() & 0o7777
                )))
            }
            Ok(_) => Ok(Some(in_box.to_string())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Status::permission_denied(format!("{in_box}: {e}"))),
        }
    };
    if argv0.contains('/') {
        let in_box = if argv0.starts_with('/') {
            argv0.to_string()
        } else {
            format!("{}/{argv0}", cwd.trim_end_matches('/'))
        };
        return check(&in_box)?
            .ok_or_else(|| Status::not_found(format!("executable {argv0} not found in the box")));
    }
    let mut denied = None;
    for dir in path_var.split(':').filter(|d| d.starts_with('/')) {
        let cand = format!("{}/{argv0}", dir.trim_end_matches('/'));
        match check(&cand) {
            Ok(Some(p)) => return Ok(p),
            Ok(None) => {}
            Err(e) if e.code() == tonic::Code::PermissionDenied => {
                denied.get_or_insert(e);
            }
            Err(e) => return Err(e),
        }
    }
    Err(denied.unwrap_or_else(|| {
        Status::not_found(format!(
            "executable {argv0:?} not found in PATH {path_var} in the box"
        ))
    }))
}

/// The I/O ends of a started process, as seen by the agent.
struct Spawned {
    pid: u32,
    stdin: Option<pipe::Sender>,
    stdout: pipe::Receiver,
    stderr: Option<pipe::Receiver>,
    pty: Option<Arc<OwnedFd>>,
    exit: tokio::sync::oneshot::Receiver<ExitInfo>,
}

fn cstring(s: impl Into<Vec<u8>>, what: &str) -> Result<CString, Status> {
    CString::new(s).map_err(|_| Status::invalid_argument(format!("{what} contains a NUL byte")))
}

fn spawn(
    root: &Path,
    p: &Prepared,
    reaper: &Reaper,
    mount_ns: Option<&OwnedFd>,
    cgroup_procs: Option<&OwnedFd>,
) -> Result<Spawned, Status> {
    let mount_ns = mount_ns.map(|fd| fd.as_raw_fd());
    let cgroup_procs = cgroup_procs.map(|fd| fd.as_raw_fd());
    let chroot = if root == Path::new("/") {
        None
    } else {
        Some(cstring(root.as_os_str().to_owned().into_vec(), "root")?)
    };
    let cwd = cstring(p.cwd.clone(), "cwd")?;
    let identity = p.identity.clone();
    let tty = p.tty.is_some();

    let mut cmd = Command::new(&p.program);
    cmd.arg0(&p.argv[0]).args(&p.argv[1..]).env_clear().envs(
        p.env
            .iter()
            .map(|(k, v)| (OsString::from(k), OsString::from(v))),
    );

    let mut pty_master = None;
    if let Some((rows, cols)) = p.tty {
        let ws = nix::pty::Winsize {
            ws_row: if rows == 0 { 24 } else { rows as u16 },
            ws_col: if cols == 0 { 80 } else { cols as u16 },
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let pty = nix::pty::openpty(Some(&ws), None)
            .map_err(|e| Status::internal(format!("openpty failed: {e}")))?;
        set_cloexec(&pty.master).and_then(|_| set_cloexec(&pty.slave))?;
        let dup = |fd: &OwnedFd| {
            fd.try_clone()
                .map_err(|e| Status::internal(format!("dup of the pty failed: {e}")))
        };
        cmd.stdin(Stdio::from(dup(&pty.slave)?))
            .stdout(Stdio::from(dup(&pty.slave)?))
            .stderr(Stdio::from(pty.slave));
        pty_master = Some(pty.master);
    } else {
        cmd.stdin(if p.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    }

    // SAFETY: the closure runs in the forked child before exec and only makes async-signal-safe
    // syscalls on data prepared before the fork (no allocation, no locks).
    unsafe {
        cmd.pre_exec(move || {
            // Into the workloads' cgroup before anything else ("0" = the writing process).
            if let Some(fd) = cgroup_procs {
                if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(io::Error::last_os_error());
                }
            }
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            if tty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            // The child is single-threaded here, as setns into a mount namespace requires.
            if let Some(ns) = mount_ns {
                if libc::setns(ns, libc::CLONE_NEWNS) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            if let Some(r) = &chroot {
                if libc::chroot(r.as_ptr()) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            if libc::chdir(cwd.as_ptr()) < 0 {
                return Err(io::Error::last_os_error());
            }
            if let Some((uid, gid, groups)) = &identity {
                if libc::setgroups(groups.len(), groups.as_ptr()) < 0
                    || libc::setgid(*gid) < 0
                    || libc::setuid(*uid) < 0
                {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }

    let (mut child, exit) = reaper
        .spawn_registered(|| {
            let child = cmd.spawn()?;
            Ok((child.id() as i32, child))
        })
        .map_err(|e| spawn_error(p, e))?;
    let pid = child.id();

    let to_status = |e: io::Error| Status::internal(format!("setting up the process pipes: {e}"));
    let spawned = if let Some(master) = pty_master {
        set_nonblocking(&master)?;
        let reader = master.try_clone().map_err(to_status)?;
        let writer = master.try_clone().map_err(to_status)?;
        Spawned {
            pid,
            // A pty master is pollable like a pipe; tokio's pipe types only need a nonblocking,
            // epoll-capable fd (the checked constructors would insist on a FIFO).
            stdin: Some(pipe::Sender::from_owned_fd_unchecked(writer).map_err(to_status)?),
            stdout: pipe::Receiver::from_owned_fd_unchecked(reader).map_err(to_status)?,
            stderr: None,
            pty: Some(Arc::new(master)),
            exit,
        }
    } else {
        let stdin = match child.stdin.take() {
            Some(s) => Some(pipe::Sender::from_owned_fd(OwnedFd::from(s)).map_err(to_status)?),
            None => None,
        };
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| Status::internal("stdout pipe missing"))?;
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| Status::internal("stderr pipe missing"))?;
        Spawned {
            pid,
            stdin,
            stdout: pipe::Receiver::from_owned_fd(OwnedFd::from(stdout)).map_err(to_status)?,
            stderr: Some(pipe::Receiver::from_owned_fd(OwnedFd::from(stderr)).map_err(to_status)?),
            pty: None,
            exit,
        }
    };
    // `child` is dropped without waiting: the reaper owns its exit status.
    drop(child);
    Ok(spawned)
}

fn spawn_error(p: &Prepared, e: io::Error) -> Status {
    match e.kind() {
        io::ErrorKind::NotFound => Status::not_found(format!(
            "cannot execute {}: a file it needs (script interpreter or dynamic loader) is missing: {e}",
            p.program
        )),
        io::ErrorKind::PermissionDenied => {
            Status::permission_denied(format!("cannot execute {}: {e}", p.program))
        }
        _ if e.raw_os_error() == Some(libc::ENOEXEC) => Status::failed_precondition(format!(
            "cannot execute {}: not a valid executable for this system: {e}",
            p.program
        )),
        _ => Status::internal(format!("cannot start {}: {e}", p.program)),
    }
}

fn set_cloexec(fd: &OwnedFd) -> Result<(), Status> {
    // SAFETY: fcntl on a file descriptor we own.
    let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    if rc < 0 {
        return Err(Status::internal(format!(
            "fcntl(FD_CLOEXEC) failed: {}",
            io::Error::last_os_error()
        )));
    }
    Ok(())
}

fn set_nonblocking(fd: &OwnedFd) -> Result<(), Status> {
    // SAFETY: fcntl on a file descriptor we own.
    let rc = unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if flags < 0 {
            flags
        } else {
            libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK)
        }
    };
    if rc < 0 {
        return Err(Status::internal(format!(
            "fcntl(O_NONBLOCK) failed: {}",
            io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// Shared state every Exec needs.
pub struct ExecContext {
    pub root: PathBuf,
    pub reaper: Arc<Reaper>,
    pub procs: Arc<ProcTable>,
    /// The box's workload mount namespace (PID 1 mode): every workload joins it before its
    /// chroot, so mounts a workload makes are shared by the box's processes and never reach
    /// the agent's own namespace.
    pub mount_ns: Option<Arc<OwnedFd>>,
    /// `cgroup.procs` of the workloads' cgroup (PID 1 mode; see [`crate::cgroup`]): every
    /// workload moves itself there first thing after the fork.
    pub cgroup_procs: Option<Arc<OwnedFd>>,
}

/// Creates the workload mount namespace: a copy of the agent's, with every mount private (no
/// propagation back). Made on a short-lived thread, since unshare affects only the caller and
/// a multi-threaded process cannot switch namespaces; the namespace lives on in the fd.
pub fn workload_mount_namespace() -> io::Result<OwnedFd> {
    std::thread::spawn(|| -> io::Result<OwnedFd> {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).map_err(io::Error::from)?;
        nix::mount::mount(
            None::<&str>,
            "/",
            None::<&str>,
            nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .map_err(io::Error::from)?;
        let f = std::fs::File::open("/proc/thread-self/ns/mnt")?;
        Ok(OwnedFd::from(f))
    })
    .join()
    .map_err(|_| io::Error::other("the namespace thread panicked"))?
}

pub type ResponseTx = mpsc::Sender<Result<ExecResponse, Status>>;

/// Starts the process described by `start` and drives the rest of the call in the background.
/// Errors before the process runs are returned to the caller as the call's status.
pub fn start(
    ctx: &ExecContext,
    start: &ExecStart,
    inbound: Streaming<ExecRequest>,
) -> Result<mpsc::Receiver<Result<ExecResponse, Status>>, Status> {
    let t0 = std::time::Instant::now();
    let prepared = prepare(&ctx.root, start)?;
    let t1 = std::time::Instant::now();
    let spawned = spawn(
        &ctx.root,
        &prepared,
        &ctx.reaper,
        ctx.mount_ns.as_deref(),
        ctx.cgroup_procs.as_deref(),
    )?;
    let (tx, rx) = mpsc::channel(RESPONSE_BUFFER);
    ctx.procs.insert(spawned.pid, spawned.pty.clone());
    tracing::debug!(
        pid = spawned.pid,
        program = %prepared.program,
        prepare_us = (t1 - t0).as_micros() as u64,
        spawn_us = t1.elapsed().as_micros() as u64,
        "exec started"
    );
    tokio::spawn(drive(spawned, inbound, tx, ctx.procs.clone()));
    Ok(rx)
}

fn msg(m: exec_response::Msg) -> Result<ExecResponse, Status> {
    Ok(ExecResponse { msg: Some(m) })
}

async fn drive(s: Spawned, inbound: Streaming<ExecRequest>, tx: ResponseTx, procs: Arc<ProcTable>) {
    let pid = s.pid;
    if tx
        .send(msg(exec_response::Msg::Started(Started { pid })))
        .await
        .is_err()
    {
        let _ = send_signal(pid, libc::SIGKILL, true);
    }
    let (exited_tx, exited_rx) = watch::channel(false);
    let out = tokio::spawn(pump(s.stdout, tx.clone(), false, exited_rx.clone()));
    let err = s
        .stderr
        .map(|r| tokio::spawn(pump(r, tx.clone(), true, exited_rx.clone())));
    let feeder = tokio::spawn(feed(inbound, s.stdin, s.pty.clone(), pid));

    let started = std::time::Instant::now();
    let mut exit = s.exit;
    let info = tokio::select! {
        r = &mut exit => r,
        _ = tx.closed() => {
            // The caller went away: nobody can see the output or stop the process any more.
            tracing::info!(pid, "exec caller disconnected; killing the process group");
            let _ = send_signal(pid, libc::SIGKILL, true);
            exit.await
        }
    };
    let exit_us = started.elapsed().as_micros() as u64;
    let _ = exited_tx.send(true);
    let _ = out.await;
    if let Some(err) = err {
        let _ = err.await;
    }
    feeder.abort();
    procs.remove(pid);
    let status = match info {
        Ok(ExitInfo::Code(c)) => Exited {
            status: Some(exited::Status::ExitCode(c)),
            core_dumped: false,
        },
        Ok(ExitInfo::Signal {
            signal,
            core_dumped,
        }) => Exited {
            status: Some(exited::Status::Signal(signal)),
            core_dumped,
        },
        Err(_) => {
            let _ = tx
                .send(Err(Status::internal(format!(
                    "lost the exit status of process {pid}"
                ))))
                .await;
            return;
        }
    };
    tracing::debug!(
        pid,
        ?status,
        exit_us,
        drained_us = started.elapsed().as_micros() as u64,
        "exec finished"
    );
    let _ = tx.send(msg(exec_response::Msg::Exited(status))).await;
}

/// Copies one output stream into the response channel, chunk by chunk; a full channel
/// (slow caller) stops reading, which in turn blocks the writing process.
async fn pump<R: AsyncRead + Unpin>(
    mut r: R,
    tx: ResponseTx,
    is_stderr: bool,
    mut exited: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let res = if *exited.borrow() {
            match tokio::time::timeout(DRAIN_GRACE, r.read(&mut buf)).await {
                Ok(res) => res,
                Err(_) => break,
            }
        } else {
            tokio::select! {
                res = r.read(&mut buf) => res,
                changed = exited.changed() => {
                    if changed.is_err() { break; }
                    continue;
                }
            }
        };
        let n = match res {
            Ok(0) => break,
            Ok(n) => n,
            // A pty master reports EIO once the last slave fd is closed: that is EOF.
            Err(e) if e.raw_os_error() == Some(libc::EIO) => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!("reading process output failed: {e}");
                break;
            }
        };
        let chunk = buf[..n].to_vec();
        let m = if is_stderr {
            exec_response::Msg::Stderr(chunk)
        } else {
            exec_response::Msg::Stdout(chunk)
        };
        if tx.send(msg(m)).await.is_err() {
            break;
        }
    }
}

/// Applies the caller's stdin, resize and signal messages until the request stream ends.
async fn feed(
    mut inbound: Streaming<ExecRequest>,
    mut stdin: Option<pipe::Sender>,
    pty: Option<Arc<OwnedFd>>,
    pid: u32,
) {
    loop {
        let req = match inbound.message().await {
            Ok(Some(r)) => r,
            // Half-close (or a broken stream) means no more stdin.
            Ok(None) | Err(_) => break,
        };
        match req.msg {
            Some(exec_request::Msg::Stdin(data)) => {
                if let Some(w) = stdin.as_mut() {
                    if w.write_all(&data).await.is_err() {
                        // The process closed its stdin (EPIPE); later input has nowhere to go.
                        stdin = None;
                    }
                }
            }
            Some(exec_request::Msg::CloseStdin(_)) => {
                if pty.is_some() {
                    // On a terminal EOF is the VEOF character, not a closed fd.
                    if let Some(w) = stdin.as_mut() {
                        let _ = w.write_all(&[4]).await;
                    }
                }
                stdin = None;
            }
            Some(exec_request::Msg::Resize(sz)) => {
                if let Some(p) = &pty {
                    if let Err(e) = set_winsize(p, sz.rows, sz.cols) {
                        tracing::warn!(pid, "resize: {}", e.message());
                    }
                }
            }
            Some(exec_request::Msg::Signal(sig)) => {
                if let Err(e) = send_signal(pid, sig, false) {
                    tracing::warn!(pid, "signal: {}", e.message());
                }
            }
            Some(exec_request::Msg::Start(_)) | None => {
                tracing::warn!(pid, "ignoring an unexpected message in an Exec stream");
            }
        }
    }
    drop(stdin);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(argv: &[&str]) -> ExecStart {
        ExecStart {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn fake_root() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        std::fs::create_dir_all(r.join("usr/bin")).unwrap();
        std::fs::create_dir_all(r.join("etc")).unwrap();
        std::fs::create_dir_all(r.join("home/app")).unwrap();
        std::os::unix::fs::symlink("usr/bin", r.join("bin")).unwrap();
        std::fs::write(r.join("usr/bin/tool"), b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(
            r.join("usr/bin/tool"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        std::fs::write(r.join("usr/bin/data"), b"x").unwrap();
        std::fs::set_permissions(
            r.join("usr/bin/data"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        std::fs::write(
            r.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(r.join("etc/group"), "root:x:0:\napp:x:1000:\n").unwrap();
        dir
    }

    #[test]
    fn empty_argv_is_invalid_argument() {
        let root = fake_root();
        let e = prepare(root.path(), &start(&[])).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("argv is empty"));
    }

    #[test]
    fn missing_executable_is_not_found_with_its_name() {
        let root = fake_root();
        let e = prepare(root.path(), &start(&["nosuchprog"])).unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound);
        assert!(e.message().contains("nosuchprog"), "{}", e.message());
        let e = prepare(root.path(), &start(&["/opt/x/prog"])).unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound);
        assert!(e.message().contains("/opt/x/prog"));
    }

    #[test]
    fn non_executable_is_permission_denied() {
        let root = fake_root();
        let e = prepare(root.path(), &start(&["data"])).unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(e.message().contains("/usr/bin/data"));
        let e = prepare(root.path(), &start(&["/usr"])).unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
    }

    #[test]
    fn path_lookup_env_user_and_cwd() {
        let root = fake_root();
        let mut s = start(&["tool", "a"]);
        s.env = vec!["PATH=/bin".into(), "A=1".into(), "A=2".into()];
        s.user = "app".into();
        s.cwd = "/home/app".into();
        let p = prepare(root.path(), &s).unwrap();
        assert_eq!(p.program, "/bin/tool");
        assert_eq!(p.identity, Some((1000, 1000, vec![1000])));
        assert!(p.env.contains(&("A".into(), "2".into())));
        assert!(!p.env.contains(&("A".into(), "1".into())));
        assert!(p.env.contains(&("HOME".into(), "/home/app".into())));
        assert_eq!(p.cwd, "/home/app");
    }

    #[test]
    fn bad_inputs_name_the_field() {
        let root = fake_root();
        let mut s = start(&["tool"]);
        s.env = vec!["NOEQUALS".into()];
        let e = prepare(root.path(), &s).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("env[0]"));

        let mut s = start(&["tool"]);
        s.cwd = "/nope".into();
        let e = prepare(root.path(), &s).unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound);
        assert!(e.message().contains("/nope"));

        let mut s = start(&["tool"]);
        s.user = "ghost".into();
        let e = prepare(root.path(), &s).unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound);
        assert!(e.message().contains("ghost"));
    }
}
