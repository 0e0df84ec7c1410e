//! The JSON documents of OCI/Docker images (manifest, index, config), parsed strictly enough
//! that a hostile registry cannot smuggle a bad digest into a file path.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const ACCEPTED: &[&str] = &[OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST];
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

const LAYER_TYPES: &[&str] = &[
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Platform {
    pub fn parse(s: &str) -> Result<Platform> {
        let parts: Vec<&str> = s.split('/').collect();
        let bad = || Error::InvalidPlatform {
            input: s.to_string(),
        };
        match parts.as_slice() {
            [os, arch] if !os.is_empty() && !arch.is_empty() => Ok(Platform {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: None,
            }),
            [os, arch, v] if !os.is_empty() && !arch.is_empty() && !v.is_empty() => Ok(Platform {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: Some(v.to_string()),
            }),
            _ => Err(bad()),
        }
    }

    pub fn host() -> Platform {
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" => "ppc64le",
            other => other,
        };
        let variant = (arch == "arm64").then(|| "v8".to_string());
        Platform {
            os: "linux".into(),
            architecture: arch.into(),
            variant,
        }
    }

    /// Whether an index entry's platform satisfies this wanted one (a missing variant on
    /// either side matches; arm64's default variant is v8).
    pub fn matches(&self, other: &Platform) -> bool {
        self.os == other.os
            && self.architecture == other.architecture
            && match (&self.variant, &other.variant) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Descriptor {
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    #[serde(rename = "mediaType", default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Index {
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    #[serde(rename = "mediaType", default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub manifests: Vec<Descriptor>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ImageConfig {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub variant: Option<String>,
    #[serde(default)]
    pub config: Option<RunConfig>,
    pub rootfs: RootFs,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RunConfig {
    #[serde(default)]
    pub env: Option<Vec<String>>,
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    #[serde(default)]
    pub working_dir: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub exposed_ports: Option<BTreeMap<String, serde_json::Value>>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RootFs {
    #[serde(rename = "type")]
    pub kind: String,
    pub diff_ids: Vec<String>,
}

/// `sha256:` + 64 lowercase hex, or an error naming `field` of `what`.
pub fn check_digest(what: &str, field: &str, digest: &str) -> Result<()> {
    let ok = digest.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    });
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidDocument {
            what: what.to_string(),
            digest: String::new(),
            reason: format!("{field}: {digest:?} is not sha256:<64 lowercase hex>"),
        })
    }
}

fn invalid(what: &str, digest: &str, reason: String) -> Error {
    Error::InvalidDocument {
        what: what.into(),
        digest: digest.into(),
        reason,
    }
}

fn with_digest(e: Error, digest: &str) -> Error {
    match e {
        Error::InvalidDocument { what, reason, .. } => invalid(&what, digest, reason),
        other => other,
    }
}

/// Kind of a manifest document, from its own mediaType or the HTTP content type.
pub fn is_index(bytes: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct Probe {
        #[serde(rename = "mediaType", default)]
        media_type: Option<String>,
        #[serde(default)]
        manifests: Option<serde_json::Value>,
    }
    match serde_json::from_slice::<Probe>(bytes) {
        Ok(p) => {
            matches!(p.media_type.as_deref(), Some(OCI_INDEX) | Some(DOCKER_LIST))
                || (p.media_type.is_none() && p.manifests.is_some())
        }
        Err(_) => false,
    }
}

pub fn parse_index(bytes: &[u8], digest: &str) -> Result<Index> {
    let idx: Index =
        serde_json::from_slice(bytes).map_err(|e| invalid("image index", digest, e.to_string()))?;
    if idx.schema_version != 2 {
        return Err(invalid(
            "image index",
            digest,
            format!("schemaVersion: expected 2, got {}", idx.schema_version),
        ));
    }
    for (i, m) in idx.manifests.iter().enumerate() {
        check_digest("image index", &format!("manifests[{i}].digest"), &m.digest)
            .map_err(|e| with_digest(e, digest))?;
    }
    Ok(idx)
}

pub fn parse_manifest(bytes: &[u8], digest: &str) -> Result<Manifest> {
    let m: Manifest =
        serde_json::from_slice(bytes).map_err(|e| invalid("manifest", digest, e.to_string()))?;
    if m.schema_version != 2 {
        return Err(invalid(
            "manifest",
            digest,
            format!(
                "schemaVersion: expected 2, got {} (schema 1 is not supported)",
                m.schema_version
            ),
        ));
    }
    check_digest("manifest", "config.digest", &m.config.digest)
        .map_err(|e| with_digest(e, digest))?;
    for (i, l) in m.layers.iter().enumerate() {
        check_digest("manifest", &format!("layers[{i}].digest"), &l.digest)
            .map_err(|e| with_digest(e, digest))?;
        if !LAYER_TYPES.contains(&l.media_type.as_str()) {
            return Err(invalid(
                "manifest",
                digest,
                format!("layers[{i}].mediaType: unsupported {:?}", l.media_type),
            ));
        }
    }
    Ok(m)
}

pub fn parse_config(bytes: &[u8], digest: &str, layers: usize) -> Result<ImageConfig> {
    let c: ImageConfig = serde_json::from_slice(bytes)
        .map_err(|e| invalid("image config", digest, e.to_string()))?;
    if c.rootfs.kind != "layers" {
        return Err(invalid(
            "image config",
            digest,
            format!("rootfs.type: expected \"layers\", got {:?}", c.rootfs.kind),
        ));
    }
    if c.rootfs.diff_ids.len() != layers {
        return Err(invalid(
            "image config",
            digest,
            format!(
                "rootfs.diff_ids: {} entries but the manifest has {layers} layers",
                c.rootfs.diff_ids.len()
            ),
        ));
    }
    for (i, d) in c.rootfs.diff_ids.iter().enumerate() {
        check_digest("image config", &format!("rootfs.diff_ids[{i}]"), d)
            .map_err(|e| with_digest(e, digest))?;
    }
    Ok(c)
}

pub fn sha256_digest(bytes: &[u8]) -> String {
    use sha2::Digest;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platform_parse_and_match() {
        let p = Platform::parse("linux/arm64/v8").unwrap();
        assert_eq!(p.to_string(), "linux/arm64/v8");
        assert!(p.matches(&Platform::parse("linux/arm64").unwrap()));
        assert!(!p.matches(&Platform::parse("linux/amd64").unwrap()));
        assert!(Platform::parse("linux").is_err());
        assert!(Platform::parse("linux//").is_err());
    }

    #[test]
    fn hostile_digests_are_refused_with_field() {
        let m = br#"{"schemaVersion":2,"config":{"mediaType":"x","digest":"sha256:../../etc","size":1},"layers":[]}"#;
        let e = parse_manifest(m, "sha256:abc").unwrap_err().to_string();
        assert!(
            e.contains("config.digest") && e.contains("sha256:abc"),
            "{e}"
        );
    }

    #[test]
    fn config_layer_count_must_match() {
        let c = br#"{"rootfs":{"type":"layers","diff_ids":[]}}"#;
        let e = parse_config(c, "sha256:c", 1).unwrap_err().to_string();
        assert!(e.contains("rootfs.diff_ids"), "{e}");
    }
}
