//! The host side of the guest agent protocol: a gRPC client for `microbox.agent.v1.Agent` and
//! `grpc.health.v1.Health`, reached either through the VM's hybrid-vsock Unix socket
//! (vhost-device-vsock / Firecracker style: `CONNECT <port>\n` -> `OK <n>\n`) or through a plain
//! Unix socket (a box's `agent.sock`, libkrun's port map, an agent run on the host), plus the
//! `agent.sock` bridge that lets standard gRPC tools reach the guest without the handshake.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use microbox_agent_proto::health::{HealthCheckRequest, HealthClient, ServingStatus};
use microbox_agent_proto::v1::agent_client::AgentClient as RawAgentClient;
use microbox_agent_proto::v1::{
    exec_request, exec_response, exited, write_file_request, AttestationReportRequest, CloseStdin,
    ExecRequest, ExecResponse, ReadFileRequest, ResizeTtyRequest, ShutdownRequest, SignalRequest,
    StatsRequest, TtySize, WriteFileHeader, WriteFileRequest,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::Streaming;

pub use crate::vsock_gate::{GatedStream, IoGate};

/// What to run: the protocol's `ExecStart` (argv, env "K=V", cwd, user, tty, rows, cols, stdin).
pub use microbox_agent_proto::v1::ExecStart as ExecSpec;
pub use microbox_agent_proto::v1::FileFormat as TransferFormat;
/// Guest memory, load, uptime and process count.
pub use microbox_agent_proto::v1::StatsResponse as GuestStats;
/// gRPC status codes, for matching [`AgentClientError::code`] without a direct tonic dependency.
pub use tonic::Code;

/// How long the hybrid-vsock handshake may take before the connection is given up.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Size of stdin / file chunks sent to the agent.
const CHUNK: usize = 32 * 1024;

/// Errors of the agent client and the bridge.
#[derive(Debug, thiserror::Error)]
pub enum AgentClientError {
    #[error("connecting to {}: {source}", path.display())]
    Connect { path: PathBuf, source: io::Error },
    #[error("vsock handshake on {} for guest port {port} was refused: the device answered {answer:?}", path.display())]
    HandshakeRefused {
        path: PathBuf,
        port: u32,
        answer: String,
    },
    #[error("vsock handshake on {} for guest port {port}: the device closed the connection without answering (nothing listening on that guest port yet?)", path.display())]
    HandshakeClosed { path: PathBuf, port: u32 },
    #[error("vsock handshake on {} for guest port {port}: no answer within {}s", path.display(), HANDSHAKE_TIMEOUT.as_secs())]
    HandshakeTimeout { path: PathBuf, port: u32 },
    #[error("vsock handshake on {} for guest port {port}: {source}", path.display())]
    HandshakeIo {
        path: PathBuf,
        port: u32,
        source: io::Error,
    },
    #[error("gRPC transport: {}", error_chain(.0))]
    Transport(#[from] tonic::transport::Error),
    #[error("agent {rpc} failed: {}: {}", .status.code(), .status.message())]
    Rpc {
        rpc: &'static str,
        status: tonic::Status,
    },
    #[error("agent {rpc}: protocol violation: {detail}")]
    Protocol { rpc: &'static str, detail: String },
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("agent bridge at {}: {detail}", path.display())]
    Bridge { path: PathBuf, detail: String },
}

impl AgentClientError {
    /// The gRPC status code when the agent answered with an error status.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            AgentClientError::Rpc { status, .. } => Some(status.code()),
            _ => None,
        }
    }

    /// Whether a call failed because the connection to the agent broke (tonic reports that as
    /// an Unknown or Unavailable status saying "transport error"), not because the agent said no.
    pub fn is_connection_lost(&self) -> bool {
        match self {
            AgentClientError::Rpc { status, .. } => {
                matches!(
                    status.code(),
                    tonic::Code::Unknown | tonic::Code::Unavailable
                ) && status.message().contains("transport error")
            }
            _ => false,
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

pub type Result<T, E = AgentClientError> = std::result::Result<T, E>;

fn rpc(rpc: &'static str) -> impl FnOnce(tonic::Status) -> AgentClientError {
    move |status| AgentClientError::Rpc { rpc, status }
}

/// Opens a stream to guest `port` through the hybrid-vsock socket `uds`, every operation of
/// which passes `gate` (see [`crate::vsock_gate`]).
pub async fn connect_hybrid_vsock_stream(
    uds: &Path,
    port: u32,
    gate: &IoGate,
) -> Result<GatedStream> {
    let mut s = gate
        .connect(uds)
        .await
        .map_err(|source| AgentClientError::Connect {
            path: uds.to_path_buf(),
            source,
        })?;
    let hs_err = |source| AgentClientError::HandshakeIo {
        path: uds.to_path_buf(),
        port,
        source,
    };
    s.write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(hs_err)?;
    let read_line = async {
        // Byte by byte: everything after the newline already belongs to the guest stream.
        let mut line = Vec::with_capacity(16);
        loop {
            let mut b = [0u8; 1];
            if s.read(&mut b).await? == 0 {
                return Ok::<_, io::Error>((line, true));
            }
            if b[0] == b'\n' {
                return Ok((line, false));
            }
            line.push(b[0]);
            if line.len() > 128 {
                return Ok((line, false));
            }
        }
    };
    let (line, closed) = tokio::time::timeout(HANDSHAKE_TIMEOUT, read_line)
        .await
        .map_err(|_| AgentClientError::HandshakeTimeout {
            path: uds.to_path_buf(),
            port,
        })?
        .map_err(hs_err)?;
    if closed && line.is_empty() {
        return Err(AgentClientError::HandshakeClosed {
            path: uds.to_path_buf(),
            port,
        });
    }
    let answer = String::from_utf8_lossy(&line).into_owned();
    let ok = answer
        .strip_prefix("OK ")
        .is_some_and(|n| n.trim().parse::<u32>().is_ok());
    if closed || !ok {
        return Err(AgentClientError::HandshakeRefused {
            path: uds.to_path_buf(),
            port,
            answer,
        });
    }
    Ok(s)
}

/// How an exec'd process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitStatus {
    /// The process id inside the guest.
    pub pid: u32,
    /// Exit code when the process exited normally.
    pub exit_code: Option<i32>,
    /// Signal number when the process was killed by a signal.
    pub signal: Option<i32>,
    pub core_dumped: bool,
}

impl ExitStatus {
    pub fn success(&self) -> bool {
        self.exit_code == Some(0)
    }
}

/// Collected output of [`AgentClient::exec_output`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
}

/// An attestation report from the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttestationReport {
    pub report: Vec<u8>,
    pub certs: Vec<u8>,
    /// "configfs-tsm" or "sev-guest".
    pub provider: String,
}

/// One event of a running exec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Exited(ExitStatus),
}

/// A running exec: feed stdin / resize / signal, and read output events until `Exited`.
pub struct ExecSession {
    pid: u32,
    tx: Option<mpsc::Sender<ExecRequest>>,
    rx: Streaming<ExecResponse>,
    done: bool,
}

impl ExecSession {
    /// The process id inside the guest.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    async fn send(&self, msg: exec_request::Msg) -> Result<()> {
        let tx = self.tx.as_ref().ok_or_else(|| {
            AgentClientError::InvalidArgument("stdin of this exec is already closed".into())
        })?;
        tx.send(ExecRequest { msg: Some(msg) })
            .await
            .map_err(|_| AgentClientError::Protocol {
                rpc: "Exec",
                detail: "the request stream is closed (the call ended)".into(),
            })
    }

    /// Sends bytes to the process's stdin (waits while the agent applies backpressure).
    pub async fn write_stdin(&self, data: Vec<u8>) -> Result<()> {
        self.send(exec_request::Msg::Stdin(data)).await
    }

    /// Closes stdin (EOF for the process) and ends the request stream.
    pub async fn close_stdin(&mut self) -> Result<()> {
        if self.tx.is_some() {
            self.send(exec_request::Msg::CloseStdin(CloseStdin {}))
                .await?;
            self.tx = None;
        }
        Ok(())
    }

    /// Changes the terminal size (tty execs).
    pub async fn resize(&self, rows: u32, cols: u32) -> Result<()> {
        self.send(exec_request::Msg::Resize(TtySize { rows, cols }))
            .await
    }

    /// Sends a signal to the process.
    pub async fn signal(&self, signal: i32) -> Result<()> {
        self.send(exec_request::Msg::Signal(signal)).await
    }

    /// The next output chunk or the exit status; `Ok(None)` after `Exited` was returned.
    pub async fn next_event(&mut self) -> Result<Option<ExecEvent>> {
        if self.done {
            return Ok(None);
        }
        loop {
            let msg = self.rx.message().await.map_err(rpc("Exec"))?;
            let Some(ExecResponse { msg }) = msg else {
                return Err(AgentClientError::Protocol {
                    rpc: "Exec",
                    detail: "the response stream ended without an exit status".into(),
                });
            };
            match msg {
                Some(exec_response::Msg::Stdout(d)) => return Ok(Some(ExecEvent::Stdout(d))),
                Some(exec_response::Msg::Stderr(d)) => return Ok(Some(ExecEvent::Stderr(d))),
                Some(exec_response::Msg::Exited(e)) => {
                    self.done = true;
                    self.tx = None;
                    let (exit_code, signal) = match e.status {
                        Some(exited::Status::ExitCode(c)) => (Some(c), None),
                        Some(exited::Status::Signal(s)) => (None, Some(s)),
                        None => (None, None),
                    };
                    return Ok(Some(ExecEvent::Exited(ExitStatus {
                        pid: self.pid,
                        exit_code,
                        signal,
                        core_dumped: e.core_dumped,
                    })));
                }
                Some(exec_response::Msg::Started(_)) | None => continue,
            }
        }
    }
}

/// A connection to one guest agent. Cheap to clone; calls may run concurrently.
#[derive(Clone)]
pub struct AgentClient {
    agent: RawAgentClient<Channel>,
    health: HealthClient<Channel>,
}

fn endpoint() -> Endpoint {
    // The URI is only used for the :authority header; the connector decides where to connect.
    Endpoint::from_static("http://localhost")
        .initial_stream_window_size(Some(1 << 20))
        .initial_connection_window_size(Some(4 << 20))
        .connect_timeout(Duration::from_secs(10))
}

impl AgentClient {
    fn from_channel(channel: Channel) -> Self {
        AgentClient {
            agent: RawAgentClient::new(channel.clone()).max_decoding_message_size(16 << 20),
            health: HealthClient::new(channel),
        }
    }

    /// Connects through a hybrid-vsock Unix socket (vhost-device-vsock, Firecracker): every
    /// (re)connection sends `CONNECT <port>\n` and expects `OK <n>\n`. The first handshake is done
    /// here, so a refused handshake is reported as such. All its I/O passes `gate`.
    pub async fn connect_hybrid_vsock(uds: &Path, port: u32, gate: &IoGate) -> Result<AgentClient> {
        let first = connect_hybrid_vsock_stream(uds, port, gate).await?;
        let first = Arc::new(Mutex::new(Some(first)));
        let uds = uds.to_path_buf();
        let gate = gate.clone();
        let channel = endpoint()
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let uds = uds.clone();
                let first = first.clone();
                let gate = gate.clone();
                async move {
                    let ready = first.lock().unwrap_or_else(|p| p.into_inner()).take();
                    let stream = match ready {
                        Some(s) => s,
                        None => connect_hybrid_vsock_stream(&uds, port, &gate)
                            .await
                            .map_err(io::Error::other)?,
                    };
                    Ok::<_, io::Error>(TokioIo::new(stream))
                }
            }))
            .await?;
        Ok(Self::from_channel(channel))
    }

    /// Connects to a plain Unix socket that leads straight to the agent.
    pub async fn connect_unix(path: &Path) -> Result<AgentClient> {
        // Fail with the path in the message rather than a bare transport error.
        let first =
            UnixStream::connect(path)
                .await
                .map_err(|source| AgentClientError::Connect {
                    path: path.to_path_buf(),
                    source,
                })?;
        let first = Arc::new(Mutex::new(Some(first)));
        let path = path.to_path_buf();
        let channel = endpoint()
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                let first = first.clone();
                async move {
                    let ready = first.lock().unwrap_or_else(|p| p.into_inner()).take();
                    let stream = match ready {
                        Some(s) => s,
                        None => UnixStream::connect(&path).await?,
                    };
                    Ok::<_, io::Error>(TokioIo::new(stream))
                }
            }))
            .await?;
        Ok(Self::from_channel(channel))
    }

    /// `grpc.health.v1.Health/Check` for the whole agent: true when SERVING.
    pub async fn health(&self) -> Result<bool> {
        let r = self
            .health
            .clone()
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map_err(rpc("Health.Check"))?;
        Ok(r.into_inner().status == ServingStatus::Serving as i32)
    }

    /// `grpc.health.v1.Health/Watch` for the whole agent: the first status now, then every
    /// change, until the agent goes away.
    pub async fn watch_health(
        &self,
    ) -> Result<impl futures::Stream<Item = Result<bool>> + Send + 'static> {
        use futures::StreamExt;
        let stream = self
            .health
            .clone()
            .watch(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map_err(rpc("Health.Watch"))?
            .into_inner();
        Ok(stream.map(|r| {
            r.map(|m| m.status == ServingStatus::Serving as i32)
                .map_err(rpc("Health.Watch"))
        }))
    }

    /// Starts a process and returns once the agent reported it running.
    pub async fn exec_session(&self, spec: ExecSpec) -> Result<ExecSession> {
        let (tx, rx) = mpsc::channel(8);
        tx.send(ExecRequest {
            msg: Some(exec_request::Msg::Start(spec)),
        })
        .await
        .map_err(|_| AgentClientError::Protocol {
            rpc: "Exec",
            detail: "request channel closed".into(),
        })?;
        let mut responses = self
            .agent
            .clone()
            .exec(ReceiverStream::new(rx))
            .await
            .map_err(rpc("Exec"))?
            .into_inner();
        let pid = match responses.message().await.map_err(rpc("Exec"))? {
            Some(ExecResponse {
                msg: Some(exec_response::Msg::Started(s)),
            }) => s.pid,
            other => {
                return Err(AgentClientError::Protocol {
                    rpc: "Exec",
                    detail: format!("expected `started` first, got {other:?}"),
                })
            }
        };
        Ok(ExecSession {
            pid,
            tx: Some(tx),
            rx: responses,
            done: false,
        })
    }

    /// Runs a process to completion, streaming `stdin` in (when given; EOF closes the process's
    /// stdin) and its stdout/stderr out to the sinks as they arrive.
    pub async fn exec<I, O, E>(
        &self,
        mut spec: ExecSpec,
        stdin: Option<I>,
        mut stdout: O,
        mut stderr: E,
    ) -> Result<ExitStatus>
    where
        I: AsyncRead + Unpin + Send + 'static,
        O: AsyncWrite + Unpin,
        E: AsyncWrite + Unpin,
    {
        spec.stdin = spec.stdin || stdin.is_some();
        let mut session = self.exec_session(spec).await?;
        let feeder: Option<JoinHandle<()>> = match (stdin, session.tx.take()) {
            (Some(mut input), Some(tx)) => Some(tokio::spawn(async move {
                let mut buf = vec![0u8; CHUNK];
                loop {
                    let n = match input.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let m = ExecRequest {
                        msg: Some(exec_request::Msg::Stdin(buf[..n].to_vec())),
                    };
                    if tx.send(m).await.is_err() {
                        return;
                    }
                }
                let _ = tx
                    .send(ExecRequest {
                        msg: Some(exec_request::Msg::CloseStdin(CloseStdin {})),
                    })
                    .await;
            })),
            _ => None,
        };
        let result = async {
            loop {
                match session.next_event().await? {
                    Some(ExecEvent::Stdout(d)) => {
                        stdout
                            .write_all(&d)
                            .await
                            .map_err(|source| AgentClientError::Io {
                                what: "writing exec stdout".into(),
                                source,
                            })?
                    }
                    Some(ExecEvent::Stderr(d)) => {
                        stderr
                            .write_all(&d)
                            .await
                            .map_err(|source| AgentClientError::Io {
                                what: "writing exec stderr".into(),
                                source,
                            })?
                    }
                    Some(ExecEvent::Exited(status)) => return Ok(status),
                    None => {
                        return Err(AgentClientError::Protocol {
                            rpc: "Exec",
                            detail: "no exit status".into(),
                        })
                    }
                }
            }
        }
        .await;
        if let Some(f) = feeder {
            f.abort();
        }
        let _ = stdout.flush().await;
        let _ = stderr.flush().await;
        result
    }

    /// Runs a process without stdin and collects its output in memory.
    pub async fn exec_output(&self, spec: ExecSpec) -> Result<ExecOutput> {
        self.collect(spec, None).await
    }

    /// Runs a process with `input` as its stdin and collects its output in memory.
    pub async fn exec_output_with_stdin(
        &self,
        spec: ExecSpec,
        input: Vec<u8>,
    ) -> Result<ExecOutput> {
        self.collect(spec, Some(io::Cursor::new(input))).await
    }

    async fn collect(
        &self,
        spec: ExecSpec,
        stdin: Option<io::Cursor<Vec<u8>>>,
    ) -> Result<ExecOutput> {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let st = self.exec(spec, stdin, &mut out, &mut err).await?;
        Ok(ExecOutput {
            stdout: out,
            stderr: err,
            exit_code: st.exit_code,
            signal: st.signal,
        })
    }

    /// Sends `signal` to an exec'd process (its whole process group when `group`).
    pub async fn signal(&self, pid: u32, signal: i32, group: bool) -> Result<()> {
        self.agent
            .clone()
            .signal(SignalRequest { pid, signal, group })
            .await
            .map_err(rpc("Signal"))?;
        Ok(())
    }

    /// Resizes the pty of a tty exec.
    pub async fn resize_tty(&self, pid: u32, rows: u32, cols: u32) -> Result<()> {
        self.agent
            .clone()
            .resize_tty(ResizeTtyRequest { pid, rows, cols })
            .await
            .map_err(rpc("ResizeTty"))?;
        Ok(())
    }

    /// Guest resource figures.
    pub async fn stats(&self) -> Result<GuestStats> {
        Ok(self
            .agent
            .clone()
            .stats(StatsRequest {})
            .await
            .map_err(rpc("Stats"))?
            .into_inner())
    }

    /// Asks the agent to stop all workloads and power the VM off (returns once acknowledged).
    pub async fn shutdown(&self) -> Result<()> {
        self.agent
            .clone()
            .shutdown(ShutdownRequest {})
            .await
            .map_err(rpc("Shutdown"))?;
        Ok(())
    }

    /// Streams `path` out of the box into `out`: the raw file or a tar of a file/directory.
    /// Returns the number of bytes written.
    pub async fn read_file_to<W: AsyncWrite + Unpin>(
        &self,
        path: &str,
        format: TransferFormat,
        mut out: W,
    ) -> Result<u64> {
        let mut stream = self
            .agent
            .clone()
            .read_file(ReadFileRequest {
                path: path.to_string(),
                format: format as i32,
            })
            .await
            .map_err(rpc("ReadFile"))?
            .into_inner();
        let mut total = 0u64;
        while let Some(chunk) = stream.message().await.map_err(rpc("ReadFile"))? {
            out.write_all(&chunk.data)
                .await
                .map_err(|source| AgentClientError::Io {
                    what: format!("writing the contents of {path}"),
                    source,
                })?;
            total += chunk.data.len() as u64;
        }
        let _ = out.flush().await;
        Ok(total)
    }

    /// Reads a whole regular file of the box into memory.
    pub async fn read_file(&self, path: &str) -> Result<Vec<u8>> {
        let mut buf = Vec::new();
        self.read_file_to(path, TransferFormat::Raw, &mut buf)
            .await?;
        Ok(buf)
    }

    /// Streams `input` into the box: RAW creates/replaces the file `path` with `mode`, TAR
    /// unpacks the archive into the directory `path`. Returns the bytes sent.
    pub async fn write_file_from<R: AsyncRead + Unpin + Send + 'static>(
        &self,
        path: &str,
        format: TransferFormat,
        mode: u32,
        create_parents: bool,
        mut input: R,
    ) -> Result<u64> {
        let (tx, rx) = mpsc::channel(8);
        let header = WriteFileRequest {
            msg: Some(write_file_request::Msg::Header(WriteFileHeader {
                path: path.to_string(),
                format: format as i32,
                mode,
                create_parents,
            })),
        };
        let _ = tx.send(header).await;
        let pump = tokio::spawn(async move {
            let mut buf = vec![0u8; CHUNK];
            loop {
                let n = input.read(&mut buf).await?;
                if n == 0 {
                    return Ok::<(), io::Error>(());
                }
                let m = WriteFileRequest {
                    msg: Some(write_file_request::Msg::Data(buf[..n].to_vec())),
                };
                if tx.send(m).await.is_err() {
                    return Ok(());
                }
            }
        });
        let result = self
            .agent
            .clone()
            .write_file(ReceiverStream::new(rx))
            .await
            .map_err(rpc("WriteFile"));
        let pumped = pump.await;
        let written = result?.into_inner().bytes_written;
        match pumped {
            Ok(Ok(())) => Ok(written),
            Ok(Err(source)) => Err(AgentClientError::Io {
                what: format!("reading the input for {path}"),
                source,
            }),
            Err(e) => Err(AgentClientError::Io {
                what: format!("input task for {path}"),
                source: io::Error::other(e.to_string()),
            }),
        }
    }

    /// Writes `data` as the file `path` (created or replaced, with `mode`; 0 = 0644).
    pub async fn write_file(&self, path: &str, data: Vec<u8>, mode: u32) -> Result<u64> {
        self.write_file_from(
            path,
            TransferFormat::Raw,
            mode,
            false,
            io::Cursor::new(data),
        )
        .await
    }

    /// An SEV-SNP attestation report bound to `report_data`.
    pub async fn attestation_report(&self, report_data: [u8; 64]) -> Result<AttestationReport> {
        let r = self
            .agent
            .clone()
            .get_attestation_report(AttestationReportRequest {
                report_data: report_data.to_vec(),
            })
            .await
            .map_err(rpc("GetAttestationReport"))?
            .into_inner();
        Ok(AttestationReport {
            report: r.report,
            certs: r.certs,
            provider: r.provider,
        })
    }
}

/// The running `agent.sock` bridge. Dropping it (or [`BridgeHandle::stop`]) stops accepting
/// and removes the socket file; connections already bridged run until either side closes.
pub struct BridgeHandle {
    path: PathBuf,
    task: JoinHandle<()>,
}

impl BridgeHandle {
    /// The socket path clients connect to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops the bridge and removes its socket.
    pub fn stop(self) {}
}

impl Drop for BridgeHandle {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Serves a plain Unix socket at `listen_path` that bridges every connection to guest `port`
/// through the hybrid-vsock socket `uds` (the device side passing `gate`). The socket's
/// directory must already exist and be private to its owner (no group/other access), and the
/// socket is made mode 0600.
pub async fn serve_bridge(
    listen_path: &Path,
    uds: impl AsRef<Path>,
    port: u32,
    gate: &IoGate,
) -> Result<BridgeHandle> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let bridge_err = |detail: String| AgentClientError::Bridge {
        path: listen_path.to_path_buf(),
        detail,
    };
    let parent = listen_path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .ok_or_else(|| bridge_err("the socket path has no parent directory".into()))?;
    let meta = std::fs::metadata(parent)
        .map_err(|e| bridge_err(format!("directory {}: {e}", parent.display())))?;
    let mode = meta.permissions().mode() & 0o777;
    if !meta.is_dir() || mode & 0o077 != 0 {
        return Err(bridge_err(format!(
            "directory {} has mode {mode:o}; it must be private to its owner (0700) so only the box owner can reach the agent",
            parent.display()
        )));
    }
    match std::fs::symlink_metadata(listen_path) {
        Ok(m) if m.file_type().is_socket() => {
            std::fs::remove_file(listen_path)
                .map_err(|e| bridge_err(format!("removing the stale socket: {e}")))?;
        }
        Ok(_) => return Err(bridge_err("exists and is not a socket".into())),
        Err(_) => {}
    }
    let listener = UnixListener::bind(listen_path).map_err(|e| bridge_err(format!("bind: {e}")))?;
    std::fs::set_permissions(listen_path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| bridge_err(format!("chmod 0600: {e}")))?;
    let uds = uds.as_ref().to_path_buf();
    let gate = gate.clone();
    let task = tokio::spawn(async move {
        loop {
            let (mut client, _) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("agent bridge accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let uds = uds.clone();
            let gate = gate.clone();
            tokio::spawn(async move {
                match connect_hybrid_vsock_stream(&uds, port, &gate).await {
                    Ok(mut guest) => {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut guest).await;
                    }
                    Err(e) => tracing::warn!("agent bridge: {e}"),
                }
            });
        }
    });
    Ok(BridgeHandle {
        path: listen_path.to_path_buf(),
        task,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake hybrid-vsock device: answers the handshake with `answer` and then echoes.
    async fn fake_device(dir: &Path, answer: &'static str) -> PathBuf {
        let path = dir.join("vsock.sock");
        let l = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut line = Vec::new();
                    let mut b = [0u8; 1];
                    while s.read(&mut b).await.unwrap_or(0) == 1 && b[0] != b'\n' {
                        line.push(b[0]);
                    }
                    assert_eq!(line, b"CONNECT 4088");
                    if answer.is_empty() {
                        return;
                    }
                    s.write_all(answer.as_bytes()).await.unwrap();
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        path
    }

    #[tokio::test]
    async fn handshake_ok_then_stream_is_the_guest_port() {
        let dir = tempfile::tempdir().unwrap();
        // The data after the newline must not be swallowed by the handshake reader.
        let uds = fake_device(dir.path(), "OK 1073741824\n").await;
        let mut s = connect_hybrid_vsock_stream(&uds, 4088, &IoGate::default())
            .await
            .unwrap();
        s.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
    }

    #[tokio::test]
    async fn handshake_errors_show_the_answer() {
        let dir = tempfile::tempdir().unwrap();
        let uds = fake_device(dir.path(), "ERR no listener\n").await;
        let e = connect_hybrid_vsock_stream(&uds, 4088, &IoGate::default())
            .await
            .unwrap_err();
        assert!(
            matches!(e, AgentClientError::HandshakeRefused { .. }),
            "{e}"
        );
        assert!(e.to_string().contains("ERR no listener"), "{e}");

        let dir2 = tempfile::tempdir().unwrap();
        let uds = fake_device(dir2.path(), "").await;
        let e = connect_hybrid_vsock_stream(&uds, 4088, &IoGate::default())
            .await
            .unwrap_err();
        assert!(matches!(e, AgentClientError::HandshakeClosed { .. }), "{e}");

        let e = connect_hybrid_vsock_stream(&dir.path().join("missing"), 4088, &IoGate::default())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
    }

    #[tokio::test]
    async fn bridge_refuses_a_shared_directory_and_cleans_up() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let uds = fake_device(dir.path(), "OK 5\n").await;
        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = serve_bridge(&open.join("agent.sock"), &uds, 4088, &IoGate::default())
            .await
            .err()
            .unwrap();
        assert!(e.to_string().contains("0700"), "{e}");

        let private = dir.path().join("private");
        std::fs::create_dir(&private).unwrap();
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
        let sock = private.join("agent.sock");
        let h = serve_bridge(&sock, &uds, 4088, &IoGate::default())
            .await
            .unwrap();
        let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // Bridged: no handshake needed by the client, data reaches the (echoing) guest port.
        let mut c = UnixStream::connect(&sock).await.unwrap();
        c.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 5];
        c.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello");
        drop(h);
        assert!(!sock.exists());
    }
}
