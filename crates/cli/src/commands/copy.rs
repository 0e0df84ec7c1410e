//! `cp` between the host and a box, over the agent's streamed ReadFile/WriteFile.
//!
//! Out of a box: the agent sends a tar of the path (entries named after its last component),
//! which is hostile input: it is unpacked with the image crate's kernel-confined extractor
//! (openat2 RESOLVE_IN_ROOT) into a fresh temporary directory beside the destination, and only
//! then moved into place. Into a box: a regular file goes as raw bytes with its mode; a
//! directory goes as a tar whose top entry is named after the destination, unpacked by the agent
//! into the destination's parent (so `cp ./site web:/srv/www` makes /srv/www hold site's files).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use microbox_runtime::agent_client::{AgentClient, TransferFormat};

use crate::UserError;

pub async fn copy_out(sock: &Path, guest: &str, dst: &Path) -> Result<()> {
    let client = AgentClient::connect_unix(sock).await?;
    let mut tar = Vec::new();
    client
        .read_file_to(guest, TransferFormat::Tar, &mut tar)
        .await
        .with_context(|| format!("reading {guest} from the box"))?;
    let name = Path::new(guest)
        .file_name()
        .ok_or_else(|| {
            UserError::new(format!(
                "cannot copy '{guest}': name a file or directory, not /"
            ))
        })?
        .to_owned();
    let (parent, target) = if dst.is_dir() {
        (dst.to_path_buf(), dst.join(&name))
    } else {
        let parent = dst
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        (parent.to_path_buf(), dst.to_path_buf())
    };
    if target.symlink_metadata().is_ok() {
        return Err(UserError::new(format!(
            "{} already exists: remove it first",
            target.display()
        ))
        .into());
    }
    let staging = tempfile::Builder::new()
        .prefix(".microbox-cp-")
        .tempdir_in(&parent)
        .with_context(|| format!("creating a staging directory in {}", parent.display()))?;
    let extractor = microbox_image::extract::Extractor::open(staging.path())?;
    extractor
        .apply_layer(std::io::Cursor::new(tar), &format!("box:{guest}"))
        .with_context(|| format!("unpacking {guest}"))?;
    let unpacked: PathBuf = staging.path().join(&name);
    std::fs::rename(&unpacked, &target)
        .with_context(|| format!("moving {} into place", target.display()))?;
    Ok(())
}

pub async fn copy_in(sock: &Path, src: &Path, guest: &str) -> Result<()> {
    let meta = std::fs::metadata(src)
        .map_err(|e| UserError::new(format!("cannot read {}: {e}", src.display())))?;
    let client = AgentClient::connect_unix(sock).await?;
    if meta.is_file() {
        use std::os::unix::fs::PermissionsExt;
        let file = tokio::fs::File::open(src).await?;
        client
            .write_file_from(
                guest,
                TransferFormat::Raw,
                meta.permissions().mode() & 0o7777,
                true,
                file,
            )
            .await
            .with_context(|| format!("writing {guest} in the box"))?;
        return Ok(());
    }
    let guest_path = Path::new(guest);
    let (Some(name), Some(parent)) = (guest_path.file_name(), guest_path.parent()) else {
        return Err(UserError::new(format!("cannot copy a directory onto '{guest}'")).into());
    };
    let mut builder = tar::Builder::new(Vec::new());
    builder.follow_symlinks(false);
    builder
        .append_dir_all(name, src)
        .with_context(|| format!("archiving {}", src.display()))?;
    let data = builder.into_inner()?;
    client
        .write_file_from(
            &parent.to_string_lossy(),
            TransferFormat::Tar,
            0,
            true,
            std::io::Cursor::new(data),
        )
        .await
        .with_context(|| format!("unpacking into {} in the box", parent.display()))?;
    Ok(())
}
