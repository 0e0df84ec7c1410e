//! The crate's error type: every variant names the input, field, digest or entry at fault.

use std::path::PathBuf;

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Errors of image references, pulls, the store and extraction.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An image reference could not be parsed.
    #[error("invalid image reference {input:?}: {reason}")]
    InvalidReference {
        /// What the user gave.
        input: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A platform string (`os/arch[/variant]`) could not be parsed.
    #[error("invalid platform {input:?}: expected os/arch[/variant], e.g. linux/amd64")]
    InvalidPlatform {
        /// What the user gave.
        input: String,
    },

    /// Downloaded or stored bytes do not hash to the digest they were announced with.
    #[error("digest mismatch for {what}: expected {expected}, got {actual}")]
    DigestMismatch {
        /// Which blob (e.g. `layer sha256:...`, `manifest of REF`).
        what: String,
        /// Digest from the descriptor / reference.
        expected: String,
        /// Digest of the bytes received.
        actual: String,
    },

    /// Downloaded bytes do not have the size the descriptor announced.
    #[error("size mismatch for {what} {digest}: descriptor says {expected} bytes, got {actual}")]
    SizeMismatch {
        /// Which blob kind.
        what: String,
        /// Its digest.
        digest: String,
        /// Size from the descriptor.
        expected: u64,
        /// Bytes received.
        actual: u64,
    },

    /// A manifest, index or config is not what the OCI/Docker specs require.
    #[error("invalid {what} {digest}: {reason}")]
    InvalidDocument {
        /// `manifest`, `image index`, `image config`, ...
        what: String,
        /// Digest (or reference) of the document.
        digest: String,
        /// Which field is wrong and how.
        reason: String,
    },

    /// The index has no manifest for the wanted platform.
    #[error("{reference}: no image for platform {platform} (available: {available})")]
    NoMatchingPlatform {
        /// The image reference.
        reference: String,
        /// The wanted platform.
        platform: String,
        /// Platforms the index offers.
        available: String,
    },

    /// Talking to the registry failed.
    #[error("registry error for {reference}: {message}")]
    Registry {
        /// The image reference being pulled.
        reference: String,
        /// What went wrong.
        message: String,
        /// Whether retrying may help (connection reset, 5xx, timeout).
        transient: bool,
    },

    /// A registry would need plain HTTP but is not allowed to use it.
    #[error("registry {registry} is not allowed over plain HTTP (allowed: localhost, 127.0.0.0/8, ::1, MICROBOX_INSECURE_REGISTRIES)")]
    InsecureNotAllowed {
        /// The registry host.
        registry: String,
    },

    /// A layer entry cannot be extracted safely or correctly.
    #[error("layer {layer}: entry {entry:?}: {reason}")]
    Layer {
        /// Digest of the layer.
        layer: String,
        /// Path of the entry as written in the tar.
        entry: String,
        /// What is wrong.
        reason: String,
    },

    /// The reference is not in the store.
    #[error("image {0} not found in the store")]
    NotFound(String),

    /// A credentials file could not be read or written.
    #[error("credentials file {path}: {reason}")]
    Auth {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },

    /// A file-system operation on the store failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What we were doing.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// Wraps an I/O error with the operation and path.
    pub(crate) fn io(
        op: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { op, path, source }
    }

    /// Whether this is a digest or size verification failure.
    pub fn is_verification(&self) -> bool {
        matches!(
            self,
            Error::DigestMismatch { .. } | Error::SizeMismatch { .. }
        )
    }
}
