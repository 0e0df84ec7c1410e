//! The durable event log: `$MICROBOX_ROOT/events.jsonl`, one [`EventRecord`] per line, appended
//! by every box's supervisor. It feeds `microbox events` and the counters of `microbox metrics`,
//! which is how those survive CLI restarts without a daemon. Pulls are logged beside it in
//! `pulls.jsonl` ([`PullRecord`]).

use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use microbox_core::{Delivered, EventRecord, Subscription};
use serde::{Deserialize, Serialize};

pub fn events_path(root: &Path) -> PathBuf {
    root.join("events.jsonl")
}

pub fn pulls_path(root: &Path) -> PathBuf {
    root.join("pulls.jsonl")
}

/// Appends one JSON line with a single `write` (O_APPEND keeps lines of concurrent writers whole).
pub fn append_json<T: Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(value)?;
    line.push(b'\n');
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?
        .write_all(&line)
}

/// Copies every event of `sub` into the log until the emitter is gone. Lag is logged, not fatal.
pub async fn persist(mut sub: Subscription, path: PathBuf) {
    while let Some(d) = sub.recv().await {
        match d {
            Delivered::Event(rec) => {
                if let Err(e) = append_json(&path, &rec) {
                    tracing::warn!("writing {}: {e}", path.display());
                }
            }
            Delivered::Lagged(n) => tracing::warn!("event log fell behind: {n} events lost"),
        }
    }
}

/// Reads complete lines from `offset`; returns the parsed records and the next offset.
/// Unparseable lines (a torn write after a crash) are skipped.
pub fn read_jsonl<T: for<'de> Deserialize<'de>>(
    path: &Path,
    offset: u64,
) -> std::io::Result<(Vec<T>, u64)> {
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), offset)),
        Err(e) => return Err(e),
    };
    f.seek(SeekFrom::Start(offset))?;
    let mut r = BufReader::new(f);
    let mut out = Vec::new();
    let mut pos = offset;
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = r.read_until(b'\n', &mut buf)?;
        if n == 0 || buf.last() != Some(&b'\n') {
            break;
        }
        pos += n as u64;
        if let Ok(v) = serde_json::from_slice(&buf) {
            out.push(v);
        }
    }
    Ok((out, pos))
}

pub fn read_events(root: &Path) -> std::io::Result<Vec<EventRecord>> {
    read_jsonl(&events_path(root), 0).map(|(v, _)| v)
}

/// One completed (or failed) image pull.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PullRecord {
    pub time_ms: u64,
    pub reference: String,
    pub ok: bool,
    pub bytes: u64,
    pub duration_ms: u64,
    pub layers_cached: u32,
    pub layers_downloaded: u32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use microbox_core::{BoxEvent, BoxId, EventEmitter};

    #[tokio::test]
    async fn persisted_events_read_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = events_path(dir.path());
        let em = EventEmitter::new(64);
        let task = tokio::spawn(persist(em.subscribe(), path.clone()));
        let id = BoxId::random();
        for i in 0..5 {
            em.emit(
                &id,
                BoxEvent::ExecStarted {
                    exec_id: i,
                    argv: vec!["x".into()],
                },
            );
        }
        drop(em);
        task.await.unwrap();
        let got = read_events(dir.path()).unwrap();
        assert_eq!(
            got.iter().map(|r| r.seq).collect::<Vec<_>>(),
            [0, 1, 2, 3, 4]
        );
        // A torn last line is ignored, and reading resumes from an offset.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"seq\":")
            .unwrap();
        let (all, off) = read_jsonl::<EventRecord>(&path, 0).unwrap();
        assert_eq!(all.len(), 5);
        let (none, _) = read_jsonl::<EventRecord>(&path, off).unwrap();
        assert!(none.is_empty());
    }
}
