//! microbox-attest: AMD SEV-SNP attestation for microbox.
//!
//! This crate owns everything the host needs to judge SEV-SNP evidence and to predict it:
//! - [`verify()`]: parse a raw attestation report (versions 2 to 5), pick the product
//!   (Milan, Genoa, Turin), verify VCEK/VLEK -> ASK/ASVK -> ARK against pinned AMD roots,
//!   verify the report signature over the raw signed bytes, match the endorsement key's
//!   X.509 extensions to the report, check validity dates and apply a [`Policy`].
//! - [`Policy`]: the verifier's TOML policy with a strict default.
//! - [`vek`]: where the VCEK/VLEK comes from (file, extended-report certificate table, cache,
//!   AMD KDS).
//! - [`measure()`]: the expected SNP launch digest of a QEMU direct-boot guest.
//!
//! Nothing here needs SEV-SNP hardware; the guest side (reading reports) lives in the agent.

mod certs;
mod inputs;
pub mod measure;
mod policy;
mod product;
mod report;
pub mod vek;
mod verify;

pub use certs::{parse_time, verify_vek_chain, VekExtensions, VekKind};
pub use inputs::{default_cache_dir, parse_nonce, verify_inputs, VerifyInputs};
pub use measure::{measure, measure_with, vcpu_signature, MeasureParams};
pub use policy::{Freshness, HashAlgo, Policy};
pub use product::Product;
pub use report::{SigningKey, SnpReport, Tcb};
pub use vek::VekSource;
pub use verify::{verify, verify_report_signature, Check, Report, Status, Verdict, VerifyRequest};

use std::path::PathBuf;

/// Errors of this crate. Each names the input (file, field, certificate) that was wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The attestation report bytes are not a usable SNP report.
    #[error("attestation report: {0}")]
    Report(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// A certificate could not be parsed or is not the expected kind.
    #[error("certificate {what}: {reason}")]
    Cert {
        /// Which certificate (e.g. "VCEK from /tmp/vcek.der").
        what: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The extended-report certificate table is malformed.
    #[error("certificate table: {0}")]
    CertTable(String),
    /// A policy field has the wrong type or value.
    #[error("policy field `{field}`: {reason}; expected {expected}")]
    Policy {
        /// The TOML key.
        field: String,
        /// What was found.
        reason: String,
        /// The accepted form.
        expected: String,
    },
    /// The policy file is not TOML at all.
    #[error("policy is not valid TOML: {0}")]
    PolicyToml(String),
    /// No endorsement key certificate is available from the chosen source.
    #[error("no {what} available: {hint}")]
    NoVek {
        /// "VCEK" or "VLEK".
        what: String,
        /// How to provide one.
        hint: String,
    },
    /// Fetching from AMD's Key Distribution Service failed.
    #[error("fetching {url}: {reason}")]
    Fetch {
        /// The KDS URL.
        url: String,
        /// Why it failed (offline, HTTP error, ...).
        reason: String,
    },
    /// The OVMF firmware image lacks what an SNP launch needs.
    #[error("OVMF {path}: {reason}")]
    Ovmf {
        /// The firmware file.
        path: PathBuf,
        /// What is missing or malformed.
        reason: String,
    },
    /// A time argument could not be parsed.
    #[error("time {0}")]
    Time(String),
    /// Launch-measurement input is invalid (vCPU type, count, ...).
    #[error("measurement input: {0}")]
    Measure(String),
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn read_file(path: &std::path::Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}
