//! Benchmark: how many idle boxes fit, and how fast many start at once.
//!
//! - Host memory (RSS of every process of a box: QEMU, virtiofsd, vhost-device-vsock) per idle
//!   box, measured with 1, 5 and 10 boxes running, before and after `compact()`; extrapolated to
//!   how many idle boxes fit in 20 GiB, with the measured points shown.
//! - 10 boxes booted at once: time until all are healthy, against one box alone (same run).
//!
//! Run: `cargo bench -p microbox --bench density` (env DENSITY_MAX, default 10).

use std::time::{Duration, Instant};

use microbox_core::{BoxConfig, EventEmitter};
use microbox_runtime::VmManager;
use microbox_testsupport::bench::{record, Figure};

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

async fn boot_n(img: &str, root: &std::path::Path, n: usize) -> (Vec<VmManager>, Duration) {
    let t = Instant::now();
    let vms: Vec<VmManager> = (0..n)
        .map(|_| {
            VmManager::with_root(
                BoxConfig::new(img.to_string()),
                EventEmitter::default(),
                root,
            )
        })
        .collect();
    let boots = vms.iter().map(|vm| vm.boot());
    for r in futures::future::join_all(boots).await {
        r.expect("boot");
    }
    for vm in &vms {
        assert!(vm.health_check().await.unwrap());
    }
    (vms, t.elapsed())
}

async fn destroy_all(vms: Vec<VmManager>) {
    for vm in vms {
        vm.destroy().await.unwrap();
    }
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

fn main() {
    let max: usize = std::env::var("DENSITY_MAX")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let root = tempfile::Builder::new()
        .prefix("mbx-density-")
        .tempdir()
        .unwrap();
    let img = microbox_testsupport::image("busybox");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // Warm: image, rootfs and initramfs caches.
        let (vms, _) = boot_n(&img, root.path(), 1).await;
        destroy_all(vms).await;

        let (vms, one) = boot_n(&img, root.path(), 1).await;
        destroy_all(vms).await;
        let (vms, many) = boot_n(&img, root.path(), max).await;
        destroy_all(vms).await;
        let name = format!("{max} boxes booted at once, until all healthy");
        record(Figure {
            bench: "density",
            name: &name,
            unit: "ms",
            value: many.as_secs_f64() * 1e3,
            baseline: Some(("one box alone", one.as_secs_f64() * 1e3)),
            target: None,
        });

        println!("idle boxes  RSS/box before compact  after compact  fit in 20 GiB (after)");
        let mut per_box_after = 0.0;
        for n in [1usize, 5, max].into_iter().filter(|n| *n <= max) {
            let (vms, _) = boot_n(&img, root.path(), n).await;
            // Let boot-time page cache and TCG translation settle.
            tokio::time::sleep(Duration::from_secs(2)).await;
            let before: u64 = vms.iter().map(|v| v.host_rss_bytes()).sum();
            for vm in &vms {
                vm.compact().await.unwrap();
            }
            let after: u64 = vms.iter().map(|v| v.host_rss_bytes()).sum();
            per_box_after = after as f64 / n as f64;
            println!(
                "{n:>10}  {:>19.1} MiB  {:>9.1} MiB  {:>10.0}",
                mib(before) / n as f64,
                mib(after) / n as f64,
                20.0 * GIB / per_box_after
            );
            let name = format!("host RSS per idle box, {n} running, after compact()");
            record(Figure {
                bench: "density",
                name: &name,
                unit: "MiB",
                value: mib(after) / n as f64,
                baseline: Some(("before compact()", mib(before) / n as f64)),
                target: None,
            });
            destroy_all(vms).await;
        }
        let name = format!("idle boxes that fit in 20 GiB (from the {max}-box point)");
        record(Figure {
            bench: "density",
            name: &name,
            unit: "boxes",
            value: (20.0 * GIB / per_box_after).floor(),
            baseline: None,
            target: None,
        });
    });
}
