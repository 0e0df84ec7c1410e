//! Benchmark: pull + unpack the busybox test image and a ~150 MB, three-layer Debian+python3
//! image from the local registry with microbox, against `skopeo copy` + `umoci unpack` of the
//! same image in the same run; plus a second pull of the stored image (against a second
//! `skopeo copy` into a layout that has it) and a cached `rootfs()`; and the rootfs of an image
//! built FROM the stored Debian image, against unpacking all of its layers.
//!
//! Run: `cargo bench -p microbox-image --bench pull_unpack` (first run debootstraps, ~1 min).
//! `MB_BENCH_ROUNDS` (default 3) rounds; best and median are reported. By default the pull
//! builds the rootfs as layers arrive (`PullOptions::prepare_rootfs`, what the runtime uses);
//! `MB_BENCH_SEQUENTIAL=1` pulls first and unpacks afterwards.

use std::process::Command;
use std::time::{Duration, Instant};

use microbox_image::{ImageStore, NoProgress, PullOptions};
use microbox_testsupport as ts;
use microbox_testsupport::bench::{record, Figure};

fn main() {
    let rounds: usize = std::env::var("MB_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    // MB_BENCH_SEQUENTIAL=1: pull, then rootfs() (no overlap of download and extraction).
    let pipelined = std::env::var_os("MB_BENCH_SEQUENTIAL").is_none();
    eprintln!("building/pushing the benchmark images (cached after the first run)...");
    let busybox = ts::image("busybox");
    let layout = ts::layout("debian-python");
    let debian = ts::push_layout(&layout, "latest", "bench/debian-python:latest");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    for (label, reference) in [("busybox", busybox), ("debian-python", debian.clone())] {
        bench_image(&rt, label, &reference, rounds, pipelined);
    }
    bench_derived(&rt, &layout, &debian, rounds);
}

/// An image built FROM the stored Debian image (one small extra layer): its rootfs starts as
/// hard links to Debian's, against unpacking all its layers from scratch in the same store.
fn bench_derived(
    rt: &tokio::runtime::Runtime,
    base_layout: &std::path::Path,
    base: &str,
    rounds: usize,
) {
    let work = tempfile::tempdir_in(ts::target_dir()).unwrap();
    let derived_layout = work.path().join("derived");
    ts::run(
        Command::new("cp")
            .arg("-a")
            .arg(base_layout)
            .arg(&derived_layout),
    );
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    let body = b"print('hello from the app layer')\n";
    h.set_size(body.len() as u64);
    h.set_mode(0o644);
    h.set_mtime(1_700_000_000);
    h.set_uid(0);
    h.set_gid(0);
    b.append_data(&mut h, "app/main.py", &body[..]).unwrap();
    let tar_path = work.path().join("app.tar");
    std::fs::write(&tar_path, b.into_inner().unwrap()).unwrap();
    ts::add_tar_layer(&derived_layout, "latest", &tar_path);
    let derived = ts::push_layout(&derived_layout, "latest", "bench/debian-app:latest");

    let (mut reuse, mut scratch) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let root = tempfile::tempdir_in(ts::target_dir()).unwrap();
        let store = ImageStore::open(root.path()).unwrap();
        let opts = PullOptions::default();
        let hb = rt.block_on(store.pull(base, &opts, &NoProgress)).unwrap();
        store.rootfs(&hb).unwrap();
        let hd = rt
            .block_on(store.pull(&derived, &opts, &NoProgress))
            .unwrap();
        sync();
        let t = Instant::now();
        let fs = store.rootfs(&hd).unwrap();
        reuse.push(t.elapsed());
        assert!(fs.join("app/main.py").exists() && fs.join("usr/bin/python3").exists());
        sync();
        let t = Instant::now();
        store.unpack(&hd, &root.path().join("scratch")).unwrap();
        scratch.push(t.elapsed());
    }
    reuse.sort();
    scratch.sort();
    let (r, s) = (reuse[rounds / 2], scratch[rounds / 2]);
    println!(
        "rootfs of an image FROM the stored Debian image: {:.1} ms vs {:.1} ms unpacking all its layers",
        r.as_secs_f64() * 1e3,
        s.as_secs_f64() * 1e3
    );
    record(Figure {
        bench: "pull_unpack",
        name: "rootfs of an image FROM the stored Debian image (+1 small layer), median",
        unit: "ms",
        value: r.as_secs_f64() * 1e3,
        baseline: Some(("unpacking all its layers", s.as_secs_f64() * 1e3)),
        target: None,
    });
}

fn bench_image(
    rt: &tokio::runtime::Runtime,
    label: &str,
    reference: &str,
    rounds: usize,
    pipelined: bool,
) {
    let reg = ts::registry();

    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    let mut second = Vec::new();
    let mut second_theirs = Vec::new();
    // Every round's trees stay until the end: on ext4, creating files right after deleting
    // many is slow (the allocator skips recently deleted inodes), and deleting between rounds
    // would time that instead of the tools.
    let keep = std::cell::RefCell::new(Vec::new());
    let mut cached_rootfs = Vec::new();
    let mut size = 0u64;
    for round in 0..rounds {
        // Alternate the order, and flush dirty pages before each timed part, so neither tool
        // pays for the other's writeback.
        let mut run_ours = || {
            sync();
            let root = tempfile::tempdir_in(ts::target_dir()).unwrap();
            let root = keep_dir(&keep, root);
            let store = ImageStore::open(&root).unwrap();
            let t = Instant::now();
            // Pipelined (what the runtime does): layers are applied while others download.
            let opts = PullOptions {
                prepare_rootfs: pipelined,
                ..Default::default()
            };
            let h = rt
                .block_on(store.pull(reference, &opts, &NoProgress))
                .unwrap();
            let t_pull = t.elapsed();
            let rootfs = store.rootfs(&h).unwrap();
            let t_ours = t.elapsed();
            size = h.layers.iter().map(|l| l.size).sum();
            assert!(rootfs.join("bin").exists());
            // Second pull of a stored image, and the cached rootfs.
            let t = Instant::now();
            rt.block_on(store.pull(reference, &PullOptions::default(), &NoProgress))
                .unwrap();
            second.push(t.elapsed());
            let t = Instant::now();
            store.rootfs(&h).unwrap();
            cached_rootfs.push(t.elapsed());
            ours.push(t_ours);
            eprintln!(
                "round {round}: microbox     {:.3}s (pull {:.3}s + rootfs {:.3}s)",
                t_ours.as_secs_f64(),
                t_pull.as_secs_f64(),
                (t_ours - t_pull).as_secs_f64()
            );
        };
        let mut run_theirs = || {
            sync();
            let work = tempfile::tempdir_in(ts::target_dir()).unwrap();
            let work = keep_dir(&keep, work);
            let t = Instant::now();
            skopeo_copy(reference, &work.join("oci"));
            let t_copy = t.elapsed();
            ts::run(
                Command::new("umoci")
                    .args(["unpack", "--image"])
                    .arg(format!("{}:latest", work.join("oci").display()))
                    .arg(work.join("bundle")),
            );
            let t_theirs = t.elapsed();
            theirs.push(t_theirs);
            // A second copy into the layout that already has the image.
            let t = Instant::now();
            skopeo_copy(reference, &work.join("oci"));
            second_theirs.push(t.elapsed());
            eprintln!(
                "round {round}: skopeo+umoci {:.3}s (copy {:.3}s + unpack {:.3}s)",
                t_theirs.as_secs_f64(),
                t_copy.as_secs_f64(),
                (t_theirs - t_copy).as_secs_f64()
            );
        };
        if round % 2 == 0 {
            run_ours();
            run_theirs();
        } else {
            run_theirs();
            run_ours();
        }
    }
    let best = |v: &[Duration]| v.iter().min().copied().unwrap();
    let median = |v: &[Duration]| {
        let mut v = v.to_vec();
        v.sort();
        v[v.len() / 2]
    };
    let (o, t) = (best(&ours), best(&theirs));
    let (om, tm) = (median(&ours), median(&theirs));
    println!(
        "image: {reference} ({:.1} MB compressed, 3 layers) via registry {}",
        size as f64 / 1e6,
        reg.addr
    );
    println!(
        "mode: {}",
        if pipelined {
            "pipelined (prepare_rootfs)"
        } else {
            "sequential (pull, then rootfs)"
        }
    );
    println!(
        "microbox pull+unpack      : {:>8.3} s (best of {rounds})",
        o.as_secs_f64()
    );
    println!(
        "skopeo copy + umoci unpack: {:>8.3} s (best of {rounds})",
        t.as_secs_f64()
    );
    println!(
        "ratio (skopeo+umoci / microbox): {:.2}x best-vs-best, {:.2}x median ({:.3}s vs {:.3}s)",
        t.as_secs_f64() / o.as_secs_f64(),
        tm.as_secs_f64() / om.as_secs_f64(),
        om.as_secs_f64(),
        tm.as_secs_f64()
    );
    println!(
        "second pull of stored image: {:>8.1} ms (best of {rounds})",
        best(&second).as_secs_f64() * 1e3
    );
    println!(
        "cached rootfs() lookup      : {:>8.3} ms",
        best(&cached_rootfs).as_secs_f64() * 1e3
    );
    let name = format!(
        "pull + unpack {label} ({:.1} MB), median",
        size as f64 / 1e6
    );
    record(Figure {
        bench: "pull_unpack",
        name: &name,
        unit: "ms",
        value: om.as_secs_f64() * 1e3,
        baseline: Some(("skopeo copy + umoci unpack", tm.as_secs_f64() * 1e3)),
        target: Some("ratio <= 0.5 (2x faster)"),
    });
    let name = format!("re-pull of stored {label}, median");
    record(Figure {
        bench: "pull_unpack",
        name: &name,
        unit: "ms",
        value: median(&second).as_secs_f64() * 1e3,
        baseline: Some((
            "skopeo copy into a layout that has it",
            median(&second_theirs).as_secs_f64() * 1e3,
        )),
        target: Some("under 100 ms"),
    });
}

/// `skopeo copy` of `reference` from the test registry into the OCI layout `layout`.
fn skopeo_copy(reference: &str, layout: &std::path::Path) {
    ts::run(
        Command::new("skopeo")
            .args([
                "copy",
                "--quiet",
                "--insecure-policy",
                "--src-tls-verify=false",
            ])
            .arg(format!("docker://{reference}"))
            .arg(format!("oci:{}:latest", layout.display())),
    );
}

/// Keeps `dir` alive in `keep` (removed when the benchmark of this image ends).
fn keep_dir(
    keep: &std::cell::RefCell<Vec<tempfile::TempDir>>,
    dir: tempfile::TempDir,
) -> std::path::PathBuf {
    let p = dir.path().to_path_buf();
    keep.borrow_mut().push(dir);
    p
}

fn sync() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
}
