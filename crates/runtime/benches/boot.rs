//! Boot benchmark: `VmManager::boot()` to agent-ready against a bare QEMU baseline.
//!
//! The baseline uses the same kernel, the same initramfs (copied from a warm-up box), the same
//! helpers (virtiofsd for the shared rootfs, vhost-device-vsock) and waits for the same thing
//! (the agent answering health SERVING on vsock port 4088), but a minimal QEMU command line and
//! none of microbox's bookkeeping. Runs alternate. Then: host RSS of an idle box before/after
//! `compact()`, and pause/resume rounds.
//!
//! `cargo bench -p microbox-runtime --bench boot` (BENCH_RUNS=N, default 5).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use microbox_core::{BootPhase, BoxConfig, EventEmitter, NetworkMode};
use microbox_runtime::accel::{detect, host_tsc_khz, Accel};
use microbox_runtime::agent_client::AgentClient;
use microbox_runtime::hypervisor::qemu::kernel_cmdline;
use microbox_runtime::process::{find_program, ManagedProcess};
use microbox_runtime::VmManager;
use microbox_testsupport::bench::{record, Figure};

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

struct Assets {
    kernel: PathBuf,
    initrd: PathBuf,
    rootfs: PathBuf,
    accel: Accel,
}

async fn wait_socket(p: &Path) {
    while !p.exists() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// One baseline boot; returns the time from the first spawn to health SERVING.
async fn baseline_boot(a: &Assets, dir: &Path) -> Duration {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    let start = Instant::now();
    let fs_sock = dir.join("fs.sock");
    let vhost = dir.join("vhost.sock");
    let uds = dir.join("vsock.sock");
    let virtiofsd = ManagedProcess::spawn(
        "virtiofsd",
        &find_program("virtiofsd", "MICROBOX_VIRTIOFSD").unwrap(),
        &[
            format!("--socket-path={}", fs_sock.display()),
            format!("--shared-dir={}", a.rootfs.display()),
            "--cache=auto".into(),
            "--readonly".into(),
        ],
        None,
        None,
    )
    .unwrap();
    let vsock = ManagedProcess::spawn(
        "vhost-device-vsock",
        &find_program("vhost-device-vsock", "MICROBOX_VHOST_VSOCK").unwrap(),
        &[
            "--vm".into(),
            format!(
                "guest-cid=3,socket={},uds-path={}",
                vhost.display(),
                uds.display()
            ),
        ],
        None,
        None,
    )
    .unwrap();
    wait_socket(&fs_sock).await;
    wait_socket(&vhost).await;
    let tsc = if a.accel == Accel::Tcg {
        host_tsc_khz()
    } else {
        None
    };
    let accel = if a.accel == Accel::Kvm { "kvm" } else { "tcg" };
    let args: Vec<String> = [
        "-M",
        "microvm,memory-backend=mem",
        "-accel",
        accel,
        "-object",
        "memory-backend-memfd,id=mem,size=256M,share=on",
        "-m",
        "256M",
        "-nodefaults",
        "-display",
        "none",
        "-no-reboot",
        "-serial",
        "null",
        "-kernel",
        &a.kernel.to_string_lossy(),
        "-initrd",
        &a.initrd.to_string_lossy(),
        "-append",
        &kernel_cmdline(a.accel, tsc, ""),
        "-chardev",
        &format!("socket,id=fs0,path={}", fs_sock.display()),
        "-device",
        "vhost-user-fs-device,chardev=fs0,tag=rootfs",
        "-chardev",
        &format!("socket,id=vs,path={}", vhost.display()),
        "-device",
        "vhost-user-vsock-device,chardev=vs",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // Like the runtime: the first host CONNECT waits for the agent's READY on port 4089 (an
    // earlier one can kill vhost-device-vsock's queue worker).
    let ready = tokio::net::UnixListener::bind(dir.join("vsock.sock_4089")).unwrap();
    let qemu = ManagedProcess::spawn(
        "qemu",
        &find_program("qemu-system-x86_64", "MICROBOX_QEMU").unwrap(),
        &args,
        Some(&dir.join("qemu.log")),
        None,
    )
    .unwrap();
    let (mut note, _) = tokio::time::timeout(Duration::from_secs(120), ready.accept())
        .await
        .expect("baseline guest never said READY")
        .unwrap();
    let mut line = [0u8; 6];
    tokio::io::AsyncReadExt::read_exact(&mut note, &mut line)
        .await
        .unwrap();
    assert_eq!(&line, microbox_agent_proto::READY_LINE);
    loop {
        if let Ok(c) = AgentClient::connect_hybrid_vsock(&uds, 4088, &Default::default()).await {
            if c.health().await.unwrap_or(false) {
                break;
            }
        }
        assert!(
            qemu.is_running(),
            "baseline QEMU died: {}",
            std::fs::read_to_string(dir.join("qemu.log")).unwrap_or_default()
        );
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "baseline boot timed out"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = start.elapsed();
    qemu.kill().await;
    vsock.kill().await;
    virtiofsd.kill().await;
    took
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this binary without it:
    // do not boot a dozen VMs then.
    if !std::env::args().any(|a| a == "--bench") {
        println!("boot benchmark: run with `cargo bench -p microbox-runtime --bench boot`");
        return;
    }
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let emitter = EventEmitter::default();
    let mut cfg = BoxConfig::new(microbox_testsupport::image("busybox"));
    cfg.network = NetworkMode::None;
    cfg.memory_mib = 256;

    // Warm-up: pulls the image, unpacks the rootfs, builds the cached initramfs.
    let warm = VmManager::with_root(cfg.clone(), emitter.clone(), &root);
    warm.boot().await.expect("warm-up boot");
    let rootfs = {
        let p = warm
            .processes()
            .into_iter()
            .find(|p| p.name == "virtiofsd-rootfs")
            .unwrap();
        let cmd =
            String::from_utf8(std::fs::read(format!("/proc/{}/cmdline", p.pid)).unwrap()).unwrap();
        PathBuf::from(
            cmd.split('\0')
                .find_map(|a| a.strip_prefix("--shared-dir="))
                .unwrap(),
        )
    };
    let initrd = tmp.path().join("initrd.cpio");
    std::fs::copy(warm.box_dir().join("initrd.cpio"), &initrd).unwrap();
    let assets = Assets {
        kernel: microbox_runtime::assets::kernel::find_kernel(None)
            .unwrap()
            .path,
        initrd,
        rootfs,
        accel: detect(None).unwrap().accel,
    };
    let accel = warm.boot_report().accel.unwrap();
    warm.stop(Duration::from_secs(10)).await.unwrap();
    warm.destroy().await.unwrap();
    println!("accel: {} ({})", accel.accel, accel.reason);

    let mut ours = Vec::new();
    let mut base = Vec::new();
    let mut phases: Vec<Vec<Duration>> = vec![Vec::new(); BootPhase::ALL.len()];
    for i in 0..runs {
        let b = baseline_boot(&assets, &tmp.path().join("baseline")).await;
        base.push(b);
        let vm = VmManager::with_root(cfg.clone(), emitter.clone(), &root);
        let t = Instant::now();
        vm.boot().await.expect("boot");
        let d = t.elapsed();
        ours.push(d);
        let rep = vm.boot_report();
        for (phase, dur) in &rep.phases {
            let idx = BootPhase::ALL.iter().position(|p| p == phase).unwrap();
            phases[idx].push(*dur);
        }
        vm.destroy().await.unwrap();
        println!(
            "run {}: microbox {:.0} ms, baseline {:.0} ms",
            i + 1,
            ms(d),
            ms(b)
        );
    }
    let mo = median(&mut ours);
    let mb = median(&mut base);
    record(Figure {
        bench: "boot",
        name: "boot() to agent ready, median",
        unit: "ms",
        value: ms(mo),
        baseline: Some(("bare QEMU, same kernel/initramfs/helpers", ms(mb))),
        target: Some("ratio <= 1.10"),
    });
    println!("phase medians (microbox):");
    for (i, p) in BootPhase::ALL.iter().enumerate() {
        if !phases[i].is_empty() {
            let name = format!("boot phase {}, median", p.as_str());
            record(Figure {
                bench: "boot",
                name: &name,
                unit: "ms",
                value: ms(median(&mut phases[i])),
                baseline: None,
                target: None,
            });
        }
    }

    // Idle RSS before/after compact().
    let vm = VmManager::with_root(cfg.clone(), emitter.clone(), &root);
    vm.boot().await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle = vm.host_rss_bytes();
    let rep = vm.compact().await.unwrap();
    println!(
        "idle box host RSS (all processes): {:.1} MiB; compact(): {:.1} -> {:.1} MiB ({})",
        idle as f64 / 1048576.0,
        rep.rss_before_bytes as f64 / 1048576.0,
        rep.rss_after_bytes as f64 / 1048576.0,
        rep.method
    );
    record(Figure {
        bench: "boot",
        name: "idle box host RSS after compact()",
        unit: "MiB",
        value: rep.rss_after_bytes as f64 / 1048576.0,
        baseline: Some(("before compact()", rep.rss_before_bytes as f64 / 1048576.0)),
        target: None,
    });
    for p in vm.processes() {
        println!(
            "  {:<20} {:.1} MiB",
            p.name,
            microbox_runtime::process::rss_bytes(p.pid).unwrap_or(0) as f64 / 1048576.0
        );
    }
    // pause() + resume() rounds with an exec after each: how long a round takes, and whether
    // the agent still answers (host I/O reaching the stopped vsock queues would kill it).
    const PAUSE_ROUNDS: usize = 50;
    let mut rounds = Vec::new();
    let mut dead = 0.0;
    for _ in 0..PAUSE_ROUNDS {
        let t = Instant::now();
        vm.pause().await.unwrap();
        vm.resume().await.unwrap();
        rounds.push(t.elapsed());
        let exec = tokio::time::timeout(
            Duration::from_secs(20),
            vm.exec(microbox_runtime::ExecRequest::new(["true"])),
        )
        .await;
        if !matches!(exec, Ok(Ok(ref r)) if r.exit_code == Some(0)) {
            println!("exec after resume {}: {exec:?}", rounds.len());
            dead = 1.0;
            break;
        }
    }
    println!("{} pause/resume rounds", rounds.len());
    record(Figure {
        bench: "boot",
        name: "pause() + resume(), median",
        unit: "ms",
        value: ms(median(&mut rounds)),
        baseline: None,
        target: None,
    });
    record(Figure {
        bench: "boot",
        name: "agent lost after a pause/resume round",
        unit: "boxes",
        value: dead,
        baseline: None,
        target: Some("0"),
    });

    let t = Instant::now();
    vm.stop(Duration::from_secs(10)).await.unwrap();
    record(Figure {
        bench: "boot",
        name: "stop() (Shutdown, power-off, helpers ended)",
        unit: "ms",
        value: ms(t.elapsed()),
        baseline: None,
        target: None,
    });
    vm.destroy().await.unwrap();
}
