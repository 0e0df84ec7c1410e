//! Layer extraction into a root filesystem directory, confined by the kernel.
//!
//! Every parent directory is opened with `openat2(RESOLVE_IN_ROOT)` relative to the rootfs, so
//! `..`, absolute paths and symlinks in parent components all resolve *inside* the rootfs (as
//! `umoci` does). The final component is then handled with `*at` syscalls that never follow it
//! (`O_NOFOLLOW`, `AT_SYMLINK_NOFOLLOW`, `O_EXCL` on a freshly unlinked name). Hard-link targets
//! are resolved with `RESOLVE_IN_ROOT` too. Nothing outside the rootfs is created, changed or
//! removed, whatever the tar says.
//!
//! Semantics follow the OCI layer spec: `.wh.NAME` removes NAME from lower layers,
//! `.wh..wh..opq` hides everything below the directory that this layer did not write, an
//! entry replaces an existing non-directory (or a directory, unless both are directories).
//!
//! Creating files is most of the work (and system time): regular files of up to
//! [`PARALLEL_FILE_MAX`] bytes are written by a few worker threads while the tar stream is read
//! on. The tar order is kept where it matters: the main thread resolves (and creates) every
//! parent directory itself, an entry waits for an in-flight file of the same name in the same
//! directory, and everything that removes a directory, follows a hard link or applies a whiteout
//! first waits for all in-flight files. Workers only ever create one new name in a directory fd
//! the main thread opened, with the same `O_EXCL | O_NOFOLLOW` as the sequential path.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, Timespec, Timestamps};
use rustix::io::Errno;

use crate::error::{Error, Result};

/// Wraps `reader` in the right decompressor, chosen by the stream's magic bytes (media types
/// lie: Docker schema 2 says gzip for everything): gzip, zstd or plain tar.
pub fn decompress<'a, R: Read + 'a>(mut reader: R) -> std::io::Result<Box<dyn Read + 'a>> {
    // The magic is up to 4 bytes; a stream may deliver fewer in its first read.
    let mut magic = [0u8; 4];
    let mut n = 0;
    while n < magic.len() {
        match reader.read(&mut magic[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let head = &magic[..n];
    let mut br = BufReader::with_capacity(
        256 * 1024,
        std::io::Cursor::new(magic).take(n as u64).chain(reader),
    );
    br.fill_buf()?;
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Box::new(flate2::bufread::MultiGzDecoder::new(br)))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Ok(Box::new(zstd::stream::read::Decoder::with_buffer(br)?))
    } else {
        Ok(Box::new(br))
    }
}

/// A rootfs directory that layers are applied to.
pub struct Extractor {
    root: OwnedFd,
    privileged: bool,
    /// File-writing threads per layer (0: the main thread writes everything).
    threads: usize,
}

struct Ctx<'a> {
    layer: &'a str,
    entry: String,
}

impl Ctx<'_> {
    fn err(&self, reason: impl Into<String>) -> Error {
        Error::Layer {
            layer: self.layer.to_string(),
            entry: self.entry.clone(),
            reason: reason.into(),
        }
    }
    fn errno(&self, what: &str, e: Errno) -> Error {
        self.err(format!("{what}: {}", std::io::Error::from(e)))
    }
}

/// A directory's final mtime (and, unprivileged, its final mode), applied after its layer.
type DirFixup = (Vec<u8>, Timestamps, Option<Mode>);

const DIR_FLAGS: OFlags = OFlags::DIRECTORY.union(OFlags::CLOEXEC);

fn in_root() -> ResolveFlags {
    ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS
}

impl Extractor {
    /// Opens `root` (an existing directory). Owners and device nodes are applied only when
    /// running as root.
    pub fn open(root: &Path) -> Result<Extractor> {
        let fd = rustix::fs::open(root, DIR_FLAGS | OFlags::RDONLY, Mode::empty())
            .map_err(|e| Error::io("open rootfs", root)(e.into()))?;
        Ok(Extractor {
            root: fd,
            privileged: rustix::process::geteuid().is_root(),
            threads: default_threads(),
        })
    }

    /// Sets the number of file-writing threads (0 extracts sequentially).
    pub fn with_threads(mut self, threads: usize) -> Extractor {
        self.threads = threads;
        self
    }

    /// Applies one (possibly compressed) layer tar stream. `layer` is the digest used in errors.
    pub fn apply_layer<R: Read>(&self, stream: R, layer: &str) -> Result<()> {
        let ctx0 = Ctx {
            layer,
            entry: String::new(),
        };
        let reader = decompress(stream).map_err(|e| ctx0.err(format!("decompress: {e}")))?;
        self.apply_tar(reader, layer)
    }

    /// Applies one uncompressed layer tar stream.
    pub fn apply_tar<R: Read>(&self, reader: R, layer: &str) -> Result<()> {
        let ctx0 = Ctx {
            layer,
            entry: String::new(),
        };
        let mut archive = tar::Archive::new(reader);
        let mut written: HashSet<Vec<u8>> = HashSet::new();
        let mut dir_times: Vec<DirFixup> = Vec::new();
        let entries = archive
            .entries()
            .map_err(|e| ctx0.err(format!("read tar: {e}")))?;
        let pool = Writers::new(self.threads);
        std::thread::scope(|scope| -> Result<()> {
            for _ in 0..pool.threads {
                scope.spawn(|| pool.work(self, layer));
            }
            let result = (|| {
                for entry in entries {
                    let mut entry = entry.map_err(|e| ctx0.err(format!("read tar entry: {e}")))?;
                    let raw = entry.path_bytes().into_owned();
                    let ctx = Ctx {
                        layer,
                        entry: String::from_utf8_lossy(&raw).into_owned(),
                    };
                    pool.failed()?;
                    self.apply_entry(&ctx, &mut entry, &raw, &mut written, &mut dir_times, &pool)?;
                }
                pool.drain()
            })();
            pool.close();
            result.and(pool.drain())
        })?;
        // Directory mtimes last: creating children changes them. Unprivileged, directories
        // were kept owner-writable until now (a 0500 directory must still receive children).
        for (rel, ts, mode) in dir_times.iter().rev() {
            if let Ok(fd) = self.open_in_root(rel, OFlags::RDONLY | DIR_FLAGS | OFlags::NOFOLLOW) {
                if let Some(m) = mode {
                    let _ = rustix::fs::fchmod(&fd, *m);
                }
                let _ = rustix::fs::futimens(&fd, ts);
            }
        }
        Ok(())
    }

    fn open_in_root(&self, rel: &[u8], flags: OFlags) -> std::result::Result<OwnedFd, Errno> {
        let p = if rel.is_empty() { b"." as &[u8] } else { rel };
        rustix::fs::openat2(
            &self.root,
            OsStr::from_bytes(p),
            flags | OFlags::CLOEXEC,
            Mode::empty(),
            in_root(),
        )
    }

    /// Opens (creating 0755 directories as needed) the parent directory `comps` inside root.
    /// `before_create` runs before the first directory is created (the writer pool drains, so
    /// that no in-flight file races a new directory of its name).
    fn ensure_dir(
        &self,
        ctx: &Ctx,
        comps: &[&[u8]],
        before_create: &dyn Fn() -> Result<()>,
    ) -> Result<OwnedFd> {
        let full = comps.join(&b'/');
        match self.open_in_root(&full, OFlags::PATH | DIR_FLAGS) {
            Ok(fd) => return Ok(fd),
            Err(Errno::NOENT) => {}
            Err(e) => return Err(ctx.errno("open parent directory", e)),
        }
        let mut fd = self
            .open_in_root(b"", OFlags::PATH | DIR_FLAGS)
            .map_err(|e| ctx.errno("open rootfs", e))?;
        for i in 0..comps.len() {
            let prefix = comps[..=i].join(&b'/');
            match self.open_in_root(&prefix, OFlags::PATH | DIR_FLAGS) {
                Ok(next) => fd = next,
                Err(Errno::NOENT) => {
                    before_create()?;
                    // `fd` is the already-confined parent; the name is a single component, and
                    // `..` never reaches here (it always exists).
                    match rustix::fs::mkdirat(&fd, OsStr::from_bytes(comps[i]), Mode::from(0o755)) {
                        Ok(()) | Err(Errno::EXIST) => {}
                        Err(e) => return Err(ctx.errno("create parent directory", e)),
                    }
                    fd = self
                        .open_in_root(&prefix, OFlags::PATH | DIR_FLAGS)
                        .map_err(|e| ctx.errno("open created parent directory", e))?;
                }
                Err(e) => return Err(ctx.errno("open parent directory", e)),
            }
        }
        Ok(fd)
    }

    fn apply_entry<R: Read>(
        &self,
        ctx: &Ctx,
        entry: &mut tar::Entry<R>,
        raw: &[u8],
        written: &mut HashSet<Vec<u8>>,
        dir_times: &mut Vec<DirFixup>,
        pool: &Writers,
    ) -> Result<()> {
        let comps = components(raw);
        let Some((name, parents)) = comps.split_last() else {
            return Ok(()); // "./": the rootfs itself; its metadata is ours.
        };
        let name: &[u8] = name;
        if name == b".." {
            return Err(ctx.err("entry name is '..'"));
        }
        let rel = comps.join(&b'/');

        if let Some(target) = name.strip_prefix(b".wh.") {
            pool.drain()?;
            return self.whiteout(ctx, parents, target, written);
        }

        let kind = entry.header().entry_type();
        let parent = self.ensure_dir(ctx, parents, &|| pool.drain())?;
        let name_os = OsStr::from_bytes(name);
        // Nothing may touch this name while a worker still writes it.
        let key = Writers::key(&parent, name).map_err(|e| ctx.errno("stat parent directory", e))?;
        pool.wait_for(&key);
        let header = entry.header();
        let mode = Mode::from(header.mode().map_err(|e| ctx.err(format!("mode: {e}")))? & 0o7777);
        let uid = header.uid().map_err(|e| ctx.err(format!("uid: {e}")))?;
        let gid = header.gid().map_err(|e| ctx.err(format!("gid: {e}")))?;
        let (uid, gid) = (u32::try_from(uid), u32::try_from(gid));
        let (Ok(uid), Ok(gid)) = (uid, gid) else {
            return Err(ctx.err("uid/gid does not fit in 32 bits"));
        };
        let mut ts = {
            let secs = header.mtime().unwrap_or(0) as i64;
            let t = Timespec {
                tv_sec: secs,
                tv_nsec: 0,
            };
            Timestamps {
                last_access: t,
                last_modification: t,
            }
        };
        let dev_major = header.device_major().ok().flatten().unwrap_or(0);
        let dev_minor = header.device_minor().ok().flatten().unwrap_or(0);
        let mut xattrs: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        if let Ok(Some(exts)) = entry.pax_extensions() {
            for ext in exts.flatten() {
                let key = ext.key_bytes();
                if let Some(x) = key.strip_prefix(b"SCHILY.xattr.") {
                    xattrs.push((x.to_vec(), ext.value_bytes().to_vec()));
                } else if key == b"mtime" {
                    if let Some(t) = parse_pax_time(ext.value_bytes()) {
                        ts.last_modification = t;
                        ts.last_access = t;
                    }
                }
            }
        }

        // Replace whatever is there, except directory-over-directory (metadata update only).
        let existing = rustix::fs::statat(&parent, name_os, AtFlags::SYMLINK_NOFOLLOW);
        let is_dir_entry = kind == tar::EntryType::Directory;
        match existing {
            Ok(st)
                if is_dir_entry && FileType::from_raw_mode(st.st_mode) == FileType::Directory => {}
            Ok(st) => {
                if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
                    // In-flight files may be inside the directory that goes.
                    pool.drain()?;
                }
                remove_all_at(parent.as_fd(), name_os, self.privileged)
                    .map_err(|e| ctx.errno("remove existing entry", e))?
            }
            Err(Errno::NOENT) => {}
            Err(e) => return Err(ctx.errno("stat existing entry", e)),
        }

        match kind {
            tar::EntryType::Directory => {
                match rustix::fs::mkdirat(&parent, name_os, Mode::from(0o700)) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => return Err(ctx.errno("mkdir", e)),
                }
                let fd = rustix::fs::openat(
                    &parent,
                    name_os,
                    OFlags::RDONLY | DIR_FLAGS | OFlags::NOFOLLOW,
                    Mode::empty(),
                )
                .map_err(|e| ctx.errno("open directory", e))?;
                if self.privileged {
                    self.set_meta_fd(ctx, &fd, uid, gid, mode, &xattrs)?;
                    dir_times.push((rel.clone(), ts, None));
                } else {
                    let writable = Mode::from(mode.bits() | 0o700);
                    self.set_meta_fd(ctx, &fd, uid, gid, writable, &xattrs)?;
                    dir_times.push((rel.clone(), ts, Some(mode)));
                }
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let meta = FileMeta {
                    uid,
                    gid,
                    mode,
                    ts,
                    xattrs,
                };
                if pool.threads > 0 && entry.size() <= PARALLEL_FILE_MAX {
                    let mut data = Vec::with_capacity(entry.size() as usize);
                    entry
                        .read_to_end(&mut data)
                        .map_err(|e| ctx.err(format!("read file: {e}")))?;
                    pool.submit(FileJob {
                        key,
                        parent,
                        entry: ctx.entry.clone(),
                        data,
                        meta,
                    });
                } else {
                    self.write_file(ctx, &parent, name, &meta, entry)?;
                }
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| ctx.err("symlink without target"))?;
                rustix::fs::symlinkat(OsStr::from_bytes(&target), &parent, name_os)
                    .map_err(|e| ctx.errno("symlink", e))?;
                if self.privileged {
                    rustix::fs::chownat(
                        &parent,
                        name_os,
                        Some(rustix::fs::Uid::from_raw(uid)),
                        Some(rustix::fs::Gid::from_raw(gid)),
                        AtFlags::SYMLINK_NOFOLLOW,
                    )
                    .map_err(|e| ctx.errno("chown symlink", e))?;
                }
                rustix::fs::utimensat(&parent, name_os, &ts, AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(|e| ctx.errno("set symlink mtime", e))?;
            }
            tar::EntryType::Link => {
                // The target may be a file a worker has not created yet.
                pool.drain()?;
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| ctx.err("hard link without target"))?;
                let tcomps = components(&target);
                if tcomps.is_empty() {
                    return Err(ctx.err("hard link to the rootfs itself"));
                }
                let tfd = self
                    .open_in_root(&tcomps.join(&b'/'), OFlags::PATH | OFlags::NOFOLLOW)
                    .map_err(|e| {
                        ctx.errno(
                            &format!(
                                "hard link target {:?} (resolved inside the rootfs)",
                                String::from_utf8_lossy(&target)
                            ),
                            e,
                        )
                    })?;
                let st = rustix::fs::fstat(&tfd).map_err(|e| ctx.errno("stat link target", e))?;
                if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
                    return Err(ctx.err("hard link to a directory"));
                }
                link_fd(&tfd, &parent, name_os).map_err(|e| ctx.errno("hard link", e))?;
            }
            tar::EntryType::Fifo | tar::EntryType::Char | tar::EntryType::Block => {
                let (ft, dev) = match kind {
                    tar::EntryType::Fifo => (FileType::Fifo, 0),
                    _ => {
                        if !self.privileged {
                            tracing::warn!(layer = ctx.layer, entry = %ctx.entry, "skipping device node: not root");
                            return Ok(());
                        }
                        let (maj, min) = (dev_major, dev_minor);
                        let ft = if kind == tar::EntryType::Char {
                            FileType::CharacterDevice
                        } else {
                            FileType::BlockDevice
                        };
                        (ft, rustix::fs::makedev(maj, min))
                    }
                };
                rustix::fs::mknodat(&parent, name_os, ft, Mode::from(0o600), dev)
                    .map_err(|e| ctx.errno("mknod", e))?;
                let fd = rustix::fs::openat(
                    &parent,
                    name_os,
                    OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| ctx.errno("open node", e))?;
                if self.privileged {
                    rustix::fs::chownat(
                        &fd,
                        "",
                        Some(rustix::fs::Uid::from_raw(uid)),
                        Some(rustix::fs::Gid::from_raw(gid)),
                        AtFlags::EMPTY_PATH,
                    )
                    .map_err(|e| ctx.errno("chown node", e))?;
                }
                // chmod through the O_PATH fd's /proc link: the node itself, never a symlink.
                let proc = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd));
                rustix::fs::chmod(proc.as_str(), mode).map_err(|e| ctx.errno("chmod node", e))?;
                rustix::fs::utimensat(&parent, name_os, &ts, AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(|e| ctx.errno("set node mtime", e))?;
            }
            tar::EntryType::XGlobalHeader
            | tar::EntryType::XHeader
            | tar::EntryType::GNULongName
            | tar::EntryType::GNULongLink => {
                return Ok(());
            }
            other => {
                return Err(ctx.err(format!("unsupported tar entry type {other:?}")));
            }
        }
        note_written(written, rel);
        Ok(())
    }

    /// Creates `name` (which must not exist) in `parent` with `data` and `meta`.
    fn write_file(
        &self,
        ctx: &Ctx,
        parent: &OwnedFd,
        name: &[u8],
        meta: &FileMeta,
        data: &mut dyn Read,
    ) -> Result<()> {
        let fd = rustix::fs::openat(
            parent,
            OsStr::from_bytes(name),
            OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from(0o600),
        )
        .map_err(|e| ctx.errno("create file", e))?;
        let mut f = File::from(fd);
        std::io::copy(data, &mut f).map_err(|e| ctx.err(format!("write file: {e}")))?;
        self.set_meta_fd(ctx, f.as_fd(), meta.uid, meta.gid, meta.mode, &meta.xattrs)?;
        rustix::fs::futimens(&f, &meta.ts).map_err(|e| ctx.errno("set mtime", e))
    }

    fn set_meta_fd(
        &self,
        ctx: &Ctx,
        fd: impl AsFd,
        uid: u32,
        gid: u32,
        mode: Mode,
        xattrs: &[(Vec<u8>, Vec<u8>)],
    ) -> Result<()> {
        if self.privileged {
            rustix::fs::fchown(
                &fd,
                Some(rustix::fs::Uid::from_raw(uid)),
                Some(rustix::fs::Gid::from_raw(gid)),
            )
            .map_err(|e| ctx.errno("chown", e))?;
        }
        // After chown: chown clears setuid/setgid.
        rustix::fs::fchmod(&fd, mode).map_err(|e| ctx.errno("chmod", e))?;
        for (k, v) in xattrs {
            if let Err(e) = rustix::fs::fsetxattr(
                &fd,
                OsStr::from_bytes(k),
                v,
                rustix::fs::XattrFlags::empty(),
            ) {
                if self.privileged && e != Errno::NOTSUP {
                    return Err(ctx.errno(&format!("set xattr {}", String::from_utf8_lossy(k)), e));
                }
                tracing::warn!(layer = ctx.layer, entry = %ctx.entry, "xattr {} not set: {e}", String::from_utf8_lossy(k));
            }
        }
        Ok(())
    }

    fn whiteout(
        &self,
        ctx: &Ctx,
        parents: &[&[u8]],
        target: &[u8],
        written: &HashSet<Vec<u8>>,
    ) -> Result<()> {
        let parent_rel = parents.join(&b'/');
        if target == b".wh..opq" {
            let dir = match self.open_in_root(&parent_rel, OFlags::RDONLY | DIR_FLAGS) {
                Ok(fd) => fd,
                // Nothing below to hide.
                Err(Errno::NOENT) | Err(Errno::NOTDIR) => return Ok(()),
                Err(e) => return Err(ctx.errno("open opaque directory", e)),
            };
            return clear_opaque(dir.as_fd(), &parent_rel, written, self.privileged)
                .map_err(|e| ctx.errno("clear opaque directory", e));
        }
        if target.is_empty() || target == b"." || target == b".." || target.contains(&b'/') {
            return Err(ctx.err("whiteout must name one entry (not empty, '.' or '..')"));
        }
        let dir = match self.open_in_root(&parent_rel, OFlags::PATH | DIR_FLAGS) {
            Ok(fd) => fd,
            Err(Errno::NOENT) | Err(Errno::NOTDIR) => return Ok(()),
            Err(e) => return Err(ctx.errno("open whiteout parent", e)),
        };
        // An O_PATH fd cannot be read; reopen for directory listing inside remove_all_at.
        let dir = rustix::fs::openat(&dir, ".", OFlags::RDONLY | DIR_FLAGS, Mode::empty())
            .map_err(|e| ctx.errno("open whiteout parent", e))?;
        remove_all_at(dir.as_fd(), OsStr::from_bytes(target), self.privileged)
            .map_err(|e| ctx.errno("apply whiteout", e))
    }
}

/// Regular files up to this size are written by the worker threads (their bytes are read into
/// memory first); larger ones are streamed by the main thread.
pub const PARALLEL_FILE_MAX: u64 = 4 << 20;

/// At most this many bytes of file data wait for the workers at once.
const QUEUED_BYTES_MAX: usize = 64 << 20;

/// Records `rel` and its ancestors as written by this layer (an opaque whiteout keeps them).
fn note_written(written: &mut HashSet<Vec<u8>>, rel: Vec<u8>) {
    for (i, b) in rel.iter().enumerate() {
        if *b == b'/' {
            written.insert(rel[..i].to_vec());
        }
    }
    written.insert(rel);
}

/// Metadata of one regular file, applied by the worker that writes it.
struct FileMeta {
    uid: u32,
    gid: u32,
    mode: Mode,
    ts: Timestamps,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// One regular file for a worker: a new name in an already-resolved directory.
struct FileJob {
    key: WriteKey,
    parent: OwnedFd,
    entry: String,
    data: Vec<u8>,
    meta: FileMeta,
}

/// (device, inode) of the parent directory and the name: what two entries must not write at
/// once, whatever path (symlinks, `..`) led to it.
type WriteKey = (u64, u64, Vec<u8>);

#[derive(Default)]
struct WritersState {
    in_flight: HashSet<WriteKey>,
    queued: std::collections::VecDeque<FileJob>,
    queued_bytes: usize,
    busy: usize,
    closed: bool,
    /// Set with the first error: the workers then only discard what is queued.
    aborted: bool,
    error: Option<Error>,
}

/// The pool of file-writing threads of one layer.
struct Writers {
    threads: usize,
    state: std::sync::Mutex<WritersState>,
    changed: std::sync::Condvar,
}

/// One writer per core (at most 4); `MICROBOX_EXTRACT_THREADS` overrides (0: sequential).
fn default_threads() -> usize {
    std::env::var("MICROBOX_EXTRACT_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
                .min(4)
        })
}

impl Writers {
    fn new(threads: usize) -> Writers {
        Writers {
            threads,
            state: Default::default(),
            changed: Default::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WritersState> {
        // The state stays consistent across a panic (plain field updates).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn key(parent: &OwnedFd, name: &[u8]) -> std::result::Result<WriteKey, Errno> {
        let st = rustix::fs::fstat(parent)?;
        Ok((st.st_dev, st.st_ino, name.to_vec()))
    }

    /// The first error a worker hit, if any.
    fn failed(&self) -> Result<()> {
        match self.lock().error.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn submit(&self, job: FileJob) {
        let mut st = self.lock();
        while st.queued_bytes > QUEUED_BYTES_MAX && st.error.is_none() {
            st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.in_flight.insert(job.key.clone());
        st.queued_bytes += job.data.len();
        st.queued.push_back(job);
        self.changed.notify_all();
    }

    /// Waits until no worker writes `key`.
    fn wait_for(&self, key: &WriteKey) {
        let mut st = self.lock();
        while st.in_flight.contains(key) {
            st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Waits until every submitted file is written; the first error, if any.
    fn drain(&self) -> Result<()> {
        let mut st = self.lock();
        while !st.queued.is_empty() || st.busy > 0 {
            st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        match st.error.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Lets the workers end once the queue is empty.
    fn close(&self) {
        self.lock().closed = true;
        self.changed.notify_all();
    }

    /// A worker: writes queued files until the pool is closed. After an error it only
    /// discards jobs (the layer fails anyway).
    fn work(&self, ex: &Extractor, layer: &str) {
        loop {
            let job = {
                let mut st = self.lock();
                loop {
                    if let Some(j) = st.queued.pop_front() {
                        st.queued_bytes -= j.data.len();
                        st.busy += 1;
                        break j;
                    }
                    if st.closed {
                        return;
                    }
                    st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
                }
            };
            let skip = self.lock().aborted;
            let ctx = Ctx {
                layer,
                entry: job.entry.clone(),
            };
            let result = if skip {
                Ok(())
            } else {
                // A panic must not leave `busy` counted (drain would wait forever).
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    ex.write_file(&ctx, &job.parent, &job.key.2, &job.meta, &mut &job.data[..])
                }))
                .unwrap_or_else(|_| Err(ctx.err("file writer panicked")))
            };
            let mut st = self.lock();
            st.busy -= 1;
            st.in_flight.remove(&job.key);
            if let Err(e) = result {
                st.aborted = true;
                st.error.get_or_insert(e);
            }
            self.changed.notify_all();
        }
    }
}

/// Splits a tar path into components, dropping empty and `.` ones. `..` is kept: openat2
/// resolves it inside the root.
fn components(raw: &[u8]) -> Vec<&[u8]> {
    raw.split(|b| *b == b'/')
        .filter(|c| !c.is_empty() && *c != b".")
        .collect()
}

fn parse_pax_time(v: &[u8]) -> Option<Timespec> {
    let s = std::str::from_utf8(v).ok()?;
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    let secs: i64 = secs.parse().ok()?;
    let mut nanos: i64 = 0;
    if !frac.is_empty() {
        let digits: String = frac.chars().take(9).collect();
        let scale = 10i64.pow(9 - digits.len() as u32);
        nanos = digits.parse::<i64>().ok()? * scale;
    }
    if secs < 0 && nanos > 0 {
        return None; // negative fractional times: not worth the edge cases
    }
    Some(Timespec {
        tv_sec: secs,
        tv_nsec: nanos as _,
    })
}

/// `linkat(fd, "", dir, name, AT_EMPTY_PATH)`; without CAP_DAC_READ_SEARCH falls back to
/// linking the `/proc/self/fd` magic link (still the confined inode, never a path lookup).
fn link_fd(target: &OwnedFd, dir: &OwnedFd, name: &OsStr) -> std::result::Result<(), Errno> {
    match rustix::fs::linkat(target, "", dir, name, AtFlags::EMPTY_PATH) {
        Err(Errno::NOENT) | Err(Errno::PERM) => {
            let proc = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(target));
            rustix::fs::linkat(
                rustix::fs::CWD,
                proc.as_str(),
                dir,
                name,
                AtFlags::SYMLINK_FOLLOW,
            )
        }
        r => r,
    }
}

/// Removes `name` in `dir` (recursively for directories), never following symlinks.
pub(crate) fn remove_all_at(
    dir: BorrowedFd,
    name: &OsStr,
    privileged: bool,
) -> std::result::Result<(), Errno> {
    let st = match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(Errno::NOENT) => return Ok(()),
        Err(e) => return Err(e),
    };
    if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
        return rustix::fs::unlinkat(dir, name, AtFlags::empty());
    }
    let sub = rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | DIR_FLAGS | OFlags::NOFOLLOW,
        Mode::empty(),
    )?;
    if !privileged {
        let _ = rustix::fs::fchmod(&sub, Mode::from(0o700));
    }
    for child in list_dir(sub.as_fd())? {
        remove_all_at(sub.as_fd(), &child, privileged)?;
    }
    rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR)
}

/// Recreates the tree in `src` inside the empty directory `dst`: directories anew (owner,
/// mode, xattrs, mtime), every other entry as a hard link to the same inode, never following
/// symlinks. Layers can then be applied on top of `dst` without touching `src`, because the
/// extractor never writes into an existing file: it replaces names (unlink, then create) and
/// changes only directories in place. Needs root (directories may be read-only).
pub(crate) fn link_tree_at(src: BorrowedFd, dst: BorrowedFd) -> std::result::Result<(), Errno> {
    for name in list_dir(src)? {
        let st = rustix::fs::statat(src, &name, AtFlags::SYMLINK_NOFOLLOW)?;
        if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
            rustix::fs::linkat(src, &name, dst, &name, AtFlags::empty())?;
            continue;
        }
        rustix::fs::mkdirat(dst, &name, Mode::from(0o700))?;
        let flags = OFlags::RDONLY | DIR_FLAGS | OFlags::NOFOLLOW;
        let s = rustix::fs::openat(src, &name, flags, Mode::empty())?;
        let d = rustix::fs::openat(dst, &name, flags, Mode::empty())?;
        link_tree_at(s.as_fd(), d.as_fd())?;
        rustix::fs::fchown(
            &d,
            Some(rustix::fs::Uid::from_raw(st.st_uid)),
            Some(rustix::fs::Gid::from_raw(st.st_gid)),
        )?;
        copy_xattrs(s.as_fd(), d.as_fd())?;
        rustix::fs::fchmod(&d, Mode::from_raw_mode(st.st_mode & 0o7777))?;
        let ts = Timestamps {
            last_access: Timespec {
                tv_sec: st.st_atime as _,
                tv_nsec: st.st_atime_nsec as _,
            },
            last_modification: Timespec {
                tv_sec: st.st_mtime as _,
                tv_nsec: st.st_mtime_nsec as _,
            },
        };
        rustix::fs::futimens(&d, &ts)?;
    }
    Ok(())
}

fn copy_xattrs(src: BorrowedFd, dst: BorrowedFd) -> std::result::Result<(), Errno> {
    let mut names = vec![0u8; 4096];
    let n = match rustix::fs::flistxattr(src, &mut names) {
        Ok(n) => n,
        Err(Errno::NOTSUP) => return Ok(()),
        Err(e) => return Err(e),
    };
    for name in names[..n].split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let name = OsStr::from_bytes(name);
        let mut value = vec![0u8; 65536];
        let len = rustix::fs::fgetxattr(src, name, &mut value)?;
        rustix::fs::fsetxattr(dst, name, &value[..len], rustix::fs::XattrFlags::empty())?;
    }
    Ok(())
}

fn list_dir(dir: BorrowedFd) -> std::result::Result<Vec<std::ffi::OsString>, Errno> {
    let mut out = Vec::new();
    let d = rustix::fs::Dir::read_from(dir)?;
    for e in d {
        let e = e?;
        let n = e.file_name().to_bytes();
        if n != b"." && n != b".." {
            out.push(OsStr::from_bytes(n).to_os_string());
        }
    }
    Ok(out)
}

/// Removes everything below `dir` that the current layer did not write.
fn clear_opaque(
    dir: BorrowedFd,
    rel: &[u8],
    written: &HashSet<Vec<u8>>,
    privileged: bool,
) -> std::result::Result<(), Errno> {
    for child in list_dir(dir)? {
        let mut crel = rel.to_vec();
        if !crel.is_empty() {
            crel.push(b'/');
        }
        crel.extend_from_slice(child.as_bytes());
        if !written.contains(&crel) {
            remove_all_at(dir, &child, privileged)?;
            continue;
        }
        let st = rustix::fs::statat(dir, &child, AtFlags::SYMLINK_NOFOLLOW)?;
        if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
            let sub = rustix::fs::openat(
                dir,
                &child,
                OFlags::RDONLY | DIR_FLAGS | OFlags::NOFOLLOW,
                Mode::empty(),
            )?;
            clear_opaque(sub.as_fd(), &crel, written, privileged)?;
        }
    }
    Ok(())
}

/// Fills the empty directory `dst` with hard links to the tree `src` (see [`link_tree_at`]).
pub fn link_tree(src: &Path, dst: &Path) -> Result<()> {
    let open = |p: &Path| {
        rustix::fs::open(
            p,
            OFlags::RDONLY | DIR_FLAGS | OFlags::NOFOLLOW,
            Mode::empty(),
        )
        .map_err(|e| Error::io("open", p)(e.into()))
    };
    let (s, d) = (open(src)?, open(dst)?);
    link_tree_at(s.as_fd(), d.as_fd()).map_err(|e| Error::io("link tree into", dst)(e.into()))
}

/// Applies the layer blobs at `layers` (path, digest) in order onto `root`.
pub fn apply_layers(root: &Path, layers: &[(PathBuf, String)]) -> Result<()> {
    apply_layers_when_ready(root, layers, &mut |_| Ok(()))
}

/// Like [`apply_layers`], but calls `ready(i)` (which may block, e.g. until a pull has stored
/// layer `i`) before touching layer `i`. Each layer is decompressed on its own thread, so
/// decompression overlaps with the file-system work.
pub fn apply_layers_when_ready(
    root: &Path,
    layers: &[(PathBuf, String)],
    ready: &mut dyn FnMut(usize) -> Result<()>,
) -> Result<()> {
    let ex = Extractor::open(root)?;
    std::thread::scope(|scope| {
        for (i, (path, digest)) in layers.iter().enumerate() {
            ready(i)?;
            let (tx, rx) = std::sync::mpsc::sync_channel::<std::io::Result<Vec<u8>>>(16);
            let path = path.clone();
            scope.spawn(move || {
                let run = || -> std::io::Result<()> {
                    let mut r = decompress(File::open(&path)?)?;
                    loop {
                        let mut buf = vec![0u8; 1 << 20];
                        let mut n = 0;
                        while n < buf.len() {
                            match r.read(&mut buf[n..])? {
                                0 => break,
                                k => n += k,
                            }
                        }
                        if n == 0 {
                            return Ok(());
                        }
                        buf.truncate(n);
                        if tx.send(Ok(buf)).is_err() {
                            return Ok(()); // extractor gave up
                        }
                    }
                };
                if let Err(e) = run() {
                    let _ = tx.send(Err(e));
                }
            });
            let reader = ChunkReader {
                rx,
                cur: Vec::new(),
                pos: 0,
            };
            ex.apply_tar(reader, digest)?;
        }
        Ok(())
    })
}

/// Reads the chunks a decompression thread sends.
struct ChunkReader {
    rx: std::sync::mpsc::Receiver<std::io::Result<Vec<u8>>>,
    cur: Vec<u8>,
    pos: usize,
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.cur.len() {
            match self.rx.recv() {
                Ok(Ok(c)) => {
                    self.cur = c;
                    self.pos = 0;
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len() - self.pos);
        buf[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hands out one byte per read, as a slow network stream may.
    struct Trickle(std::io::Cursor<Vec<u8>>);
    impl Read for Trickle {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let end = buf.len().min(1);
            self.0.read(&mut buf[..end])
        }
    }

    #[test]
    fn compression_is_detected_when_the_magic_arrives_byte_by_byte() {
        let tar = b"plain tar bytes".to_vec();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &tar).unwrap();
        let gz = gz.finish().unwrap();
        let zst = zstd::encode_all(&tar[..], 1).unwrap();
        for (what, data) in [
            ("gzip", gz),
            ("zstd", zst),
            ("plain", tar.clone()),
            ("short", b"ab".to_vec()),
        ] {
            let mut out = Vec::new();
            decompress(Trickle(std::io::Cursor::new(data.clone())))
                .unwrap()
                .read_to_end(&mut out)
                .unwrap();
            let want = if what == "short" { data } else { tar.clone() };
            assert_eq!(out, want, "{what}");
        }
    }

    #[test]
    fn components_drop_dots_keep_dotdot() {
        assert_eq!(components(b"./a//b/./c/"), vec![&b"a"[..], b"b", b"c"]);
        assert_eq!(components(b"/../x"), vec![&b".."[..], b"x"]);
        assert!(components(b"./").is_empty());
    }

    fn tar_of(entries: &[(&str, tar::EntryType, u32, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, mode, data) in entries {
            let mut h = tar::Header::new_ustar();
            h.set_path(path).unwrap();
            h.set_entry_type(*kind);
            h.set_mode(*mode);
            h.set_size(data.len() as u64);
            h.set_uid(rustix::process::geteuid().as_raw() as u64);
            h.set_gid(rustix::process::getegid().as_raw() as u64);
            h.set_mtime(1_000_000_000);
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    /// A read-only directory still receives its children (unprivileged extraction keeps it
    /// writable until the layer ends), and ends with its own mode and mtime.
    #[test]
    fn readonly_directory_gets_children_and_final_mode() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = tempfile::tempdir().unwrap();
        let tar = tar_of(&[
            ("ro/", tar::EntryType::Directory, 0o500, b""),
            ("ro/sub/", tar::EntryType::Directory, 0o555, b""),
            ("ro/sub/f", tar::EntryType::Regular, 0o400, b"data"),
        ]);
        Extractor::open(dir.path())
            .unwrap()
            .apply_layer(&tar[..], "sha256:test")
            .unwrap();
        let m = std::fs::metadata(dir.path().join("ro")).unwrap();
        assert_eq!(m.permissions().mode() & 0o7777, 0o500);
        assert_eq!(m.mtime(), 1_000_000_000);
        assert_eq!(
            std::fs::metadata(dir.path().join("ro/sub"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o555
        );
        assert_eq!(std::fs::read(dir.path().join("ro/sub/f")).unwrap(), b"data");
        // Cleanup must cope with the read-only tree.
        let root = rustix::fs::open(dir.path(), OFlags::RDONLY | DIR_FLAGS, Mode::empty()).unwrap();
        remove_all_at(
            root.as_fd(),
            OsStr::new("ro"),
            rustix::process::geteuid().is_root(),
        )
        .unwrap();
    }

    #[test]
    fn pax_time() {
        let t = parse_pax_time(b"1234.5").unwrap();
        assert_eq!((t.tv_sec, t.tv_nsec), (1234, 500_000_000));
        let t = parse_pax_time(b"7").unwrap();
        assert_eq!((t.tv_sec, t.tv_nsec), (7, 0));
        assert!(parse_pax_time(b"x").is_none());
    }
}
