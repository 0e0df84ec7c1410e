//! Registry credentials: `microbox login` writes `<root>/auth.json` (Docker's config.json
//! format, mode 0600); lookups read it first, then `$DOCKER_CONFIG/config.json` or
//! `~/.docker/config.json`. Credential helpers (`credsStore`) are not supported.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A username/password pair for HTTP basic auth (or token exchange).
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User name.
    pub username: String,
    /// Password or token.
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
    #[serde(flatten)]
    other: BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct AuthEntry {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    auth: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    password: Option<String>,
}

/// microbox's own credentials file under the store root.
pub fn auth_file(root: &Path) -> PathBuf {
    root.join("auth.json")
}

fn docker_config_file() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("DOCKER_CONFIG") {
        return Some(PathBuf::from(d).join("config.json"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json"))
}

/// Canonical key for a registry: Docker Hub's many spellings become `docker.io`; URL schemes
/// and paths are dropped.
fn canonical(registry: &str) -> String {
    let r = registry
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    let r = r.split('/').next().unwrap_or(r);
    match r {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            "docker.io".to_string()
        }
        other => other.to_string(),
    }
}

fn read_config(path: &Path) -> Result<Option<DockerConfig>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(Error::Auth {
                path: path.into(),
                reason: e.to_string(),
            })
        }
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| Error::Auth {
            path: path.into(),
            reason: format!("not a Docker config.json: {e}"),
        })
}

fn decode(path: &Path, key: &str, e: &AuthEntry) -> Result<Option<Credentials>> {
    if let (Some(u), Some(p)) = (&e.username, &e.password) {
        return Ok(Some(Credentials {
            username: u.clone(),
            password: p.clone(),
        }));
    }
    let Some(auth) = &e.auth else { return Ok(None) };
    let bad = |reason: String| Error::Auth {
        path: path.into(),
        reason: format!("auths.{key}.auth: {reason}"),
    };
    let raw = base64::engine::general_purpose::STANDARD
        .decode(auth.trim())
        .map_err(|e| bad(format!("not base64: {e}")))?;
    let s = String::from_utf8(raw).map_err(|_| bad("not UTF-8".into()))?;
    let (u, p) = s
        .split_once(':')
        .ok_or_else(|| bad("expected base64 of user:password".into()))?;
    Ok(Some(Credentials {
        username: u.to_string(),
        password: p.to_string(),
    }))
}

fn lookup_in(path: &Path, registry: &str) -> Result<Option<Credentials>> {
    let Some(cfg) = read_config(path)? else {
        return Ok(None);
    };
    let want = canonical(registry);
    for (key, entry) in &cfg.auths {
        if canonical(key) == want {
            if let Some(c) = decode(path, key, entry)? {
                return Ok(Some(c));
            }
        }
    }
    Ok(None)
}

/// Credentials for `registry` from `<root>/auth.json`, else the Docker config; `None` means
/// anonymous.
pub fn credentials_for(root: &Path, registry: &str) -> Result<Option<Credentials>> {
    if let Some(c) = lookup_in(&auth_file(root), registry)? {
        return Ok(Some(c));
    }
    match docker_config_file() {
        Some(p) => lookup_in(&p, registry),
        None => Ok(None),
    }
}

fn write_config(path: &Path, cfg: &DockerConfig) -> Result<()> {
    let io = |e: std::io::Error| Error::Auth {
        path: path.into(),
        reason: e.to_string(),
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io)?;
    let tmp = dir.join(format!(".auth.json.{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(&serde_json::to_vec_pretty(cfg).expect("serializable"))
        .and_then(|_| f.sync_all())
        .map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// Stores credentials for `registry` in `<root>/auth.json`.
pub fn login(root: &Path, registry: &str, creds: &Credentials) -> Result<()> {
    let path = auth_file(root);
    let mut cfg = read_config(&path)?.unwrap_or_default();
    let auth = base64::engine::general_purpose::STANDARD
        .encode(format!("{}:{}", creds.username, creds.password));
    cfg.auths.insert(
        canonical(registry),
        AuthEntry {
            auth: Some(auth),
            ..Default::default()
        },
    );
    write_config(&path, &cfg)
}

/// Forgets credentials for `registry`; returns whether there were any.
pub fn logout(root: &Path, registry: &str) -> Result<bool> {
    let path = auth_file(root);
    let Some(mut cfg) = read_config(&path)? else {
        return Ok(false);
    };
    let want = canonical(registry);
    let before = cfg.auths.len();
    cfg.auths.retain(|k, _| canonical(k) != want);
    let removed = cfg.auths.len() != before;
    if removed {
        write_config(&path, &cfg)?;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_lookup_logout_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let c = Credentials {
            username: "u".into(),
            password: "p:with:colons".into(),
        };
        login(dir.path(), "https://index.docker.io/v1/", &c).unwrap();
        let got = lookup_in(&auth_file(dir.path()), "docker.io").unwrap();
        assert_eq!(got, Some(c));
        let mode = std::fs::metadata(auth_file(dir.path())).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
            0o600
        );
        assert!(logout(dir.path(), "docker.io").unwrap());
        assert!(!logout(dir.path(), "docker.io").unwrap());
        assert_eq!(
            lookup_in(&auth_file(dir.path()), "docker.io").unwrap(),
            None
        );
    }

    #[test]
    fn bad_auth_field_names_file_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        std::fs::write(&p, r#"{"auths":{"r.example":{"auth":"!!!"}}}"#).unwrap();
        let err = lookup_in(&p, "r.example").unwrap_err().to_string();
        assert!(err.contains("auths.r.example.auth"), "{err}");
        assert!(err.contains("config.json"), "{err}");
    }
}
