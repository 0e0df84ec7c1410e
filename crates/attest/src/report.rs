//! The raw SEV-SNP attestation report: length/version checks, field access by offset, and
//! typed parsing through the `sev` crate.
//!
//! The signature is always verified over the raw bytes kept here (offsets 0..0x2A0), never over
//! a re-encoding, so reserved bytes are covered too.

use crate::product::Product;
use crate::{Error, Result};
use serde::Serialize;
use sev::firmware::guest::AttestationReport;
use sev::parser::ByteParser;
use std::fmt;

/// Size of every SNP attestation report (versions 2 to 5).
pub const REPORT_LEN: usize = 1184;
/// End of the signed area; the ECDSA signature starts here.
pub const SIGNED_LEN: usize = 0x2A0;

const OFF_POLICY: usize = 0x08;
const OFF_VMPL: usize = 0x30;
const OFF_SIG_ALGO: usize = 0x34;
const OFF_CURRENT_TCB: usize = 0x38;
const OFF_KEY_INFO: usize = 0x48;
const OFF_REPORT_DATA: usize = 0x50;
const OFF_MEASUREMENT: usize = 0x90;
const OFF_HOST_DATA: usize = 0xC0;
const OFF_REPORTED_TCB: usize = 0x180;
const OFF_CPUID_FAM: usize = 0x188;
const OFF_CPUID_MOD: usize = 0x189;
const OFF_CHIP_ID: usize = 0x1A0;

/// A TCB version as AMD encodes SPLs in VEK certificates and KDS URLs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
pub struct Tcb {
    /// FMC SPL (Turin and later only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fmc: Option<u8>,
    /// PSP bootloader SPL.
    pub bootloader: u8,
    /// PSP OS (TEE) SPL.
    pub tee: u8,
    /// SNP firmware SPL.
    pub snp: u8,
    /// Microcode SPL.
    pub microcode: u8,
}

impl Tcb {
    /// Decodes the 8-byte TCB_VERSION with the product's layout.
    pub fn from_bytes(b: &[u8; 8], product: Product) -> Tcb {
        if product.is_turin_like() {
            Tcb {
                fmc: Some(b[0]),
                bootloader: b[1],
                tee: b[2],
                snp: b[3],
                microcode: b[7],
            }
        } else {
            Tcb {
                fmc: None,
                bootloader: b[0],
                tee: b[1],
                snp: b[6],
                microcode: b[7],
            }
        }
    }

    /// True when every component is >= the corresponding one in `min` (FMC only if both have it).
    pub fn at_least(&self, min: &Tcb) -> bool {
        let fmc_ok = match (self.fmc, min.fmc) {
            (Some(a), Some(b)) => a >= b,
            (None, Some(b)) => b == 0,
            _ => true,
        };
        fmc_ok
            && self.bootloader >= min.bootloader
            && self.tee >= min.tee
            && self.snp >= min.snp
            && self.microcode >= min.microcode
    }
}

impl fmt::Display for Tcb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(fmc) = self.fmc {
            write!(f, "fmc={fmc} ")?;
        }
        write!(
            f,
            "bl={} tee={} snp={} ucode={}",
            self.bootloader, self.tee, self.snp, self.microcode
        )
    }
}

/// Which key signed the report (KEY_INFO.SIGNING_KEY).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum SigningKey {
    /// Versioned Chip Endorsement Key (per chip, derived from fuses and TCB).
    Vcek,
    /// Versioned Loaded Endorsement Key (per cloud provider, loaded by the host).
    Vlek,
    /// The report is unsigned (SIGNING_KEY = 7).
    None,
}

/// A parsed attestation report that keeps its raw bytes.
#[derive(Clone)]
pub struct SnpReport {
    raw: Vec<u8>,
    parsed: AttestationReport,
}

impl fmt::Debug for SnpReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SnpReport")
            .field("version", &self.version())
            .field("measurement", &hex::encode(self.measurement()))
            .finish()
    }
}

fn le_u32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

impl SnpReport {
    /// Parses a raw report. Accepts exactly 1184 bytes, versions 2 to 5 and the
    /// ECDSA P-384/SHA-384 signature algorithm.
    pub fn from_bytes(raw: &[u8]) -> Result<SnpReport> {
        if raw.len() != REPORT_LEN {
            return Err(Error::Report(format!(
                "{} bytes; an SNP report is exactly {REPORT_LEN} bytes",
                raw.len()
            )));
        }
        let version = le_u32(raw, 0);
        if !(2..=5).contains(&version) {
            return Err(Error::Report(format!(
                "version {version} is not supported (expected 2 to 5)"
            )));
        }
        let sig_algo = le_u32(raw, OFF_SIG_ALGO);
        if sig_algo != 1 {
            return Err(Error::Report(format!(
                "signature algorithm {sig_algo} is not supported (expected 1 = ECDSA P-384 with SHA-384)"
            )));
        }
        // The sev crate guesses the TCB layout of v2 reports from CHIP_ID and refuses a masked
        // (all-zero) CHIP_ID. v2 predates Turin, so parse a copy with a placeholder CHIP_ID
        // that selects the legacy layout; CHIP_ID itself is always read from the raw bytes.
        let mut for_crate = raw.to_vec();
        if version == 2 && raw[OFF_CHIP_ID..OFF_CHIP_ID + 64].iter().all(|&b| b == 0) {
            for_crate[OFF_CHIP_ID..OFF_CHIP_ID + 64].fill(0xff);
        }
        let parsed = AttestationReport::from_bytes(&for_crate)
            .map_err(|e| Error::Report(format!("sev crate rejects the report: {e}")))?;
        Ok(SnpReport {
            raw: raw.to_vec(),
            parsed,
        })
    }

    /// The raw report bytes.
    pub fn raw(&self) -> &[u8] {
        &self.raw
    }

    /// The bytes the signature covers.
    pub fn signed_bytes(&self) -> &[u8] {
        &self.raw[..SIGNED_LEN]
    }

    /// The typed view from the `sev` crate.
    pub fn parsed(&self) -> &AttestationReport {
        &self.parsed
    }

    /// Report format version (2 to 5).
    pub fn version(&self) -> u32 {
        le_u32(&self.raw, 0)
    }

    /// Guest policy bits.
    pub fn policy(&self) -> u64 {
        le_u64(&self.raw, OFF_POLICY)
    }

    /// POLICY.DEBUG (bit 19).
    pub fn debug_allowed(&self) -> bool {
        self.parsed.policy.debug_allowed()
    }

    /// POLICY.MIGRATE_MA (bit 18).
    pub fn migrate_ma_allowed(&self) -> bool {
        self.parsed.policy.migrate_ma_allowed()
    }

    /// VMPL that requested the report.
    pub fn vmpl(&self) -> u32 {
        le_u32(&self.raw, OFF_VMPL)
    }

    /// Which key signed the report.
    pub fn signing_key(&self) -> Result<SigningKey> {
        let key_info = le_u32(&self.raw, OFF_KEY_INFO);
        if key_info & 0x2 != 0 {
            // MASK_CHIP_KEY: the firmware wrote zeros instead of a signature.
            return Ok(SigningKey::None);
        }
        match (key_info >> 2) & 0x7 {
            0 => Ok(SigningKey::Vcek),
            1 => Ok(SigningKey::Vlek),
            7 => Ok(SigningKey::None),
            other => Err(Error::Report(format!(
                "KEY_INFO.SIGNING_KEY = {other} is reserved (expected 0 = VCEK, 1 = VLEK, 7 = none)"
            ))),
        }
    }

    /// REPORT_DATA (64 bytes chosen by the guest).
    pub fn report_data(&self) -> &[u8] {
        &self.raw[OFF_REPORT_DATA..OFF_REPORT_DATA + 64]
    }

    /// MEASUREMENT (launch digest).
    pub fn measurement(&self) -> &[u8] {
        &self.raw[OFF_MEASUREMENT..OFF_MEASUREMENT + 48]
    }

    /// HOST_DATA (32 bytes set by the host at launch).
    pub fn host_data(&self) -> &[u8] {
        &self.raw[OFF_HOST_DATA..OFF_HOST_DATA + 32]
    }

    /// CHIP_ID (all zero when MaskChipId is set).
    pub fn chip_id(&self) -> &[u8] {
        &self.raw[OFF_CHIP_ID..OFF_CHIP_ID + 64]
    }

    /// True when CHIP_ID is masked (all zero).
    pub fn chip_id_masked(&self) -> bool {
        self.chip_id().iter().all(|&b| b == 0)
    }

    /// Product from the CPUID fields; `None` for v2 reports (no CPUID fields) or unknown CPUs.
    pub fn cpuid_product(&self) -> Option<Product> {
        if self.version() < 3 {
            return None;
        }
        Product::from_cpuid(self.raw[OFF_CPUID_FAM], self.raw[OFF_CPUID_MOD])
    }

    /// CPUID family/model bytes as found (v3+).
    pub fn cpuid_family_model(&self) -> Option<(u8, u8)> {
        (self.version() >= 3).then(|| (self.raw[OFF_CPUID_FAM], self.raw[OFF_CPUID_MOD]))
    }

    fn tcb_at(&self, off: usize, product: Product) -> Tcb {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.raw[off..off + 8]);
        Tcb::from_bytes(&b, product)
    }

    /// REPORTED_TCB: the TCB the VEK was derived for (the one to check the VEK against).
    pub fn reported_tcb(&self, product: Product) -> Tcb {
        self.tcb_at(OFF_REPORTED_TCB, product)
    }

    /// CURRENT_TCB: what the platform currently runs (may be newer than REPORTED_TCB).
    pub fn current_tcb(&self, product: Product) -> Tcb {
        self.tcb_at(OFF_CURRENT_TCB, product)
    }

    /// The signature as (r, s) big-endian 48-byte scalars. Errors if the little-endian 72-byte
    /// fields carry bits above 384.
    pub fn signature_rs(&self) -> Result<([u8; 48], [u8; 48])> {
        let sig = &self.raw[SIGNED_LEN..SIGNED_LEN + 144];
        let conv = |le: &[u8], name: &str| -> Result<[u8; 48]> {
            if le[48..72].iter().any(|&b| b != 0) {
                return Err(Error::Report(format!(
                    "signature {name} has bits above 384; not a P-384 signature"
                )));
            }
            let mut be = [0u8; 48];
            for (i, b) in le[..48].iter().enumerate() {
                be[47 - i] = *b;
            }
            Ok(be)
        };
        Ok((conv(&sig[..72], "r")?, conv(&sig[72..144], "s")?))
    }
}
