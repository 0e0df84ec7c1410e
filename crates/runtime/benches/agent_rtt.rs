//! Agent round-trip benchmark (issue 4): exec of `true` and a health Check, p50/p99 over N calls,
//! against the raw round trip of 4 bytes over the same transport, in the same run.
//!
//! - Against a booted box VM: `MICROBOX_AGENT_TEST_VSOCK=<hybrid vsock uds> cargo bench -p
//!   microbox-runtime --bench agent_rtt` (`crates/agent/scripts/vm-smoke.sh --bench` does it).
//!   The raw baseline is the static agent binary uploaded into the box and run in `--echo` mode
//!   on vsock port 5000, reached through the same vhost-device-vsock socket.
//! - Without it: the agent runs on this host over Unix sockets (baseline: `--echo` on a socket).
//!
//! `MICROBOX_BENCH_N` sets the number of calls (default 300).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use microbox_runtime::agent_client::{
    connect_hybrid_vsock_stream, AgentClient, ExecSpec, TransferFormat,
};
use microbox_testsupport::bench::{record, Figure};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const ECHO_PORT: u32 = 5000;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    sorted[((sorted.len() * p) / 100).min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

struct Row {
    name: &'static str,
    p50: Duration,
    p99: Duration,
}

async fn measure<F, Fut>(n: usize, mut f: F) -> (Duration, Duration)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for _ in 0..n / 10 {
        f().await; // warm-up
    }
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        f().await;
        v.push(t.elapsed());
    }
    v.sort();
    (percentile(&v, 50), percentile(&v, 99))
}

/// Round trips of 4 bytes over an echo stream.
async fn raw_rtt<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, n: usize) -> Row {
    let mut v = Vec::with_capacity(n);
    let mut buf = [0u8; 4];
    for i in 0..n + n / 10 {
        let t = Instant::now();
        s.write_all(b"ping").await.expect("echo write");
        s.read_exact(&mut buf).await.expect("echo read");
        assert_eq!(&buf, b"ping");
        if i >= n / 10 {
            v.push(t.elapsed());
        }
    }
    v.sort();
    Row {
        name: "raw 4-byte echo",
        p50: percentile(&v, 50),
        p99: percentile(&v, 99),
    }
}

fn true_spec() -> ExecSpec {
    ExecSpec {
        argv: vec!["true".into()],
        env: vec!["PATH=/usr/local/bin:/usr/bin:/bin".into()],
        ..Default::default()
    }
}

async fn agent_rows(c: &AgentClient, n: usize) -> Vec<Row> {
    let (p50, p99) = measure(n, || async {
        assert!(c.health().await.expect("health"));
    })
    .await;
    let health = Row {
        name: "health Check",
        p50,
        p99,
    };
    let (p50, p99) = measure(n, || async {
        let out = c.exec_output(true_spec()).await.expect("exec true");
        assert_eq!(out.exit_code, Some(0));
    })
    .await;
    vec![
        health,
        Row {
            name: "exec `true`",
            p50,
            p99,
        },
    ]
}

fn print(title: &str, label: &str, n: usize, raw: Row, rows: Vec<Row>) {
    println!("{title} ({n} calls each)");
    for r in &rows {
        for (pct, v, base) in [("p50", r.p50, raw.p50), ("p99", r.p99, raw.p99)] {
            let name = format!("{label}: {} {pct}", r.name);
            let base_name = format!("raw 4-byte round trip {pct}");
            record(Figure {
                bench: "agent_rtt",
                name: &name,
                unit: "ms",
                value: ms(v),
                baseline: Some((&base_name, ms(base))),
                target: (r.name.starts_with("exec") && pct == "p50").then_some("ratio <= 2"),
            });
        }
    }
    println!(
        "  {:<16} p50 {:>8.3} ms   p99 {:>8.3} ms",
        raw.name,
        ms(raw.p50),
        ms(raw.p99)
    );
    for r in rows {
        println!(
            "  {:<16} p50 {:>8.3} ms   p99 {:>8.3} ms   p50 = {:.2}x raw",
            r.name,
            ms(r.p50),
            ms(r.p99),
            r.p50.as_secs_f64() / raw.p50.as_secs_f64()
        );
    }
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn build_agent(static_build: bool) -> PathBuf {
    if let Some(p) = std::env::var_os("MICROBOX_AGENT_BIN") {
        return PathBuf::from(p);
    }
    let root = workspace_root();
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(&root)
        .args(["build", "-q", "--release", "-p", "microbox-agent"]);
    let path = if static_build {
        cmd.env("CARGO_TARGET_DIR", root.join("target/agent"))
            .env("RUSTFLAGS", "-C target-feature=+crt-static")
            .args(["--target", "x86_64-unknown-linux-gnu"]);
        root.join("target/agent/x86_64-unknown-linux-gnu/release/microbox-agent")
    } else {
        root.join("target/release/microbox-agent")
    };
    assert!(
        cmd.status().expect("cargo build").success(),
        "building the agent failed"
    );
    path
}

async fn bench_vm(uds: PathBuf, n: usize) {
    // The VM may still be booting.
    let mut client = None;
    for _ in 0..600 {
        if let Ok(c) = AgentClient::connect_hybrid_vsock(
            &uds,
            microbox_agent_proto::AGENT_VSOCK_PORT,
            &Default::default(),
        )
        .await
        {
            if c.health().await.unwrap_or(false) {
                client = Some(c);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let c = client.expect("the agent never became SERVING");
    // The static agent runs in any box: upload it and start its echo mode.
    let bin = build_agent(true);
    let file = tokio::fs::File::open(&bin).await.expect("agent binary");
    c.write_file_from("/tmp/microbox-echo", TransferFormat::Raw, 0o755, true, file)
        .await
        .expect("uploading the echo server");
    let echo = c
        .exec_session(ExecSpec {
            argv: vec![
                "/tmp/microbox-echo".into(),
                "--echo".into(),
                "--listen".into(),
                format!("vsock:{ECHO_PORT}"),
            ],
            ..Default::default()
        })
        .await
        .expect("starting the echo server");
    let mut stream = None;
    for _ in 0..100 {
        if let Ok(s) = connect_hybrid_vsock_stream(&uds, ECHO_PORT, &Default::default()).await {
            stream = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut s = stream.expect("echo server never reachable");
    let raw = raw_rtt(&mut s, n).await;
    let rows = agent_rows(&c, n).await;
    let exec_p50 = rows
        .iter()
        .find(|r| r.name.starts_with("exec"))
        .map(|r| r.p50);
    print(
        &format!("box VM via hybrid vsock {}", uds.display()),
        "microVM via vsock",
        n,
        raw,
        rows,
    );
    // The floor of an exec: what the guest itself pays to fork, exec and reap `true` (busybox
    // sh in a loop, 51 spawns minus 1, over the same client).
    let loop_of = |k: usize| {
        spec_of(&[
            "sh",
            "-c",
            &format!("for i in $(seq {k}); do /bin/true; done"),
        ])
    };
    let mut per_spawn = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        c.exec_output(loop_of(1)).await.expect("sh loop");
        let one = t.elapsed();
        let t = Instant::now();
        c.exec_output(loop_of(51)).await.expect("sh loop");
        per_spawn.push(t.elapsed().saturating_sub(one) / 50);
    }
    per_spawn.sort();
    let spawn = per_spawn[per_spawn.len() / 2];
    if let Some(p50) = exec_p50 {
        record(Figure {
            bench: "agent_rtt",
            name: "microVM via vsock: exec `true` p50",
            unit: "ms",
            value: ms(p50),
            baseline: Some((
                "the guest's own fork+exec+wait of true (sh loop)",
                ms(spawn),
            )),
            target: None,
        });
    }
    drop(echo); // the agent kills the echo server when its Exec call goes away
}

fn spec_of(argv: &[&str]) -> ExecSpec {
    ExecSpec {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

async fn bench_host(n: usize) {
    let bin = build_agent(false);
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("agent.sock");
    let echo_sock = dir.path().join("echo.sock");
    let spawn = |args: &[&str]| {
        Killed(
            Command::new(&bin)
                .args(args)
                .env("MICROBOX_AGENT_LOG", "warn")
                .stdout(Stdio::null())
                .spawn()
                .expect("starting the agent"),
        )
    };
    let _agent = spawn(&["--listen", &format!("unix:{}", sock.display())]);
    let _echo = spawn(&[
        "--echo",
        "--listen",
        &format!("unix:{}", echo_sock.display()),
    ]);
    for _ in 0..500 {
        if sock.exists() && echo_sock.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let c = AgentClient::connect_unix(&sock).await.expect("connect");
    let mut s = tokio::net::UnixStream::connect(&echo_sock)
        .await
        .expect("echo");
    let raw = raw_rtt(&mut s, n).await;
    let rows = agent_rows(&c, n).await;
    print(
        "agent on this host via a Unix socket",
        "agent on the host via Unix socket",
        n,
        raw,
        rows,
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing: run quickly then.
    let benching = std::env::args().any(|a| a == "--bench");
    let n: usize = std::env::var("MICROBOX_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if benching { 300 } else { 20 });
    match std::env::var_os("MICROBOX_AGENT_TEST_VSOCK") {
        Some(uds) => bench_vm(PathBuf::from(uds), n).await,
        None if benching => {
            bench_host(n).await;
            // And a real box booted for the purpose.
            let root = tempfile::tempdir().expect("tempdir");
            let mut cfg = microbox_core::BoxConfig::new(microbox_testsupport::image("busybox"));
            cfg.network = microbox_core::NetworkMode::None;
            let vm = microbox_runtime::VmManager::with_root(
                cfg,
                microbox_core::EventEmitter::default(),
                root.path(),
            );
            vm.boot().await.expect("booting the benchmark box");
            bench_vm(vm.box_dir().join("vsock.sock"), n).await;
            vm.destroy().await.expect("destroy");
        }
        None => bench_host(n).await,
    }
}
