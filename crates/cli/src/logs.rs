//! The box's workload log: `output.log` in the box directory, one JSON object per chunk of
//! output (`{"t": unix_ms, "s": "out"|"err", "d": utf8}` or `"b": base64` for bytes that are not
//! UTF-8), so that `logs` can replay stdout and stderr separately, byte-exact, with timestamps.

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

pub struct LogWriter {
    file: File,
}

impl LogWriter {
    pub fn open(box_dir: &Path) -> Result<LogWriter> {
        let path = log_path(box_dir);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(LogWriter { file })
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
        // One write per line: O_APPEND keeps concurrent writers' lines whole.
        self.file.write_all(&buf)?;
        Ok(())
    }
}

/// Reads chunks from `offset`, returning them and the offset after the last complete line.
pub fn read_from(path: &Path, offset: u64) -> Result<(Vec<Chunk>, u64)> {
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), offset)),
        Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
    };
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

/// The last `n` lines of the log's text (both streams, in order), as chunks.
pub fn tail(chunks: Vec<Chunk>, n: usize) -> Vec<Chunk> {
    let mut lines_seen = 0;
    let mut keep_from = chunks.len();
    for (i, c) in chunks.iter().enumerate().rev() {
        lines_seen += c.data.iter().filter(|b| **b == b'\n').count().max(1);
        if lines_seen > n {
            break;
        }
        keep_from = i;
    }
    chunks.into_iter().skip(keep_from).collect()
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
        let (chunks, off) = read_from(&log_path(dir.path()), 0).unwrap();
        assert_eq!(chunks.len(), 2);
        assert_eq!(chunks[0].data, b"hello\n");
        assert_eq!(chunks[1].stream, Stream::Stderr);
        assert_eq!(chunks[1].data, vec![0xff, 0x00, 0x10]);
        w.write(Stream::Stdout, b"more").unwrap();
        let (more, _) = read_from(&log_path(dir.path()), off).unwrap();
        assert_eq!(more.len(), 1);
        assert_eq!(more[0].data, b"more");
    }

    #[test]
    fn tail_keeps_last_lines() {
        let mk = |s: &str| Chunk {
            time_ms: 0,
            stream: Stream::Stdout,
            data: s.as_bytes().to_vec(),
        };
        let chunks = vec![mk("a\n"), mk("b\n"), mk("c\n")];
        let t = tail(chunks, 2);
        assert_eq!(
            t.iter().map(|c| c.data.clone()).collect::<Vec<_>>(),
            vec![b"b\n".to_vec(), b"c\n".to_vec()]
        );
    }
}
