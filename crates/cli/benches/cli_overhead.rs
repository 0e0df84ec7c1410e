//! Benchmark: the CLI's own overhead.
//!
//! 1. `microbox run --rm IMAGE true` (wall time, image already stored) against the same work
//!    done in-process with the runtime API (`VmManager::boot` + `exec(true)` + `destroy`),
//!    alternated in one run. Target: the CLI within 5% of the in-process path.
//! 2. `microbox exec BOX true` p50/p99 against an in-process `exec(true)` on a booted box.
//!
//! Run: `cargo bench -p microbox --bench cli_overhead` (env BENCH_RUNS, default 5).
//! Uses the shared test harness (a real docker-registry and the busybox test image).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use microbox_core::{BoxConfig, EventEmitter};
use microbox_runtime::{ExecRequest, VmManager};
use microbox_testsupport::bench::{record, Figure};

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() {
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let root = tempfile::Builder::new()
        .prefix("mbx-bench-")
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
        out
    };
    cli(&["pull", &img]);
    let rt = tokio::runtime::Runtime::new().unwrap();

    // Warm the initramfs cache and the rootfs once.
    cli(&["run", "--rm", &img, "true"]);

    let (mut via_cli, mut in_proc) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let t = Instant::now();
        cli(&["run", "--rm", &img, "true"]);
        via_cli.push(t.elapsed());

        let t = Instant::now();
        rt.block_on(async {
            let vm = VmManager::with_root(
                BoxConfig::new(img.clone()),
                EventEmitter::default(),
                root.path(),
            );
            vm.boot().await.unwrap();
            let r = vm.exec(ExecRequest::new(["true"])).await.unwrap();
            assert!(r.success());
            vm.destroy().await.unwrap();
        });
        in_proc.push(t.elapsed());
    }
    let (c, p) = (median(&mut via_cli), median(&mut in_proc));
    println!(
        "run --rm IMAGE true        median {:>8.1} ms  (n={runs})",
        ms(c)
    );
    println!("in-process boot+exec+destroy median {:>6.1} ms", ms(p));
    record(Figure {
        bench: "cli_overhead",
        name: "microbox run --rm IMAGE true (image stored), median",
        unit: "ms",
        value: ms(c),
        baseline: Some(("in-process boot + exec + destroy", ms(p))),
        target: Some("ratio <= 1.05"),
    });

    // exec round trips on one running box.
    let execs: usize = std::env::var("BENCH_EXECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    cli(&["run", "-d", "--name", "bench", &img, "sleep", "100000"]);
    let mut via_cli = Vec::new();
    for _ in 0..execs {
        let t = Instant::now();
        cli(&["exec", "bench", "true"]);
        via_cli.push(t.elapsed());
    }
    cli(&["rm", "-f", "bench"]);
    let mut in_proc = Vec::new();
    rt.block_on(async {
        let vm = VmManager::with_root(
            BoxConfig::new(img.clone()),
            EventEmitter::default(),
            root.path(),
        );
        vm.boot().await.unwrap();
        for _ in 0..execs {
            let t = Instant::now();
            vm.exec(ExecRequest::new(["true"])).await.unwrap();
            in_proc.push(t.elapsed());
        }
        vm.destroy().await.unwrap();
    });
    println!(
        "microbox exec BOX true     p50 {:>7.1} ms  p99 {:>7.1} ms  (n={execs})",
        ms(pct(&mut via_cli, 0.5)),
        ms(pct(&mut via_cli, 0.99))
    );
    println!(
        "in-process exec(true)      p50 {:>7.1} ms  p99 {:>7.1} ms",
        ms(pct(&mut in_proc, 0.5)),
        ms(pct(&mut in_proc, 0.99))
    );
    for (label, p) in [("p50", 0.5), ("p99", 0.99)] {
        let name = format!("microbox exec BOX true {label}");
        let base = format!("in-process exec(true) {label}");
        record(Figure {
            bench: "cli_overhead",
            name: &name,
            unit: "ms",
            value: ms(pct(&mut via_cli, p)),
            baseline: Some((&base, ms(pct(&mut in_proc, p)))),
            target: None,
        });
    }
}
