//! Hostile guests, each in its own real microVM next to a well-behaved one: a fork bomb, a
//! workload filling its disk, one flooding stdout (and the serial console), and a VM whose agent
//! stops answering (its QEMU frozen with SIGSTOP). The other box keeps working, the CLI stays
//! responsive (no command hangs), the flood is bounded on the host's disk, and every hostile
//! box can be stopped and removed without leaving a process behind.

mod common;

use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use common::{processes_mentioning, Env};
use microbox_testsupport as ts;

/// Runs a CLI command that must finish within `limit` (a hang is a failure, not a slow pass).
fn bounded(env: &Env, args: &[&str], limit: Duration) -> Output {
    let mut child = env
        .cmd(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("microbox {args:?} hung for more than {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    eprintln!(
        "$ microbox {} -> {:?} in {:?}\n{}{}",
        args.join(" "),
        out.status.code(),
        start.elapsed(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn dir_bytes(dir: &std::path::Path, prefix: &str) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
        .sum()
}

#[test]
fn hostile_guests_hurt_neither_the_host_nor_other_boxes() {
    let env = Env::new();
    let img = ts::image("busybox");
    let long = Duration::from_secs(90);
    env.ok(&["run", "-d", "--name", "witness", &img, "sleep", "100000"]);

    // A fork bomb (busybox sh functions). The box's main process starts its sleep before the
    // bomb and then only waits (a builtin): a fork it needed after the bomb filled pids.max
    // would fail, end the main process and with it the box.
    env.ok(&[
        "run",
        "-d",
        "--name",
        "bomb",
        &img,
        "sh",
        "-c",
        "sleep 100000 & s=$!; b() { b | b & }; b; wait $s",
    ]);
    // Fill the box's writable layer until the guest says it is full.
    env.ok(&[
        "run",
        "-d",
        "--name",
        "fill",
        &img,
        "sh",
        "-c",
        "dd if=/dev/zero of=/filler bs=1M; echo dd-ended; exec sleep 100000",
    ]);
    // Flood stdout and the serial console; the host keeps a bounded log.
    let max_log: u64 = 1 << 20;
    let mut flood = env.cmd(&[
        "run",
        "-d",
        "--name",
        "flood",
        &img,
        "sh",
        "-c",
        "(yes console-flood > /dev/console &); yes stdout-flood",
    ]);
    flood.env("MICROBOX_LOG_MAX_SIZE", max_log.to_string());
    assert!(flood.output().unwrap().status.success());
    // A VM whose agent stops answering.
    env.ok(&["run", "-d", "--name", "frozen", &img, "sleep", "100000"]);
    let qemu = env.inspect("frozen")["pids"]["processes"]["qemu"]
        .as_u64()
        .expect("qemu pid in inspect") as i32;
    // SAFETY: kill(2) of the QEMU this test's box runs.
    assert_eq!(unsafe { libc::kill(qemu, libc::SIGSTOP) }, 0);

    // Let them do their worst for a while, checking on the witness meanwhile.
    for _ in 0..4 {
        std::thread::sleep(Duration::from_secs(2));
        let out = bounded(&env, &["exec", "witness", "echo", "alive"], long);
        assert!(out.status.success());
        assert_eq!(String::from_utf8_lossy(&out.stdout), "alive\n");
        // The bombed box's own agent still answers: the bomb is held in the workloads cgroup.
        let health = bounded(&env, &["health", "bomb"], long);
        assert_eq!(
            health.status.code(),
            Some(0),
            "the bombed box's agent is healthy: {}",
            String::from_utf8_lossy(&health.stderr)
        );
    }
    assert!(bounded(&env, &["ps", "-a"], long).status.success());
    assert!(bounded(&env, &["stats", "--no-stream"], long)
        .status
        .success());

    // The full disk is the box's own: dd ended, and the box still answers.
    let deadline = Instant::now() + long;
    loop {
        let logs = bounded(&env, &["logs", "fill"], long);
        if String::from_utf8_lossy(&logs.stdout).contains("dd-ended") {
            break;
        }
        assert!(Instant::now() < deadline, "dd never ended");
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(bounded(&env, &["exec", "fill", "true"], long)
        .status
        .success());

    // The flood is bounded on the host: two log files of at most max_log (plus one line).
    let flood_dir = PathBuf::from(env.inspect("flood")["box_dir"].as_str().unwrap());
    let out_bytes = dir_bytes(&flood_dir, "output.log");
    assert!(
        out_bytes <= 2 * max_log + 64 * 1024,
        "output logs: {out_bytes} bytes"
    );
    let tail = bounded(&env, &["logs", "--tail", "3", "flood"], long);
    assert!(String::from_utf8_lossy(&tail.stdout).contains("stdout-flood\n"));

    // The frozen box: calls to it fail, none hangs.
    let exec = bounded(&env, &["exec", "frozen", "true"], long);
    assert!(!exec.status.success());
    assert!(
        String::from_utf8_lossy(&exec.stderr).contains("box 'frozen' does not answer"),
        "the error says which box and what is wrong"
    );
    let health = bounded(&env, &["health", "frozen"], long);
    assert_eq!(
        health.status.code(),
        Some(1),
        "unhealthy, not a microbox failure"
    );

    // Every hostile box stops and goes away; the witness is untouched.
    let mut dirs = Vec::new();
    for name in ["bomb", "fill", "flood", "frozen"] {
        dirs.push(PathBuf::from(
            env.inspect(name)["box_dir"].as_str().unwrap(),
        ));
        // `-t 2` is honoured even by a VMM that answers nothing (QMP included): after its
        // grace the box is killed. The bound leaves room for a loaded host, not for a wait on
        // QMP's own 10 s timeouts (that took 22 s).
        let limit = if name == "frozen" {
            Duration::from_secs(15)
        } else {
            long
        };
        assert!(bounded(&env, &["stop", "-t", "2", name], limit)
            .status
            .success());
        assert!(bounded(&env, &["rm", name], long).status.success());
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while dirs.iter().any(|d| !processes_mentioning(d).is_empty()) {
        assert!(
            Instant::now() < deadline,
            "processes of removed hostile boxes remain"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(env.ok(&["exec", "witness", "echo", "still"]), "still\n");
    env.ok(&["rm", "-f", "witness"]);
}
