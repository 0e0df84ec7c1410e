//! Pulls from the real test registry and compares extraction with `umoci unpack`.

mod common;

use common::*;
use microbox_image::{ImageStore, NoProgress, PullEvent, PullOptions};
use microbox_testsupport as ts;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multilayer_pull_and_unpack_matches_umoci() {
    let reference = ts::image("multilayer");
    let root = tempfile::tempdir().unwrap();
    let store = ImageStore::open(root.path()).unwrap();
    let events = std::sync::Mutex::new(Vec::new());
    let progress = |e: &PullEvent| events.lock().unwrap().push(e.clone());
    let h = store
        .pull(&reference, &PullOptions::default(), &progress)
        .await
        .unwrap();

    assert_eq!(h.reference, reference);
    assert_eq!(h.layers.len(), 3);
    assert_eq!(h.platform, "linux/amd64");
    assert_eq!(h.config.env, vec!["PATH=/bin".to_string()]);
    assert_eq!(h.config.cmd, vec!["sh".to_string()]);
    assert_eq!(h.config.working_dir, "/data");
    assert_eq!(h.config.user, "1000:1000");
    let ev = events.into_inner().unwrap();
    for l in &h.layers {
        assert!(
            ev.contains(&PullEvent::LayerDone {
                digest: l.digest.clone(),
                cached: false
            }),
            "{ev:?}"
        );
    }

    let ours = store.rootfs(&h).unwrap();
    assert_eq!(store.rootfs(&h).unwrap(), ours, "rootfs is cached");
    let work = tempfile::tempdir().unwrap();
    let theirs = umoci_unpack(&ts::layout("multilayer"), &work.path().join("bundle"));
    let (a, b) = (snapshot(&ours), snapshot(&theirs));
    assert!(a.len() > 40, "suspiciously small tree: {}", a.len());
    // The comparison covers what it claims to.
    assert_eq!(a["perm/setuid"].mode, 0o4755);
    assert_eq!(a["perm/sticky"].mode, 0o1777);
    assert_eq!(a["misc/added-in-2"].mode, 0o6755);
    assert_eq!(a["misc/fifo"].kind, "fifo");
    assert_eq!(a["links/rel"].link, "target.txt");
    assert_eq!(
        a["links/hard1"].hardlinks,
        vec!["links/target.txt".to_string()]
    );
    assert_eq!(
        a["links/l2-hard"].hardlinks,
        vec!["links/l2-target".to_string()]
    );
    assert_eq!(a["data/keep.txt"].mtime.unwrap().0, 1286705410); // 2010-10-10 10:10:10 UTC
    assert_eq!(a["swap/was-dir"].kind, "file");
    assert_eq!(a["swap/was-file"].kind, "dir");
    assert_eq!(
        a["data/subdir/nested.txt"].xattrs,
        vec!["user.microbox=layer-one".to_string()]
    );
    if ts::is_root() {
        assert_eq!(a["misc/null"].kind, "char");
        assert_eq!(a["misc/loop9"].kind, "block");
        assert_eq!(a["misc/null"].rdev, b["misc/null"].rdev);
        assert_eq!((a["own/odd"].uid, a["own/odd"].gid), (123, 456));
        assert_eq!(a["own/link-owned"].uid, 1000);
    }
    let d = diff(&a, &b);
    assert!(
        d.is_empty(),
        "{} differences vs umoci:\n{}",
        d.len(),
        d.join("\n")
    );

    // Spot checks of the semantics the comparison relies on.
    assert!(!ours.join("data/delete-me.txt").exists());
    assert!(!ours.join("replaced/a.txt").exists() && ours.join("replaced/fresh.txt").exists());
    assert_eq!(
        std::fs::read_link(ours.join("links/abs")).unwrap().to_str(),
        Some("/links/target.txt")
    );

    // unpack() into a fresh directory gives the same tree.
    let dest = work.path().join("unpacked");
    store.unpack(&h, &dest).unwrap();
    assert!(diff(&snapshot(&dest), &b).is_empty());

    // Pipelined: the rootfs is built during the pull, layer by layer, and is identical.
    let root2 = tempfile::tempdir().unwrap();
    let store2 = ImageStore::open(root2.path()).unwrap();
    let opts = PullOptions {
        prepare_rootfs: true,
        ..Default::default()
    };
    let h3 = store2.pull(&reference, &opts, &NoProgress).await.unwrap();
    let tmp_left = dir_entries(&root2.path().join("images-state/tmp"));
    assert!(tmp_left.is_empty(), "{tmp_left:?}");
    let built = dir_entries(&root2.path().join("images-state/rootfs"));
    assert_eq!(built.len(), 1, "rootfs built during the pull: {built:?}");
    let d = diff(&snapshot(&store2.rootfs(&h3).unwrap()), &b);
    assert!(d.is_empty(), "pipelined: {}", d.join("\n"));

    // Second pull: everything cached, same handle.
    let events = std::sync::Mutex::new(Vec::new());
    let progress = |e: &PullEvent| events.lock().unwrap().push(e.clone());
    let h2 = store
        .pull(&reference, &PullOptions::default(), &progress)
        .await
        .unwrap();
    assert_eq!(h2, h);
    assert!(events
        .into_inner()
        .unwrap()
        .iter()
        .all(|e| !matches!(e, PullEvent::LayerDone { cached: false, .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_is_an_oci_layout_and_commands_work() {
    let reference = ts::image("busybox");
    let root = tempfile::tempdir().unwrap();
    let store = ImageStore::open(root.path()).unwrap();
    assert!(store.lookup(&reference).unwrap().is_none());
    let h = store
        .ensure(&reference, &PullOptions::default(), &NoProgress)
        .await
        .unwrap();
    assert_eq!(store.lookup(&reference).unwrap().as_ref(), Some(&h));
    assert_eq!(h.config.cmd, vec!["sh".to_string()]);
    assert!(h.config.exposed_ports.contains(&"80/tcp".to_string()));

    // Other tools read the store.
    let out = ts::run(
        std::process::Command::new("skopeo")
            .arg("inspect")
            .arg("--raw")
            .arg(format!(
                "oci:{}:{}",
                store.layout_dir().display(),
                h.reference
            )),
    );
    assert!(out.contains(&h.config_digest), "{out}");
    let bundle = tempfile::tempdir().unwrap();
    let mut cmd = std::process::Command::new("umoci");
    ts::run(
        cmd.arg("unpack")
            .arg("--image")
            .arg(format!("{}:{}", store.layout_dir().display(), h.reference))
            .arg(bundle.path().join("b")),
    );
    assert!(bundle.path().join("b/rootfs/bin/busybox").is_file());

    let list = store.list().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].reference, reference);
    assert!(list[0].size > 500_000);
    let report = store.check().unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.blobs_checked, 3);

    // Damage is found.
    let blob = store
        .layout_dir()
        .join("blobs/sha256")
        .join(&h.layers[0].digest[7..]);
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&blob, &bytes).unwrap();
    let report = store.check().unwrap();
    assert_eq!(report.problems.len(), 1, "{report:?}");
    assert_eq!(report.problems[0].digest, h.layers[0].digest);
    bytes[100] ^= 1;
    std::fs::write(&blob, &bytes).unwrap();

    store.rootfs(&h).unwrap();
    store.remove(&reference).unwrap();
    assert!(store.lookup(&reference).unwrap().is_none());
    assert!(store
        .remove(&reference)
        .unwrap_err()
        .to_string()
        .contains("not found"));
    let pr = store.prune().unwrap();
    assert_eq!(pr.blobs_removed, 3);
    assert_eq!(pr.rootfs_removed, 1);
    assert!(dir_entries(&store.layout_dir().join("blobs/sha256")).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_keeps_a_leased_rootfs_of_an_untagged_image() {
    let root = tempfile::tempdir().unwrap();
    let store = ImageStore::open(root.path()).unwrap();
    let reference = ts::image("busybox");
    let h = store
        .pull(&reference, &PullOptions::default(), &NoProgress)
        .await
        .unwrap();
    let (rootfs, lease) = store.lease_rootfs(&h).unwrap();
    assert!(rootfs.join("bin/busybox").exists());
    store.remove(&reference).unwrap();
    let r = store.prune().unwrap();
    assert!(r.blobs_removed > 0, "untagged blobs go");
    assert_eq!(r.rootfs_removed, 0, "a leased rootfs stays");
    assert!(rootfs.join("bin/busybox").exists());
    drop(lease);
    assert_eq!(store.prune().unwrap().rootfs_removed, 1);
    assert!(!rootfs.exists());
}

/// The uncompressed layer tars of a test image's OCI layout, in order.
fn layer_tars(layout: &std::path::Path, out: &std::path::Path) -> Vec<std::path::PathBuf> {
    let blob = |d: &str| {
        layout
            .join("blobs/sha256")
            .join(d.trim_start_matches("sha256:"))
    };
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let mdigest = index["manifests"][0]["digest"].as_str().unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(blob(mdigest)).unwrap()).unwrap();
    let mut tars = Vec::new();
    for (i, l) in manifest["layers"].as_array().unwrap().iter().enumerate() {
        let mut data = Vec::new();
        let f = std::fs::File::open(blob(l["digest"].as_str().unwrap())).unwrap();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(f), &mut data).unwrap();
        let p = out.join(format!("layer{i}.tar"));
        std::fs::write(&p, data).unwrap();
        tars.push(p);
    }
    tars
}

/// An image built FROM another reuses the base image's rootfs (hard links to its files) and
/// applies only its own layers; the result equals a from-scratch unpack and the base's tree is
/// left exactly as it was, through layer 2's deletions, replacements and type changes and
/// layer 3's opaque directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn derived_image_reuses_the_base_rootfs_and_leaves_it_untouched() {
    if !ts::is_root() {
        eprintln!("skipping: the shared base rootfs is used only by root");
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let tars = layer_tars(&ts::layout("multilayer"), work.path());
    assert_eq!(tars.len(), 3);
    let base_layout = ts::build_image_from_tars(&work.path().join("base"), &tars[..1]);
    let mid_layout = ts::build_image_from_tars(&work.path().join("mid"), &tars[..2]);
    let full_layout = ts::build_image_from_tars(&work.path().join("full"), &tars);
    let base_ref = ts::push_layout(&base_layout, "latest", "reuse/base:latest");
    let mid_ref = ts::push_layout(&mid_layout, "latest", "reuse/mid:latest");
    let full_ref = ts::push_layout(&full_layout, "latest", "reuse/full:latest");

    let root = tempfile::tempdir().unwrap();
    let store = ImageStore::open(root.path()).unwrap();
    let pull = |r: String| {
        let store = &store;
        async move {
            store
                .pull(&r, &PullOptions::default(), &NoProgress)
                .await
                .unwrap()
        }
    };
    let base = pull(base_ref).await;
    let base_fs = store.rootfs(&base).unwrap();
    let before = snapshot(&base_fs);
    let mid = pull(mid_ref).await;
    let mid_fs = store.rootfs(&mid).unwrap();
    let full = pull(full_ref).await;
    let full_fs = store.rootfs(&full).unwrap();

    use std::os::unix::fs::MetadataExt;
    let ino = |p: std::path::PathBuf| std::fs::symlink_metadata(p).unwrap().ino();
    // Layer 1's untouched files are the base's inodes; the full image was built on mid (the
    // longest cached prefix), whose files are the base's too.
    assert_eq!(
        ino(base_fs.join("bin/busybox")),
        ino(mid_fs.join("bin/busybox"))
    );
    assert_eq!(
        ino(base_fs.join("bin/busybox")),
        ino(full_fs.join("bin/busybox"))
    );
    assert_eq!(
        ino(mid_fs.join("links/l2-target")),
        ino(full_fs.join("links/l2-target"))
    );
    // Files a later layer replaced are new inodes.
    assert_ne!(
        ino(base_fs.join("data/keep.txt")),
        ino(mid_fs.join("data/keep.txt"))
    );

    assert_eq!(
        diff(&snapshot(&base_fs), &before),
        Vec::<String>::new(),
        "base unchanged"
    );
    for (h, fs_dir, name) in [(&mid, &mid_fs, "mid"), (&full, &full_fs, "full")] {
        let fresh = work.path().join(format!("fresh-{name}"));
        store.unpack(h, &fresh).unwrap();
        assert_eq!(
            diff(&snapshot(fs_dir), &snapshot(&fresh)),
            Vec::<String>::new(),
            "{name}: reused rootfs == from-scratch unpack"
        );
    }
}
