//! Helper processes (VMM, virtiofsd, vsock device) that live and die with their box.
//!
//! Each child gets `PR_SET_PDEATHSIG(SIGKILL)` so it dies if the runtime dies, its own process
//! group (a terminal's Ctrl-C goes to the runtime, which then shuts boxes down in order), a pidfile
//! in the box directory (so a later run can clean up after a crash), and output to a log file.
//! A background task reaps the child and publishes how it ended.
//! Stopping a helper ends its whole process group, so what it forked goes with it.

use std::fs::File;
use std::io;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::sync::watch;

/// The descriptor number a socket passed with [`ManagedProcess::spawn_with_fd`] gets in the
/// child.
pub const PASSED_FD: i32 = 3;

/// How a helper ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitInfo {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

impl std::fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.code, self.signal) {
            (Some(c), _) => write!(f, "exit code {c}"),
            (None, Some(s)) => write!(f, "killed by signal {s}"),
            _ => f.write_str("unknown exit status"),
        }
    }
}

/// A running helper process.
#[derive(Debug)]
pub struct ManagedProcess {
    name: String,
    pid: u32,
    exit: watch::Receiver<Option<ExitInfo>>,
    pidfile: Option<PathBuf>,
}

impl ManagedProcess {
    /// Spawns `program args` with stdout/stderr appended to `log` (None: discarded).
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[String],
        log: Option<&Path>,
        pidfile: Option<PathBuf>,
    ) -> io::Result<Self> {
        Self::spawn_with_fd(name, program, args, log, pidfile, None)
    }

    /// [`Self::spawn`], handing `fd` to the child as its file descriptor [`PASSED_FD`] (a
    /// connected socket, so that no listening path is needed).
    pub fn spawn_with_fd(
        name: &str,
        program: &Path,
        args: &[String],
        log: Option<&Path>,
        pidfile: Option<PathBuf>,
        fd: Option<&std::os::fd::OwnedFd>,
    ) -> io::Result<Self> {
        let passed = fd.map(std::os::fd::AsRawFd::as_raw_fd);
        let mut cmd = std::process::Command::new(program);
        cmd.args(args).stdin(Stdio::null());
        match log {
            Some(l) => {
                let f = File::options().create(true).append(true).open(l)?;
                cmd.stdout(f.try_clone()?).stderr(f);
            }
            None => {
                cmd.stdout(Stdio::null()).stderr(Stdio::null());
            }
        }
        // SAFETY: the closure runs in the child between fork and exec and only calls
        // async-signal-safe functions (prctl, getppid, setpgid, dup2, fcntl, _exit).
        unsafe {
            let parent = libc::getpid();
            cmd.pre_exec(move || {
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                ) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                // The parent may have died before prctl: then nobody would kill us.
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                libc::setpgid(0, 0);
                if let Some(fd) = passed {
                    // dup2 leaves the copy without FD_CLOEXEC, so it survives the exec; a
                    // descriptor that already has the number needs the flag cleared instead.
                    let r = if fd == PASSED_FD {
                        libc::fcntl(fd, libc::F_SETFD, 0)
                    } else {
                        libc::dup2(fd, PASSED_FD)
                    };
                    if r < 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut child = tokio::process::Command::from(cmd)
            .kill_on_drop(false)
            .spawn()?;
        let pid = child
            .id()
            .ok_or_else(|| io::Error::other("child exited before its pid was read"))?;
        if let Some(p) = &pidfile {
            std::fs::write(p, format!("{pid}\n"))?;
        }
        let (tx, rx) = watch::channel(None);
        let pname = name.to_string();
        tokio::spawn(async move {
            let info = match child.wait().await {
                Ok(st) => ExitInfo {
                    code: st.code(),
                    signal: st.signal(),
                },
                Err(e) => {
                    tracing::warn!(process = %pname, error = %e, "waiting for helper failed");
                    ExitInfo {
                        code: None,
                        signal: None,
                    }
                }
            };
            tracing::debug!(process = %pname, pid, status = %info, "helper exited");
            let _ = tx.send(Some(info));
        });
        Ok(Self {
            name: name.to_string(),
            pid,
            exit: rx,
            pidfile,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The exit status, if the process has ended (and been reaped).
    pub fn exit_info(&self) -> Option<ExitInfo> {
        self.exit.borrow().clone()
    }

    pub fn is_running(&self) -> bool {
        self.exit.borrow().is_none()
    }

    /// Sends `sig` unless the process was already reaped (its pid may have been reused).
    pub fn signal(&self, sig: i32) {
        self.signaller().signal(sig);
    }

    /// A cloneable handle that can signal this process from another task.
    pub fn signaller(&self) -> Signaller {
        Signaller {
            pid: self.pid,
            exit: self.exit.clone(),
        }
    }

    /// Waits for the process to end.
    pub async fn wait(&self) -> ExitInfo {
        wait_exit(&mut self.exit.clone()).await
    }

    /// A receiver that sees the exit status once the process ends.
    pub fn exit_watch(&self) -> watch::Receiver<Option<ExitInfo>> {
        self.exit.clone()
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL and wait for the reap. Removes the pidfile.
    pub async fn stop(&self, grace: Duration) -> ExitInfo {
        let mut info = None;
        if self.is_running() && !grace.is_zero() {
            self.signal_group(libc::SIGTERM);
            info = tokio::time::timeout(grace, self.wait()).await.ok();
        }
        let info = match info {
            Some(i) => i,
            None => {
                self.signal_group(libc::SIGKILL);
                self.wait().await
            }
        };
        // What it forked (virtiofsd's sandboxed worker) dies by its own parent-death signal, a
        // moment later: the helper is stopped when none of its process group runs.
        kill_process_group(self.pid).await;
        self.remove_pidfile();
        info
    }

    /// Sends `sig` to the helper's whole process group (it leads its own) while it is unreaped.
    fn signal_group(&self, sig: i32) {
        if self.exit.borrow().is_none() {
            // SAFETY: kill(2) of the process group our unreaped child leads, valid signal.
            unsafe {
                libc::kill(-(self.pid as libc::pid_t), sig);
            }
        }
    }

    /// SIGKILL and wait for the reap.
    pub async fn kill(&self) -> ExitInfo {
        self.stop(Duration::ZERO).await
    }

    fn remove_pidfile(&self) {
        if let Some(p) = &self.pidfile {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Waits until an exit watch (see [`ManagedProcess::exit_watch`]) reports the exit.
pub async fn wait_exit(rx: &mut watch::Receiver<Option<ExitInfo>>) -> ExitInfo {
    loop {
        if let Some(i) = rx.borrow_and_update().clone() {
            return i;
        }
        if rx.changed().await.is_err() {
            return rx.borrow().clone().unwrap_or(ExitInfo {
                code: None,
                signal: None,
            });
        }
    }
}

/// Signals one [`ManagedProcess`] from elsewhere, with the same reuse guard.
#[derive(Debug, Clone)]
pub struct Signaller {
    pid: u32,
    exit: watch::Receiver<Option<ExitInfo>>,
}

impl Signaller {
    /// Sends `sig` unless the process was already reaped.
    pub fn signal(&self, sig: i32) {
        if self.exit.borrow().is_none() {
            // SAFETY: kill(2) with a pid of our own unreaped child and a valid signal number.
            unsafe {
                libc::kill(self.pid as libc::pid_t, sig);
            }
        }
    }
}

/// Kills processes recorded in `*.pid` files of a box directory left behind by a runtime that
/// crashed (its children got SIGKILL via PDEATHSIG, but a pidfile is cheap insurance).
/// Only kills a pid whose command line mentions the box directory, so a reused pid is spared.
pub fn kill_stale_pidfiles(box_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(box_dir) else {
        return;
    };
    let needle = box_dir.as_os_str().as_encoded_bytes().to_vec();
    for e in entries.flatten() {
        let p = e.path();
        if p.extension().and_then(|x| x.to_str()) != Some("pid") {
            continue;
        }
        let Some(pid) = std::fs::read_to_string(&p)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        else {
            continue;
        };
        if pid <= 1 {
            continue;
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if cmdline
            .windows(needle.len())
            .any(|w| w == needle.as_slice())
        {
            // SAFETY: kill(2) on a pid verified (via its cmdline) to belong to this box.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        let _ = std::fs::remove_file(&p);
    }
}

/// Resident set size of a process in bytes (VmRSS), None if it is gone.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The fields of a `/proc/.../stat` file after the command name (state, ppid, pgrp, ...); the
/// name is in parentheses and may hold anything, so it is skipped from the last `)`.
fn stat_fields(stat_file: &Path) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(stat_file).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// Whether every thread of `pid` is asleep (state `S`): then none has work it has been woken
/// for. None if the process is gone.
pub fn all_threads_asleep(pid: u32) -> Option<bool> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    for t in tasks.flatten() {
        // A thread whose stat cannot be read has ended.
        if let Some(f) = stat_fields(&t.path().join("stat")) {
            if f.first().map(String::as_str) != Some("S") {
                return Some(false);
            }
        }
    }
    Some(true)
}

/// Live (not zombie) processes in process group `pgid`.
fn process_group_members(pgid: u32) -> Vec<u32> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let f = stat_fields(&e.path().join("stat"))?;
            (f.get(2)?.parse::<u32>().ok()? == pgid && f[0] != "Z").then_some(pid)
        })
        .collect()
}

/// SIGKILLs what runs of process group `pgid` and waits (up to 1 s) until none of it does.
async fn kill_process_group(pgid: u32) {
    for _ in 0..100 {
        let live = process_group_members(pgid);
        if live.is_empty() {
            return;
        }
        for pid in live {
            // SAFETY: kill(2) of a process just seen alive in the group our helper led.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until [`all_threads_asleep`] holds in two samples a little apart (a thread may wake
/// another between samples), or `limit` passes. Returns whether it did.
pub async fn wait_asleep(pid: u32, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    let mut quiet = 0;
    loop {
        match all_threads_asleep(pid) {
            None => return true, // gone: nothing of it can run
            Some(true) => quiet += 1,
            Some(false) => quiet = 0,
        }
        if quiet == 2 {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Finds an executable: `env_var` if set, else `name` in ~/.cargo/bin, /usr/libexec, PATH.
pub fn find_program(name: &str, env_var: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env_var).filter(|v| !v.is_empty()) {
        let p = PathBuf::from(p);
        return p.is_file().then_some(p);
    }
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    dirs.extend(
        [
            "/usr/libexec",
            "/usr/lib/qemu",
            "/usr/local/bin",
            "/usr/bin",
        ]
        .map(PathBuf::from),
    );
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stop_ends_what_the_helper_forked_too() {
        let tmp = tempfile::tempdir().unwrap();
        for grace in [Duration::ZERO, Duration::from_millis(500)] {
            // The forked sleep has no parent-death signal: only the group kill ends it.
            let p = ManagedProcess::spawn(
                "forker",
                Path::new("/bin/sh"),
                &["-c".into(), "sleep 30 & sleep 31; wait".into()],
                Some(&tmp.path().join("log")),
                None,
            )
            .unwrap();
            for _ in 0..100 {
                if process_group_members(p.pid()).len() == 3 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert_eq!(process_group_members(p.pid()).len(), 3);
            p.stop(grace).await;
            assert_eq!(process_group_members(p.pid()), Vec::<u32>::new());
        }
    }

    #[tokio::test]
    async fn a_sleeping_process_settles_and_a_spinning_one_does_not() {
        let mut sleeper = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let mut spinner = std::process::Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .spawn()
            .unwrap();
        assert!(wait_asleep(sleeper.id(), Duration::from_secs(5)).await);
        assert!(!wait_asleep(spinner.id(), Duration::from_millis(300)).await);
        assert_eq!(all_threads_asleep(spinner.id()), Some(false));
        for c in [&mut sleeper, &mut spinner] {
            c.kill().unwrap();
            c.wait().unwrap();
        }
        assert_eq!(all_threads_asleep(sleeper.id()), None);
    }

    #[tokio::test]
    async fn spawn_stop_and_pidfile() {
        let tmp = tempfile::tempdir().unwrap();
        let pidfile = tmp.path().join("sleep.pid");
        let p = ManagedProcess::spawn(
            "sleep",
            Path::new("/bin/sleep"),
            &["30".into()],
            Some(&tmp.path().join("log")),
            Some(pidfile.clone()),
        )
        .unwrap();
        assert_eq!(
            std::fs::read_to_string(&pidfile).unwrap().trim(),
            p.pid().to_string()
        );
        assert!(p.is_running());
        let info = p.stop(Duration::from_secs(5)).await;
        assert_eq!(info.signal, Some(libc::SIGTERM));
        assert!(!pidfile.exists());
        assert!(!Path::new(&format!("/proc/{}", p.pid())).exists());
    }

    #[tokio::test]
    async fn exit_code_is_reported() {
        let p = ManagedProcess::spawn("false", Path::new("/bin/false"), &[], None, None).unwrap();
        assert_eq!(
            p.wait().await,
            ExitInfo {
                code: Some(1),
                signal: None
            }
        );
        assert_eq!(p.name(), "false");
    }
}
