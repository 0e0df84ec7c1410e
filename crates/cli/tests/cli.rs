//! End-to-end tests of the `microbox` binary against real microVMs (QEMU, TCG where KVM is not
//! usable) and images pulled from the real registry of the shared harness.

mod common;

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use common::{poll_until, processes_mentioning, Env};
use microbox_testsupport as ts;

#[test]
fn run_streams_output_and_returns_the_exit_code() {
    let env = Env::new();
    let img = ts::image("busybox");
    let out = env.run(&[
        "run",
        "--rm",
        &img,
        "sh",
        "-c",
        "echo to-out; echo to-err >&2; exit 3",
    ]);
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "to-out\n");
    assert!(String::from_utf8_lossy(&out.stderr).contains("to-err\n"));
    // --rm: nothing left.
    assert_eq!(env.ok(&["ps", "-aq"]).trim(), "");
    // A missing command is 127, like Docker.
    let out = env.run(&["run", "--rm", &img, "/no/such/thing"]);
    assert_eq!(out.status.code(), Some(127));
}

#[test]
fn detached_box_ps_logs_exec_stop_rm() {
    let env = Env::new();
    let img = ts::image("busybox");
    let id = env.ok(&[
        "run",
        "-d",
        "--name",
        "web",
        &img,
        "sh",
        "-c",
        "echo started; exec sleep 1000",
    ]);
    let id = id.trim();
    assert_eq!(id.len(), 32, "run -d prints the id: {id:?}");

    let ps = env.ok(&["ps"]);
    assert!(ps.contains("web") && ps.contains(&id[..12]), "{ps}");

    // By name, by prefix.
    assert_eq!(env.ok(&["exec", "web", "echo", "hi"]), "hi\n");
    let hostname = env.ok(&["exec", &id[..8], "cat", "/etc/hostname"]);
    assert!(!hostname.trim().is_empty(), "{hostname:?}");
    let out = env.run(&["exec", "web", "sh", "-c", "exit 7"]);
    assert_eq!(out.status.code(), Some(7));
    let out = env.run(&["exec", "web", "/nope"]);
    assert_eq!(out.status.code(), Some(127));

    // The workload's output is in the log.
    let logs = poll_until(50, || env.ok(&["logs", "web"]), |l| l.contains("started"));
    assert_eq!(logs, "started\n");

    let info = env.inspect("web");
    assert_eq!(info["state"], "ready");
    let sock = PathBuf::from(info["agent_socket"].as_str().unwrap());
    assert!(sock.exists(), "agent socket {sock:?}");
    let box_dir = PathBuf::from(info["box_dir"].as_str().unwrap());
    assert!(!processes_mentioning(&box_dir).is_empty(), "the VM runs");

    env.ok(&["stop", "-t", "2", "web"]);
    let info = env.inspect("web");
    assert_eq!(info["state"], "stopped");
    assert!(
        processes_mentioning(&box_dir).is_empty(),
        "stop leaves no process"
    );
    // start boots it again; kill -s TERM ends the main process; wait reports 128+15.
    env.ok(&["start", "web"]);
    assert_eq!(env.ok(&["health", "web"]), "healthy\n");
    assert_eq!(env.ok(&["exec", "web", "echo", "again"]), "again\n");
    env.ok(&["kill", "-s", "TERM", "web"]);
    assert_eq!(env.ok(&["wait", "web"]).trim(), "143");
    assert_eq!(env.inspect("web")["state"], "stopped");
    assert!(
        processes_mentioning(&box_dir).is_empty(),
        "the ended box leaves no process"
    );

    env.ok(&["rm", "web"]);
    assert!(!box_dir.exists());
    let out = env.run(&["inspect", "web"]);
    assert_eq!(out.status.code(), Some(125));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "microbox: no such box 'web' (see: microbox ps -a)"
    );
}

#[test]
fn two_clis_racing_for_one_name_one_wins() {
    let env = Env::new();
    let img = ts::image("busybox");
    env.ok(&["pull", &img]);
    let children: Vec<_> = (0..2)
        .map(|_| {
            env.cmd(&["create", "--name", "same", &img, "true"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outs: Vec<Output> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    let wins = outs.iter().filter(|o| o.status.success()).count();
    assert_eq!(wins, 1, "exactly one create wins");
    let loser = outs.iter().find(|o| !o.status.success()).unwrap();
    let err = String::from_utf8_lossy(&loser.stderr);
    assert!(err.contains("name 'same' is already used"), "{err}");
    env.ok(&["rm", "same"]);
}

#[test]
fn a_killed_supervisor_shows_stopped_and_rm_cleans_up() {
    let env = Env::new();
    let img = ts::image("busybox");
    env.ok(&["run", "-d", "--name", "victim", &img, "sleep", "1000"]);
    let info = env.inspect("victim");
    let sup = info["pids"]["supervisor"].as_u64().unwrap() as i32;
    let box_dir = PathBuf::from(info["box_dir"].as_str().unwrap());
    // SAFETY: plain kill(2) of a process this test started through the CLI.
    assert_eq!(unsafe { libc::kill(sup, libc::SIGKILL) }, 0);
    let state = poll_until(
        50,
        || env.inspect("victim")["state"].as_str().unwrap().to_owned(),
        |s| s == "stopped",
    );
    assert_eq!(state, "stopped");
    let reason = env.inspect("victim")["reason"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    assert!(reason.contains("supervisor"), "{reason}");
    env.ok(&["rm", "victim"]);
    // Helpers die with their supervisor (parent-death signal) or are killed by rm.
    let left = poll_until(50, || processes_mentioning(&box_dir), Vec::is_empty);
    assert!(left.is_empty());
}

fn metric_value(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn metrics_are_valid_prometheus_and_count_boots_execs_and_events() {
    let env = Env::new();
    let img = ts::image("busybox");
    let before = env.ok(&["metrics"]);
    let boots_before = metric_value(
        &before,
        "microbox_boot_duration_seconds_count{phase=\"agent_ready\"}",
    );
    let execs_before = metric_value(&before, "microbox_execs_total");

    env.ok(&["run", "-d", "--name", "m", &img, "sleep", "1000"]);
    env.ok(&["exec", "m", "true"]);
    let text = env.ok(&["metrics"]);
    let boots = metric_value(
        &text,
        "microbox_boot_duration_seconds_count{phase=\"agent_ready\"}",
    );
    assert_eq!(boots, boots_before + 1.0, "{text}");
    // The exec finished (the main process, sleep, still runs).
    assert_eq!(
        metric_value(&text, "microbox_execs_total"),
        execs_before + 1.0,
        "{text}"
    );
    assert!(
        text.contains("microbox_boxes{state=\"ready\"} 1")
            || text.contains("microbox_boxes{state=\"busy\"} 1"),
        "{text}"
    );
    assert!(
        metric_value(&text, "microbox_image_pulls_total") >= 1.0,
        "{text}"
    );
    let rss_line = text
        .lines()
        .find(|l| l.starts_with("microbox_box_host_rss_bytes{"))
        .expect("per-box RSS");
    assert!(
        metric_value(rss_line, "microbox_box_host_rss_bytes") > 0.0,
        "{rss_line}"
    );

    // promtool (Debian's prometheus package) validates the exposition.
    let out = ts::output_with_stdin(
        Command::new("promtool")
            .args(["check", "metrics"])
            .stderr(Stdio::piped()),
        text.as_bytes(),
    );
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // stats --no-stream shows the box with non-zero guest memory.
    let stats = env.ok(&["stats", "--no-stream"]);
    let row = stats
        .lines()
        .find(|l| l.contains(" m "))
        .unwrap_or_else(|| panic!("{stats}"));
    assert!(!row.contains(" - "), "guest memory shown: {row}");

    // The same metrics served over HTTP.
    let port = ts::free_port();
    let mut server = env
        .cmd(&["metrics", "--listen", &format!("127.0.0.1:{port}")])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut served = String::new();
    for _ in 0..50 {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            use std::io::Read;
            s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
            s.read_to_string(&mut served).unwrap();
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    server.kill().unwrap();
    server.wait().unwrap();
    assert!(
        served.starts_with("HTTP/1.1 200") && served.contains("microbox_boxes{"),
        "{served}"
    );

    env.ok(&["rm", "-f", "m"]);

    // The events of that run, in order, with every boot phase.
    let events = env.ok(&["events", "--format", "json", "--until", "0s"]);
    let evs: Vec<serde_json::Value> = events
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // In log order, time never goes backwards (seq orders the events of one emitter).
    let times: Vec<u64> = evs.iter().map(|e| e["time_ms"].as_u64().unwrap()).collect();
    assert!(
        times.windows(2).all(|w| w[0] <= w[1]),
        "in order: {times:?}"
    );
    let phases: Vec<&str> = evs
        .iter()
        .filter(|e| e["type"] == "boot_phase")
        .map(|e| e["phase"].as_str().unwrap())
        .collect();
    for p in [
        "image",
        "rootfs",
        "boot_assets",
        "vmm_spawn",
        "kernel_boot",
        "agent_ready",
    ] {
        assert!(phases.contains(&p), "phase {p} in {phases:?}");
    }
    assert!(evs.iter().any(|e| e["type"] == "exec_finished"), "{events}");
    assert!(
        evs.iter()
            .any(|e| e["type"] == "state_changed" && e["to"] == "stopped"),
        "{events}"
    );
}

#[test]
fn volumes_are_writable_both_ways_and_ro_refuses_writes() {
    let env = Env::new();
    let img = ts::image("busybox");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in"), "from-host\n").unwrap();
    let vol = format!("{}:/data", dir.path().display());
    let out = env.ok(&[
        "run",
        "--rm",
        "-v",
        &vol,
        &img,
        "sh",
        "-c",
        "cat /data/in; echo from-box > /data/out",
    ]);
    assert_eq!(out, "from-host\n");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("out")).unwrap(),
        "from-box\n"
    );

    let ro = format!("{vol}:ro");
    let out = env.run(&[
        "run",
        "--rm",
        "-v",
        &ro,
        &img,
        "sh",
        "-c",
        "cat /data/in && echo x > /data/nope",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "from-host\n");
    assert!(String::from_utf8_lossy(&out.stderr).contains("Read-only file system"));
    assert!(!dir.path().join("nope").exists());

    // Named volumes persist across boxes and are listed; rm is refused while a box uses one.
    env.ok(&[
        "run",
        "--rm",
        "-v",
        "shared:/v",
        &img,
        "sh",
        "-c",
        "echo kept > /v/f",
    ]);
    assert_eq!(
        env.ok(&["run", "--rm", "-v", "shared:/v:ro", &img, "cat", "/v/f"]),
        "kept\n"
    );
    assert!(env.ok(&["volume", "ls"]).contains("shared"));
    env.ok(&[
        "create",
        "--name",
        "holder",
        "-v",
        "shared:/v",
        &img,
        "true",
    ]);
    let out = env.run(&["volume", "rm", "shared"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("used by box 'holder'"));
    env.ok(&["rm", "holder"]);
    env.ok(&["volume", "rm", "shared"]);
    assert!(!env.ok(&["volume", "ls"]).contains("shared"));

    // A missing host directory fails before anything boots.
    let out = env.run(&["run", "--rm", "-v", "/no/such/dir:/data", &img, "true"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/no/such/dir"));
}

#[test]
fn cp_in_and_out_is_byte_identical() {
    let env = Env::new();
    let img = ts::image("busybox");
    env.ok(&["run", "-d", "--name", "cpbox", &img, "sleep", "1000"]);
    let host = tempfile::tempdir().unwrap();
    let blob: Vec<u8> = (0..300_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(host.path().join("blob"), &blob).unwrap();
    std::fs::create_dir_all(host.path().join("tree/sub")).unwrap();
    std::fs::write(host.path().join("tree/sub/a"), "a\n").unwrap();
    std::os::unix::fs::symlink("sub/a", host.path().join("tree/link")).unwrap();

    env.ok(&[
        "cp",
        &host.path().join("blob").to_string_lossy(),
        "cpbox:/tmp/blob",
    ]);
    env.ok(&[
        "cp",
        &host.path().join("tree").to_string_lossy(),
        "cpbox:/srv/tree",
    ]);
    assert_eq!(env.ok(&["exec", "cpbox", "cat", "/srv/tree/link"]), "a\n");

    let back = tempfile::tempdir().unwrap();
    env.ok(&[
        "cp",
        "cpbox:/tmp/blob",
        &back.path().join("blob").to_string_lossy(),
    ]);
    env.ok(&["cp", "cpbox:/srv/tree", &back.path().to_string_lossy()]);
    assert_eq!(std::fs::read(back.path().join("blob")).unwrap(), blob);
    assert_eq!(
        std::fs::read_to_string(back.path().join("tree/sub/a")).unwrap(),
        "a\n"
    );
    assert_eq!(
        std::fs::read_link(back.path().join("tree/link")).unwrap(),
        PathBuf::from("sub/a")
    );
    env.ok(&["rm", "-f", "cpbox"]);
}

/// Boots `name` on `network` with busybox httpd published on a free port: the page comes back
/// through the port, and the box reaches a TCP server on the host's loopback through the
/// gateway. Returns the published `HOST:80` spec.
fn web_box_serves_and_reaches_the_host(env: &Env, img: &str, network: &str, name: &str) -> String {
    let port = ts::free_port();
    let publish = format!("{port}:80");
    env.ok(&[
        "run",
        "-d",
        "--name",
        name,
        "--network",
        network,
        "-p",
        &publish,
        img,
        "sh",
        "-c",
        "mkdir -p /www && echo hello-web > /www/index.html && exec httpd -f -p 80 -h /www",
    ]);
    assert_eq!(
        env.ok(&["port", name]).trim(),
        format!("80/tcp -> 127.0.0.1:{port}")
    );
    // busybox httpd needs a moment after the box is Ready.
    let mut body = String::new();
    for _ in 0..50 {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            use std::io::{Read, Write};
            let _ = s.write_all(b"GET / HTTP/1.0\r\n\r\n");
            body.clear();
            let _ = s.read_to_string(&mut body);
            if body.contains("hello-web") {
                break;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(
        body.starts_with("HTTP/1.") && body.contains("hello-web"),
        "{network}: {body:?}"
    );

    // A box reaches a TCP server on the host's loopback through the gateway. (An HTTP
    // exchange, not `nc </dev/null`: Debian 12's passt stalls a connection the guest has
    // half-closed, see the README.)
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let host_port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        use std::io::{BufRead, Write};
        let (mut c, _) = listener.accept().unwrap();
        let mut r = std::io::BufReader::new(c.try_clone().unwrap());
        let mut line = String::new();
        while r.read_line(&mut line).unwrap() > 2 {
            line.clear();
        }
        c.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 10\r\n\r\nfrom-host\n")
            .unwrap();
    });
    let got = env.ok(&[
        "exec",
        name,
        "wget",
        "-qO-",
        &format!("http://10.0.2.2:{host_port}/"),
    ]);
    assert_eq!(got, "from-host\n", "{network}");
    server.join().unwrap();
    // The box's resolver is the stack's DNS forwarder.
    assert_eq!(
        env.ok(&["exec", name, "cat", "/etc/resolv.conf"]).trim(),
        "nameserver 10.0.2.3"
    );
    publish
}

#[test]
fn networking_published_port_gateway_none_and_busy_port() {
    let env = Env::new();
    let img = ts::image("busybox");
    let publish = web_box_serves_and_reaches_the_host(&env, &img, "user", "web");
    let port = publish.trim_end_matches(":80");

    // A busy host port fails fast and clearly, and nothing is left behind.
    let out = env.run(&[
        "run", "--rm", "--name", "clash", "-p", &publish, &img, "true",
    ]);
    assert_eq!(out.status.code(), Some(125));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("cannot publish 127.0.0.1:{port}/tcp")),
        "{err}"
    );
    assert!(
        env.run(&["inspect", "clash"]).status.code() == Some(125),
        "no box was created"
    );
    env.ok(&["rm", "-f", "web"]);

    // --network none: loopback only.
    let out = env.ok(&[
        "run",
        "--rm",
        "--network",
        "none",
        &img,
        "ls",
        "/sys/class/net",
    ]);
    assert_eq!(out.split_whitespace().collect::<Vec<_>>(), ["lo"]);
}

#[test]
fn passt_network_serves_published_ports_and_reaches_the_host() {
    let env = Env::new();
    let img = ts::image("busybox");
    web_box_serves_and_reaches_the_host(&env, &img, "passt", "web-passt");
    let dir = std::path::PathBuf::from(env.inspect("web-passt")["box_dir"].as_str().unwrap());
    // Fail-stop: a box whose passt dies has lost its network, so microbox stops it and says
    // why instead of leaving it Ready and unreachable.
    let pid: i32 = std::fs::read_to_string(dir.join("passt.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SAFETY: kill(2) on the pid of this box's passt, read from its pidfile just now.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let state = poll_until(
        100,
        || env.inspect("web-passt"),
        |s| s["state"] == "stopped",
    );
    assert_eq!(state["state"], "stopped", "{state}");
    let reason = state["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("passt exited") && reason.contains("network"),
        "{reason}"
    );
    env.ok(&["rm", "-f", "web-passt"]);
    let left = poll_until(50, || processes_mentioning(&dir), Vec::is_empty);
    assert!(left.is_empty(), "passt and QEMU are gone");
}

#[test]
fn run_it_gives_a_real_terminal_with_the_window_size() {
    let env = Env::new();
    let img = ts::image("busybox");
    env.ok(&["pull", &img]);
    // util-linux `script` runs us on a fresh pseudo-terminal; the keys wait in its buffer until
    // the box's shell reads them.
    let inner = format!(
        "stty rows 33 cols 111; {} run -it --rm {img} sh; echo inner-rc=$?",
        env!("CARGO_BIN_EXE_microbox")
    );
    let out = ts::output_with_stdin(
        Command::new("script")
            .args(["-qec", &inner, "/dev/null"])
            .env("MICROBOX_ROOT", env.root.path()),
        b"tty; stty size; exit 5\n",
    );
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    assert!(text.contains("\n/dev/pts/"), "a pty in the box: {text}");
    assert!(text.contains("\n33 111\n"), "window size forwarded: {text}");
    assert!(
        text.contains("inner-rc=5"),
        "exit code passed through: {text}"
    );
}

#[test]
fn attest_verify_prints_each_check_and_exits_by_verdict() {
    let d = ts::sev_vectors();
    let env = Env::new();
    let p = |n: &str| d.join(n).display().to_string();
    let (report, vcek) = (p("milan-report.bin"), p("milan-vcek.der"));
    let base = ["attest", "verify", "--report", &report, "--vcek", &vcek];
    fn with<'a>(base: &[&'a str], extra: &[&'a str]) -> Vec<&'a str> {
        [base, extra].concat()
    }

    let out = env.ok(&with(&base, &["--at", "2025-06-01"]));
    assert!(
        out.contains("report.signature") && out.contains("PASS"),
        "{out}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&env.ok(&with(&base, &["--at", "2025-06-01", "--format", "json"])))
            .unwrap();
    assert_eq!(json["verdict"], "pass");

    // One flipped bit in the signed area: verdict fail, exit 1.
    let mut bad = std::fs::read(&report).unwrap();
    bad[0x50] ^= 1;
    let bad_path = env.root.path().join("bad.bin");
    std::fs::write(&bad_path, bad).unwrap();
    let bad_path = bad_path.display().to_string();
    let out = env.run(&[
        "attest",
        "verify",
        "--report",
        &bad_path,
        "--vcek",
        &vcek,
        "--at",
        "2025-06-01",
    ]);
    assert_eq!(out.status.code(), Some(1));

    // The debug report fails the strict default policy.
    let debug = [
        "attest",
        "verify",
        "--report",
        &p("milan-debug-report.bin"),
        "--vcek",
        &p("milan-debug-vcek.der"),
        "--at",
        "2025-06-01",
    ];
    assert_eq!(env.run(&debug).status.code(), Some(1));

    // A nonce too short to mean anything is a usage error that says so.
    let out = env.run(&with(&base, &["--at", "2025-06-01", "--nonce", "00ff"]));
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 8"));
    // A wrong (well-formed) nonce fails freshness.
    let out = env.run(&with(
        &base,
        &["--at", "2025-06-01", "--nonce", "0011223344556677"],
    ));
    assert_eq!(out.status.code(), Some(1));
}
