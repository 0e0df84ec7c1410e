//! Helper processes (VMM, virtiofsd, vsock device) that live and die with their box.
//!
//! Each child gets `PR_SET_PDEATHSIG(SIGKILL)` so it dies if the runtime dies, its own process
//! group (a terminal's Ctrl-C goes to the runtime, which then shuts boxes down in order), a pidfile
//! in the box directory (so a later run can clean up after a crash), and output to a log file.
//! A background task reaps the child and publishes how it ended.

use std::fs::File;
use std::io;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::sync::watch;

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
        // async-signal-safe functions (prctl, getppid, setpgid, _exit).
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
        if self.is_running() {
            // SAFETY: kill(2) with a pid of our own unreaped child and a valid signal number.
            unsafe {
                libc::kill(self.pid as libc::pid_t, sig);
            }
        }
    }

    /// Waits for the process to end.
    pub async fn wait(&self) -> ExitInfo {
        let mut rx = self.exit.clone();
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

    /// A receiver that sees the exit status once the process ends.
    pub fn exit_watch(&self) -> watch::Receiver<Option<ExitInfo>> {
        self.exit.clone()
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL and wait for the reap. Removes the pidfile.
    pub async fn stop(&self, grace: Duration) -> ExitInfo {
        if self.is_running() && !grace.is_zero() {
            self.signal(libc::SIGTERM);
            if let Ok(i) = tokio::time::timeout(grace, self.wait()).await {
                self.remove_pidfile();
                return i;
            }
        }
        self.signal(libc::SIGKILL);
        let info = self.wait().await;
        self.remove_pidfile();
        info
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
