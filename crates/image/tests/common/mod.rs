//! Helpers shared by the integration tests: a tree snapshot for comparisons and a small
//! HTTP proxy in front of the test registry that can count, slow down or corrupt blobs.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Everything about one tree entry that a faithful extraction must reproduce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryInfo {
    pub kind: &'static str,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub sha256: String,
    pub link: String,
    /// mtime, for non-directories (directory mtimes depend on extraction order).
    pub mtime: Option<(i64, i64)>,
    /// Other paths sharing this inode (hard-link group), sorted.
    pub hardlinks: Vec<String>,
    /// Device number of char/block nodes.
    pub rdev: u64,
    /// Extended attributes (name=value), sorted.
    pub xattrs: Vec<String>,
}

fn xattrs(p: &Path) -> Vec<String> {
    let mut names = vec![0u8; 4096];
    let Ok(n) = rustix::fs::llistxattr(p, &mut names) else {
        return vec![];
    };
    let mut out: Vec<String> = names[..n]
        .split(|b| *b == 0)
        .filter(|n| !n.is_empty())
        .map(|n| {
            let name = std::ffi::OsStr::from_bytes(n);
            let mut v = vec![0u8; 4096];
            let len = rustix::fs::lgetxattr(p, name, &mut v).unwrap_or(0);
            format!(
                "{}={}",
                name.to_string_lossy(),
                String::from_utf8_lossy(&v[..len])
            )
        })
        .collect();
    out.sort();
    out
}

/// Snapshot of the tree under `root` (root itself excluded), keyed by relative path.
pub fn snapshot(root: &Path) -> BTreeMap<String, EntryInfo> {
    let mut out = BTreeMap::new();
    let mut inodes: HashMap<(u64, u64), Vec<String>> = HashMap::new();
    walk(root, root, &mut out, &mut inodes);
    for paths in inodes.values() {
        if paths.len() > 1 {
            for p in paths {
                let mut others: Vec<String> = paths.iter().filter(|o| *o != p).cloned().collect();
                others.sort();
                out.get_mut(p).unwrap().hardlinks = others;
            }
        }
    }
    out
}

fn walk(
    root: &Path,
    dir: &Path,
    out: &mut BTreeMap<String, EntryInfo>,
    inodes: &mut HashMap<(u64, u64), Vec<String>>,
) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        let m = std::fs::symlink_metadata(&p).unwrap();
        let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
        let ft = m.file_type();
        use std::os::unix::fs::FileTypeExt;
        let kind = if ft.is_dir() {
            "dir"
        } else if ft.is_symlink() {
            "symlink"
        } else if ft.is_file() {
            "file"
        } else if ft.is_fifo() {
            "fifo"
        } else if ft.is_char_device() {
            "char"
        } else if ft.is_block_device() {
            "block"
        } else {
            "other"
        };
        let sha256 = if ft.is_file() {
            hex::encode(Sha256::digest(std::fs::read(&p).unwrap()))
        } else {
            String::new()
        };
        let link = if ft.is_symlink() {
            std::fs::read_link(&p)
                .unwrap()
                .to_string_lossy()
                .into_owned()
        } else {
            String::new()
        };
        if !ft.is_dir() && m.nlink() > 1 {
            inodes
                .entry((m.dev(), m.ino()))
                .or_default()
                .push(rel.clone());
        }
        out.insert(
            rel,
            EntryInfo {
                kind,
                mode: m.mode() & 0o7777,
                uid: m.uid(),
                gid: m.gid(),
                size: if ft.is_file() || ft.is_symlink() {
                    m.size()
                } else {
                    0
                },
                sha256,
                link,
                mtime: (!ft.is_dir()).then(|| (m.mtime(), m.mtime_nsec())),
                hardlinks: vec![],
                rdev: if ft.is_char_device() || ft.is_block_device() {
                    m.rdev()
                } else {
                    0
                },
                xattrs: xattrs(&p),
            },
        );
        if ft.is_dir() {
            walk(root, &p, out, inodes);
        }
    }
}

/// Human-readable differences between two snapshots (empty = identical).
pub fn diff(a: &BTreeMap<String, EntryInfo>, b: &BTreeMap<String, EntryInfo>) -> Vec<String> {
    let mut out = Vec::new();
    for (k, va) in a {
        match b.get(k) {
            None => out.push(format!("only in ours: {k}")),
            Some(vb) if va != vb => out.push(format!("{k}: ours {va:?} vs theirs {vb:?}")),
            _ => {}
        }
    }
    for k in b.keys() {
        if !a.contains_key(k) {
            out.push(format!("only in theirs: {k}"));
        }
    }
    out
}

/// What the proxy does to responses.
#[derive(Clone, Debug)]
pub enum ProxyMode {
    /// Forward unchanged (and count requests).
    Pass,
    /// Flip the last byte of the body of blob responses whose path contains this string.
    Corrupt(String),
    /// Send blob bodies slowly (16 KiB every `ms` milliseconds).
    Slow(u64),
    /// Cut the first full (200) response of each matching blob after half its body.
    CutOnce(String),
}

pub struct Proxy {
    pub addr: String,
    /// GET request counts by path.
    pub gets: Arc<Mutex<HashMap<String, usize>>>,
    /// `Range` headers seen, with their paths.
    pub ranges: Arc<Mutex<Vec<(String, String)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Proxy {
    /// A one-request-per-connection HTTP/1.1 proxy to `upstream` on a free loopback port.
    pub async fn start(upstream: &str, mode: ProxyMode) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let gets: Arc<Mutex<HashMap<String, usize>>> = Default::default();
        let upstream = upstream.to_string();
        let g = gets.clone();
        let ranges: Arc<Mutex<Vec<(String, String)>>> = Default::default();
        let rg = ranges.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    return;
                };
                let (up, mode, g, rg) = (upstream.clone(), mode.clone(), g.clone(), rg.clone());
                tokio::spawn(async move {
                    let _ = serve(sock, &up, &mode, &g, &rg).await;
                });
            }
        });
        Proxy {
            addr,
            gets,
            ranges,
            task,
        }
    }

    /// GET counts of blob paths.
    pub fn blob_gets(&self) -> HashMap<String, usize> {
        self.gets
            .lock()
            .unwrap()
            .iter()
            .filter(|(k, _)| k.contains("/blobs/"))
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }
}

async fn serve(
    mut sock: tokio::net::TcpStream,
    upstream: &str,
    mode: &ProxyMode,
    gets: &Mutex<HashMap<String, usize>>,
    ranges: &Mutex<Vec<(String, String)>>,
) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if sock.read(&mut b).await? == 0 {
            return Ok(());
        }
        head.push(b[0]);
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or_default().to_string();
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let path = parts.next().unwrap_or_default().to_string();
    if method == "GET" {
        *gets.lock().unwrap().entry(path.clone()).or_default() += 1;
    }
    let mut fwd = format!("{request_line}\r\n");
    for l in lines {
        let lower = l.to_ascii_lowercase();
        if lower.starts_with("range:") {
            ranges
                .lock()
                .unwrap()
                .push((path.clone(), l[6..].trim().to_string()));
        }
        if l.is_empty() || lower.starts_with("connection:") || lower.starts_with("host:") {
            continue;
        }
        fwd.push_str(l);
        fwd.push_str("\r\n");
    }
    fwd.push_str(&format!("Host: {upstream}\r\nConnection: close\r\n\r\n"));
    let mut up = tokio::net::TcpStream::connect(upstream).await?;
    up.write_all(fwd.as_bytes()).await?;
    let mut resp = Vec::new();
    up.read_to_end(&mut resp).await?;
    let is_blob = method == "GET" && path.contains("/blobs/") && resp.starts_with(b"HTTP/1.1 2");
    let body_at = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 4);
    match (mode, body_at) {
        (ProxyMode::Corrupt(pat), Some(at))
            if is_blob && path.contains(pat.as_str()) && resp.len() > at =>
        {
            let last = resp.len() - 1;
            resp[last] ^= 0xff;
            sock.write_all(&resp).await?;
        }
        (ProxyMode::CutOnce(pat), Some(at))
            if is_blob
                && path.contains(pat.as_str())
                && resp.starts_with(b"HTTP/1.1 200")
                && gets.lock().unwrap()[&path] == 1 =>
        {
            let half = at + (resp.len() - at) / 2;
            sock.write_all(&resp[..half]).await?;
            return Ok(()); // drop the connection mid-body
        }
        (ProxyMode::Slow(ms), Some(at)) if is_blob => {
            sock.write_all(&resp[..at]).await?;
            for c in resp[at..].chunks(16 * 1024) {
                sock.write_all(c).await?;
                tokio::time::sleep(std::time::Duration::from_millis(*ms)).await;
            }
        }
        _ => sock.write_all(&resp).await?,
    }
    sock.shutdown().await
}

/// `umoci unpack` of `layout:latest`, returning the rootfs path.
pub fn umoci_unpack(layout: &Path, dest: &Path) -> PathBuf {
    let mut cmd = std::process::Command::new("umoci");
    cmd.arg("unpack");
    if !microbox_testsupport::is_root() {
        cmd.arg("--rootless");
    }
    microbox_testsupport::run(
        cmd.arg("--image")
            .arg(format!("{}:latest", layout.display()))
            .arg(dest),
    );
    dest.join("rootfs")
}

/// Files in a directory (non-recursive), for "nothing left behind" checks.
pub fn dir_entries(p: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(p)
        .map(|r| {
            r.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}
