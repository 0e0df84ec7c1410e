//! The verifier's policy (TOML) and freshness binding.
//!
//! Example (every key optional; omitted keys keep the strict default):
//! ```toml
//! allow_debug = false            # POLICY.DEBUG must be 0
//! allow_migration_agent = false  # POLICY.MIGRATE_MA must be 0
//! allowed_vmpls = [0]            # VMPL that requested the report
//! min_tcb = { bootloader = 3, tee = 0, snp = 8, microcode = 115 }  # fmc = N on Turin
//! measurements = ["<96 hex chars>"]  # any of these launch digests
//! host_data = "<64 hex chars>"
//! report_data_hash = "any"       # "sha384", "sha512" or "any" (freshness hash)
//! ```

use crate::report::Tcb;
use crate::{Error, Result};
use serde::Serialize;
use sha2::{Digest, Sha384, Sha512};
use std::path::Path;

/// Which hash binds the nonce (and public key) into REPORT_DATA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum HashAlgo {
    /// SHA-384, zero-padded to 64 bytes.
    Sha384,
    /// SHA-512 (exactly 64 bytes).
    Sha512,
}

impl HashAlgo {
    /// REPORT_DATA expected for `nonce` (and optional `public_key`): H(nonce || public_key),
    /// zero-padded to 64 bytes.
    pub fn report_data(self, nonce: &[u8], public_key: Option<&[u8]>) -> [u8; 64] {
        let mut out = [0u8; 64];
        match self {
            HashAlgo::Sha384 => {
                let mut h = Sha384::new();
                h.update(nonce);
                if let Some(pk) = public_key {
                    h.update(pk);
                }
                out[..48].copy_from_slice(&h.finalize());
            }
            HashAlgo::Sha512 => {
                let mut h = Sha512::new();
                h.update(nonce);
                if let Some(pk) = public_key {
                    h.update(pk);
                }
                out.copy_from_slice(&h.finalize());
            }
        }
        out
    }
}

/// The verifier's challenge: REPORT_DATA must equal hash(nonce || public_key).
#[derive(Debug, Clone, Serialize)]
pub struct Freshness {
    /// The verifier's nonce (raw bytes).
    #[serde(serialize_with = "ser_hex")]
    pub nonce: Vec<u8>,
    /// Optional public key bytes the guest bound into the report (e.g. a TLS key).
    #[serde(serialize_with = "ser_hex_opt")]
    pub public_key: Option<Vec<u8>>,
}

fn ser_hex<S: serde::Serializer>(v: &[u8], s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&hex::encode(v))
}
fn ser_hex_opt<S: serde::Serializer>(
    v: &Option<Vec<u8>>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    match v {
        Some(b) => s.serialize_str(&hex::encode(b)),
        None => s.serialize_none(),
    }
}

/// What an acceptable report looks like. `Policy::default()` is strict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Policy {
    /// Accept POLICY.DEBUG = 1 (default false).
    pub allow_debug: bool,
    /// Accept POLICY.MIGRATE_MA = 1 (default false).
    pub allow_migration_agent: bool,
    /// VMPLs allowed to have requested the report (default: only VMPL 0).
    pub allowed_vmpls: Vec<u32>,
    /// Minimum REPORTED_TCB (default none).
    pub min_tcb: Option<Tcb>,
    /// Accepted launch measurements (default: any, reported as skipped).
    #[serde(serialize_with = "ser_hex_list")]
    pub measurements: Vec<[u8; 48]>,
    /// Required HOST_DATA (default: any).
    #[serde(serialize_with = "ser_hex_opt32")]
    pub host_data: Option<[u8; 32]>,
    /// Hash algorithms accepted for freshness (default both).
    pub report_data_hashes: Vec<HashAlgo>,
}

fn ser_hex_list<S: serde::Serializer>(
    v: &[[u8; 48]],
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    use serde::ser::SerializeSeq;
    let mut seq = s.serialize_seq(Some(v.len()))?;
    for m in v {
        seq.serialize_element(&hex::encode(m))?;
    }
    seq.end()
}
fn ser_hex_opt32<S: serde::Serializer>(
    v: &Option<[u8; 32]>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    match v {
        Some(b) => s.serialize_str(&hex::encode(b)),
        None => s.serialize_none(),
    }
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            allow_debug: false,
            allow_migration_agent: false,
            allowed_vmpls: vec![0],
            min_tcb: None,
            measurements: Vec::new(),
            host_data: None,
            report_data_hashes: vec![HashAlgo::Sha384, HashAlgo::Sha512],
        }
    }
}

const KNOWN_KEYS: &str = "allow_debug, allow_migration_agent, allowed_vmpls, min_tcb, measurements, host_data, report_data_hash";

fn perr(field: &str, reason: impl Into<String>, expected: &str) -> Error {
    Error::Policy {
        field: field.to_string(),
        reason: reason.into(),
        expected: expected.to_string(),
    }
}

fn type_name(v: &toml::Value) -> &'static str {
    v.type_str()
}

fn get_bool(field: &str, v: &toml::Value) -> Result<bool> {
    v.as_bool().ok_or_else(|| {
        perr(
            field,
            format!("found {} `{v}`", type_name(v)),
            "a boolean (true or false)",
        )
    })
}

fn get_u8(field: &str, v: &toml::Value) -> Result<u8> {
    let expected = "an integer from 0 to 255";
    let i = v
        .as_integer()
        .ok_or_else(|| perr(field, format!("found {} `{v}`", type_name(v)), expected))?;
    u8::try_from(i).map_err(|_| perr(field, format!("{i} is out of range"), expected))
}

fn get_hex<const N: usize>(field: &str, v: &toml::Value) -> Result<[u8; N]> {
    let expected = format!("a string of {} hex digits ({N} bytes)", N * 2);
    let s = v
        .as_str()
        .ok_or_else(|| perr(field, format!("found {} `{v}`", type_name(v)), &expected))?;
    let s = s.trim().trim_start_matches("0x");
    let bytes =
        hex::decode(s).map_err(|e| perr(field, format!("`{s}` is not hex ({e})"), &expected))?;
    bytes.as_slice().try_into().map_err(|_| {
        perr(
            field,
            format!("{} hex digits ({} bytes)", s.len(), bytes.len()),
            &expected,
        )
    })
}

impl Policy {
    /// Parses a policy from TOML text. Unknown keys are errors (a typo must not loosen policy).
    pub fn from_toml(text: &str) -> Result<Policy> {
        let table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| Error::PolicyToml(e.to_string()))?;
        let mut p = Policy::default();
        for (key, v) in &table {
            match key.as_str() {
                "allow_debug" => p.allow_debug = get_bool(key, v)?,
                "allow_migration_agent" => p.allow_migration_agent = get_bool(key, v)?,
                "allowed_vmpls" => {
                    let expected = "an array of VMPL numbers 0 to 3, e.g. [0] or [0, 1]";
                    let arr = v.as_array().ok_or_else(|| {
                        perr(key, format!("found {} `{v}`", type_name(v)), expected)
                    })?;
                    if arr.is_empty() {
                        return Err(perr(
                            key,
                            "the array is empty (no report could pass)",
                            expected,
                        ));
                    }
                    let mut vmpls = Vec::new();
                    for (i, item) in arr.iter().enumerate() {
                        let field = format!("allowed_vmpls[{i}]");
                        let n = item.as_integer().ok_or_else(|| {
                            perr(
                                &field,
                                format!("found {} `{item}`", type_name(item)),
                                expected,
                            )
                        })?;
                        if !(0..=3).contains(&n) {
                            return Err(perr(&field, format!("{n} is not a VMPL"), expected));
                        }
                        vmpls.push(n as u32);
                    }
                    p.allowed_vmpls = vmpls;
                }
                "min_tcb" => {
                    let expected = "a table like { bootloader = 3, tee = 0, snp = 8, microcode = 115 } (fmc = N optional)";
                    let t = v.as_table().ok_or_else(|| {
                        perr(key, format!("found {} `{v}`", type_name(v)), expected)
                    })?;
                    let mut tcb = Tcb::default();
                    let mut seen = [false; 4];
                    for (k, item) in t {
                        let field = format!("min_tcb.{k}");
                        let val = get_u8(&field, item)?;
                        match k.as_str() {
                            "bootloader" => (tcb.bootloader, seen[0]) = (val, true),
                            "tee" => (tcb.tee, seen[1]) = (val, true),
                            "snp" => (tcb.snp, seen[2]) = (val, true),
                            "microcode" => (tcb.microcode, seen[3]) = (val, true),
                            "fmc" => tcb.fmc = Some(val),
                            _ => {
                                return Err(perr(
                                    &field,
                                    "unknown TCB component",
                                    "one of bootloader, tee, snp, microcode, fmc",
                                ))
                            }
                        }
                    }
                    let names = ["bootloader", "tee", "snp", "microcode"];
                    if let Some(i) = seen.iter().position(|s| !s) {
                        return Err(perr(
                            &format!("min_tcb.{}", names[i]),
                            "missing",
                            "bootloader, tee, snp and microcode all given",
                        ));
                    }
                    p.min_tcb = Some(tcb);
                }
                "measurements" | "measurement" => {
                    let expected = "an array of 96-hex-digit (48-byte) launch digests";
                    let items: Vec<&toml::Value> = match v {
                        toml::Value::Array(a) => a.iter().collect(),
                        toml::Value::String(_) => vec![v],
                        _ => {
                            return Err(perr(
                                key,
                                format!("found {} `{v}`", type_name(v)),
                                expected,
                            ))
                        }
                    };
                    if items.is_empty() {
                        return Err(perr(
                            key,
                            "the array is empty (no report could pass)",
                            expected,
                        ));
                    }
                    let mut ms = Vec::new();
                    for (i, item) in items.iter().enumerate() {
                        ms.push(get_hex::<48>(&format!("{key}[{i}]"), item)?);
                    }
                    p.measurements = ms;
                }
                "host_data" => p.host_data = Some(get_hex::<32>(key, v)?),
                "report_data_hash" => {
                    let expected = "\"sha384\", \"sha512\" or \"any\"";
                    let s = v.as_str().ok_or_else(|| {
                        perr(key, format!("found {} `{v}`", type_name(v)), expected)
                    })?;
                    p.report_data_hashes = match s.to_ascii_lowercase().as_str() {
                        "sha384" | "sha-384" => vec![HashAlgo::Sha384],
                        "sha512" | "sha-512" => vec![HashAlgo::Sha512],
                        "any" => vec![HashAlgo::Sha384, HashAlgo::Sha512],
                        _ => return Err(perr(key, format!("`{s}`"), expected)),
                    };
                }
                other => return Err(perr(other, "unknown key", &format!("one of {KNOWN_KEYS}"))),
            }
        }
        Ok(p)
    }

    /// Reads and parses a policy file.
    pub fn from_file(path: &Path) -> Result<Policy> {
        let bytes = crate::read_file(path)?;
        let text = String::from_utf8(bytes)
            .map_err(|_| Error::PolicyToml(format!("{} is not UTF-8 text", path.display())))?;
        Policy::from_toml(&text).map_err(|e| match e {
            Error::PolicyToml(m) => Error::PolicyToml(format!("{}: {m}", path.display())),
            other => other,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        Policy::from_toml(text).unwrap_err().to_string()
    }

    #[test]
    fn default_is_strict() {
        let p = Policy::from_toml("").unwrap();
        assert_eq!(p, Policy::default());
        assert!(!p.allow_debug && !p.allow_migration_agent);
        assert_eq!(p.allowed_vmpls, vec![0]);
    }

    #[test]
    fn full_policy_parses() {
        let m = "ab".repeat(48);
        let h = "cd".repeat(32);
        let p = Policy::from_toml(&format!(
            "allow_debug = true\nallowed_vmpls = [0, 1]\nmin_tcb = {{ bootloader = 3, tee = 0, snp = 8, microcode = 115 }}\nmeasurements = [\"{m}\"]\nhost_data = \"{h}\"\nreport_data_hash = \"sha512\"\n"
        ))
        .unwrap();
        assert!(p.allow_debug);
        assert_eq!(p.allowed_vmpls, vec![0, 1]);
        assert_eq!(p.min_tcb.unwrap().microcode, 115);
        assert_eq!(p.measurements, vec![[0xab; 48]]);
        assert_eq!(p.host_data, Some([0xcd; 32]));
        assert_eq!(p.report_data_hashes, vec![HashAlgo::Sha512]);
    }

    #[test]
    fn wrong_type_names_field_and_form() {
        let e = err("allow_debug = \"yes\"");
        assert!(e.contains("`allow_debug`") && e.contains("boolean"), "{e}");
    }

    #[test]
    fn unknown_key_is_rejected() {
        let e = err("allow_debugg = true");
        assert!(
            e.contains("`allow_debugg`") && e.contains("unknown key"),
            "{e}"
        );
        assert!(e.contains("allow_debug,"), "{e}");
    }

    #[test]
    fn bad_measurement_length() {
        let e = err("measurements = [\"abcd\"]");
        assert!(
            e.contains("`measurements[0]`") && e.contains("96 hex digits"),
            "{e}"
        );
    }

    #[test]
    fn bad_measurement_hex() {
        let e = err(&format!("measurements = [\"{}\"]", "zz".repeat(48)));
        assert!(
            e.contains("`measurements[0]`") && e.contains("not hex"),
            "{e}"
        );
    }

    #[test]
    fn bad_host_data() {
        let e = err("host_data = 5");
        assert!(
            e.contains("`host_data`") && e.contains("64 hex digits"),
            "{e}"
        );
    }

    #[test]
    fn bad_vmpl() {
        let e = err("allowed_vmpls = [0, 7]");
        assert!(
            e.contains("`allowed_vmpls[1]`") && e.contains("0 to 3"),
            "{e}"
        );
        let e = err("allowed_vmpls = []");
        assert!(e.contains("`allowed_vmpls`") && e.contains("empty"), "{e}");
    }

    #[test]
    fn bad_min_tcb() {
        let e = err("min_tcb = { bootloader = 3, tee = 0, snp = 8 }");
        assert!(
            e.contains("`min_tcb.microcode`") && e.contains("missing"),
            "{e}"
        );
        let e = err("min_tcb = { bootloader = 300, tee = 0, snp = 8, microcode = 1 }");
        assert!(
            e.contains("`min_tcb.bootloader`") && e.contains("0 to 255"),
            "{e}"
        );
        let e = err("min_tcb = { bootloader = 3, tee = 0, snp = 8, microcode = 1, psp = 2 }");
        assert!(e.contains("`min_tcb.psp`"), "{e}");
    }

    #[test]
    fn bad_hash_name() {
        let e = err("report_data_hash = \"md5\"");
        assert!(
            e.contains("`report_data_hash`") && e.contains("sha384"),
            "{e}"
        );
    }

    #[test]
    fn not_toml() {
        let e = err("allow_debug = ");
        assert!(e.contains("not valid TOML"), "{e}");
    }

    #[test]
    fn freshness_hashes_pad_and_bind_key() {
        let a = HashAlgo::Sha384.report_data(b"nonce", None);
        assert_eq!(&a[48..], &[0u8; 16]);
        let b = HashAlgo::Sha384.report_data(b"nonce", Some(b"key"));
        assert_ne!(a, b);
        let c = HashAlgo::Sha512.report_data(b"nonce", None);
        assert_ne!(&c[48..], &[0u8; 16]);
    }
}
