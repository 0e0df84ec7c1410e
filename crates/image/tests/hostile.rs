//! Hostile layers (path traversal, absolute paths, writes through symlinks, hard links to host
//! files, climbing whiteouts) pulled from the real registry: nothing outside the rootfs changes.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use microbox_image::{Error, ImageStore, NoProgress, PullOptions};
use microbox_testsupport as ts;
use tar::EntryType;

enum E<'a> {
    File(&'a str, &'a str),
    Dir(&'a str),
    Symlink(&'a str, &'a str),
    Hardlink(&'a str, &'a str),
}

/// A tar with raw (unsanitized) names: the `tar` crate's path setters refuse `..`.
fn layer_tar(dir: &Path, name: &str, entries: &[E]) -> PathBuf {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let (kind, path, link, data): (EntryType, &str, &str, &str) = match e {
            E::File(p, d) => (EntryType::Regular, p, "", d),
            E::Dir(p) => (EntryType::Directory, p, "", ""),
            E::Symlink(p, t) => (EntryType::Symlink, p, t, ""),
            E::Hardlink(p, t) => (EntryType::Link, p, t, ""),
        };
        let mut h = tar::Header::new_ustar();
        {
            let u = h.as_ustar_mut().unwrap();
            u.name[..path.len()].copy_from_slice(path.as_bytes());
            u.linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
        h.set_entry_type(kind);
        h.set_size(data.len() as u64);
        h.set_mode(if kind == EntryType::Directory {
            0o755
        } else {
            0o644
        });
        h.set_mtime(1_600_000_000);
        h.set_uid(0);
        h.set_gid(0);
        h.set_cksum();
        b.append(&h, data.as_bytes()).unwrap();
    }
    let p = dir.join(format!("{name}.tar"));
    std::fs::write(&p, b.into_inner().unwrap()).unwrap();
    p
}

struct Outside {
    dir: tempfile::TempDir,
}

impl Outside {
    fn new() -> Outside {
        let dir = tempfile::Builder::new()
            .prefix("mb-outside")
            .tempdir_in("/tmp")
            .unwrap();
        std::fs::write(dir.path().join("victim"), "original").unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/keep"), "keep").unwrap();
        Outside { dir }
    }
    fn path(&self) -> &str {
        self.dir.path().to_str().unwrap()
    }
}

/// Builds, pushes, pulls and materialises an image of the given layers; returns the store
/// root, the handle and the rootfs result.
async fn run_case(
    name: &str,
    layers: &[Vec<E<'_>>],
) -> (
    tempfile::TempDir,
    microbox_image::ImageHandle,
    Result<PathBuf, Error>,
) {
    let work = tempfile::tempdir().unwrap();
    let tars: Vec<PathBuf> = layers
        .iter()
        .enumerate()
        .map(|(i, l)| layer_tar(work.path(), &format!("l{i}"), l))
        .collect();
    let layout = work.path().join("oci");
    ts::build_image_from_tars(&layout, &tars);
    let reference = ts::push_layout(&layout, "latest", &format!("hostile/{name}:latest"));
    let root = tempfile::tempdir().unwrap();
    let store = ImageStore::open(root.path()).unwrap();
    let h = store
        .pull(&reference, &PullOptions::default(), &NoProgress)
        .await
        .unwrap();
    let r = store.rootfs(&h);
    (root, h, r)
}

fn assert_contained(
    case: &str,
    outside: &Outside,
    before: &std::collections::BTreeMap<String, EntryInfo>,
    store_root: &Path,
) {
    let after = snapshot(outside.dir.path());
    let d = diff(&after, before);
    assert!(
        d.is_empty(),
        "{case}: outside dir changed:\n{}",
        d.join("\n")
    );
    for p in [
        "/escape-dotdot",
        "/b-escape",
        "/up",
        "/abs-escape-mb",
        "/pwned",
        "/pwned2",
    ] {
        assert!(!Path::new(p).exists(), "{case}: {p} created on the host");
    }
    // `..` from the rootfs would land next to it.
    let rootfs_parent = store_root.join("images-state/rootfs");
    for e in dir_entries(&rootfs_parent) {
        assert_eq!(e.len(), 32, "{case}: unexpected {e} next to the rootfs");
    }
    assert!(
        dir_entries(&store_root.join("images-state/tmp")).is_empty(),
        "{case}: temp files left"
    );
    for e in dir_entries(store_root) {
        assert!(
            ["images", "images-state"].contains(&e.as_str()),
            "{case}: unexpected {e} in store root"
        );
    }
}

fn assert_layer_error(case: &str, r: &Result<PathBuf, Error>, h: &microbox_image::ImageHandle) {
    if let Err(e) = r {
        let msg = e.to_string();
        assert!(matches!(e, Error::Layer { .. }), "{case}: {msg}");
        assert!(
            h.layers.iter().any(|l| msg.contains(&l.digest)),
            "{case}: error does not name the layer: {msg}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traversal_and_absolute_paths_stay_inside() {
    let out = Outside::new();
    let before = snapshot(out.dir.path());
    let victim_abs = format!("{}/victim", out.path());
    let layers = vec![vec![
        E::File("../../../../escape-dotdot", "x"),
        E::File("a/../../b-escape", "x"),
        E::Dir("../up/"),
        E::File("/abs-escape-mb", "x"),
        E::File(&victim_abs, "overwritten"),
    ]];
    let (root, h, r) = run_case("traversal", &layers).await;
    let rootfs = r.expect("traversal entries resolve inside the root");
    assert_eq!(
        std::fs::read_to_string(rootfs.join("escape-dotdot")).unwrap(),
        "x"
    );
    assert!(rootfs.join("b-escape").is_file());
    assert!(rootfs.join("up").is_dir());
    assert!(rootfs.join("abs-escape-mb").is_file());
    assert_eq!(
        std::fs::read_to_string(rootfs.join(victim_abs.trim_start_matches('/'))).unwrap(),
        "overwritten"
    );
    assert_contained("traversal", &out, &before, root.path());
    drop(h);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_through_symlinks_stay_inside() {
    let out = Outside::new();
    let before = snapshot(out.dir.path());
    let rel_out = format!("../../../../../../../..{}", out.path());
    let victim = format!("{}/victim", out.path());
    let layers = vec![
        vec![
            E::Symlink("evil", out.path()),
            E::Symlink("evil-rel", &rel_out),
            E::Symlink("victim-link", &victim),
            E::Symlink("dotdot", ".."),
        ],
        vec![
            E::File("evil/pwned", "x"),
            E::File("evil-rel/pwned2", "x"),
            E::File("victim-link", "overwritten"),
            E::File("dotdot/pwned", "x"),
            E::File("evil/sub/keep", "changed"),
        ],
    ];
    let (root, h, r) = run_case("symlink-write", &layers).await;
    assert_layer_error("symlink-write", &r, &h);
    if let Ok(rootfs) = &r {
        // Resolved inside: the symlinked directories do not exist in the rootfs, so they were
        // created there (or the write refused); the host file is untouched either way.
        assert_eq!(
            std::fs::read_to_string(rootfs.join("victim-link")).unwrap(),
            "overwritten"
        );
    }
    assert_contained("symlink-write", &out, &before, root.path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hardlinks_to_host_files_are_refused_or_confined() {
    let out = Outside::new();
    let before = snapshot(out.dir.path());
    let victim = format!("{}/victim", out.path());
    let rel_victim = format!("../../../../../../../..{victim}");
    for (case, layers) in [
        ("hl-abs", vec![vec![E::Hardlink("hl", &victim)]]),
        ("hl-rel", vec![vec![E::Hardlink("hl", &rel_victim)]]),
        (
            "hl-via-symlink",
            vec![
                vec![E::Symlink("sl", out.path())],
                vec![E::Hardlink("hl", "sl/victim")],
            ],
        ),
    ] {
        let (root, h, r) = run_case(case, &layers).await;
        let e = r.expect_err("a hard link to a file that is not in the rootfs must fail");
        assert!(e.to_string().contains("hard link target"), "{case}: {e}");
        assert_layer_error(case, &Err(e), &h);
        assert_contained(case, &out, &before, root.path());
        let st = std::fs::metadata(&victim).unwrap();
        assert_eq!(
            std::os::unix::fs::MetadataExt::nlink(&st),
            1,
            "{case}: host file got a link"
        );

        // Building the rootfs during the pull fails the pull the same way, leaving nothing.
        let root = tempfile::tempdir().unwrap();
        let store = ImageStore::open(root.path()).unwrap();
        let opts = PullOptions {
            prepare_rootfs: true,
            ..Default::default()
        };
        let e = store
            .pull(&h.reference, &opts, &NoProgress)
            .await
            .unwrap_err();
        assert_layer_error(case, &Err(e), &h);
        assert_contained(case, &out, &before, root.path());
        assert!(dir_entries(&root.path().join("images-state/rootfs")).is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn climbing_whiteouts_stay_inside() {
    let out = Outside::new();
    let before = snapshot(out.dir.path());
    let climb = format!("..{}/.wh.victim", out.path());
    let layers = vec![
        vec![
            E::Symlink("sl", out.path()),
            E::File("keep", "k"),
            E::Dir("d/"),
        ],
        vec![
            E::File("../../../.wh.victim", ""),
            E::File("sl/.wh.victim", ""),
            E::File("sl/sub/.wh..wh..opq", ""),
            E::File("sl/.wh.sub", ""),
            E::File(&climb, ""),
        ],
    ];
    let (root, h, r) = run_case("whiteout-climb", &layers).await;
    let rootfs = r.expect("climbing whiteouts resolve inside the root");
    assert!(rootfs.join("keep").is_file());
    assert!(std::fs::symlink_metadata(rootfs.join("sl")).is_ok());
    assert_contained("whiteout-climb", &out, &before, root.path());
    drop(h);

    // A whiteout of "." or ".." is refused with the layer and entry named.
    let (root, h, r) = run_case(
        "whiteout-dot",
        &[vec![E::Dir("d/")], vec![E::File("d/.wh..", "")]],
    )
    .await;
    let e = r.expect_err("whiteout of '..' must be refused");
    assert!(e.to_string().contains("d/.wh.."), "{e}");
    assert_layer_error("whiteout-dot", &Err(e), &h);
    assert_contained("whiteout-dot", &out, &before, root.path());
}
