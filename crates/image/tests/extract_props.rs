//! Property test of layer extraction against hostile tars: random layers of files, directories,
//! symlinks (absolute, climbing, pointing at a directory outside), hard links, whiteouts and
//! opaque markers, with raw names (`..`, absolute paths, `.`). The oracle: whatever is refused,
//! nothing outside the rootfs is created, changed or removed, and every refusal names the layer.
//!
//! Bounded for CI: `PROPTEST_CASES` (default 2000 here) cases of up to 4 layers of 14 entries.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use microbox_image::extract::Extractor;
use proptest::prelude::*;
use sha2::{Digest, Sha256};

/// The sandbox every case runs in: `<base>/root` is the rootfs, the rest must stay untouched.
struct Sandbox {
    base: PathBuf,
}

impl Sandbox {
    fn root(&self) -> PathBuf {
        self.base.join("root")
    }
    fn outside(&self) -> PathBuf {
        self.base.join("outside")
    }

    /// Fresh rootfs and a fresh outside tree: files, a read-write directory, a nested one.
    fn reset(&self) {
        let _ = std::fs::remove_dir_all(&self.base);
        std::fs::create_dir_all(self.root()).unwrap();
        let o = self.outside();
        std::fs::create_dir_all(o.join("sub/deeper")).unwrap();
        std::fs::write(o.join("victim"), "original").unwrap();
        std::fs::write(o.join("sub/keep"), "keep").unwrap();
        std::fs::write(o.join("sub/deeper/keep2"), "keep2").unwrap();
        std::os::unix::fs::symlink("victim", o.join("lnk")).unwrap();
        std::fs::write(self.base.join("beside-root"), "beside").unwrap();
    }
}

/// Everything observable about the tree under `base` except inside `base/root`.
fn snapshot_outside(base: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![base.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let md = std::fs::symlink_metadata(&dir).unwrap();
        out.insert(dir.clone(), describe(&dir, &md));
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let p = e.path();
            if p == base.join("root") {
                // The rootfs directory itself may gain children but must stay a directory.
                let md = std::fs::symlink_metadata(&p).unwrap();
                out.insert(p, format!("rootfs dir={}", md.is_dir()));
                continue;
            }
            let md = std::fs::symlink_metadata(&p).unwrap();
            if md.is_dir() {
                stack.push(p);
            } else {
                out.insert(p.clone(), describe(&p, &md));
            }
        }
    }
    out
}

fn describe(p: &Path, md: &std::fs::Metadata) -> String {
    let content = if md.file_type().is_symlink() {
        format!("-> {}", std::fs::read_link(p).unwrap().display())
    } else if md.is_file() {
        hex::encode(Sha256::digest(std::fs::read(p).unwrap()))
    } else {
        String::new()
    };
    format!(
        "mode={:o} uid={} gid={} size={} nlink={} mtime={}.{} ino={} {content}",
        md.mode(),
        md.uid(),
        md.gid(),
        md.size(),
        md.nlink(),
        md.mtime(),
        md.mtime_nsec(),
        md.ino()
    )
}

#[derive(Debug, Clone)]
enum Entry {
    File(String, Vec<u8>),
    Dir(String, u32),
    Symlink(String, String),
    Hardlink(String, String),
    /// `.wh.NAME` in the given directory.
    Whiteout(String, String),
    /// `.wh..wh..opq` in the given directory.
    Opaque(String),
    Fifo(String),
}

/// Raw path components, hostile ones included.
fn component() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(vec!["a", "b", "c", "lnk", "up", "abs", "victim", "sub"])
            .prop_map(String::from),
        2 => Just("..".to_string()),
        1 => Just(".".to_string()),
        1 => Just("".to_string()), // "a//b" and a leading "/" when first
    ]
}

fn raw_path() -> impl Strategy<Value = String> {
    (any::<bool>(), prop::collection::vec(component(), 1..5))
        .prop_map(|(abs, comps)| {
            let p = comps.join("/");
            if abs {
                format!("/{p}")
            } else {
                p
            }
        })
        .prop_filter("ustar names are at most 100 bytes", |p| {
            !p.is_empty() && p.len() < 100
        })
}

/// Link targets: inside, climbing, and absolute ones that name the real outside tree.
fn link_target(outside: String) -> impl Strategy<Value = String> {
    prop_oneof![
        3 => raw_path(),
        1 => Just(outside.clone()),
        1 => Just(format!("{outside}/victim")),
        1 => Just(format!("{outside}/sub")),
        1 => Just(format!("{outside}/lnk")),
        1 => Just("../../../outside".to_string()),
        1 => Just("../../outside/victim".to_string()),
        1 => Just("/".to_string()),
        1 => Just("..".to_string()),
    ]
}

fn entry(outside: String) -> impl Strategy<Value = Entry> {
    prop_oneof![
        3 => (raw_path(), prop::collection::vec(any::<u8>(), 0..64))
            .prop_map(|(p, d)| Entry::File(p, d)),
        2 => (raw_path(), prop::sample::select(vec![0o755u32, 0o700, 0o500, 0o000, 0o1777]))
            .prop_map(|(p, m)| Entry::Dir(p, m)),
        3 => (raw_path(), link_target(outside.clone())).prop_map(|(p, t)| Entry::Symlink(p, t)),
        2 => (raw_path(), link_target(outside)).prop_map(|(p, t)| Entry::Hardlink(p, t)),
        2 => (raw_path(), prop::sample::select(vec!["a", "b", "lnk", "victim", "sub", "..", ".", "*"]))
            .prop_map(|(d, n)| Entry::Whiteout(d, n.to_string())),
        1 => raw_path().prop_map(Entry::Opaque),
        1 => raw_path().prop_map(Entry::Fifo),
    ]
}

fn set_raw(h: &mut tar::Header, name: &str, link: &str) {
    let u = h.as_ustar_mut().unwrap();
    u.name[..name.len()].copy_from_slice(name.as_bytes());
    u.linkname[..link.len()].copy_from_slice(link.as_bytes());
}

/// A tar with raw names: the `tar` crate's path setters would refuse `..`.
fn layer_tar(entries: &[Entry]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_ustar();
        let (kind, name, link, data, mode): (tar::EntryType, String, &str, &[u8], u32) = match e {
            Entry::File(p, d) => (tar::EntryType::Regular, p.clone(), "", d, 0o644),
            Entry::Dir(p, m) => (tar::EntryType::Directory, p.clone(), "", b"", *m),
            Entry::Symlink(p, t) => (tar::EntryType::Symlink, p.clone(), t, b"", 0o777),
            Entry::Hardlink(p, t) => (tar::EntryType::Link, p.clone(), t, b"", 0o644),
            Entry::Whiteout(d, n) => (
                tar::EntryType::Regular,
                format!("{d}/.wh.{n}"),
                "",
                b"",
                0o644,
            ),
            Entry::Opaque(d) => (
                tar::EntryType::Regular,
                format!("{d}/.wh..wh..opq"),
                "",
                b"",
                0o644,
            ),
            Entry::Fifo(p) => (tar::EntryType::Fifo, p.clone(), "", b"", 0o644),
        };
        if name.len() >= 100 || link.len() >= 100 {
            continue;
        }
        set_raw(&mut h, &name, link);
        h.set_entry_type(kind);
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_mtime(1_600_000_000);
        h.set_uid(0);
        h.set_gid(0);
        h.set_cksum();
        b.append(&h, data).unwrap();
    }
    b.into_inner().unwrap()
}

fn base_dir() -> PathBuf {
    static BASE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BASE.get_or_init(|| microbox_testsupport::process_temp_dir("mb-extract-props-"))
        .clone()
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn nothing_outside_the_rootfs_changes(
        layers in prop::collection::vec(
            prop::collection::vec(entry(base_dir().join("case/outside").display().to_string()), 1..14),
            1..5,
        )
    ) {
        let sb = Sandbox { base: base_dir().join("case") };
        sb.reset();
        let before = snapshot_outside(&sb.base);
        let ex = Extractor::open(&sb.root()).unwrap();
        for (i, l) in layers.iter().enumerate() {
            let digest = format!("sha256:layer{i}");
            if let Err(e) = ex.apply_tar(&layer_tar(l)[..], &digest) {
                // A refusal is fine; it must say which layer (and so which image) was at fault.
                prop_assert!(e.to_string().contains(&digest), "error without the layer: {e}");
            }
        }
        let after = snapshot_outside(&sb.base);
        prop_assert_eq!(before, after);
    }
}

/// What a faithful extraction reproduces, by relative path (directory mtimes and inode numbers
/// depend on creation order and time, so they are left out).
fn snapshot_tree(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let p = e.path();
            let md = std::fs::symlink_metadata(&p).unwrap();
            let content = if md.file_type().is_symlink() {
                format!("-> {}", std::fs::read_link(&p).unwrap().display())
            } else if md.is_file() {
                hex::encode(Sha256::digest(std::fs::read(&p).unwrap()))
            } else {
                String::new()
            };
            let mtime = if md.is_dir() { 0 } else { md.mtime() };
            out.insert(
                p.strip_prefix(root).unwrap().to_path_buf(),
                format!(
                    "mode={:o} uid={} gid={} size={} nlink={} mtime={mtime} {content}",
                    md.mode(),
                    md.uid(),
                    md.gid(),
                    if md.is_dir() { 0 } else { md.size() },
                    if md.is_dir() { 0 } else { md.nlink() },
                ),
            );
            if md.is_dir() {
                stack.push(p);
            }
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases() / 4, ..ProptestConfig::default() })]

    /// The parallel file writers give exactly the tree (and fail on the same layer) that writing
    /// everything in tar order on one thread gives. (A failed layer fails the whole pull, so
    /// what a failing layer left half-done is not compared.)
    #[test]
    fn parallel_writers_match_sequential_extraction(
        layers in prop::collection::vec(
            prop::collection::vec(entry(base_dir().join("seq/outside").display().to_string()), 1..14),
            1..5,
        )
    ) {
        let mut trees = Vec::new();
        for (name, threads) in [("seq", 0usize), ("par", 3)] {
            let sb = Sandbox { base: base_dir().join(name) };
            sb.reset();
            let ex = Extractor::open(&sb.root()).unwrap().with_threads(threads);
            let failed_at = layers
                .iter()
                .enumerate()
                .position(|(i, l)| ex.apply_tar(&layer_tar(l)[..], &format!("sha256:layer{i}")).is_err());
            let tree = failed_at.is_none().then(|| snapshot_tree(&sb.root()));
            trees.push((failed_at, tree));
        }
        prop_assert_eq!(&trees[0], &trees[1]);
    }
}

#[test]
fn the_oracle_sees_a_write_outside() {
    // The property is worth something only if its snapshot notices a change outside.
    let sb = Sandbox {
        base: base_dir().join("oracle"),
    };
    sb.reset();
    let before = snapshot_outside(&sb.base);
    std::fs::write(sb.outside().join("sub/new"), "x").unwrap();
    std::fs::remove_file(sb.outside().join("sub/new")).unwrap();
    assert_ne!(
        before,
        snapshot_outside(&sb.base),
        "a create+delete changes the dir mtime"
    );
    sb.reset();
    let before = snapshot_outside(&sb.base);
    std::fs::write(sb.outside().join("victim"), "changed!").unwrap();
    assert_ne!(before, snapshot_outside(&sb.base));
}
