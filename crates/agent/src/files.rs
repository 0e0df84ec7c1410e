//! Copies files and directory trees in and out of the box root (ReadFile / WriteFile), streamed
//! in bounded chunks. Paths are resolved inside the box root, so image symlinks cannot point the
//! agent at its own files.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use microbox_agent_proto::v1::{
    write_file_request, FileFormat, ReadFileChunk, WriteFileHeader, WriteFileRequest,
};
use tokio::sync::mpsc;
use tonic::{Status, Streaming};

use crate::rootpath::resolve_in_root;

const CHUNK: usize = 64 * 1024;
const BUFFERED_CHUNKS: usize = 8;

pub type ChunkRx = mpsc::Receiver<Result<ReadFileChunk, Status>>;

fn io_status(what: &str, path: &str, e: &io::Error) -> Status {
    let m = format!("{what} {path}: {e}");
    match e.kind() {
        io::ErrorKind::NotFound => Status::not_found(m),
        io::ErrorKind::PermissionDenied => Status::permission_denied(m),
        io::ErrorKind::AlreadyExists => Status::already_exists(m),
        io::ErrorKind::InvalidInput | io::ErrorKind::IsADirectory => Status::invalid_argument(m),
        io::ErrorKind::NotADirectory => Status::failed_precondition(m),
        _ => Status::internal(m),
    }
}

fn box_path(root: &Path, path: &str, follow_last: bool) -> Result<PathBuf, Status> {
    if !path.starts_with('/') || path.contains('\0') {
        return Err(Status::invalid_argument(format!(
            "path {path:?} must be an absolute path inside the box"
        )));
    }
    resolve_in_root(root, path, follow_last).map_err(|e| io_status("resolving", path, &e))
}

/// Writes into the response channel in chunks (blocking side of a spawn_blocking task).
struct ChannelWriter {
    tx: mpsc::Sender<Result<ReadFileChunk, Status>>,
    buf: Vec<u8>,
}

impl ChannelWriter {
    fn send_buf(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let data = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.tx
            .blocking_send(Ok(ReadFileChunk { data }))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the caller went away"))
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() >= CHUNK {
            self.send_buf()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.send_buf()
    }
}

/// Starts streaming `path` out of the box. Errors about the path itself come back at once.
pub fn read(root: &Path, path: &str, format: FileFormat) -> Result<ChunkRx, Status> {
    let host = box_path(root, path, true)?;
    let meta = std::fs::symlink_metadata(&host).map_err(|e| io_status("reading", path, &e))?;
    if format == FileFormat::Raw && !meta.is_file() {
        return Err(Status::invalid_argument(format!(
            "{path} is not a regular file; read it with format TAR"
        )));
    }
    // Open before answering so that permission problems are reported as the call's status.
    let file = if meta.is_file() {
        Some(std::fs::File::open(&host).map_err(|e| io_status("opening", path, &e))?)
    } else {
        None
    };
    let (tx, rx) = mpsc::channel(BUFFERED_CHUNKS);
    let path = path.to_string();
    tokio::task::spawn_blocking(move || {
        let err_tx = tx.clone();
        let mut w = ChannelWriter {
            tx,
            buf: Vec::with_capacity(CHUNK),
        };
        let result = match (format, file) {
            (FileFormat::Raw, Some(mut f)) => io::copy(&mut f, &mut w).and_then(|_| w.flush()),
            _ => write_tar(&host, &path, &meta, &mut w).and_then(|_| w.flush()),
        };
        if let Err(e) = result {
            if e.kind() != io::ErrorKind::BrokenPipe {
                let _ = err_tx.blocking_send(Err(io_status("reading", &path, &e)));
            }
        }
    });
    Ok(rx)
}

fn write_tar(
    host: &Path,
    path: &str,
    meta: &std::fs::Metadata,
    w: &mut ChannelWriter,
) -> io::Result<()> {
    let mut b = tar::Builder::new(w);
    b.follow_symlinks(false);
    let name = Path::new(path)
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_else(|| ".".into());
    if meta.is_dir() {
        b.append_dir_all(&name, host)?;
    } else {
        b.append_path_with_name(host, &name)?;
    }
    b.finish()
}

/// Blocking reader over the data chunks of a WriteFile call.
struct ChannelReader {
    rx: mpsc::Receiver<Vec<u8>>,
    cur: Vec<u8>,
    pos: usize,
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos >= self.cur.len() {
            match self.rx.blocking_recv() {
                Some(c) => {
                    self.cur = c;
                    self.pos = 0;
                }
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.cur.len() - self.pos);
        out[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Receives a WriteFile call: header first, then data; returns the bytes received.
pub async fn write(root: &Path, mut inbound: Streaming<WriteFileRequest>) -> Result<u64, Status> {
    let header: WriteFileHeader = match inbound.message().await? {
        Some(WriteFileRequest {
            msg: Some(write_file_request::Msg::Header(h)),
        }) => h,
        _ => {
            return Err(Status::invalid_argument(
                "the first WriteFile message must be a header",
            ))
        }
    };
    let format = FileFormat::try_from(header.format)
        .map_err(|_| Status::invalid_argument(format!("unknown file format {}", header.format)))?;
    let path = header.path.clone();
    let host = box_path(root, &path, true)?;
    if header.create_parents {
        let parent = match format {
            FileFormat::Raw => host.parent().map(Path::to_path_buf),
            FileFormat::Tar => Some(host.clone()),
        };
        if let Some(parent) = parent {
            std::fs::create_dir_all(&parent).map_err(|e| io_status("creating", &path, &e))?;
        }
    }

    let (tx, rx) = mpsc::channel::<Vec<u8>>(BUFFERED_CHUNKS);
    let mode = if header.mode == 0 {
        0o644
    } else {
        header.mode & 0o7777
    };
    let task_path = path.clone();
    let task = tokio::task::spawn_blocking(move || -> Result<(), Status> {
        let mut reader = ChannelReader {
            rx,
            cur: Vec::new(),
            pos: 0,
        };
        match format {
            FileFormat::Raw => {
                use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(mode)
                    .open(&host)
                    .map_err(|e| io_status("creating", &task_path, &e))?;
                io::copy(&mut reader, &mut f).map_err(|e| io_status("writing", &task_path, &e))?;
                f.set_permissions(std::fs::Permissions::from_mode(mode))
                    .map_err(|e| io_status("chmod", &task_path, &e))?;
                f.sync_all()
                    .map_err(|e| io_status("syncing", &task_path, &e))
            }
            FileFormat::Tar => {
                if !host.is_dir() {
                    return Err(Status::not_found(format!(
                        "directory {task_path} does not exist in the box (set create_parents)"
                    )));
                }
                let mut ar = tar::Archive::new(&mut reader);
                ar.set_preserve_permissions(true);
                ar.set_overwrite(true);
                ar.unpack(&host).map_err(|e| {
                    Status::invalid_argument(format!("unpacking into {task_path}: {e}"))
                })?;
                // Drain trailing padding so the sender never blocks on a finished reader.
                io::copy(&mut reader, &mut io::sink())
                    .map(|_| ())
                    .map_err(|e| io_status("reading", &task_path, &e))
            }
        }
    });

    let mut total = 0u64;
    let mut send_failed = false;
    loop {
        match inbound.message().await {
            Ok(Some(WriteFileRequest {
                msg: Some(write_file_request::Msg::Data(d)),
            })) => {
                total += d.len() as u64;
                if tx.send(d).await.is_err() {
                    // The writer stopped (its error is reported below).
                    send_failed = true;
                    break;
                }
            }
            Ok(Some(_)) => {
                drop(tx);
                let _ = task.await;
                return Err(Status::invalid_argument(
                    "only data messages may follow the WriteFile header",
                ));
            }
            Ok(None) => break,
            Err(e) => {
                drop(tx);
                let _ = task.await;
                return Err(e);
            }
        }
    }
    drop(tx);
    match task.await {
        Ok(Ok(())) if !send_failed => Ok(total),
        Ok(Ok(())) => Err(Status::internal(format!("writing {path} stopped early"))),
        Ok(Err(s)) => Err(s),
        Err(e) => Err(Status::internal(format!("writing {path}: {e}"))),
    }
}
