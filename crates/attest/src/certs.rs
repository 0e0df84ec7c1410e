//! X.509 handling for the AMD chain: parsing, RSA-PSS chain signatures (through the `sev`
//! crate), validity windows (which the crate does not check) and the AMD VEK extensions.

use crate::report::Tcb;
use crate::{Error, Result};
use serde::Serialize;
use sev::certs::snp::Verifiable;
use std::time::SystemTime;
use x509_cert::der::asn1::{Ia5StringRef, OctetStringRef};
use x509_cert::der::oid::ObjectIdentifier;
use x509_cert::der::{Decode, DecodePem};
use x509_cert::Certificate;

const OID_PRODUCT_NAME: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.3704.1.2");
const OID_BL_SPL: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.3704.1.3.1");
const OID_TEE_SPL: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.3704.1.3.2");
const OID_SNP_SPL: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.3704.1.3.3");
const OID_UCODE_SPL: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.3704.1.3.8");
const OID_FMC_SPL: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.3704.1.3.9");
const OID_HWID: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.3704.1.4");
const OID_CSP_ID: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.3704.1.5");

/// Whether an endorsement key is chip-bound (VCEK) or provider-loaded (VLEK).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum VekKind {
    /// Versioned Chip Endorsement Key, signed by the ASK.
    Vcek,
    /// Versioned Loaded Endorsement Key, signed by the ASVK.
    Vlek,
}

impl std::fmt::Display for VekKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VekKind::Vcek => "VCEK",
            VekKind::Vlek => "VLEK",
        })
    }
}

/// The AMD-specific extensions of a VCEK/VLEK certificate.
#[derive(Debug, Clone, Serialize)]
pub struct VekExtensions {
    /// productName, e.g. "Milan-B0".
    pub product_name: Option<String>,
    /// The SPLs the key was issued for.
    pub tcb: Tcb,
    /// hwID (VCEK only): the chip's CHIP_ID (64 bytes; 8 on Turin).
    #[serde(serialize_with = "ser_hex_opt")]
    pub hw_id: Option<Vec<u8>>,
    /// cspId (VLEK only): the cloud provider.
    pub csp_id: Option<String>,
}

fn ser_hex_opt<S: serde::Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(b) => s.serialize_str(&hex::encode(b)),
        None => s.serialize_none(),
    }
}

/// Parses a certificate given as DER or PEM.
pub(crate) fn parse_cert(bytes: &[u8], what: &str) -> Result<Certificate> {
    let trimmed = bytes.trim_ascii_start();
    let res = if trimmed.starts_with(b"-----BEGIN") {
        Certificate::from_pem(bytes).map_err(|e| e.to_string())
    } else {
        Certificate::from_der(bytes).map_err(|e| e.to_string())
    };
    res.map_err(|reason| Error::Cert {
        what: what.to_string(),
        reason: format!("not an X.509 certificate in DER or PEM: {reason}"),
    })
}

/// Subject common name, for messages.
pub(crate) fn common_name(cert: &Certificate) -> String {
    cert.tbs_certificate.subject.to_string()
}

/// Verifies that `signer` signed `signee` (RSA-PSS SHA-384, as AMD uses throughout).
pub(crate) fn signed_by(signee: &Certificate, signer: &Certificate) -> Result<(), String> {
    let a = sev::certs::snp::Certificate::from(signer.clone());
    let b = sev::certs::snp::Certificate::from(signee.clone());
    (&a, &b).verify().map_err(|e| e.to_string())
}

fn unix(t: x509_cert::time::Time) -> SystemTime {
    SystemTime::UNIX_EPOCH + t.to_unix_duration()
}

/// Checks notBefore <= at <= notAfter.
pub(crate) fn check_validity(cert: &Certificate, at: SystemTime) -> Result<(), String> {
    let v = &cert.tbs_certificate.validity;
    let nb = unix(v.not_before);
    let na = unix(v.not_after);
    let show = |t: SystemTime| humantime::format_rfc3339_seconds(t).to_string();
    if at < nb {
        return Err(format!(
            "not yet valid at {} (notBefore {})",
            show(at),
            show(nb)
        ));
    }
    if at > na {
        return Err(format!("expired at {} (notAfter {})", show(at), show(na)));
    }
    Ok(())
}

/// notAfter as a SystemTime (for messages and tests).
pub(crate) fn not_after(cert: &Certificate) -> SystemTime {
    unix(cert.tbs_certificate.validity.not_after)
}

/// Whether the certificate's subject CN marks it as a VLEK.
pub(crate) fn kind_of(cert: &Certificate) -> VekKind {
    if common_name(cert).contains("SEV-VLEK") {
        VekKind::Vlek
    } else {
        VekKind::Vcek
    }
}

fn ext_u8(value: &[u8], name: &str) -> Result<u8, String> {
    // AMD encodes SPLs as a DER INTEGER inside the extension's OCTET STRING.
    u8::from_der(value).map_err(|e| format!("extension {name} is not a small DER INTEGER: {e}"))
}

/// Reads the AMD extensions. `turin_like` selects whether an FMC SPL is expected.
pub(crate) fn vek_extensions(
    cert: &Certificate,
    turin_like: bool,
) -> Result<VekExtensions, String> {
    let mut product_name = None;
    let mut hw_id = None;
    let mut csp_id = None;
    let (mut bl, mut tee, mut snp, mut ucode, mut fmc) = (None, None, None, None, None);
    for ext in cert.tbs_certificate.extensions.iter().flatten() {
        let v = ext.extn_value.as_bytes();
        let oid = ext.extn_id;
        if oid == OID_PRODUCT_NAME {
            product_name = Some(der_string(v));
        } else if oid == OID_BL_SPL {
            bl = Some(ext_u8(v, "blSPL")?);
        } else if oid == OID_TEE_SPL {
            tee = Some(ext_u8(v, "teeSPL")?);
        } else if oid == OID_SNP_SPL {
            snp = Some(ext_u8(v, "snpSPL")?);
        } else if oid == OID_UCODE_SPL {
            ucode = Some(ext_u8(v, "ucodeSPL")?);
        } else if oid == OID_FMC_SPL {
            fmc = Some(ext_u8(v, "fmcSPL")?);
        } else if oid == OID_HWID {
            // KDS certificates carry the raw bytes; tolerate an OCTET STRING wrapper too.
            let raw = match OctetStringRef::from_der(v) {
                Ok(inner) if inner.as_bytes().len() == 64 || inner.as_bytes().len() == 8 => {
                    inner.as_bytes().to_vec()
                }
                _ => v.to_vec(),
            };
            hw_id = Some(raw);
        } else if oid == OID_CSP_ID {
            csp_id = Some(der_string(v));
        }
    }
    let need = |x: Option<u8>, n: &str| x.ok_or_else(|| format!("missing {n} extension"));
    let tcb = Tcb {
        fmc: if turin_like {
            Some(need(fmc, "fmcSPL (1.3.6.1.4.1.3704.1.3.9)")?)
        } else {
            None
        },
        bootloader: need(bl, "blSPL (1.3.6.1.4.1.3704.1.3.1)")?,
        tee: need(tee, "teeSPL (1.3.6.1.4.1.3704.1.3.2)")?,
        snp: need(snp, "snpSPL (1.3.6.1.4.1.3704.1.3.3)")?,
        microcode: need(ucode, "ucodeSPL (1.3.6.1.4.1.3704.1.3.8)")?,
    };
    Ok(VekExtensions {
        product_name,
        tcb,
        hw_id,
        csp_id,
    })
}

fn der_string(v: &[u8]) -> String {
    match Ia5StringRef::from_der(v) {
        Ok(s) => s.as_str().to_string(),
        Err(_) => String::from_utf8_lossy(v).into_owned(),
    }
}

/// Parses a time given as RFC 3339 ("2025-06-01T00:00:00Z") or a date ("2025-06-01"), UTC.
pub fn parse_time(s: &str) -> Result<SystemTime> {
    let t = s.trim();
    let r = if t.len() == 10 {
        humantime::parse_rfc3339_weak(&format!("{t} 00:00:00"))
    } else {
        humantime::parse_rfc3339_weak(t)
    };
    r.map_err(|e| {
        Error::Time(format!(
            "`{t}`: {e}; expected YYYY-MM-DD or RFC 3339 like 2025-06-01T00:00:00Z"
        ))
    })
}

/// Checks that `vek` (DER or PEM) chains to the pinned ARK of `product` through the pinned
/// ASK (VCEK) or ASVK (VLEK; `intermediate` if none is pinned), and returns its extensions.
/// Signatures only; validity dates are checked by [`crate::verify()`].
pub fn verify_vek_chain(
    vek: &[u8],
    product: crate::Product,
    intermediate: Option<&[u8]>,
) -> Result<(VekKind, VekExtensions)> {
    let cert = parse_cert(vek, "VEK")?;
    let kind = kind_of(&cert);
    let bad = |reason: String| Error::Cert {
        what: format!("{product} {kind}"),
        reason,
    };
    let ark = product.ark().map_err(bad)?;
    let inter = match (kind, product.asvk(), intermediate) {
        (VekKind::Vcek, _, _) => product.ask().map_err(bad)?,
        (VekKind::Vlek, Some(pinned), _) => pinned.map_err(bad)?,
        (VekKind::Vlek, None, Some(b)) => parse_cert(b, "supplied ASVK")?,
        (VekKind::Vlek, None, None) => {
            return Err(bad(format!("no {product} ASVK pinned or supplied")))
        }
    };
    signed_by(&ark, &ark).map_err(|e| bad(format!("ARK not self-signed: {e}")))?;
    signed_by(&inter, &ark).map_err(|e| bad(format!("intermediate not signed by the ARK: {e}")))?;
    signed_by(&cert, &inter)
        .map_err(|e| bad(format!("not signed by the {product} intermediate: {e}")))?;
    let ext = vek_extensions(&cert, product.is_turin_like()).map_err(bad)?;
    Ok((kind, ext))
}
