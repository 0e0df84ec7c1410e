//! The image store: a valid OCI image layout at `<root>/images` (`oci-layout`, `index.json`
//! whose entries carry `org.opencontainers.image.ref.name` = the normalized reference,
//! `blobs/sha256/...`), plus private state in `<root>/images-state` (temp files, locks, the
//! rootfs cache). Blobs are written to a temp file and renamed into place only once verified,
//! so readers never see partial blobs. `index.json` is replaced atomically under a lock.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;
use sha2::Digest as _;

use crate::docs::{self, Descriptor, Index, REF_NAME};
use crate::error::{Error, Result};
use crate::reference::ImageRef;
use crate::{ImageHandle, ImageRunConfig, ImageSummary, LayerInfo};

/// The on-disk image store. Cheap to clone; safe to use from several processes at once.
#[derive(Debug, Clone)]
pub struct ImageStore {
    pub(crate) root: PathBuf,
    layout: PathBuf,
    state: PathBuf,
}

/// Result of [`ImageStore::check`].
#[derive(Debug, Clone, Default, Serialize)]
pub struct CheckReport {
    /// Blobs re-hashed.
    pub blobs_checked: usize,
    /// Bytes re-hashed.
    pub bytes_checked: u64,
    /// Blobs whose content does not match their name, or that images need but are missing.
    pub problems: Vec<BlobProblem>,
}

impl CheckReport {
    /// No damage found.
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

/// One damaged or missing blob.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct BlobProblem {
    /// Blob digest (file name).
    pub digest: String,
    /// What is wrong.
    pub problem: String,
}

/// Result of [`ImageStore::prune`].
#[derive(Debug, Clone, Default, Serialize)]
pub struct PruneReport {
    /// Unreferenced blobs deleted.
    pub blobs_removed: usize,
    /// Their total size.
    pub bytes_freed: u64,
    /// Cached root filesystems deleted.
    pub rootfs_removed: usize,
}

/// An exclusive or shared `flock`, released on drop.
pub(crate) struct Lock(#[allow(dead_code)] File);

/// Proof that a running box uses an image's shared rootfs: while any lease on it is held (by
/// any process), [`ImageStore::prune`] leaves that rootfs in place, even if the image was
/// untagged. A flock, so a crashed holder releases it.
pub struct RootfsLease {
    _lock: Lock,
}

impl ImageStore {
    /// Opens (creating if needed) the store under `root` (the runtime passes `$MICROBOX_ROOT`).
    pub fn open(root: &Path) -> Result<ImageStore> {
        let layout = root.join("images");
        let state = root.join("images-state");
        for d in [
            layout.join("blobs/sha256"),
            state.join("tmp"),
            state.join("locks"),
            state.join("rootfs"),
        ] {
            fs::create_dir_all(&d).map_err(Error::io("create store directory", &d))?;
        }
        let store = ImageStore {
            root: root.to_path_buf(),
            layout,
            state,
        };
        let marker = store.layout.join("oci-layout");
        if !marker.exists() {
            store.write_atomic(&marker, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        }
        let index = store.layout.join("index.json");
        if !index.exists() {
            let _l = store.lock("index", true)?;
            if !index.exists() {
                store.write_index(&Index {
                    schema_version: 2,
                    media_type: Some(docs::OCI_INDEX.into()),
                    manifests: vec![],
                })?;
            }
        }
        Ok(store)
    }

    /// The OCI layout directory (readable by `umoci`/`skopeo` as `oci:<dir>:<reference>`).
    pub fn layout_dir(&self) -> &Path {
        &self.layout
    }

    /// The root directory the store was opened on.
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub(crate) fn blob_path(&self, digest: &str) -> Result<PathBuf> {
        docs::check_digest("blob", "digest", digest)?;
        Ok(self.layout.join("blobs/sha256").join(&digest[7..]))
    }

    /// Whether the blob is stored with the expected size.
    pub(crate) fn has_blob(&self, digest: &str, size: u64) -> bool {
        self.blob_path(digest)
            .ok()
            .and_then(|p| fs::symlink_metadata(p).ok())
            .is_some_and(|m| m.is_file() && m.len() == size)
    }

    pub(crate) fn read_blob(&self, digest: &str) -> Result<Vec<u8>> {
        let p = self.blob_path(digest)?;
        fs::read(&p).map_err(Error::io("read blob", &p))
    }

    pub(crate) fn tmp_dir(&self) -> PathBuf {
        self.state.join("tmp")
    }

    /// Takes a lock named `name` under `images-state/locks` (blocking).
    pub(crate) fn lock(&self, name: &str, exclusive: bool) -> Result<Lock> {
        let p = self.state.join("locks").join(format!("{name}.lock"));
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .map_err(Error::io("open lock", &p))?;
        let op = if exclusive {
            rustix::fs::FlockOperation::LockExclusive
        } else {
            rustix::fs::FlockOperation::LockShared
        };
        rustix::fs::flock(&f, op).map_err(|e| Error::io("lock", &p)(e.into()))?;
        Ok(Lock(f))
    }

    /// Like [`Self::lock`] (exclusive) but gives up at once: `None` when someone holds it.
    fn try_lock_exclusive(&self, name: &str) -> Result<Option<Lock>> {
        let p = self.state.join("locks").join(format!("{name}.lock"));
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .map_err(Error::io("open lock", &p))?;
        match rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(Some(Lock(f))),
            Err(rustix::io::Errno::WOULDBLOCK) => Ok(None),
            Err(e) => Err(Error::io("lock", &p)(e.into())),
        }
    }

    /// Async wrapper of [`Self::lock`]: flock blocks, so it runs on the blocking pool.
    pub(crate) async fn lock_async(&self, name: String, exclusive: bool) -> Result<Lock> {
        let s = self.clone();
        tokio::task::spawn_blocking(move || s.lock(&name, exclusive))
            .await
            .expect("lock task panicked")
    }

    fn write_atomic(&self, dest: &Path, bytes: &[u8]) -> Result<()> {
        let mut tmp = tempfile::NamedTempFile::new_in(self.tmp_dir())
            .map_err(Error::io("create temp file", self.tmp_dir()))?;
        tmp.write_all(bytes)
            .and_then(|_| tmp.as_file().sync_all())
            .map_err(Error::io("write temp file", tmp.path()))?;
        fs::set_permissions(
            tmp.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o644),
        )
        .map_err(Error::io("chmod", tmp.path()))?;
        tmp.persist(dest)
            .map_err(|e| Error::io("rename into place", dest)(e.error))?;
        Ok(())
    }

    /// Stores `bytes` as blob `digest` after checking hash and size.
    pub(crate) fn put_blob(&self, what: &str, digest: &str, size: u64, bytes: &[u8]) -> Result<()> {
        let actual = docs::sha256_digest(bytes);
        if actual != digest {
            return Err(Error::DigestMismatch {
                what: format!("{what} {digest}"),
                expected: digest.into(),
                actual,
            });
        }
        if bytes.len() as u64 != size {
            return Err(Error::SizeMismatch {
                what: what.into(),
                digest: digest.into(),
                expected: size,
                actual: bytes.len() as u64,
            });
        }
        let dest = self.blob_path(digest)?;
        if self.has_blob(digest, size) {
            return Ok(());
        }
        self.write_atomic(&dest, bytes)
    }

    pub(crate) fn read_index(&self) -> Result<Index> {
        let p = self.layout.join("index.json");
        let bytes = fs::read(&p).map_err(Error::io("read", &p))?;
        serde_json::from_slice(&bytes).map_err(|e| Error::InvalidDocument {
            what: "store index".into(),
            digest: p.display().to_string(),
            reason: e.to_string(),
        })
    }

    fn write_index(&self, idx: &Index) -> Result<()> {
        let bytes = serde_json::to_vec(idx).expect("index serializes");
        self.write_atomic(&self.layout.join("index.json"), &bytes)
    }

    /// Points `reference` at `desc` in index.json (replacing an older entry of that name).
    pub(crate) fn tag(&self, reference: &str, mut desc: Descriptor) -> Result<()> {
        let _l = self.lock("index", true)?;
        let mut idx = self.read_index()?;
        idx.manifests.retain(|d| ref_name(d) != Some(reference));
        desc.annotations
            .get_or_insert_with(Default::default)
            .insert(REF_NAME.into(), reference.into());
        idx.manifests.push(desc);
        self.write_index(&idx)
    }

    /// The stored image for `reference`, if any. Accepts any spelling Docker accepts.
    pub fn lookup(&self, reference: &str) -> Result<Option<ImageHandle>> {
        let r = ImageRef::parse(reference)?.to_string();
        let idx = self.read_index()?;
        let Some(desc) = idx.manifests.iter().find(|d| ref_name(d) == Some(&r)) else {
            return Ok(None);
        };
        self.handle_for(&r, desc).map(Some)
    }

    /// Builds the handle of a stored manifest.
    pub(crate) fn handle_for(&self, reference: &str, desc: &Descriptor) -> Result<ImageHandle> {
        let mbytes = self.read_blob(&desc.digest)?;
        let m = docs::parse_manifest(&mbytes, &desc.digest)?;
        let cbytes = self.read_blob(&m.config.digest)?;
        let c = docs::parse_config(&cbytes, &m.config.digest, m.layers.len())?;
        let mut h = build_handle(reference, &desc.digest, &m, &c);
        if let Some(p) = &desc.platform {
            h.platform = p.to_string();
        }
        Ok(h)
    }

    /// Every stored image.
    pub fn list(&self) -> Result<Vec<ImageSummary>> {
        let idx = self.read_index()?;
        let mut out = Vec::new();
        for d in &idx.manifests {
            let Some(name) = ref_name(d) else { continue };
            let h = self.handle_for(name, d)?;
            out.push(ImageSummary {
                reference: h.reference,
                manifest_digest: h.manifest_digest,
                config_digest: h.config_digest,
                platform: h.platform,
                size: h.layers.iter().map(|l| l.size).sum(),
                layers: h.layers.len(),
            });
        }
        out.sort_by(|a, b| a.reference.cmp(&b.reference));
        Ok(out)
    }

    /// Removes the tag `reference`; blobs stay until [`Self::prune`]. Errors if not stored.
    pub fn remove(&self, reference: &str) -> Result<()> {
        let r = ImageRef::parse(reference)?.to_string();
        let _l = self.lock("index", true)?;
        let mut idx = self.read_index()?;
        let before = idx.manifests.len();
        idx.manifests.retain(|d| ref_name(d) != Some(&r));
        if idx.manifests.len() == before {
            return Err(Error::NotFound(r));
        }
        self.write_index(&idx)
    }

    /// Re-hashes every blob; reports blobs whose bytes do not match their name and blobs that a
    /// tagged image needs but that are missing.
    pub fn check(&self) -> Result<CheckReport> {
        let mut report = CheckReport::default();
        let dir = self.layout.join("blobs/sha256");
        let entries = fs::read_dir(&dir).map_err(Error::io("list", &dir))?;
        for e in entries {
            let e = e.map_err(Error::io("list", &dir))?;
            let name = e.file_name().to_string_lossy().into_owned();
            let digest = format!("sha256:{name}");
            if docs::check_digest("blob", "name", &digest).is_err() {
                report.problems.push(BlobProblem {
                    digest: name,
                    problem: "stray file in blobs/sha256 (not a sha256 name)".into(),
                });
                continue;
            }
            let mut f = File::open(e.path()).map_err(Error::io("open blob", e.path()))?;
            let mut h = sha2::Sha256::new();
            let mut buf = vec![0u8; 1 << 20];
            let mut n_total = 0u64;
            loop {
                let n = f.read(&mut buf).map_err(Error::io("read blob", e.path()))?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
                n_total += n as u64;
            }
            report.blobs_checked += 1;
            report.bytes_checked += n_total;
            let actual = format!("sha256:{}", hex::encode(h.finalize()));
            if actual != digest {
                report.problems.push(BlobProblem {
                    digest,
                    problem: format!("content hashes to {actual}"),
                });
            }
        }
        let idx = self.read_index()?;
        for d in &idx.manifests {
            for (digest, size) in self.referenced(d) {
                if !self.has_blob(&digest, size) {
                    report.problems.push(BlobProblem {
                        digest,
                        problem: format!(
                            "missing or wrong size (needed by {})",
                            ref_name(d).unwrap_or("?")
                        ),
                    });
                }
            }
        }
        Ok(report)
    }

    /// (digest, size) of the manifest, config and layers of an index entry, as far as readable.
    fn referenced(&self, d: &Descriptor) -> Vec<(String, u64)> {
        let mut out = vec![(d.digest.clone(), d.size)];
        if let Ok(m) = self
            .read_blob(&d.digest)
            .and_then(|b| docs::parse_manifest(&b, &d.digest))
        {
            out.push((m.config.digest.clone(), m.config.size));
            out.extend(m.layers.iter().map(|l| (l.digest.clone(), l.size)));
        }
        out
    }

    /// Deletes blobs no tagged image references, cached root filesystems of untagged images
    /// that no running box leases ([`Self::lease_rootfs`])
    /// and stale temp files. Waits for running pulls to finish first.
    pub fn prune(&self) -> Result<PruneReport> {
        let _gc = self.lock("gc", true)?;
        let _l = self.lock("index", true)?;
        let idx = self.read_index()?;
        let mut keep = std::collections::HashSet::new();
        let mut keep_rootfs = std::collections::HashSet::new();
        for d in &idx.manifests {
            for (digest, _) in self.referenced(d) {
                keep.insert(digest);
            }
            if let Some(name) = ref_name(d) {
                if let Ok(h) = self.handle_for(name, d) {
                    keep_rootfs.insert(rootfs_key(&h));
                }
            }
        }
        let mut report = PruneReport::default();
        let dir = self.layout.join("blobs/sha256");
        for e in fs::read_dir(&dir)
            .map_err(Error::io("list", &dir))?
            .flatten()
        {
            let digest = format!("sha256:{}", e.file_name().to_string_lossy());
            if !keep.contains(&digest) {
                let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                fs::remove_file(e.path()).map_err(Error::io("remove blob", e.path()))?;
                report.blobs_removed += 1;
                report.bytes_freed += len;
            }
        }
        let rdir = self.state.join("rootfs");
        for e in fs::read_dir(&rdir)
            .map_err(Error::io("list", &rdir))?
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            if !keep_rootfs.contains(&name) {
                // A running box may still use the rootfs of an image that was untagged.
                let Some(_unused) = self.try_lock_exclusive(&rootfs_use_lock(&name))? else {
                    continue;
                };
                remove_tree(&e.path())?;
                report.rootfs_removed += 1;
            }
        }
        // Temp files: no pull runs (we hold gc exclusively), so all are leftovers of crashes.
        let tdir = self.tmp_dir();
        for e in fs::read_dir(&tdir)
            .map_err(Error::io("list", &tdir))?
            .flatten()
        {
            let p = e.path();
            if p.is_dir() {
                remove_tree(&p)?;
            } else {
                let _ = fs::remove_file(&p);
            }
        }
        Ok(report)
    }

    /// The image's root filesystem, materialised once (layers applied in order) and shared
    /// read-only by every box of the image. Boxes must never write into it.
    pub fn rootfs(&self, image: &ImageHandle) -> Result<PathBuf> {
        self.rootfs_when_ready(image, &mut |_| Ok(()))
    }

    /// [`Self::rootfs`] for a box that is about to use it: the lease keeps `prune` away from it
    /// until dropped. Taken before the rootfs is looked up, so a prune either finished before
    /// (and the rootfs is rebuilt here) or sees the lease.
    pub fn lease_rootfs(&self, image: &ImageHandle) -> Result<(PathBuf, RootfsLease)> {
        let lock = self.lock(&rootfs_use_lock(&rootfs_key(image)), false)?;
        let path = self.rootfs(image)?;
        Ok((path, RootfsLease { _lock: lock }))
    }

    /// [`Self::rootfs`], waiting with `ready(i)` before layer `i` is applied (a pull in
    /// progress signals each stored layer).
    pub(crate) fn rootfs_when_ready(
        &self,
        image: &ImageHandle,
        ready: &mut dyn FnMut(usize) -> Result<()>,
    ) -> Result<PathBuf> {
        let key = rootfs_key(image);
        let dest = self.rootfs_dir(&key);
        if dest.is_dir() {
            return Ok(dest);
        }
        let _l = self.lock(&format!("rootfs-{key}"), true)?;
        if dest.is_dir() {
            return Ok(dest);
        }
        let tmp = tempfile::Builder::new()
            .prefix(&format!("rootfs-{key}-"))
            .tempdir_in(self.tmp_dir())
            .map_err(Error::io("create temp dir", self.tmp_dir()))?;
        let work = tmp.path().join("rootfs");
        let fresh = || -> Result<()> {
            fs::create_dir(&work).map_err(Error::io("create", &work))?;
            fs::set_permissions(&work, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                .map_err(Error::io("chmod", &work))
        };
        fresh()?;
        let mut skip = 0;
        if let Some((base, k, _lease)) = self.cached_prefix(image)? {
            match crate::extract::link_tree(&base, &work) {
                Ok(()) => skip = k,
                Err(e) => {
                    // e.g. EMLINK on a much-linked inode: build from scratch instead.
                    tracing::warn!(error = %e, "reusing the base image's rootfs failed");
                    remove_tree(&work)?;
                    fresh()?;
                }
            }
        }
        self.apply_from(image, skip, &work, ready)?;
        fs::rename(&work, &dest).map_err(Error::io("rename rootfs into place", &dest))?;
        Ok(dest)
    }

    /// Where the rootfs with cache key `key` lives once built.
    fn rootfs_dir(&self, key: &str) -> PathBuf {
        self.state.join("rootfs").join(key)
    }

    /// The longest proper prefix of `image`'s layer chain whose rootfs is already built (the
    /// rootfs of an image it is built FROM), with a lease that keeps `prune` away while it is
    /// linked from. Only for root: the linked tree keeps its final, possibly read-only,
    /// directory modes, which only root can write through.
    fn cached_prefix(&self, image: &ImageHandle) -> Result<Option<(PathBuf, usize, Lock)>> {
        if !rustix::process::geteuid().is_root() {
            return Ok(None);
        }
        for k in (1..image.layers.len()).rev() {
            let key = chain_key(&image.layers[..k]);
            let dir = self.rootfs_dir(&key);
            if dir.is_dir() {
                let lease = self.lock(&rootfs_use_lock(&key), false)?;
                if dir.is_dir() {
                    return Ok(Some((dir, k, lease)));
                }
            }
        }
        Ok(None)
    }

    /// Materialises the image's root filesystem into `dest` (created if missing; must be
    /// empty), like `umoci unpack`'s rootfs.
    pub fn unpack(&self, image: &ImageHandle, dest: &Path) -> Result<()> {
        fs::create_dir_all(dest).map_err(Error::io("create", dest))?;
        if fs::read_dir(dest)
            .map_err(Error::io("list", dest))?
            .next()
            .is_some()
        {
            return Err(Error::io("unpack into", dest)(std::io::Error::other(
                "destination directory is not empty",
            )));
        }
        self.apply_from(image, 0, dest, &mut |_| Ok(()))
    }

    /// Applies the image's layers from index `skip` on (the ones before are in `dest` already).
    fn apply_from(
        &self,
        image: &ImageHandle,
        skip: usize,
        dest: &Path,
        ready: &mut dyn FnMut(usize) -> Result<()>,
    ) -> Result<()> {
        let mut layers = Vec::new();
        for l in &image.layers[skip..] {
            layers.push((self.blob_path(&l.digest)?, l.digest.clone()));
        }
        crate::extract::apply_layers_when_ready(dest, &layers, &mut |i| {
            let i = i + skip;
            ready(i)?;
            let l = &image.layers[i];
            if !self.has_blob(&l.digest, l.size) {
                return Err(Error::NotFound(format!(
                    "layer {} of {} (pull the image again)",
                    l.digest, image.reference
                )));
            }
            Ok(())
        })
    }
}

/// The lock a box holds (shared) while it uses the rootfs `key`, and `prune` takes
/// exclusively before removing it.
fn rootfs_use_lock(key: &str) -> String {
    format!("rootfs-use-{key}")
}

/// Rootfs cache key: hash of the diff_id chain (same layers, same tree).
fn rootfs_key(h: &ImageHandle) -> String {
    chain_key(&h.layers)
}

fn chain_key(layers: &[crate::LayerInfo]) -> String {
    let mut s = sha2::Sha256::new();
    for l in layers {
        s.update(l.diff_id.as_bytes());
        s.update(b"\n");
    }
    hex::encode(&s.finalize()[..16])
}

fn remove_tree(p: &Path) -> Result<()> {
    // Our own trees may hold 0500 directories; go through the no-follow remover.
    let parent = p.parent().unwrap_or(Path::new("/"));
    let name = p.file_name().unwrap_or_default();
    let dfd = rustix::fs::open(
        parent,
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(|e| Error::io("open", parent)(e.into()))?;
    crate::extract::remove_all_at(
        std::os::fd::AsFd::as_fd(&dfd),
        name,
        rustix::process::geteuid().is_root(),
    )
    .map_err(|e| Error::io("remove", p)(e.into()))
}

pub(crate) fn ref_name(d: &Descriptor) -> Option<&str> {
    d.annotations
        .as_ref()
        .and_then(|a| a.get(REF_NAME))
        .map(String::as_str)
}

pub(crate) fn build_handle(
    reference: &str,
    manifest_digest: &str,
    m: &docs::Manifest,
    c: &docs::ImageConfig,
) -> ImageHandle {
    let rc = c.config.clone().unwrap_or_default();
    let mut platform = format!("{}/{}", c.os, c.architecture);
    if let Some(v) = &c.variant {
        platform.push('/');
        platform.push_str(v);
    }
    ImageHandle {
        reference: reference.to_string(),
        manifest_digest: manifest_digest.to_string(),
        config_digest: m.config.digest.clone(),
        platform,
        config: ImageRunConfig {
            env: rc.env.unwrap_or_default(),
            entrypoint: rc.entrypoint.unwrap_or_default(),
            cmd: rc.cmd.unwrap_or_default(),
            working_dir: rc
                .working_dir
                .filter(|w| !w.is_empty())
                .unwrap_or_else(|| "/".into()),
            user: rc.user.unwrap_or_default(),
            exposed_ports: rc
                .exposed_ports
                .map(|p| p.into_keys().collect())
                .unwrap_or_default(),
        },
        layers: m
            .layers
            .iter()
            .zip(&c.rootfs.diff_ids)
            .map(|(l, d)| LayerInfo {
                digest: l.digest.clone(),
                size: l.size,
                media_type: l.media_type.clone(),
                diff_id: d.clone(),
            })
            .collect(),
    }
}
