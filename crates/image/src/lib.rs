//! microbox-image: OCI image references, registry pulls, the content-addressed image store
//! (a valid OCI image layout under `<root>/images`), kernel-confined layer extraction and the
//! shared read-only rootfs cache.
//!
//! Entry point: [`ImageStore`]. The runtime opens it on `$MICROBOX_ROOT`, calls
//! [`ImageStore::ensure`] and then [`ImageStore::rootfs`] to get the directory a box's overlay
//! sits on.

pub mod auth;
mod docs;
mod error;
pub mod extract;
mod import;
mod progress;
mod pull;
pub mod reference;
mod store;

pub use auth::Credentials;
pub use error::{Error, Result};
pub use progress::{NoProgress, PullEvent, PullProgress};
pub use reference::ImageRef;
pub use store::{BlobProblem, CheckReport, ImageStore, PruneReport, RootfsLease};

use serde::{Deserialize, Serialize};

/// Options of one pull.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// `os/arch[/variant]`; `None` means the host platform.
    pub platform: Option<String>,
    /// Explicit credentials; `None` looks them up (`<root>/auth.json`, then Docker's config).
    pub credentials: Option<Credentials>,
    /// Layers downloaded at once.
    pub max_concurrent_downloads: usize,
    /// Retries per blob on transient failures (connection errors, 5xx, 429, timeouts).
    pub retries: u32,
    /// Also materialise the rootfs cache ([`ImageStore::rootfs`]) during the pull, applying
    /// each layer as soon as it (and all below it) are verified and stored. The pull then
    /// fails if the rootfs cannot be built.
    pub prepare_rootfs: bool,
}

impl Default for PullOptions {
    fn default() -> Self {
        PullOptions {
            platform: None,
            credentials: None,
            max_concurrent_downloads: 4,
            retries: 4,
            prepare_rootfs: false,
        }
    }
}

/// A stored image: everything the runtime needs to start a box from it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageHandle {
    /// Normalized reference, e.g. `docker.io/library/alpine:latest`.
    pub reference: String,
    /// Digest of the platform-specific image manifest.
    pub manifest_digest: String,
    /// Digest of the image config.
    pub config_digest: String,
    /// `os/arch[/variant]`.
    pub platform: String,
    /// The process defaults from the image config.
    pub config: ImageRunConfig,
    /// Layers, lowest first.
    pub layers: Vec<LayerInfo>,
}

/// Process defaults of an image (from its config's `config` object).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRunConfig {
    /// `KEY=value` pairs.
    pub env: Vec<String>,
    /// Entrypoint argv prefix.
    pub entrypoint: Vec<String>,
    /// Default arguments.
    pub cmd: Vec<String>,
    /// Working directory (`/` when the image says nothing).
    pub working_dir: String,
    /// `user[:group]` (empty means root).
    pub user: String,
    /// e.g. `80/tcp`.
    pub exposed_ports: Vec<String>,
}

/// One layer of an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerInfo {
    /// Digest of the (compressed) blob.
    pub digest: String,
    /// Size of the blob in bytes.
    pub size: u64,
    /// Media type from the manifest.
    pub media_type: String,
    /// Digest of the uncompressed tar (from the config's `rootfs.diff_ids`).
    pub diff_id: String,
}

/// One line of `microbox images`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageSummary {
    /// Normalized reference.
    pub reference: String,
    /// Manifest digest.
    pub manifest_digest: String,
    /// Config digest (Docker's "IMAGE ID").
    pub config_digest: String,
    /// `os/arch[/variant]`.
    pub platform: String,
    /// Sum of the compressed layer sizes.
    pub size: u64,
    /// Number of layers.
    pub layers: usize,
}
