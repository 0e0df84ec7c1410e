//! Owns waiting for child processes. As PID 1 the agent must reap every orphan that the kernel
//! re-parents to it, so it cannot let a library `wait()` on its own children: one reaper collects
//! all exit statuses and hands those of registered (exec'd) processes to their waiters.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::sync::oneshot;

/// How a child process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitInfo {
    Code(i32),
    Signal { signal: i32, core_dumped: bool },
}

pub struct Reaper {
    waiters: Mutex<HashMap<i32, oneshot::Sender<ExitInfo>>>,
    /// Reap any child (PID 1 / subreaper), not only registered ones.
    reap_all: bool,
}

impl Reaper {
    pub fn new(reap_all: bool) -> Arc<Self> {
        Arc::new(Reaper {
            waiters: Mutex::new(HashMap::new()),
            reap_all,
        })
    }

    /// Runs `spawn` (which forks a child and returns its pid) with the waiter table locked, so the
    /// child cannot be reaped before its waiter is registered.
    pub fn spawn_registered<T>(
        &self,
        spawn: impl FnOnce() -> io::Result<(i32, T)>,
    ) -> io::Result<(T, oneshot::Receiver<ExitInfo>)> {
        let mut waiters = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        let (pid, value) = spawn()?;
        let (tx, rx) = oneshot::channel();
        waiters.insert(pid, tx);
        Ok((value, rx))
    }

    /// Collects every exited child that is ready now.
    pub fn reap(&self) {
        let mut waiters = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        let pids: Vec<i32> = waiters.keys().copied().collect();
        for pid in pids {
            if let Ok(status) = waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
                Self::dispatch(&mut waiters, status);
            }
        }
        if self.reap_all {
            while let Ok(status) = waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
                if status == WaitStatus::StillAlive {
                    break;
                }
                Self::dispatch(&mut waiters, status);
            }
        }
    }

    fn dispatch(waiters: &mut HashMap<i32, oneshot::Sender<ExitInfo>>, status: WaitStatus) {
        let (pid, info) = match status {
            WaitStatus::Exited(pid, code) => (pid, ExitInfo::Code(code)),
            WaitStatus::Signaled(pid, sig, core) => (
                pid,
                ExitInfo::Signal {
                    signal: sig as i32,
                    core_dumped: core,
                },
            ),
            _ => return,
        };
        if let Some(tx) = waiters.remove(&pid.as_raw()) {
            let _ = tx.send(info);
        }
    }

    /// Reaps on every SIGCHLD until the process ends.
    pub async fn run(self: Arc<Self>) {
        use tokio::signal::unix::{signal, SignalKind};
        let mut sigchld = match signal(SignalKind::child()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("cannot watch SIGCHLD ({e}); falling back to polling");
                loop {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    self.reap();
                }
            }
        };
        loop {
            self.reap();
            // A periodic sweep as well: cheap, and robust if a signal is ever coalesced oddly.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), sigchld.recv()).await;
        }
    }
}
