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
pub fn decompress<'a, R: Read + 'a>(reader: R) -> std::io::Result<Box<dyn Read + 'a>> {
    let mut br = BufReader::with_capacity(256 * 1024, reader);
    let head = br.fill_buf()?;
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
        })
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
        for entry in entries {
            let mut entry = entry.map_err(|e| ctx0.err(format!("read tar entry: {e}")))?;
            let raw = entry.path_bytes().into_owned();
            let ctx = Ctx {
                layer,
                entry: String::from_utf8_lossy(&raw).into_owned(),
            };
            self.apply_entry(&ctx, &mut entry, &raw, &mut written, &mut dir_times)?;
        }
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
    fn ensure_dir(&self, ctx: &Ctx, comps: &[&[u8]]) -> Result<OwnedFd> {
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
            return self.whiteout(ctx, parents, target, written);
        }

        let kind = entry.header().entry_type();
        let parent = self.ensure_dir(ctx, parents)?;
        let name_os = OsStr::from_bytes(name);
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
            Ok(_) => remove_all_at(parent.as_fd(), name_os, self.privileged)
                .map_err(|e| ctx.errno("remove existing entry", e))?,
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
                let fd = rustix::fs::openat(
                    &parent,
                    name_os,
                    OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::WRONLY
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from(0o600),
                )
                .map_err(|e| ctx.errno("create file", e))?;
                let mut f = File::from(fd);
                std::io::copy(entry, &mut f).map_err(|e| ctx.err(format!("write file: {e}")))?;
                self.set_meta_fd(ctx, f.as_fd(), uid, gid, mode, &xattrs)?;
                rustix::fs::futimens(&f, &ts).map_err(|e| ctx.errno("set mtime", e))?;
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
        written.insert(rel);
        Ok(())
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
