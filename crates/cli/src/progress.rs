//! What the user sees while things take time: pull progress (indicatif bars on a terminal,
//! quiet lines otherwise) and a raw-mode terminal for `-t` sessions.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use microbox_image::{PullEvent, PullProgress};

/// Pull progress for a person: one bar per layer on a terminal, one line per layer otherwise.
pub struct PullBars {
    multi: MultiProgress,
    bars: Mutex<HashMap<String, ProgressBar>>,
    tty: bool,
    /// Totals for the pull log (metrics).
    pub bytes: AtomicU64,
    pub cached: AtomicU32,
    pub downloaded: AtomicU32,
}

impl PullBars {
    pub fn new() -> PullBars {
        let tty = std::io::stderr().is_terminal();
        let target = if tty {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        PullBars {
            multi: MultiProgress::with_draw_target(target),
            bars: Mutex::new(HashMap::new()),
            tty,
            bytes: AtomicU64::new(0),
            cached: AtomicU32::new(0),
            downloaded: AtomicU32::new(0),
        }
    }
}

fn short(digest: &str) -> &str {
    let hex = digest.split_once(':').map(|(_, h)| h).unwrap_or(digest);
    &hex[..hex.len().min(12)]
}

impl PullProgress for PullBars {
    fn on_event(&self, event: &PullEvent) {
        let mut bars = self.bars.lock().unwrap_or_else(|e| e.into_inner());
        match event {
            PullEvent::Resolved {
                reference,
                manifest_digest,
                layers,
                total_bytes,
            } => {
                if !self.tty {
                    eprintln!(
                        "pulling {reference} ({manifest_digest}): {layers} layers, {}",
                        indicatif::HumanBytes(*total_bytes)
                    );
                }
            }
            PullEvent::LayerStart { digest, size } => {
                if self.tty {
                    let bar = self.multi.add(ProgressBar::new(*size));
                    bar.set_style(
                        ProgressStyle::with_template(
                            "{prefix:.bold} [{bar:30}] {bytes}/{total_bytes} {msg}",
                        )
                        .unwrap_or_else(|_| ProgressStyle::default_bar())
                        .progress_chars("=> "),
                    );
                    bar.set_prefix(short(digest).to_string());
                    bars.insert(digest.clone(), bar);
                }
            }
            PullEvent::LayerAdvance { digest, bytes } => {
                self.bytes.fetch_add(*bytes, Ordering::Relaxed);
                if let Some(b) = bars.get(digest) {
                    b.inc(*bytes);
                }
            }
            PullEvent::LayerRetry {
                digest,
                attempt,
                error,
            } => {
                if let Some(b) = bars.get(digest) {
                    b.set_message(format!("retry {attempt}: {error}"));
                } else {
                    eprintln!("layer {}: retry {attempt}: {error}", short(digest));
                }
            }
            PullEvent::LayerDone { digest, cached } => {
                if *cached {
                    &self.cached
                } else {
                    &self.downloaded
                }
                .fetch_add(1, Ordering::Relaxed);
                let what = if *cached { "already stored" } else { "done" };
                if let Some(b) = bars.get(digest) {
                    b.finish_with_message(what);
                } else {
                    eprintln!("layer {}: {what}", short(digest));
                }
            }
            PullEvent::Done { reference } => {
                if !self.tty {
                    eprintln!("pulled {reference}");
                }
            }
        }
    }
}

/// Runs `f` with our terminal in raw mode (keys go to the box unprocessed), restoring the
/// previous mode afterwards whatever happens.
pub async fn with_raw_terminal<F, Fut, T>(f: F) -> T
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    struct Restore(Option<libc::termios>);
    impl Drop for Restore {
        fn drop(&mut self) {
            if let Some(t) = self.0 {
                // SAFETY: tcsetattr on fd 0 with a termios previously read from it.
                unsafe { libc::tcsetattr(0, libc::TCSANOW, &t) };
            }
        }
    }
    // SAFETY: tcgetattr/cfmakeraw/tcsetattr on stdin with a zeroed, then filled, termios.
    let _restore = unsafe {
        let mut orig: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(0, &mut orig) == 0 {
            let mut raw = orig;
            libc::cfmakeraw(&mut raw);
            libc::tcsetattr(0, libc::TCSANOW, &raw);
            Restore(Some(orig))
        } else {
            Restore(None)
        }
    };
    f().await
}

/// The terminal's size (rows, cols), if stdin is one.
pub fn terminal_size() -> Option<(u16, u16)> {
    // SAFETY: TIOCGWINSZ fills a winsize struct we own.
    unsafe {
        let mut ws: libc::winsize = std::mem::zeroed();
        (libc::ioctl(0, libc::TIOCGWINSZ, &mut ws) == 0 && ws.ws_row > 0)
            .then_some((ws.ws_row, ws.ws_col))
    }
}
