//! Image references, parsed as Docker does (`alpine` is `docker.io/library/alpine:latest`),
//! and the policy for which registries may be reached over plain HTTP.

use std::fmt;
use std::net::IpAddr;

use oci_client::{ParseError, Reference};

use crate::error::{Error, Result};

/// A parsed, normalized image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    inner: Reference,
}

impl ImageRef {
    /// Parses `input` like Docker: default registry `docker.io`, default namespace `library/`,
    /// default tag `latest`, optional `@sha256:...` digest.
    pub fn parse(input: &str) -> Result<ImageRef> {
        let bad = |reason: &str| Error::InvalidReference {
            input: input.to_string(),
            reason: reason.to_string(),
        };
        if input.is_empty() {
            return Err(bad("empty reference"));
        }
        if input.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad("contains whitespace or control characters"));
        }
        if let Some((_, d)) = input.split_once('@') {
            match d.split_once(':') {
                Some(("sha256", hex)) if hex.len() != 64 => {
                    return Err(bad(&format!(
                        "sha256 digest must have 64 hex characters, got {}",
                        hex.len()
                    )))
                }
                Some(("sha256", hex))
                    if !hex
                        .bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) =>
                {
                    return Err(bad("sha256 digest must be lowercase hex"))
                }
                Some(("sha256", _)) => {}
                Some((alg, _)) => {
                    return Err(bad(&format!(
                        "unsupported digest algorithm {alg:?} (only sha256)"
                    )))
                }
                None => return Err(bad("digest after '@' must look like sha256:<64 hex>")),
            }
        }
        let inner: Reference = input.parse().map_err(|e: ParseError| {
            let reason = match e {
                ParseError::NameContainsUppercase => {
                    "repository name must be lowercase".to_string()
                }
                ParseError::TagInvalidFormat => {
                    "tag must match [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}".to_string()
                }
                ParseError::ReferenceInvalidFormat => {
                    "expected [host[:port]/]name[:tag][@sha256:digest] with a lowercase name"
                        .to_string()
                }
                other => other.to_string(),
            };
            bad(&reason)
        })?;
        Ok(ImageRef { inner })
    }

    /// Registry host (and port) as written, e.g. `docker.io`, `127.0.0.1:5000`.
    pub fn registry(&self) -> &str {
        self.inner.registry()
    }

    /// Repository path, e.g. `library/alpine`.
    pub fn repository(&self) -> &str {
        self.inner.repository()
    }

    /// Tag, if any (`latest` is filled in when neither tag nor digest was given).
    pub fn tag(&self) -> Option<&str> {
        self.inner.tag()
    }

    /// Digest, if the reference pins one.
    pub fn digest(&self) -> Option<&str> {
        self.inner.digest()
    }

    /// The oci-client reference.
    pub fn oci(&self) -> &Reference {
        &self.inner
    }

    /// Same repository, pinned to `digest`.
    pub fn with_digest(&self, digest: &str) -> Reference {
        Reference::with_digest(
            self.registry().to_string(),
            self.repository().to_string(),
            digest.to_string(),
        )
    }

    /// Whether plain HTTP may be used for this reference's registry.
    pub fn allows_plain_http(&self) -> bool {
        allows_plain_http(
            self.registry(),
            std::env::var("MICROBOX_INSECURE_REGISTRIES")
                .ok()
                .as_deref(),
        )
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.inner.whole())
    }
}

/// Plain HTTP is allowed for loopback registries and those listed (comma or space separated,
/// `host[:port]`) in `insecure_list` (the value of `MICROBOX_INSECURE_REGISTRIES`).
pub fn allows_plain_http(registry: &str, insecure_list: Option<&str>) -> bool {
    if let Some(list) = insecure_list {
        if list
            .split(|c: char| c == ',' || c.is_whitespace())
            .any(|r| !r.is_empty() && r == registry)
        {
            return true;
        }
    }
    let host = host_of(registry);
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    match host.parse::<IpAddr>() {
        Ok(IpAddr::V4(v4)) => v4.octets()[0] == 127,
        Ok(IpAddr::V6(v6)) => v6.is_loopback(),
        Err(_) => false,
    }
}

/// `host` of `host`, `host:port`, `[v6]:port`.
fn host_of(registry: &str) -> &str {
    if let Some(rest) = registry.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match registry.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => registry,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_defaults() {
        let r = ImageRef::parse("alpine").unwrap();
        assert_eq!(r.to_string(), "docker.io/library/alpine:latest");
        let r = ImageRef::parse("user/app:1.2").unwrap();
        assert_eq!(r.to_string(), "docker.io/user/app:1.2");
        let r = ImageRef::parse("127.0.0.1:5000/a/b:tag").unwrap();
        assert_eq!(r.registry(), "127.0.0.1:5000");
        assert_eq!(r.repository(), "a/b");
        assert_eq!(r.tag(), Some("tag"));
        let d = format!("sha256:{}", "a".repeat(64));
        let r = ImageRef::parse(&format!("ghcr.io/x/y@{d}")).unwrap();
        assert_eq!(r.digest(), Some(d.as_str()));
        assert_eq!(r.to_string(), format!("ghcr.io/x/y@{d}"));
        let r = ImageRef::parse("localhost/x").unwrap();
        assert_eq!(r.registry(), "localhost");
    }

    #[test]
    fn malformed_references_name_input_and_problem() {
        for (input, needle) in [
            ("", "empty"),
            ("Alpine", "lowercase"),
            ("alpine:", "expected"),
            ("a b", "whitespace"),
            ("x@sha256:abc", "64 hex"),
            ("x@md5:abc", "unsupported digest algorithm"),
            ("x@sha256", "sha256:<64 hex>"),
            ("x:bad/tag!", "expected"),
        ] {
            let err = ImageRef::parse(input).unwrap_err().to_string();
            assert!(err.contains(&format!("{input:?}")), "{err}");
            assert!(err.contains(needle), "{input}: {err}");
        }
    }

    #[test]
    fn plain_http_policy() {
        assert!(allows_plain_http("localhost:5000", None));
        assert!(allows_plain_http("127.0.0.1:5000", None));
        assert!(allows_plain_http("127.9.9.9", None));
        assert!(allows_plain_http("[::1]:5000", None));
        assert!(!allows_plain_http("docker.io", None));
        assert!(!allows_plain_http("10.0.0.1:5000", None));
        assert!(!allows_plain_http("localhost.evil.com", None));
        assert!(allows_plain_http(
            "10.0.0.1:5000",
            Some("a.b, 10.0.0.1:5000")
        ));
        assert!(!allows_plain_http("10.0.0.1", Some("10.0.0.1:5000")));
    }
}
