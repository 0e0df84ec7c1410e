//! Benchmark: networking through each user-mode network stack (`--network user`, QEMU's slirp,
//! and `--network passt`) against plain host loopback, measured in the same run.
//!
//! - host -> guest TCP throughput: the host sends N MiB to a published port where the guest's
//!   busybox `nc` discards it; baseline: the same transfer to a host listener on 127.0.0.1.
//! - guest -> host TCP throughput: the guest pipes N MiB of zeros to a host listener through the
//!   gateway (10.0.2.2); baseline: the host sending the same to the same listener.
//! - HTTP latency through a published port (busybox httpd in the box), p50/p99 of N requests;
//!   baseline: the same requests to a minimal HTTP responder on host loopback.
//!
//! Run: `cargo bench -p microbox --bench network` (env NET_MIB, default 64; NET_REQS, default 200).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use microbox_testsupport::bench::{record, Figure};

fn mib_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / (1024.0 * 1024.0) / d.as_secs_f64()
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Sends `bytes` to `addr` and returns how long until the peer closed after reading it all.
fn send_to(addr: (&str, u16), bytes: u64) -> Duration {
    let buf = vec![0u8; 256 * 1024];
    let t = Instant::now();
    let mut s = TcpStream::connect(addr).unwrap();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        s.write_all(&buf[..n]).unwrap();
        left -= n as u64;
    }
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let _ = s.read(&mut [0u8; 1]);
    t.elapsed()
}

/// Accepts one connection and counts what arrives until EOF.
fn sink(listener: &TcpListener) -> (u64, Duration) {
    let (mut c, _) = listener.accept().unwrap();
    let t = Instant::now();
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        match c.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => total += n as u64,
        }
    }
    (total, t.elapsed())
}

fn http_get(port: u16) -> Duration {
    let t = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut body = Vec::new();
    s.read_to_end(&mut body).unwrap();
    assert!(
        body.starts_with(b"HTTP/1."),
        "{}",
        String::from_utf8_lossy(&body)
    );
    t.elapsed()
}

fn main() {
    let mib: u64 = std::env::var("NET_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let reqs: usize = std::env::var("NET_REQS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let bytes = mib * 1024 * 1024;
    let root = tempfile::Builder::new()
        .prefix("mbx-netbench-")
        .tempdir()
        .unwrap();
    let img = microbox_testsupport::image("busybox");
    let bin = env!("CARGO_BIN_EXE_microbox");
    let cli = |args: &[&str]| {
        let out = Command::new(bin)
            .args(args)
            .env("MICROBOX_ROOT", root.path())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "microbox {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    for (network, label) in [("user", "slirp"), ("passt", "passt")] {
        bench_stack(&cli, &img, network, label, bytes, mib, reqs);
    }
}

fn bench_stack(
    cli: &dyn Fn(&[&str]) -> String,
    img: &str,
    network: &str,
    label: &str,
    bytes: u64,
    mib: u64,
    reqs: usize,
) {
    let (sink_port, http_port) = (
        microbox_testsupport::free_port(),
        microbox_testsupport::free_port(),
    );
    cli(&[
        "run", "-d", "--name", "net", "--network", network, "-p", &format!("{sink_port}:5001"), "-p", &format!("{http_port}:80"),
        img, "sh", "-c",
        "mkdir -p /www && echo ok > /www/index.html && httpd -p 80 -h /www && while true; do sleep 100000 | nc -l -p 5001 > /dev/null; done",
    ]);
    // The sink's stdin is a pipe that stays open, so the guest never half-closes the
    // connection: passt 2023-03 (Debian 12) stops forwarding host->guest data on a connection
    // the guest has shut down for writing, which a plain `nc -l < /dev/null` does at once.
    // Wait for both guest listeners.
    for _ in 0..100 {
        let http_ok = TcpStream::connect(("127.0.0.1", http_port))
            .and_then(|mut s| {
                s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
                let mut b = Vec::new();
                s.read_to_end(&mut b)?;
                Ok(b.starts_with(b"HTTP/1."))
            })
            .unwrap_or(false);
        if http_ok {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    // host -> guest
    let d_box = send_to(("127.0.0.1", sink_port), bytes);
    let base = TcpListener::bind("127.0.0.1:0").unwrap();
    let base_port = base.local_addr().unwrap().port();
    let h = std::thread::spawn(move || sink(&base));
    let d_loop = send_to(("127.0.0.1", base_port), bytes);
    h.join().unwrap();
    let (a, b) = (mib_per_s(bytes, d_box), mib_per_s(bytes, d_loop));
    record(Figure {
        bench: "network",
        name: &format!("TCP host->guest through -p ({label})"),
        unit: "MiB/s",
        value: a,
        baseline: Some(("host loopback", b)),
        target: None,
    });

    // guest -> host
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let lp = l.local_addr().unwrap().port();
    let h = std::thread::spawn(move || sink(&l));
    cli(&[
        "exec",
        "net",
        "sh",
        "-c",
        &format!("dd if=/dev/zero bs=1048576 count={mib} 2>/dev/null | nc 10.0.2.2 {lp}"),
    ]);
    let (got, d_box) = h.join().unwrap();
    assert_eq!(got, bytes, "guest->host bytes");
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let lp = l.local_addr().unwrap().port();
    let h = std::thread::spawn(move || sink(&l));
    send_to(("127.0.0.1", lp), bytes);
    let (_, d_loop) = h.join().unwrap();
    let (a, b) = (mib_per_s(bytes, d_box), mib_per_s(bytes, d_loop));
    record(Figure {
        bench: "network",
        name: &format!("TCP guest->host via the gateway ({label})"),
        unit: "MiB/s",
        value: a,
        baseline: Some(("host loopback", b)),
        target: None,
    });

    // HTTP latency
    let mut via_box: Vec<Duration> = (0..reqs).map(|_| http_get(http_port)).collect();
    let responder = TcpListener::bind("127.0.0.1:0").unwrap();
    let rp = responder.local_addr().unwrap().port();
    let n = reqs;
    let h = std::thread::spawn(move || {
        for _ in 0..n {
            let (mut c, _) = responder.accept().unwrap();
            let mut buf = [0u8; 1024];
            let _ = c.read(&mut buf);
            let _ = c.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nok\n");
        }
    });
    let mut base: Vec<Duration> = (0..reqs).map(|_| http_get(rp)).collect();
    h.join().unwrap();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let (p50, p99, b50, b99) = (
        pct(&mut via_box, 0.5),
        pct(&mut via_box, 0.99),
        pct(&mut base, 0.5),
        pct(&mut base, 0.99),
    );
    for (q, v, b) in [("p50", p50, b50), ("p99", p99, b99)] {
        let name = format!("HTTP GET through -p ({label}), {q}");
        record(Figure {
            bench: "network",
            name: &name,
            unit: "ms",
            value: ms(v),
            baseline: Some(("host loopback", ms(b))),
            target: None,
        });
    }
    cli(&["rm", "-f", "net"]);
}
