//! `microbox image import`: an OCI image layout (directory or tar) or a `docker save` archive
//! into the store. Archives are unpacked with the confined extractor (they are as hostile as
//! any layer), and every blob is re-verified (digest, size, diff_id) on its way in.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::Digest as _;

use crate::docs::{self, Descriptor, Platform};
use crate::error::{Error, Result};
use crate::reference::ImageRef;
use crate::store::{build_handle, ImageStore};
use crate::ImageHandle;

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerSaveEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

fn bad(path: &Path, reason: impl Into<String>) -> Error {
    Error::InvalidDocument {
        what: "import archive".into(),
        digest: path.display().to_string(),
        reason: reason.into(),
    }
}

/// sha256 and size of a file, streamed.
fn hash_file(p: &Path) -> Result<(String, u64)> {
    let mut f = File::open(p).map_err(Error::io("open", p))?;
    let mut h = sha2::Sha256::new();
    let n = std::io::copy(&mut f, &mut h).map_err(Error::io("read", p))?;
    Ok((format!("sha256:{}", hex::encode(h.finalize())), n))
}

/// Digest of the decompressed content (a layer's diff_id).
fn diff_id_of(p: &Path) -> Result<String> {
    let f = File::open(p).map_err(Error::io("open", p))?;
    let mut r = crate::extract::decompress(f).map_err(Error::io("decompress", p))?;
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut r, &mut h).map_err(Error::io("decompress", p))?;
    Ok(format!("sha256:{}", hex::encode(h.finalize())))
}

/// Resolves `rel` (a path written inside an archive) under `base` without leaving it: the
/// archive was extracted confined, but its JSON may still name `../../etc/shadow`.
fn inside(base: &Path, rel: &str) -> Result<PathBuf> {
    let mut out = base.to_path_buf();
    for c in rel.split('/') {
        match c {
            "" | "." => {}
            ".." => return Err(bad(base, format!("path {rel:?} leaves the archive"))),
            c => out.push(c),
        }
    }
    let meta = fs::symlink_metadata(&out).map_err(Error::io("stat archive member", &out))?;
    if !meta.is_file() {
        return Err(bad(
            base,
            format!("{rel:?} is not a regular file in the archive"),
        ));
    }
    Ok(out)
}

impl ImageStore {
    /// Imports an OCI layout (directory or tar) or a `docker save` archive. `reference` names
    /// the image; it may be omitted for `docker save` archives that carry `RepoTags`.
    pub fn import(&self, path: &Path, reference: Option<&str>) -> Result<ImageHandle> {
        let _gc = self.lock("gc", false)?;
        let meta = fs::metadata(path).map_err(Error::io("stat", path))?;
        let _tmp;
        let dir = if meta.is_dir() {
            path.to_path_buf()
        } else {
            let t = tempfile::Builder::new()
                .prefix("import-")
                .tempdir_in(self.tmp_dir())
                .map_err(Error::io("create temp dir", self.tmp_dir()))?;
            let f = File::open(path).map_err(Error::io("open", path))?;
            crate::extract::Extractor::open(t.path())?
                .apply_layer(f, &path.display().to_string())?;
            let d = t.path().to_path_buf();
            _tmp = t;
            d
        };
        if dir.join("index.json").is_file() {
            self.import_oci(&dir, reference)
        } else if dir.join("manifest.json").is_file() {
            self.import_docker(&dir, reference)
        } else {
            Err(bad(
                path,
                "neither an OCI layout (index.json) nor a docker save archive (manifest.json)",
            ))
        }
    }

    fn copy_blob_in(&self, src: &Path, digest: &str, size: u64, what: &str) -> Result<()> {
        docs::check_digest(what, "digest", digest)?;
        if self.has_blob(digest, size) {
            return Ok(());
        }
        let _l = self.lock(&format!("blob-{}", &digest[7..]), true)?;
        let tmp = tempfile::NamedTempFile::new_in(self.tmp_dir())
            .map_err(Error::io("create temp file", self.tmp_dir()))?;
        fs::copy(src, tmp.path()).map_err(Error::io("copy", src))?;
        let (actual, n) = hash_file(tmp.path())?;
        if actual != digest {
            return Err(Error::DigestMismatch {
                what: format!("{what} {digest} ({})", src.display()),
                expected: digest.into(),
                actual,
            });
        }
        if n != size {
            return Err(Error::SizeMismatch {
                what: what.into(),
                digest: digest.into(),
                expected: size,
                actual: n,
            });
        }
        fs::set_permissions(
            tmp.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o644),
        )
        .map_err(Error::io("chmod", tmp.path()))?;
        let dest = self.blob_path(digest)?;
        tmp.persist(&dest)
            .map_err(|e| Error::io("rename blob into place", &dest)(e.error))?;
        Ok(())
    }

    fn import_oci(&self, dir: &Path, reference: Option<&str>) -> Result<ImageHandle> {
        let reference = reference.ok_or_else(|| {
            bad(
                dir,
                "an OCI layout needs a reference to import as (e.g. myimage:latest)",
            )
        })?;
        let name = ImageRef::parse(reference)?.to_string();
        let blob = |d: &str| -> Result<PathBuf> {
            docs::check_digest("import", "digest", d)?;
            inside(dir, &format!("blobs/sha256/{}", &d[7..]))
        };
        let idx_bytes =
            fs::read(dir.join("index.json")).map_err(Error::io("read", dir.join("index.json")))?;
        let mut desc = pick(&docs::parse_index(&idx_bytes, "index.json")?, dir)?;
        // Nested index (e.g. docker's OCI export): resolve to the host platform.
        let mut mbytes = fs::read(blob(&desc.digest)?).map_err(Error::io("read manifest", dir))?;
        if docs::is_index(&mbytes) {
            desc = pick(&docs::parse_index(&mbytes, &desc.digest)?, dir)?;
            mbytes = fs::read(blob(&desc.digest)?).map_err(Error::io("read manifest", dir))?;
        }
        let m = docs::parse_manifest(&mbytes, &desc.digest)?;
        let cpath = blob(&m.config.digest)?;
        self.copy_blob_in(&cpath, &m.config.digest, m.config.size, "image config")?;
        let c = docs::parse_config(
            &self.read_blob(&m.config.digest)?,
            &m.config.digest,
            m.layers.len(),
        )?;
        for (l, diff_id) in m.layers.iter().zip(&c.rootfs.diff_ids) {
            self.copy_blob_in(&blob(&l.digest)?, &l.digest, l.size, "layer")?;
            let actual = diff_id_of(&self.blob_path(&l.digest)?)?;
            if &actual != diff_id {
                return Err(Error::DigestMismatch {
                    what: format!("uncompressed layer {} (config rootfs.diff_ids)", l.digest),
                    expected: diff_id.clone(),
                    actual,
                });
            }
        }
        self.put_blob("manifest", &desc.digest, mbytes.len() as u64, &mbytes)?;
        let handle = build_handle(&name, &desc.digest, &m, &c);
        self.tag(
            &name,
            Descriptor {
                media_type: m
                    .media_type
                    .clone()
                    .unwrap_or_else(|| docs::OCI_MANIFEST.into()),
                digest: desc.digest.clone(),
                size: mbytes.len() as u64,
                platform: Some(Platform {
                    os: c.os.clone(),
                    architecture: c.architecture.clone(),
                    variant: c.variant.clone(),
                }),
                annotations: None,
            },
        )?;
        Ok(handle)
    }

    fn import_docker(&self, dir: &Path, reference: Option<&str>) -> Result<ImageHandle> {
        let mpath = dir.join("manifest.json");
        let entries: Vec<DockerSaveEntry> =
            serde_json::from_slice(&fs::read(&mpath).map_err(Error::io("read", &mpath))?)
                .map_err(|e| bad(&mpath, format!("manifest.json: {e}")))?;
        let [entry] = entries.as_slice() else {
            return Err(bad(
                &mpath,
                format!(
                    "manifest.json lists {} images; import one at a time",
                    entries.len()
                ),
            ));
        };
        let name = match reference {
            Some(r) => r.to_string(),
            None => entry
                .repo_tags
                .as_ref()
                .and_then(|t| t.first().cloned())
                .ok_or_else(|| bad(&mpath, "no RepoTags: give a reference to import as"))?,
        };
        let name = ImageRef::parse(&name)?.to_string();
        let cpath = inside(dir, &entry.config)?;
        let (cdigest, csize) = hash_file(&cpath)?;
        self.copy_blob_in(&cpath, &cdigest, csize, "image config")?;
        let c = docs::parse_config(&self.read_blob(&cdigest)?, &cdigest, entry.layers.len())?;
        let mut layers = Vec::new();
        for (i, (l, diff_id)) in entry.layers.iter().zip(&c.rootfs.diff_ids).enumerate() {
            let lpath = inside(dir, l)?;
            let (digest, size) = hash_file(&lpath)?;
            self.copy_blob_in(&lpath, &digest, size, "layer")?;
            let actual = diff_id_of(&self.blob_path(&digest)?)?;
            if &actual != diff_id {
                return Err(Error::DigestMismatch {
                    what: format!("layer {i} ({l}) vs config rootfs.diff_ids[{i}]"),
                    expected: diff_id.clone(),
                    actual,
                });
            }
            let compressed = actual != digest;
            layers.push(Descriptor {
                media_type: if compressed {
                    "application/vnd.oci.image.layer.v1.tar+gzip".into()
                } else {
                    "application/vnd.oci.image.layer.v1.tar".into()
                },
                digest,
                size,
                platform: None,
                annotations: None,
            });
        }
        let m = docs::Manifest {
            schema_version: 2,
            media_type: Some(docs::OCI_MANIFEST.into()),
            config: Descriptor {
                media_type: "application/vnd.oci.image.config.v1+json".into(),
                digest: cdigest,
                size: csize,
                platform: None,
                annotations: None,
            },
            layers,
        };
        let mbytes = serde_json::to_vec(&m).expect("manifest serializes");
        let mdigest = docs::sha256_digest(&mbytes);
        self.put_blob("manifest", &mdigest, mbytes.len() as u64, &mbytes)?;
        let handle = build_handle(&name, &mdigest, &m, &c);
        self.tag(
            &name,
            Descriptor {
                media_type: docs::OCI_MANIFEST.into(),
                digest: mdigest,
                size: mbytes.len() as u64,
                platform: Some(Platform {
                    os: c.os.clone(),
                    architecture: c.architecture.clone(),
                    variant: c.variant.clone(),
                }),
                annotations: None,
            },
        )?;
        Ok(handle)
    }
}

/// The manifest of an index to import: the only one, else the host platform's.
fn pick(idx: &docs::Index, dir: &Path) -> Result<Descriptor> {
    if let [only] = idx.manifests.as_slice() {
        return Ok(only.clone());
    }
    let host = Platform::host();
    idx.manifests
        .iter()
        .find(|d| d.platform.as_ref().is_some_and(|p| host.matches(p)))
        .cloned()
        .ok_or_else(|| {
            bad(
                dir,
                format!(
                    "index.json has {} manifests and none for {host}",
                    idx.manifests.len()
                ),
            )
        })
}
