//! The guest agent inside a real microVM (booted by the runtime from the busybox test image of
//! the shared harness, QEMU TCG here): gRPC through the box's `agent.sock` (the plain Unix
//! bridge to vsock port 4088), checked with our client and with Python's standard grpcio
//! health client: health SERVING, exec stdout/stderr/exit code, env and cwd, 10 MB of output
//! intact, stdin, NotFound for a missing executable, a tty's size, stats, and no TEE here.
//!
//! With `MICROBOX_AGENT_TEST_VSOCK=<hybrid vsock socket>` the checks run against that VM instead
//! (`crates/agent/scripts/vm-smoke.sh` boots one without the runtime), and
//! `MICROBOX_AGENT_TEST_SCRIPT` adds a shell check that must exit 0 in the box.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use microbox_core::{BoxConfig, EventEmitter, NetworkMode};
use microbox_runtime::agent_client::{serve_bridge, AgentClient, ExecSpec};
use microbox_runtime::VmManager;
use sha2::{Digest, Sha256};

fn spec(argv: &[&str]) -> ExecSpec {
    ExecSpec {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_in_a_real_vm_through_agent_sock() {
    if let Some(uds) = std::env::var_os("MICROBOX_AGENT_TEST_VSOCK") {
        // An externally booted VM: bridge its hybrid vsock ourselves.
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("agent.sock");
        let _bridge = serve_bridge(&sock, Path::new(&uds), 4088, &Default::default())
            .await
            .unwrap();
        let c = wait_serving(&sock).await;
        checks(&c, &sock).await;
        if std::env::var_os("MICROBOX_AGENT_TEST_SHUTDOWN").is_some() {
            c.shutdown().await.unwrap();
        }
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let mut cfg = BoxConfig::new(microbox_testsupport::image("busybox"));
    cfg.network = NetworkMode::None;
    let vm = VmManager::with_root(cfg, EventEmitter::default(), root.path());
    vm.boot().await.expect("boot");
    let sock = vm.agent_socket();
    // The box directory (and so the socket) is reachable by its owner only.
    let mode = std::fs::metadata(vm.box_dir()).unwrap().permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o700
    );
    let c = AgentClient::connect_unix(&sock).await.unwrap();
    checks(&c, &sock).await;
    vm.destroy().await.unwrap();
}

async fn wait_serving(sock: &Path) -> AgentClient {
    let mut last = String::new();
    for _ in 0..600 {
        match AgentClient::connect_unix(sock).await {
            Ok(c) => match c.health().await {
                Ok(true) => return c,
                other => last = format!("{other:?}"),
            },
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("agent never became SERVING: {last}")
}

async fn checks(c: &AgentClient, agent_sock: &Path) {
    assert!(c.health().await.unwrap());

    let out = c
        .exec_output(spec(&["sh", "-c", "echo out; echo err >&2; exit 3"]))
        .await
        .unwrap();
    assert_eq!(
        (out.stdout.as_slice(), out.stderr.as_slice()),
        (&b"out\n"[..], &b"err\n"[..])
    );
    assert_eq!(out.exit_code, Some(3));

    let mut s = spec(&["sh", "-c", "echo \"$FOO\"; pwd"]);
    s.env.push("FOO=from host".into());
    s.cwd = "/tmp".into();
    let out = c.exec_output(s).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "from host\n/tmp\n");

    // 10 MB: uploaded with WriteFile, streamed back by cat, hash compared.
    let data: Vec<u8> = (0..10 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    c.write_file("/tmp/blob", data.clone(), 0o644)
        .await
        .unwrap();
    let out = c.exec_output(spec(&["cat", "/tmp/blob"])).await.unwrap();
    assert_eq!(out.exit_code, Some(0));
    assert_eq!(out.stdout.len(), data.len());
    assert_eq!(Sha256::digest(&out.stdout), Sha256::digest(&data));

    let input = b"stdin reaches the guest\n".repeat(1000);
    let out = c
        .exec_output_with_stdin(spec(&["sha256sum"]), input.clone())
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).starts_with(&hex::encode(Sha256::digest(&input))));

    let e = c.exec_output(spec(&["no-such-program"])).await.unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::NotFound), "{e}");

    let mut s = spec(&["busybox", "stty", "size"]);
    s.tty = true;
    s.rows = 40;
    s.cols = 120;
    let out = c.exec_output(s).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "40 120");

    let st = c.stats().await.unwrap();
    assert!(st.mem_total_bytes > 0 && st.process_count > 0);

    let e = c.attestation_report([0; 64]).await.unwrap_err();
    assert!(
        matches!(e.code(), Some(tonic::Code::FailedPrecondition)) || e.code().is_none(),
        "{e}"
    );

    // Workloads run in the box's own mount namespace (not the agent's), shared by all of them.
    let out = c
        .exec_output(spec(&[
            "sh",
            "-c",
            "readlink /proc/1/ns/mnt; readlink /proc/self/ns/mnt; busybox mkdir -p /mnt/t && busybox mount -t tmpfs none /mnt/t && echo mounted",
        ]))
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines.len(),
        3,
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_ne!(
        lines[0], lines[1],
        "the workload shares PID 1's mount namespace"
    );
    let out = c
        .exec_output(spec(&[
            "sh",
            "-c",
            "readlink /proc/self/ns/mnt; busybox grep -c ' /mnt/t tmpfs' /proc/self/mounts",
        ]))
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{}\n1\n", lines[1]),
        "a second exec joins the same namespace and sees the first one's mount"
    );

    // Workloads run in the limited workloads cgroup; the agent (PID 1) stays outside it.
    let out = c
        .exec_output(spec(&["cat", "/proc/self/cgroup", "/proc/1/cgroup"]))
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "0::/workloads\n0::/\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A standard Python grpcio health client on the box's plain agent.sock.
    let bp = agent_sock.to_path_buf();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg("-c")
            .arg(
                "import sys, grpc\nfrom grpc_health.v1 import health_pb2 as p, health_pb2_grpc as g\n\
                 ch = grpc.insecure_channel('unix:' + sys.argv[1], options=[('grpc.default_authority', 'localhost')])\n\
                 print(p.HealthCheckResponse.ServingStatus.Name(g.HealthStub(ch).Check(p.HealthCheckRequest(), timeout=30).status))",
            )
            .arg(&bp)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "SERVING\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Extra checks of the box set-up (volumes, network, hostname), as a shell script that must
    // exit 0 inside the box.
    if let Ok(script) = std::env::var("MICROBOX_AGENT_TEST_SCRIPT") {
        let out = c.exec_output(spec(&["sh", "-c", &script])).await.unwrap();
        println!("{}", String::from_utf8_lossy(&out.stdout));
        assert_eq!(
            out.exit_code,
            Some(0),
            "MICROBOX_AGENT_TEST_SCRIPT failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
