//! The real agent binary, run on this host (`--listen unix:...`), driven through the real
//! `AgentClient` over real gRPC: health, exec (output, exit codes, 10 MB intact, stdin, env,
//! cwd, user, signals, errors), files, stats, attestation, shutdown, and a Python grpcio health
//! client through the `agent.sock` bridge.
//!
//! The bridge normally sits in front of vhost-device-vsock; without a VM the hybrid-vsock device
//! is played by a small in-test proxy that speaks the same handshake (`CONNECT 4088\n` ->
//! `OK <n>\n`) and then forwards to the host-run agent.
//!
//! The agent binary is `MICROBOX_AGENT_BIN` when set, else it is built with
//! `cargo build -p microbox-agent` (target/debug/microbox-agent).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use microbox_runtime::agent_client::{
    serve_bridge, AgentClient, ExecEvent, ExecSpec, TransferFormat,
};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn agent_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("MICROBOX_AGENT_BIN") {
        return PathBuf::from(p);
    }
    let root = workspace_root();
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "-q", "-p", "microbox-agent"])
        .current_dir(&root)
        .status()
        .expect("running cargo build -p microbox-agent");
    assert!(status.success(), "cargo build -p microbox-agent failed");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    target.join("debug/microbox-agent")
}

/// A host-run agent; killed and reaped on drop.
struct Agent {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Agent {
    async fn start(root: &Path) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let child = Command::new(agent_bin())
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()))
            .arg("--root")
            .arg(root)
            // Must never leak into workloads.
            .env("MICROBOX_AGENT_SECRET", "leaked")
            .env("MICROBOX_AGENT_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting the agent");
        let mut agent = Agent {
            child,
            socket,
            _dir: dir,
        };
        for _ in 0..500 {
            if agent.socket.exists() {
                return agent;
            }
            if let Some(st) = agent.child.try_wait().unwrap() {
                panic!("agent exited early: {st}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = agent.child.kill();
        panic!("agent socket {} never appeared", agent.socket.display());
    }

    async fn client(&self) -> AgentClient {
        AgentClient::connect_unix(&self.socket).await.unwrap()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spec(argv: &[&str]) -> ExecSpec {
    ExecSpec {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: vec!["PATH=/usr/local/bin:/usr/bin:/bin".into()],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_exec_output_and_errors() {
    let agent = Agent::start(Path::new("/")).await;
    let c = agent.client().await;
    assert!(c.health().await.unwrap(), "health is SERVING");

    let out = c
        .exec_output(spec(&["sh", "-c", "echo out; echo err >&2; exit 3"]))
        .await
        .unwrap();
    assert_eq!(out.stdout, b"out\n");
    assert_eq!(out.stderr, b"err\n");
    assert_eq!((out.exit_code, out.signal), (Some(3), None));

    // The workload sees exactly the env it was given (never the agent's), in the given cwd.
    let mut s = spec(&[
        "sh",
        "-c",
        "echo \"$FOO\"; pwd; env | grep -c MICROBOX_AGENT_SECRET",
    ]);
    s.env.push("FOO=bar baz".into());
    s.cwd = "/tmp".into();
    let out = c.exec_output(s).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "bar baz\n/tmp\n0\n");

    let e = c
        .exec_output(spec(&["definitely-not-a-program-xyz"]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::NotFound), "{e}");
    assert!(
        e.to_string().contains("definitely-not-a-program-xyz"),
        "{e}"
    );

    let e = c.exec_output(spec(&[])).await.unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::InvalidArgument), "{e}");

    let dir = tempfile::tempdir().unwrap();
    let not_exec = dir.path().join("data.txt");
    std::fs::write(&not_exec, "echo should not run\n").unwrap();
    std::fs::set_permissions(&not_exec, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = c
        .exec_output(spec(&[not_exec.to_str().unwrap()]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::PermissionDenied), "{e}");

    let mut s = spec(&["true"]);
    s.cwd = "/no/such/dir".into();
    let e = c.exec_output(s).await.unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::NotFound), "{e}");
    assert!(e.to_string().contains("/no/such/dir"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_megabytes_of_output_arrive_intact() {
    let agent = Agent::start(Path::new("/")).await;
    let c = agent.client().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("blob");
    let mut data = vec![0u8; 10 * 1024 * 1024];
    // Deterministic but not trivially compressible content.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for b in data.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    std::fs::write(&file, &data).unwrap();
    let want = Sha256::digest(&data);

    // Hash while streaming: the client never needs the whole output either.
    struct HashSink(Sha256, usize);
    impl tokio::io::AsyncWrite for HashSink {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            self.0.update(buf);
            self.1 += buf.len();
            std::task::Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }
    let mut sink = HashSink(Sha256::new(), 0);
    let mut err = Vec::new();
    let st = c
        .exec(
            spec(&["cat", file.to_str().unwrap()]),
            None::<tokio::io::Empty>,
            &mut sink,
            &mut err,
        )
        .await
        .unwrap();
    assert_eq!(
        st.exit_code,
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&err)
    );
    assert_eq!(sink.1, data.len());
    assert_eq!(sink.0.finalize(), want, "sha256 of the streamed output");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdin_reaches_the_process() {
    let agent = Agent::start(Path::new("/")).await;
    let c = agent.client().await;
    let input: Vec<u8> = (0..300_000u32).flat_map(|i| i.to_le_bytes()).collect();
    let out = c
        .exec_output_with_stdin(spec(&["sha256sum"]), input.clone())
        .await
        .unwrap();
    let want = hex::encode(Sha256::digest(&input));
    assert_eq!(out.exit_code, Some(0));
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with(&want),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // Interactive session: line in, line out, then EOF ends the process.
    let mut s = spec(&["cat"]);
    s.stdin = true;
    let mut sess = c.exec_session(s).await.unwrap();
    sess.write_stdin(b"hello agent\n".to_vec()).await.unwrap();
    let mut got = Vec::new();
    while got != b"hello agent\n" {
        match sess.next_event().await.unwrap() {
            Some(ExecEvent::Stdout(d)) => got.extend(d),
            other => panic!("unexpected {other:?}"),
        }
    }
    sess.close_stdin().await.unwrap();
    match sess.next_event().await.unwrap() {
        Some(ExecEvent::Exited(st)) => assert_eq!(st.exit_code, Some(0)),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_workload_does_not_block_and_can_be_signalled() {
    let agent = Agent::start(Path::new("/")).await;
    let c = agent.client().await;
    let mut sess = c.exec_session(spec(&["sleep", "1000"])).await.unwrap();
    // Health and other execs keep working meanwhile (on the same connection).
    assert!(c.health().await.unwrap());
    assert_eq!(
        c.exec_output(spec(&["true"])).await.unwrap().exit_code,
        Some(0)
    );
    // Unknown pids are refused.
    let e = c.signal(1, 15, false).await.unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::NotFound), "{e}");
    c.signal(sess.pid(), 15, false).await.unwrap();
    match sess.next_event().await.unwrap() {
        Some(ExecEvent::Exited(st)) => {
            assert_eq!((st.exit_code, st.signal), (None, Some(15)))
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tty_exec_uses_a_terminal() {
    let agent = Agent::start(Path::new("/")).await;
    let c = agent.client().await;
    let mut s = spec(&["sh", "-c", "test -t 0 && test -t 1 && stty size"]);
    s.tty = true;
    s.rows = 33;
    s.cols = 101;
    let out = c.exec_output(s).await.unwrap();
    assert_eq!(
        out.exit_code,
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "33 101");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tty_resize_in_band_and_by_rpc() {
    let agent = Agent::start(Path::new("/")).await;
    let c = agent.client().await;
    let mut s = spec(&["sh", "-c", "read a; stty size; read b; stty size"]);
    s.tty = true;
    s.rows = 10;
    s.cols = 20;
    let mut sess = c.exec_session(s).await.unwrap();
    sess.resize(30, 90).await.unwrap();
    sess.write_stdin(b"\n".to_vec()).await.unwrap();
    let mut out = Vec::new();
    while !String::from_utf8_lossy(&out).contains("30 90") {
        match sess.next_event().await.unwrap() {
            Some(ExecEvent::Stdout(d)) => out.extend(d),
            other => panic!(
                "unexpected {other:?} after {:?}",
                String::from_utf8_lossy(&out)
            ),
        }
    }
    c.resize_tty(sess.pid(), 50, 132).await.unwrap();
    sess.write_stdin(b"\n".to_vec()).await.unwrap();
    loop {
        match sess.next_event().await.unwrap() {
            Some(ExecEvent::Stdout(d)) => out.extend(d),
            Some(ExecEvent::Exited(st)) => {
                assert_eq!(st.exit_code, Some(0));
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(
        String::from_utf8_lossy(&out).contains("50 132"),
        "{:?}",
        String::from_utf8_lossy(&out)
    );
    // A non-tty process cannot be resized.
    let plain = c.exec_session(spec(&["sleep", "30"])).await.unwrap();
    let e = c.resize_tty(plain.pid(), 1, 1).await.unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::FailedPrecondition), "{e}");
    c.signal(plain.pid(), 9, true).await.unwrap();
}

fn process_alive(pid: u32) -> bool {
    // A reaped process has no /proc entry; a zombie would still show state Z.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

async fn wait_gone(pid: u32) -> bool {
    for _ in 0..500 {
        if !process_alive(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caller_going_away_kills_the_process() {
    let agent = Agent::start(Path::new("/")).await;
    let c = agent.client().await;
    let sess = c.exec_session(spec(&["sleep", "1000"])).await.unwrap();
    let pid = sess.pid();
    assert!(process_alive(pid));
    drop(sess);
    assert!(
        wait_gone(pid).await,
        "pid {pid} still running after the caller left"
    );
    assert!(c.health().await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_child_holding_stdout_does_not_hang_exec() {
    let agent = Agent::start(Path::new("/")).await;
    let c = agent.client().await;
    // The backgrounded sleep inherits stdout and keeps the pipe open after sh exits.
    let mut sess = c
        .exec_session(spec(&["sh", "-c", "sleep 60 & echo started"]))
        .await
        .unwrap();
    let mut stdout = Vec::new();
    let status = loop {
        match sess.next_event().await.unwrap() {
            Some(ExecEvent::Stdout(d)) => stdout.extend(d),
            Some(ExecEvent::Exited(st)) => break st,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(
        (stdout.as_slice(), status.exit_code),
        (&b"started\n"[..], Some(0))
    );
    // Clean up the straggler: it is in the exec's own process group.
    // SAFETY: kill(2) with a negative pid signals that process group; no memory involved.
    unsafe { libc::kill(-(sess.pid() as i32), libc::SIGKILL) };
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_running_workloads() {
    let mut agent = Agent::start(Path::new("/")).await;
    let c = agent.client().await;
    let mut sess = c.exec_session(spec(&["sleep", "1000"])).await.unwrap();
    let pid = sess.pid();
    c.shutdown().await.unwrap();
    // The open Exec call ends with the workload's death by SIGTERM.
    match sess.next_event().await.unwrap() {
        Some(ExecEvent::Exited(st)) => assert_eq!(st.signal, Some(15)),
        other => panic!("unexpected {other:?}"),
    }
    assert!(wait_gone(pid).await);
    let mut exited = false;
    for _ in 0..500 {
        if agent.child.try_wait().unwrap().is_some() {
            exited = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(exited, "agent still running after Shutdown");
}

/// A minimal image root: busybox, a passwd with a non-root user.
fn busybox_root() -> Option<tempfile::TempDir> {
    let bb = Path::new("/bin/busybox");
    if !bb.exists() {
        eprintln!("SKIP: /bin/busybox (busybox-static) is not installed");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let r = dir.path();
    for d in ["bin", "etc", "tmp", "home/app"] {
        std::fs::create_dir_all(r.join(d)).unwrap();
    }
    std::fs::copy(bb, r.join("bin/busybox")).unwrap();
    for tool in ["sh", "id", "pwd", "cat", "echo", "ls"] {
        std::os::unix::fs::symlink("busybox", r.join("bin").join(tool)).unwrap();
    }
    std::fs::write(
        r.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(
        r.join("etc/group"),
        "root:x:0:\napp:x:1000:\nstaff:x:50:app\n",
    )
    .unwrap();
    std::fs::write(r.join("etc/marker"), "inside the box root\n").unwrap();
    std::fs::set_permissions(r.join("tmp"), std::fs::Permissions::from_mode(0o1777)).unwrap();
    std::fs::set_permissions(r.join("home/app"), std::fs::Permissions::from_mode(0o777)).unwrap();
    Some(dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workloads_run_chrooted_as_the_image_user() {
    if unsafe_is_not_root() {
        eprintln!("SKIP: chroot and user switching need root");
        return;
    }
    let Some(root) = busybox_root() else { return };
    let agent = Agent::start(root.path()).await;
    let c = agent.client().await;
    let mut s = spec(&[
        "sh",
        "-c",
        "cat /etc/marker; id -u; id -g; id -G; pwd; echo $HOME",
    ]);
    s.env = vec!["PATH=/bin".into()];
    s.user = "app".into();
    s.cwd = "/home/app".into();
    let out = c.exec_output(s).await.unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "inside the box root\n1000\n1000\n1000 50\n/home/app\n/home/app\n",
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut s = spec(&["id", "-u"]);
    s.env = vec![];
    s.user = "1234:50".into();
    let out = c.exec_output(s).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "1234\n");
    let mut s = spec(&["true"]);
    s.user = "nobody-here".into();
    let e = c.exec_output(s).await.unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::NotFound), "{e}");
    assert!(e.to_string().contains("nobody-here"), "{e}");

    // Files are addressed inside the box root too.
    assert_eq!(
        c.read_file("/etc/marker").await.unwrap(),
        b"inside the box root\n"
    );
}

fn unsafe_is_not_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() != 0 }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_stats_attestation_and_shutdown() {
    let box_root = tempfile::tempdir().unwrap();
    let mut agent = Agent::start(box_root.path()).await;
    let c = agent.client().await;

    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let n = c.write_file("/data/blob.bin", data.clone(), 0o600).await;
    assert_eq!(
        n.unwrap_err().code(),
        Some(tonic::Code::NotFound),
        "parent directory missing"
    );
    let n = c
        .write_file_from(
            "/data/blob.bin",
            TransferFormat::Raw,
            0o600,
            true,
            std::io::Cursor::new(data.clone()),
        )
        .await
        .unwrap();
    assert_eq!(n, data.len() as u64);
    let host = box_root.path().join("data/blob.bin");
    assert_eq!(std::fs::read(&host).unwrap(), data);
    assert_eq!(
        std::fs::metadata(&host).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(c.read_file("/data/blob.bin").await.unwrap(), data);

    // A directory out as tar, back in as tar somewhere else.
    std::fs::write(box_root.path().join("data/small.txt"), b"small").unwrap();
    let mut tar_bytes = Vec::new();
    c.read_file_to("/data", TransferFormat::Tar, &mut tar_bytes)
        .await
        .unwrap();
    c.write_file_from(
        "/copy",
        TransferFormat::Tar,
        0,
        true,
        std::io::Cursor::new(tar_bytes),
    )
    .await
    .unwrap();
    assert_eq!(
        std::fs::read(box_root.path().join("copy/data/small.txt")).unwrap(),
        b"small"
    );
    assert_eq!(
        std::fs::read(box_root.path().join("copy/data/blob.bin")).unwrap(),
        data
    );

    let e = c.write_file("/data", b"x".to_vec(), 0).await.unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::InvalidArgument), "{e}");
    let e = c
        .write_file("relative/path", b"x".to_vec(), 0)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::InvalidArgument), "{e}");
    let e = c.read_file("/nope").await.unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::NotFound), "{e}");
    let e = c.read_file("/data").await.unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::InvalidArgument), "{e}");
    // A symlink pointing at the host's files resolves inside the box root instead.
    std::os::unix::fs::symlink("/etc/hostname", box_root.path().join("escape")).unwrap();
    let e = c.read_file("/escape").await.unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::NotFound), "{e}");

    let st = c.stats().await.unwrap();
    assert!(st.mem_total_bytes > 0 && st.mem_available_bytes <= st.mem_total_bytes);
    assert!(st.process_count > 0 && st.uptime_seconds > 0.0);

    if !Path::new("/sys/kernel/config/tsm/report").exists() && !Path::new("/dev/sev-guest").exists()
    {
        let e = c.attestation_report([1; 64]).await.unwrap_err();
        assert_eq!(e.code(), Some(tonic::Code::FailedPrecondition), "{e}");
        assert!(e.to_string().contains("no TEE in this VM"), "{e}");
    }

    // Health Watch: SERVING now, then a change (NOT_SERVING) or the end once Shutdown starts.
    use futures::StreamExt;
    let mut watch = Box::pin(c.watch_health().await.unwrap());
    assert!(
        watch.next().await.unwrap().unwrap(),
        "first Watch status is SERVING"
    );

    // On a host, Shutdown makes the agent exit cleanly.
    c.shutdown().await.unwrap();
    // Either a NOT_SERVING update or the end of the stream (the server went away).
    if let Some(Ok(serving)) = watch.next().await {
        assert!(!serving, "Watch reported SERVING after Shutdown");
    }
    let mut status = None;
    for _ in 0..500 {
        if let Some(s) = agent.child.try_wait().unwrap() {
            status = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = status.expect("agent did not exit after Shutdown");
    assert!(status.success(), "{status}");
    assert!(!agent.socket.exists(), "socket removed on exit");
}

/// Plays vhost-device-vsock's host side: handshake, then forward to the host-run agent.
async fn fake_hybrid_vsock(dir: &Path, agent_socket: PathBuf) -> PathBuf {
    let uds = dir.join("vsock.sock");
    let l = tokio::net::UnixListener::bind(&uds).unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let agent_socket = agent_socket.clone();
            tokio::spawn(async move {
                let mut line = Vec::new();
                let mut b = [0u8; 1];
                while s.read(&mut b).await.unwrap_or(0) == 1 && b[0] != b'\n' {
                    line.push(b[0]);
                }
                if line != b"CONNECT 4088" {
                    let _ = s.write_all(b"ERR wrong port\n").await;
                    return;
                }
                let Ok(mut guest) = tokio::net::UnixStream::connect(&agent_socket).await else {
                    return;
                };
                let _ = s.write_all(b"OK 1073741824\n").await;
                let _ = tokio::io::copy_bidirectional(&mut s, &mut guest).await;
            });
        }
    });
    uds
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_health_through_the_bridge() {
    let probe = Command::new("python3")
        .args(["-c", "import grpc, grpc_health.v1"])
        .status();
    if !probe.is_ok_and(|s| s.success()) {
        panic!("python3 with grpcio + grpcio-health-checking is required (scripts/setup.sh installs them)");
    }
    let agent = Agent::start(Path::new("/")).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let uds = fake_hybrid_vsock(dir.path(), agent.socket.clone()).await;

    // The Rust client through the hybrid handshake.
    let c = AgentClient::connect_hybrid_vsock(&uds, 4088, &Default::default())
        .await
        .unwrap();
    assert!(c.health().await.unwrap());
    let e = AgentClient::connect_hybrid_vsock(&uds, 1234, &Default::default())
        .await
        .err()
        .unwrap();
    assert!(e.to_string().contains("ERR wrong port"), "{e}");

    // A standard client on the plain bridge socket.
    let bridge_path = dir.path().join("agent.sock");
    let bridge = serve_bridge(&bridge_path, &uds, 4088, &Default::default())
        .await
        .unwrap();
    let script = r#"
import sys, grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
# h2-based servers (tonic) reject grpcio's default :authority for unix sockets (the %-encoded
# path); "localhost" is the usual value for UDS.
ch = grpc.insecure_channel("unix:" + sys.argv[1], options=[("grpc.default_authority", "localhost")])
stub = health_pb2_grpc.HealthStub(ch)
for svc in ("", "microbox.agent.v1.Agent"):
    r = stub.Check(health_pb2.HealthCheckRequest(service=svc), timeout=20)
    print(svc or "<all>", health_pb2.HealthCheckResponse.ServingStatus.Name(r.status))
"#;
    let bp = bridge_path.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(&bp)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "python: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "<all> SERVING\nmicrobox.agent.v1.Agent SERVING\n"
    );
    drop(bridge);
    assert!(!bridge_path.exists());
}
