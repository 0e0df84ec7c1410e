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
