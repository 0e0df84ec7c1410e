//! Pull progress reporting: the puller emits [`PullEvent`]s, the CLI turns them into bars or
//! quiet lines.

/// Something that happened during a pull.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullEvent {
    /// The manifest is known.
    Resolved {
        /// Normalized reference.
        reference: String,
        /// Platform manifest digest.
        manifest_digest: String,
        /// Number of layers.
        layers: usize,
        /// Sum of layer sizes.
        total_bytes: u64,
    },
    /// A layer download begins (or is found already stored: `cached`).
    LayerStart {
        /// Layer digest.
        digest: String,
        /// Blob size.
        size: u64,
    },
    /// Bytes of a layer arrived.
    LayerAdvance {
        /// Layer digest.
        digest: String,
        /// Bytes in this chunk.
        bytes: u64,
    },
    /// A transient failure; the download will be retried (resumed when the registry allows).
    LayerRetry {
        /// Layer digest.
        digest: String,
        /// Retry number, from 1.
        attempt: u32,
        /// What failed.
        error: String,
    },
    /// A layer is verified and stored.
    LayerDone {
        /// Layer digest.
        digest: String,
        /// Whether it was already in the store (nothing downloaded).
        cached: bool,
    },
    /// The image is stored and tagged.
    Done {
        /// Normalized reference.
        reference: String,
    },
}

/// Receives pull events. Called from several tasks at once; must be cheap and never block.
pub trait PullProgress: Send + Sync {
    /// One event.
    fn on_event(&self, event: &PullEvent);
}

/// Ignores all events.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl PullProgress for NoProgress {
    fn on_event(&self, _: &PullEvent) {}
}

impl<F: Fn(&PullEvent) + Send + Sync> PullProgress for F {
    fn on_event(&self, event: &PullEvent) {
        self(event)
    }
}
