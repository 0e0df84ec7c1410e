//! Resolves paths *inside* the box root from outside it (the agent itself is not chrooted).
//! Symbolic links in the image are hostile input: an absolute link target or `..` must stay
//! inside the box root, never reach the agent's own filesystem.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io;
use std::path::{Component, Path, PathBuf};

/// Linux's own limit on symbolic links followed during one lookup.
const MAX_SYMLINKS: usize = 40;

/// Maps `path` (absolute inside the box) to a host path under `root`, following symbolic links
/// as if `root` were `/`. With `follow_last` false a final symlink is returned as is.
/// Missing components are kept lexically (the caller's open/stat reports them).
pub fn resolve_in_root(root: &Path, path: &str, follow_last: bool) -> io::Result<PathBuf> {
    let mut pending: VecDeque<OsString> = components(Path::new(path));
    let mut resolved: Vec<OsString> = Vec::new();
    let mut links = 0usize;
    while let Some(comp) = pending.pop_front() {
        if comp == ".." {
            resolved.pop();
            continue;
        }
        let is_last = pending.is_empty();
        let mut candidate = root.to_path_buf();
        candidate.extend(&resolved);
        candidate.push(&comp);
        let meta = match std::fs::symlink_metadata(&candidate) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                resolved.push(comp);
                continue;
            }
            Err(e) => return Err(e),
        };
        if meta.file_type().is_symlink() && (follow_last || !is_last) {
            links += 1;
            if links > MAX_SYMLINKS {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("too many levels of symbolic links resolving {path}"),
                ));
            }
            let target = std::fs::read_link(&candidate)?;
            if target.is_absolute() {
                resolved.clear();
            }
            let mut rest = components(&target);
            rest.extend(pending.drain(..));
            pending = rest;
        } else {
            resolved.push(comp);
        }
    }
    let mut out = root.to_path_buf();
    out.extend(&resolved);
    Ok(out)
}

/// Normal and `..` components of `p` (root and `.` dropped).
fn components(p: &Path) -> VecDeque<OsString> {
    p.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn symlinks_stay_inside_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("usr/bin")).unwrap();
        std::fs::write(root.join("usr/bin/tool"), b"x").unwrap();
        symlink("/usr/bin", root.join("bin")).unwrap();
        symlink("/etc/passwd", root.join("evil")).unwrap();
        symlink("../../../../etc", root.join("usr/up")).unwrap();
        symlink("loop2", root.join("loop1")).unwrap();
        symlink("loop1", root.join("loop2")).unwrap();

        assert_eq!(
            resolve_in_root(root, "/bin/tool", true).unwrap(),
            root.join("usr/bin/tool")
        );
        // Absolute target: re-rooted, not the host's /etc/passwd.
        assert_eq!(
            resolve_in_root(root, "/evil", true).unwrap(),
            root.join("etc/passwd")
        );
        assert_eq!(
            resolve_in_root(root, "/evil", false).unwrap(),
            root.join("evil")
        );
        assert_eq!(
            resolve_in_root(root, "/usr/up/shadow", true).unwrap(),
            root.join("etc/shadow")
        );
        assert_eq!(
            resolve_in_root(root, "/../../x", true).unwrap(),
            root.join("x")
        );
        assert!(resolve_in_root(root, "/loop1", true).is_err());
        assert_eq!(
            resolve_in_root(root, "/missing/a", true).unwrap(),
            root.join("missing/a")
        );
    }
}
