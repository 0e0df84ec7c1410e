//! Where a box's root filesystem comes from: an OCI image from the image store (pulled if
//! missing, unpacked once and shared read-only by all boxes of the image), or, for development
//! and tests, an existing host directory given as an absolute path.

use std::path::{Path, PathBuf};

use crate::error::{Result, RuntimeError};
use crate::paths::Paths;

/// What the runtime needs from an image.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageInfo {
    pub reference: String,
    pub env: Vec<String>,
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    source: Source,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
enum Source {
    #[default]
    None,
    Dir(PathBuf),
    Store(Box<microbox_image::ImageHandle>),
}

fn image_err(reference: &str, message: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Image {
        reference: reference.to_string(),
        message: message.to_string(),
    }
}

/// Resolves (and pulls if needed) `reference`.
pub async fn ensure(reference: &str, paths: &Paths) -> Result<ImageInfo> {
    if reference.starts_with('/') {
        let dir = PathBuf::from(reference);
        if !dir.is_dir() {
            return Err(image_err(
                reference,
                "a local root filesystem must be an existing directory",
            ));
        }
        return Ok(ImageInfo {
            reference: reference.to_string(),
            source: Source::Dir(dir),
            ..Default::default()
        });
    }
    let store =
        microbox_image::ImageStore::open(paths.root()).map_err(|e| image_err(reference, e))?;
    let h = store
        .ensure(
            reference,
            &microbox_image::PullOptions::default(),
            &microbox_image::NoProgress,
        )
        .await
        .map_err(|e| image_err(reference, e))?;
    let c = &h.config;
    let non_empty = |v: &Vec<String>| (!v.is_empty()).then(|| v.clone());
    let non_blank = |s: &String| (!s.is_empty()).then(|| s.clone());
    Ok(ImageInfo {
        reference: h.reference.clone(),
        env: c.env.clone(),
        entrypoint: non_empty(&c.entrypoint),
        cmd: non_empty(&c.cmd),
        working_dir: non_blank(&c.working_dir),
        user: non_blank(&c.user),
        source: Source::Store(Box::new(h.clone())),
    })
}

/// The shared read-only root directory of the image (unpacked on first use), with the lease
/// that keeps `prune` from deleting it while the box runs (None for a plain directory).
pub async fn rootfs(
    info: &ImageInfo,
    paths: &Paths,
) -> Result<(PathBuf, Option<microbox_image::RootfsLease>)> {
    match &info.source {
        Source::Dir(d) => Ok((d.clone(), None)),
        Source::None => Err(image_err(&info.reference, "image was not resolved")),
        Source::Store(h) => {
            let root: PathBuf = paths.root().to_path_buf();
            let h = h.clone();
            let reference = info.reference.clone();
            tokio::task::spawn_blocking(move || {
                let store = microbox_image::ImageStore::open(Path::new(&root))?;
                store.lease_rootfs(&h)
            })
            .await
            .map_err(|e| image_err(&reference, e))?
            .map(|(p, lease)| (p, Some(lease)))
            .map_err(|e| image_err(&reference, e))
        }
    }
}
