//! Named volumes: directories under `$MICROBOX_ROOT/volumes/<name>/_data`, shared into boxes
//! through virtio-fs like bind mounts. `-v NAME:/path` uses (and, like Docker, creates) one.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::Ctx;
use crate::boxes::now_rfc3339;
use crate::cli::Format;
use crate::UserError;

#[derive(Debug, Serialize, Deserialize)]
pub struct VolumeInfo {
    pub name: String,
    pub mountpoint: PathBuf,
    pub created_at: String,
}

fn volumes_dir(root: &Path) -> PathBuf {
    root.join("volumes")
}

/// A volume name: Docker's rule, `[a-zA-Z0-9][a-zA-Z0-9_.-]*`.
pub fn is_volume_name(s: &str) -> bool {
    crate::boxes::validate_name(s).is_ok()
}

fn info_path(root: &Path, name: &str) -> PathBuf {
    volumes_dir(root).join(name).join("volume.json")
}

pub fn load(root: &Path, name: &str) -> Result<Option<VolumeInfo>> {
    match std::fs::read(info_path(root, name)) {
        Ok(b) => {
            Ok(Some(serde_json::from_slice(&b).with_context(|| {
                format!("volume '{name}': damaged volume.json")
            })?))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Creates the volume if needed and returns it.
pub fn ensure(root: &Path, name: &str) -> Result<VolumeInfo> {
    crate::boxes::validate_name(name)?;
    if let Some(v) = load(root, name)? {
        return Ok(v);
    }
    let dir = volumes_dir(root).join(name);
    let data = dir.join("_data");
    std::fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;
    let info = VolumeInfo {
        name: name.to_string(),
        mountpoint: data,
        created_at: now_rfc3339(),
    };
    let tmp = dir.join("volume.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&info)?)?;
    std::fs::rename(&tmp, info_path(root, name))?;
    Ok(info)
}

pub fn create(ctx: &Ctx, name: &str) -> Result<()> {
    let v = ensure(&ctx.root, name)?;
    println!("{}", v.name);
    Ok(())
}

pub fn list(ctx: &Ctx, format: Format) -> Result<()> {
    let mut vols = Vec::new();
    if let Ok(entries) = std::fs::read_dir(volumes_dir(&ctx.root)) {
        for e in entries.flatten() {
            if let Some(name) = e.file_name().to_str() {
                if let Some(v) = load(&ctx.root, name)? {
                    vols.push(v);
                }
            }
        }
    }
    vols.sort_by(|a, b| a.name.cmp(&b.name));
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&vols)?),
        Format::Table => {
            println!("{:<30}  MOUNTPOINT", "VOLUME NAME");
            for v in vols {
                println!("{:<30}  {}", v.name, v.mountpoint.display());
            }
        }
    }
    Ok(())
}

pub fn inspect(ctx: &Ctx, name: &str) -> Result<()> {
    let v = load(&ctx.root, name)?.ok_or_else(|| {
        UserError::new(format!("no such volume '{name}' (see: microbox volume ls)"))
    })?;
    println!("{}", serde_json::to_string_pretty(&[v])?);
    Ok(())
}

pub fn remove(ctx: &Ctx, names: &[String]) -> Result<()> {
    let store = ctx.boxes()?;
    for name in names {
        let v = load(&ctx.root, name)?.ok_or_else(|| {
            UserError::new(format!("no such volume '{name}' (see: microbox volume ls)"))
        })?;
        if let Some(user) = store
            .list()?
            .iter()
            .find(|r| r.config.volumes.iter().any(|m| m.host == v.mountpoint))
        {
            return Err(UserError::new(format!(
                "volume '{name}' is used by box '{}' (remove it first: microbox rm {})",
                user.name, user.name
            ))
            .into());
        }
        let dir = volumes_dir(&ctx.root).join(name);
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        println!("{name}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ensure_is_idempotent_and_names_are_checked() {
        let tmp = tempfile::tempdir().unwrap();
        let a = ensure(tmp.path(), "data").unwrap();
        std::fs::write(a.mountpoint.join("f"), "x").unwrap();
        let b = ensure(tmp.path(), "data").unwrap();
        assert_eq!(a.mountpoint, b.mountpoint);
        assert!(b.mountpoint.join("f").exists());
        assert!(ensure(tmp.path(), "../evil").is_err());
        assert!(is_volume_name("data-1") && !is_volume_name("/abs"));
    }
}
