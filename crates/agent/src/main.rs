//! microbox-agent: the guest's PID 1 and gRPC agent.
//!
//! In a box VM it is `/init`: it sets the machine up from the boot config (see [`init`]) and
//! serves `microbox.agent.v1.Agent` plus `grpc.health.v1.Health` on vsock port 4088.
//! Run as a normal process (`--listen unix:/path --root DIR`) it serves the same API on a Unix
//! socket with DIR as the workload root, so the protocol can be tested on a host without a VM.

mod attest;
mod cgroup;
mod exec;
mod files;
mod init;
mod net;
mod reaper;
mod rootpath;
mod service;
mod stats;
mod users;

use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};

use anyhow::{bail, Context as _, Result};
use futures::Stream;
use microbox_agent_proto::health::{health_reporter, ReporterStatus};
use microbox_agent_proto::v1::agent_server::AgentServer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;

/// Where the agent listens.
#[derive(Debug, Clone, PartialEq)]
enum Listen {
    Unix(PathBuf),
    Vsock(u32),
}

fn parse_listen(s: &str) -> Result<Listen> {
    if let Some(p) = s.strip_prefix("unix:") {
        if p.is_empty() {
            bail!("--listen unix: needs a path");
        }
        return Ok(Listen::Unix(PathBuf::from(p)));
    }
    if let Some(port) = s.strip_prefix("vsock:") {
        let port = port
            .parse()
            .with_context(|| format!("--listen {s}: {port:?} is not a port number"))?;
        return Ok(Listen::Vsock(port));
    }
    bail!("--listen {s:?}: expected unix:/path or vsock:PORT")
}

struct Args {
    listen: Listen,
    root: PathBuf,
    /// Serve a byte echo instead of gRPC (the raw-transport baseline for benchmarks).
    echo: bool,
}

const USAGE: &str =
    "usage: microbox-agent [--listen unix:/path|vsock:PORT] [--root DIR] [--echo]\n\
    --echo serves a plain byte echo (benchmark baseline) instead of the agent API.\n\
    As PID 1 it ignores arguments and boots the box from /etc/microbox/boot.json.";

fn parse_args(args: impl Iterator<Item = String>) -> Result<Args> {
    let mut a = Args {
        listen: Listen::Vsock(microbox_agent_proto::AGENT_VSOCK_PORT),
        root: PathBuf::from("/"),
        echo: false,
    };
    let mut it = args;
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--listen" => a.listen = parse_listen(&value("--listen")?)?,
            "--root" => a.root = PathBuf::from(value("--root")?),
            "--echo" => a.echo = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    if !a.root.is_absolute() || !a.root.is_dir() {
        bail!(
            "--root {}: must be an existing absolute directory",
            a.root.display()
        );
    }
    Ok(a)
}

fn init_tracing(ansi: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MICROBOX_AGENT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .try_init();
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(2)
        .build()
}

fn main() {
    if std::process::id() == 1 {
        pid1_main()
    }
    init_tracing(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("microbox-agent: {e:#}");
            std::process::exit(2);
        }
    };
    let result = runtime()
        .context("starting the async runtime")
        .and_then(|rt| {
            if args.echo {
                rt.block_on(echo(args.listen))
            } else {
                rt.block_on(serve(args.listen, args.root, false, None))
            }
        });
    if let Err(e) = result {
        eprintln!("microbox-agent: {e:#}");
        std::process::exit(1);
    }
}

/// PID 1: boot, serve until Shutdown, power off. Never returns and never panics out.
fn pid1_main() -> ! {
    std::panic::set_hook(Box::new(|info| {
        init::console(&format!("panic: {info}"));
    }));
    let booted = match init::boot() {
        Ok(b) => b,
        Err(e) => init::fatal(&e),
    };
    // The console is a serial log: no colour escapes.
    init_tracing(false);
    init::console(&format!(
        "box root ready at {}; serving on vsock port {}",
        booted.root.display(),
        booted.config.vsock_port
    ));
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => init::fatal(&format!("starting the async runtime: {e}")),
    };
    let result = rt.block_on(serve(
        Listen::Vsock(booted.config.vsock_port),
        booted.root.clone(),
        true,
        booted.config.ready_port,
    ));
    if let Err(e) = result {
        init::console(&format!("FATAL: {e:#}"));
    }
    // Shut down outside the runtime: its worker threads must not hold the filesystems.
    rt.shutdown_timeout(std::time::Duration::from_millis(500));
    init::shutdown_system(&booted.mounts)
}

/// A vsock connection that tonic can serve (tokio-vsock only implements tonic's `Connected`
/// for older tonic versions).
struct VsockIo(tokio_vsock::VsockStream);

impl tonic::transport::server::Connected for VsockIo {
    type ConnectInfo = ();
    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl AsyncRead for VsockIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl AsyncWrite for VsockIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

type Incoming<T> = Pin<Box<dyn Stream<Item = std::io::Result<T>> + Send>>;

/// Accepted connections; accept errors are logged and skipped so the server never stops on them.
fn accept_stream<T, F, Fut>(accept: F) -> Incoming<T>
where
    T: Send + 'static,
    F: FnMut() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = std::io::Result<T>> + Send,
{
    Box::pin(futures::stream::unfold(accept, |mut accept| async move {
        loop {
            match accept().await {
                Ok(conn) => return Some((Ok(conn), accept)),
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }))
}

/// Echoes every connection's bytes back: the raw round-trip baseline for the agent benchmark.
async fn echo(listen: Listen) -> Result<()> {
    async fn pump<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) {
        let (mut r, mut w) = tokio::io::split(&mut s);
        let _ = tokio::io::copy(&mut r, &mut w).await;
    }
    match listen {
        Listen::Unix(path) => {
            let _ = std::fs::remove_file(&path);
            let l = tokio::net::UnixListener::bind(&path)
                .with_context(|| format!("binding {}", path.display()))?;
            loop {
                let (s, _) = l.accept().await.context("accept")?;
                tokio::spawn(pump(s));
            }
        }
        Listen::Vsock(port) => {
            let l = tokio_vsock::VsockListener::bind(tokio_vsock::VsockAddr::new(
                tokio_vsock::VMADDR_CID_ANY,
                port,
            ))
            .with_context(|| format!("binding vsock port {port}"))?;
            loop {
                let (s, _) = l.accept().await.context("accept")?;
                tokio::spawn(pump(s));
            }
        }
    }
}

/// How long open calls may take to finish after a Shutdown.
const GRACEFUL_STOP: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs the server until it stops by itself or `deadline` fires.
async fn bounded<E>(
    server: impl std::future::Future<Output = Result<(), E>>,
    deadline: impl std::future::Future<Output = ()>,
) -> Result<(), E> {
    tokio::select! {
        r = server => r,
        () = deadline => Ok(()),
    }
}

/// Tells the host (vsock CID 2, `port`) that the agent listens. Best effort: a host that does
/// not listen there simply polls.
async fn notify_ready(port: u32) {
    use tokio::io::AsyncWriteExt;
    let addr = tokio_vsock::VsockAddr::new(tokio_vsock::VMADDR_CID_HOST, port);
    for attempt in 0..20u64 {
        match tokio_vsock::VsockStream::connect(addr).await {
            Ok(mut s) => {
                if let Err(e) = s.write_all(microbox_agent_proto::READY_LINE).await {
                    tracing::warn!("ready notification on vsock port {port}: {e}");
                }
                let _ = s.shutdown(std::net::Shutdown::Both);
                return;
            }
            Err(e) => {
                tracing::debug!("ready notification on vsock port {port}: {e}; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(10 * (attempt + 1))).await;
            }
        }
    }
    tracing::warn!("the host never accepted the ready notification on vsock port {port}");
}

async fn serve(
    listen: Listen,
    root: PathBuf,
    reap_all: bool,
    ready_port: Option<u32>,
) -> Result<()> {
    let reaper = reaper::Reaper::new(reap_all);
    tokio::spawn(reaper.clone().run());
    let (shutdown_tx, mut shutdown_rx) = mpsc::channel(1);
    // As PID 1 the workloads get their own mount namespace; run as a plain process (tests,
    // development) they share the agent's.
    let mount_ns = if reap_all {
        match exec::workload_mount_namespace() {
            Ok(fd) => Some(fd),
            Err(e) => {
                tracing::warn!("no workload mount namespace (workloads share the agent's): {e}");
                None
            }
        }
    } else {
        None
    };
    // As PID 1 the workloads also get their own cgroup, with limits that keep the agent alive.
    let cgroup_procs = reap_all.then(cgroup::for_workloads).flatten();
    let svc = service::AgentService::new(root, reaper, shutdown_tx, mount_ns, cgroup_procs);
    let procs = svc.procs();
    let (reporter, health) = health_reporter();
    reporter
        .set_serving::<AgentServer<service::AgentService>>()
        .await;
    reporter
        .set_service_status("", ReporterStatus::Serving)
        .await;

    let router = tonic::transport::Server::builder()
        .initial_stream_window_size(Some(1 << 20))
        .initial_connection_window_size(Some(4 << 20))
        .add_service(health)
        .add_service(AgentServer::new(svc));
    // Shutdown: let the response reach the caller, then end the workloads so that their Exec
    // streams finish, then stop serving. A graceful stop waits for open calls, so it is bounded.
    let (stopping_tx, mut stopping_rx) = tokio::sync::watch::channel(false);
    let stopping_reporter = reporter.clone();
    let stop = async move {
        let _ = shutdown_rx.recv().await;
        // Health checks now say the agent is going away.
        stopping_reporter
            .set_service_status("", ReporterStatus::NotServing)
            .await;
        stopping_reporter
            .set_not_serving::<AgentServer<service::AgentService>>()
            .await;
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        procs.signal_all(libc::SIGTERM);
        let _ = stopping_tx.send(true);
    };
    let deadline = async move {
        let _ = stopping_rx.wait_for(|s| *s).await;
        tokio::time::sleep(GRACEFUL_STOP).await;
        tracing::warn!("calls still open {GRACEFUL_STOP:?} after Shutdown; stopping anyway");
    };
    match listen {
        Listen::Unix(path) => {
            let _ = std::fs::remove_file(&path);
            let listener = std::sync::Arc::new(
                tokio::net::UnixListener::bind(&path)
                    .with_context(|| format!("binding {}", path.display()))?,
            );
            tracing::info!("listening on unix:{}", path.display());
            let incoming = accept_stream(move || {
                let l = listener.clone();
                async move { l.accept().await.map(|(s, _)| s) }
            });
            let r = bounded(
                router.serve_with_incoming_shutdown(incoming, stop),
                deadline,
            )
            .await;
            let _ = std::fs::remove_file(&path);
            r.context("serving gRPC")?;
        }
        Listen::Vsock(port) => {
            // The vsock transport may still be settling right after its module loaded.
            let mut attempt = 0;
            let listener = loop {
                match tokio_vsock::VsockListener::bind(tokio_vsock::VsockAddr::new(
                    tokio_vsock::VMADDR_CID_ANY,
                    port,
                )) {
                    Ok(l) => break l,
                    Err(e) if attempt < 50 => {
                        attempt += 1;
                        tracing::debug!("vsock bind on port {port}: {e}; retrying");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                    Err(e) => return Err(e).with_context(|| format!("binding vsock port {port}")),
                }
            };
            tracing::info!("listening on vsock:{port}");
            if let Some(rp) = ready_port {
                tokio::spawn(notify_ready(rp));
            }
            let listener = std::sync::Arc::new(listener);
            let incoming = accept_stream(move || {
                let l = listener.clone();
                async move { l.accept().await.map(|(s, _)| VsockIo(s)) }
            });
            bounded(
                router.serve_with_incoming_shutdown(incoming, stop),
                deadline,
            )
            .await
            .context("serving gRPC")?;
        }
    }
    tracing::info!("agent stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_parsing() {
        assert_eq!(
            parse_listen("unix:/tmp/a.sock").unwrap(),
            Listen::Unix("/tmp/a.sock".into())
        );
        assert_eq!(parse_listen("vsock:4088").unwrap(), Listen::Vsock(4088));
        assert!(parse_listen("tcp:1").is_err());
        assert!(parse_listen("vsock:x")
            .unwrap_err()
            .to_string()
            .contains("port"));
    }
}
