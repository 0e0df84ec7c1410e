//! One-call verification from command-line style inputs (files, hex nonce, time text), so the
//! CLI's `microbox attest verify` stays a thin wrapper.

use crate::policy::{Freshness, Policy};
use crate::vek::VekSource;
use crate::verify::{verify, Report, VerifyRequest};
use crate::{read_file, Error, Result};
use std::path::PathBuf;
use std::time::SystemTime;

/// What `microbox attest verify` receives.
#[derive(Debug, Clone, Default)]
pub struct VerifyInputs {
    /// The raw report file (1184 bytes).
    pub report: PathBuf,
    /// VCEK/VLEK file (DER or PEM). Takes precedence over every other source.
    pub vek: Option<PathBuf>,
    /// Certificate table of an extended report (used when `vek` is not given).
    pub cert_table: Option<PathBuf>,
    /// ASK/ASVK file to use when none is pinned (Milan ASVK); checked against the pinned ARK.
    pub intermediate: Option<PathBuf>,
    /// Policy TOML; `None` = strict default.
    pub policy: Option<PathBuf>,
    /// The verifier's nonce as hex.
    pub nonce_hex: Option<String>,
    /// Public key file bound into REPORT_DATA together with the nonce.
    pub public_key: Option<PathBuf>,
    /// Time to check certificate validity at (RFC 3339 or YYYY-MM-DD); `None` = now.
    pub at: Option<String>,
    /// VCEK cache directory; `None` = [`default_cache_dir`].
    pub cache_dir: Option<PathBuf>,
    /// Never touch the network: only the cache (when no file/table is given).
    pub offline: bool,
}

/// `$XDG_CACHE_HOME/microbox/vcek`, else `$HOME/.cache/microbox/vcek`, else `/var/cache/microbox/vcek`.
pub fn default_cache_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("microbox/vcek");
    }
    if let Some(h) = std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(h).join(".cache/microbox/vcek");
    }
    PathBuf::from("/var/cache/microbox/vcek")
}

/// Parses a hex nonce (optional `0x`, whitespace ignored); at least 8 bytes.
pub fn parse_nonce(hex_text: &str) -> Result<Vec<u8>> {
    let t: String = hex_text.split_whitespace().collect();
    let t = t.trim_start_matches("0x");
    let b = hex::decode(t).map_err(|e| {
        Error::Report(format!(
            "nonce `{hex_text}` is not hex ({e}); expected an even number of hex digits"
        ))
    })?;
    if b.len() < 8 {
        return Err(Error::Report(format!(
            "nonce has {} bytes; a freshness nonce needs at least 8 (16 or more recommended)",
            b.len()
        )));
    }
    Ok(b)
}

/// Reads every input, then runs [`verify()`]. Errors only for unreadable/malformed inputs;
/// a report that fails verification is an `Ok(Report)` with a failing verdict.
pub fn verify_inputs(i: &VerifyInputs) -> Result<Report> {
    let report = read_file(&i.report)?;
    let policy = match &i.policy {
        Some(p) => Policy::from_file(p)?,
        None => Policy::default(),
    };
    let freshness = match &i.nonce_hex {
        Some(n) => Some(Freshness {
            nonce: parse_nonce(n)?,
            public_key: i.public_key.as_deref().map(read_file).transpose()?,
        }),
        None if i.public_key.is_some() => {
            return Err(Error::Report(
                "a public key was given without a nonce; freshness needs the nonce".into(),
            ))
        }
        None => None,
    };
    let at = match &i.at {
        Some(t) => crate::parse_time(t)?,
        None => SystemTime::now(),
    };
    let cache = i.cache_dir.clone().unwrap_or_else(default_cache_dir);
    let vek = if let Some(f) = &i.vek {
        VekSource::File(f.clone())
    } else if let Some(t) = &i.cert_table {
        VekSource::CertTable(read_file(t)?)
    } else if i.offline {
        VekSource::Cache(cache)
    } else {
        VekSource::Kds {
            cache_dir: Some(cache),
        }
    };
    let intermediate = i.intermediate.as_deref().map(read_file).transpose()?;
    Ok(verify(&VerifyRequest {
        report: &report,
        vek,
        intermediate,
        policy: &policy,
        freshness: freshness.as_ref(),
        at,
    }))
}
