//! The runtime's use of the agent client: connect + wait for SERVING, run an exec to
//! completion, shut down, and the `agent.sock` bridge. Keeps [`crate::manager`] independent of
//! the client's details.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::agent_client::{serve_bridge, AgentClient, BridgeHandle};
use crate::hypervisor::AgentEndpoint;
use crate::manager::{ExecResult, ResolvedExec, WaitError};
use crate::process::ExitInfo;

/// How long one health check may take before it counts as failed.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(5);

/// A shared connection to one box's agent.
#[derive(Clone)]
pub struct AgentLink {
    client: Arc<AgentClient>,
}

async fn connect(endpoint: &AgentEndpoint) -> Result<AgentClient, String> {
    match endpoint {
        AgentEndpoint::HybridVsock { uds, port, gate } => {
            AgentClient::connect_hybrid_vsock(uds, *port, gate)
                .await
                .map_err(|e| e.to_string())
        }
        AgentEndpoint::Unix(p) => AgentClient::connect_unix(p)
            .await
            .map_err(|e| e.to_string()),
    }
}

/// The host end of the agent's ready notification (see
/// [`microbox_agent_proto::AGENT_READY_VSOCK_PORT`]): a Unix listener bound before the VM starts,
/// at the path the vsock device maps the guest's connection to. Removed when dropped.
pub(crate) struct ReadyListener {
    listener: tokio::net::UnixListener,
    path: PathBuf,
}

impl ReadyListener {
    pub(crate) fn bind(path: &Path) -> std::io::Result<Self> {
        let _ = std::fs::remove_file(path);
        Ok(ReadyListener {
            listener: tokio::net::UnixListener::bind(path)?,
            path: path.to_path_buf(),
        })
    }

    /// Waits for the agent's `READY` line, the VMM's exit or `deadline`. Connections that do not
    /// say `READY` are dropped and waiting goes on.
    pub(crate) async fn wait(
        &self,
        exit: &tokio::sync::watch::Receiver<Option<ExitInfo>>,
        deadline: Instant,
    ) -> Result<(), WaitError> {
        use tokio::io::AsyncReadExt;
        let mut exit = exit.clone();
        let until = tokio::time::Instant::from_std(deadline);
        loop {
            if let Some(info) = exit.borrow_and_update().clone() {
                return Err(WaitError::Exited(info.to_string()));
            }
            tokio::select! {
                conn = self.listener.accept() => {
                    let Ok((mut s, _)) = conn else { continue };
                    let mut buf = [0u8; 16];
                    let mut n = 0;
                    let read = async {
                        while n < microbox_agent_proto::READY_LINE.len() {
                            match s.read(&mut buf[n..]).await {
                                Ok(0) | Err(_) => break,
                                Ok(k) => n += k,
                            }
                        }
                    };
                    let _ = tokio::time::timeout(Duration::from_secs(2), read).await;
                    if &buf[..n] == microbox_agent_proto::READY_LINE {
                        return Ok(());
                    }
                }
                _ = exit.changed() => {}
                _ = tokio::time::sleep_until(until) => return Err(WaitError::Timeout),
            }
        }
    }
}

impl Drop for ReadyListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl AgentLink {
    /// Retries connecting until the guest accepts on the agent port (the kernel booted and the
    /// agent listens), the VMM exits or `deadline` passes.
    pub(crate) async fn connect_when_listening(
        endpoint: &AgentEndpoint,
        exit: &tokio::sync::watch::Receiver<Option<ExitInfo>>,
        deadline: Instant,
    ) -> Result<Self, WaitError> {
        loop {
            if let Some(info) = exit.borrow().clone() {
                return Err(WaitError::Exited(info.to_string()));
            }
            if let Ok(c) = connect(endpoint).await {
                return Ok(AgentLink {
                    client: Arc::new(c),
                });
            }
            if Instant::now() >= deadline {
                return Err(WaitError::Timeout);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Retries the health check until SERVING, the VMM exits or `deadline` passes.
    pub(crate) async fn wait_healthy(
        &self,
        exit: &tokio::sync::watch::Receiver<Option<ExitInfo>>,
        deadline: Instant,
    ) -> Result<(), WaitError> {
        loop {
            if let Some(info) = exit.borrow().clone() {
                return Err(WaitError::Exited(info.to_string()));
            }
            // One answer must not hold the boot past its deadline (a guest can stall).
            let left = deadline.saturating_duration_since(Instant::now());
            let last =
                match tokio::time::timeout(left.min(HEALTH_TIMEOUT), self.client.health()).await {
                    Ok(Ok(true)) => return Ok(()),
                    Ok(Ok(false)) => "health check answered NOT_SERVING".to_string(),
                    Ok(Err(e)) => format!("health check failed: {e}"),
                    Err(_) => "health check did not answer".to_string(),
                };
            if Instant::now() >= deadline {
                return Err(WaitError::Agent(format!(
                    "not SERVING before the boot deadline: {last}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// One health check, bounded by [`HEALTH_TIMEOUT`].
    pub async fn health(&self) -> Result<bool, String> {
        match tokio::time::timeout(HEALTH_TIMEOUT, self.client.health()).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err(format!(
                "the agent did not answer a health check within {HEALTH_TIMEOUT:?}"
            )),
        }
    }

    pub async fn exec(&self, r: &ResolvedExec) -> Result<ExecResult, String> {
        let spec = r.to_spec();
        let out = match &r.stdin {
            Some(input) => {
                self.client
                    .exec_output_with_stdin(spec, input.clone())
                    .await
            }
            None => self.client.exec_output(spec).await,
        }
        .map_err(|e| e.to_string())?;
        Ok(ExecResult {
            exit_code: out.exit_code,
            signal: out.signal,
            stdout: out.stdout,
            stderr: out.stderr,
            duration: Duration::ZERO,
        })
    }

    pub async fn shutdown(&self) -> Result<(), String> {
        self.client.shutdown().await.map_err(|e| e.to_string())
    }

    /// A clone of the connected client (cheap; calls may run concurrently).
    pub fn client(&self) -> AgentClient {
        (*self.client).clone()
    }
}

/// The `agent.sock` bridge; stops when dropped.
pub struct Bridge {
    _handle: BridgeHandle,
    path: PathBuf,
}

impl Bridge {
    pub async fn start(listen: &Path, endpoint: &AgentEndpoint) -> Result<Self, String> {
        let AgentEndpoint::HybridVsock { uds, port, gate } = endpoint else {
            return Err("the agent endpoint is already a plain Unix socket".into());
        };
        let _ = std::fs::remove_file(listen);
        let h = serve_bridge(listen, uds, *port, gate)
            .await
            .map_err(|e| e.to_string())?;
        Ok(Bridge {
            _handle: h,
            path: listen.to_path_buf(),
        })
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
