//! The box's workload log: `output.log` in the box directory, one JSON object per chunk of
//! output (`{"t": unix_ms, "s": "out"|"err", "d": utf8}` or `"b": base64` for bytes that are not
//! UTF-8), so that `logs` can replay stdout and stderr separately, byte-exact, with timestamps.
//!
//! A workload that floods its output must not fill the host's disk: like Docker's json-file
//! `max-size`/`max-file=2`, the log is rotated to `output.log.1` once it reaches
//! `MICROBOX_LOG_MAX_SIZE` bytes (default 32 MiB), so a box keeps at most twice that.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use base64::Engine;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stream {
    #[serde(rename = "out")]
    Stdout,
    #[serde(rename = "err")]
    Stderr,
}

#[derive(Debug, Serialize, Deserialize)]
struct Line {
    t: u64,
    s: Stream,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    d: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    b: Option<String>,
}

pub struct Chunk {
    pub time_ms: u64,
    pub stream: Stream,
    pub data: Vec<u8>,
}

pub fn log_path(box_dir: &Path) -> PathBuf {
    box_dir.join("output.log")
}

/// Where the previous log goes when the current one is full.
fn rotated_path(box_dir: &Path) -> PathBuf {
    box_dir.join("output.log.1")
}

const DEFAULT_MAX_SIZE: u64 = 32 << 20;

fn max_size() -> u64 {
    std::env::var("MICROBOX_LOG_MAX_SIZE")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(DEFAULT_MAX_SIZE)
}

pub struct LogWriter {
    dir: PathBuf,
    file: File,
    size: u64,
    max: u64,
}

fn open_append(path: &Path) -> Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

impl LogWriter {
    pub fn open(box_dir: &Path) -> Result<LogWriter> {
        let file = open_append(&log_path(box_dir))?;
        let size = file.metadata()?.len();
        Ok(LogWriter {
            dir: box_dir.to_path_buf(),
            file,
            size,
            max: max_size(),
        })
    }

    /// Starts a new `output.log`; the full one replaces `output.log.1`.
    fn rotate(&mut self) -> Result<()> {
        let cur = log_path(&self.dir);
        std::fs::rename(&cur, rotated_path(&self.dir))
            .with_context(|| format!("rotating {}", cur.display()))?;
        self.file = open_append(&cur)?;
        self.size = 0;
        Ok(())
    }

    pub fn write(&mut self, stream: Stream, data: &[u8]) -> Result<()> {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let line = match std::str::from_utf8(data) {
            Ok(s) => Line {
                t,
                s: stream,
                d: Some(s.to_owned()),
                b: None,
            },
            Err(_) => Line {
                t,
                s: stream,
                d: None,
                b: Some(base64::engine::general_purpose::STANDARD.encode(data)),
            },
        };
        let mut buf = serde_json::to_vec(&line)?;
        buf.push(b'\n');
        if self.size > 0 && self.size + buf.len() as u64 > self.max {
            self.rotate()?;
        }
        // One write per line: O_APPEND keeps concurrent writers' lines whole.
        self.file.write_all(&buf)?;
        self.size += buf.len() as u64;
        Ok(())
    }
}

/// Reads a box's log across rotations: everything kept first, then what is appended.
pub struct LogFollower {
    dir: PathBuf,
    /// Inode of the file `offset` belongs to (None: no log yet).
    ino: Option<u64>,
    offset: u64,
}

impl LogFollower {
    /// All kept output (the rotated file, then the current one), and a follower after it.
    pub fn from_start(box_dir: &Path) -> Result<(LogFollower, Vec<Chunk>)> {
        let mut chunks = match File::open(rotated_path(box_dir)) {
            Ok(f) => read_file(f, 0)?.0,
            Err(_) => Vec::new(),
        };
        let mut f = LogFollower {
            dir: box_dir.to_path_buf(),
            ino: None,
            offset: 0,
        };
        chunks.extend(f.poll()?);
        Ok((f, chunks))
    }

    /// What was written since the last call, including the end of a file that was rotated
    /// meanwhile.
    pub fn poll(&mut self) -> Result<Vec<Chunk>> {
        use std::os::unix::fs::MetadataExt;
        let path = log_path(&self.dir);
        let cur = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
        };
        let ino = cur.metadata()?.ino();
        let mut out = Vec::new();
        if self.ino != Some(ino) {
            if let Some(old) = self.ino {
                // Rotated: finish the old file, now output.log.1 (unless rotated twice since).
                if let Ok(f) = File::open(rotated_path(&self.dir)) {
                    if f.metadata()?.ino() == old {
                        out = read_file(f, self.offset)?.0;
                    }
                }
            }
            self.ino = Some(ino);
            self.offset = 0;
        }
        let (more, next) = read_file(cur, self.offset)?;
        self.offset = next;
        out.extend(more);
        Ok(out)
    }
}

/// Reads chunks from `offset`, returning them and the offset after the last complete line.
fn read_file(mut f: File, offset: u64) -> Result<(Vec<Chunk>, u64)> {
    f.seek(SeekFrom::Start(offset))?;
    let mut reader = BufReader::new(f);
    let mut out = Vec::new();
    let mut pos = offset;
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = reader.read_until(b'\n', &mut buf)?;
        if n == 0 || buf.last() != Some(&b'\n') {
            break; // end, or a line still being written
        }
        pos += n as u64;
        let line: Line = match serde_json::from_slice(&buf) {
            Ok(l) => l,
            Err(_) => continue, // a damaged line is skipped, not fatal
        };
        let data = match (line.d, line.b) {
            (Some(d), _) => d.into_bytes(),
            (None, Some(b)) => base64::engine::general_purpose::STANDARD
                .decode(b)
                .unwrap_or_default(),
            _ => Vec::new(),
        };
        out.push(Chunk {
            time_ms: line.t,
            stream: line.s,
            data,
        });
    }
    Ok((out, pos))
}

/// Prints chunks to our stdout/stderr, optionally with a timestamp before each chunk.
pub fn print_chunks(chunks: &[Chunk], timestamps: bool) -> Result<()> {
    let mut out = std::io::stdout().lock();
    let mut err = std::io::stderr().lock();
    for c in chunks {
        let w: &mut dyn Write = match c.stream {
            Stream::Stdout => &mut out,
            Stream::Stderr => &mut err,
        };
        if timestamps {
            let t = UNIX_EPOCH + Duration::from_millis(c.time_ms);
            write!(w, "{} ", humantime::format_rfc3339_millis(t))?;
        }
        w.write_all(&c.data)?;
    }
    out.flush()?;
    err.flush()?;
    Ok(())
}

/// The last `n` lines of the log's text (both streams, in order), as chunks. A chunk holding
/// more lines than wanted is cut, so `--tail 1` of a flood shows its last line.
pub fn tail(mut chunks: Vec<Chunk>, n: usize) -> Vec<Chunk> {
    if n == 0 {
        return Vec::new();
    }
    let mut newlines = 0;
    let mut at_end = true;
    for ci in (0..chunks.len()).rev() {
        let data = &chunks[ci].data;
        for i in (0..data.len()).rev() {
            if data[i] != b'\n' {
                at_end = false;
                continue;
            }
            if at_end {
                // The newline that ends the last line does not start another one.
                at_end = false;
                continue;
            }
            newlines += 1;
            if newlines == n {
                chunks[ci].data.drain(..=i);
                let mut kept = chunks.split_off(ci);
                kept.retain(|c| !c.data.is_empty());
                return kept;
            }
        }
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_text_and_binary_and_resume_offset() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = LogWriter::open(dir.path()).unwrap();
        w.write(Stream::Stdout, b"hello\n").unwrap();
        w.write(Stream::Stderr, &[0xff, 0x00, 0x10]).unwrap();
        let (mut f, chunks) = LogFollower::from_start(dir.path()).unwrap();
        assert_eq!(chunks.len(), 2);
        assert_eq!(chunks[0].data, b"hello\n");
        assert_eq!(chunks[1].stream, Stream::Stderr);
        assert_eq!(chunks[1].data, vec![0xff, 0x00, 0x10]);
        w.write(Stream::Stdout, b"more").unwrap();
        let more = f.poll().unwrap();
        assert_eq!(more.len(), 1);
        assert_eq!(more[0].data, b"more");
        assert!(f.poll().unwrap().is_empty());
    }

    fn texts(chunks: &[Chunk]) -> Vec<String> {
        chunks
            .iter()
            .map(|c| String::from_utf8_lossy(&c.data).into_owned())
            .collect()
    }

    #[test]
    fn rotation_bounds_the_log_and_followers_lose_nothing_across_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = LogWriter::open(dir.path()).unwrap();
        w.max = 200; // a line is about 40 bytes
        let (mut f, first) = LogFollower::from_start(dir.path()).unwrap();
        assert!(first.is_empty());
        let mut seen = Vec::new();
        for i in 0..40 {
            w.write(Stream::Stdout, format!("line {i:02}\n").as_bytes())
                .unwrap();
            // A follower polling at least once per rotation sees every line once, in order.
            if i % 3 == 0 {
                seen.extend(texts(&f.poll().unwrap()));
            }
        }
        seen.extend(texts(&f.poll().unwrap()));
        let all: Vec<String> = (0..40).map(|i| format!("line {i:02}\n")).collect();
        assert_eq!(seen, all);
        // On disk: at most two files of at most `max` bytes each.
        let cur = std::fs::metadata(log_path(dir.path())).unwrap().len();
        let old = std::fs::metadata(rotated_path(dir.path())).unwrap().len();
        assert!(cur <= 200 && old <= 200, "{cur} {old}");
        // A new reader gets what is kept: the tail, in order, ending with the last line.
        let (_, kept) = LogFollower::from_start(dir.path()).unwrap();
        let kept = texts(&kept);
        assert!(kept.len() >= 5, "{kept:?}");
        assert_eq!(kept.last().unwrap(), "line 39\n");
        assert_eq!(kept[..], all[all.len() - kept.len()..]);
    }

    #[test]
    fn tail_keeps_last_lines() {
        let mk = |s: &str| Chunk {
            time_ms: 0,
            stream: Stream::Stdout,
            data: s.as_bytes().to_vec(),
        };
        let chunks = || vec![mk("a\n"), mk("b\n"), mk("c\n")];
        assert_eq!(texts(&tail(chunks(), 2)), ["b\n", "c\n"]);
        assert_eq!(texts(&tail(chunks(), 5)), ["a\n", "b\n", "c\n"]);
        assert!(tail(chunks(), 0).is_empty());
        // One chunk of many lines is cut; a line split over chunks stays whole.
        assert_eq!(texts(&tail(vec![mk("x\ny\nz\n")], 1)), ["z\n"]);
        assert_eq!(texts(&tail(vec![mk("x\ny\nz\n")], 2)), ["y\nz\n"]);
        assert_eq!(texts(&tail(vec![mk("p\nq"), mk("r\n")], 1)), ["q", "r\n"]);
        // A last line without a newline counts as a line.
        assert_eq!(texts(&tail(vec![mk("a\nb")], 1)), ["b"]);
    }
}
