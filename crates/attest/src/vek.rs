//! Where the endorsement key certificate (VCEK or VLEK) comes from.
//!
//! - a file given by the user,
//! - the certificate table of an extended guest report (GHCB/`SNP_GET_EXT_REPORT` format:
//!   `{guid[16], offset u32, length u32}` entries ended by an all-zero entry; offsets are from
//!   the start of the table),
//! - a local cache directory (the only source in offline mode),
//! - AMD's Key Distribution Service, addressed by product, CHIP_ID and REPORTED_TCB.

use crate::product::Product;
use crate::report::{SigningKey, SnpReport, Tcb};
use crate::{Error, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Base URL of AMD's Key Distribution Service.
pub const KDS_BASE: &str = "https://kdsintf.amd.com";

/// Where [`crate::verify()`] gets the VEK certificate from.
#[derive(Debug, Clone)]
pub enum VekSource {
    /// A DER or PEM file.
    File(PathBuf),
    /// DER or PEM bytes already in memory.
    Bytes(Vec<u8>),
    /// The raw certificate table of an extended report (may also carry ASK/ASVK and ARK).
    CertTable(Vec<u8>),
    /// Look in a cache directory only (offline mode); never touches the network.
    Cache(PathBuf),
    /// Cache first, then fetch from AMD KDS and store into the cache.
    Kds {
        /// Where to look first and store fetched certificates.
        cache_dir: Option<PathBuf>,
    },
}

/// Certificate types found in an extended-report certificate table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableCertType {
    /// AMD Root Key.
    Ark,
    /// AMD SEV Key (signs VCEKs) or ASVK (signs VLEKs).
    Ask,
    /// Versioned Chip Endorsement Key.
    Vcek,
    /// Versioned Loaded Endorsement Key.
    Vlek,
    /// Certificate revocation list.
    Crl,
    /// Anything else (kept, ignored by verification).
    Other([u8; 16]),
}

const GUIDS: [(&str, TableCertType); 5] = [
    ("c0b406a4-a803-4952-9743-3fb6014cd0ae", TableCertType::Ark),
    ("4ab7b379-bbac-4fe4-a02f-05aef327c782", TableCertType::Ask),
    ("63da758d-e664-4564-adc5-f4b93be8accd", TableCertType::Vcek),
    ("a8074bc2-a25a-483e-aae6-39c045a0b8a1", TableCertType::Vlek),
    ("92f81bc3-5811-4d3d-97ff-d19f88dc67ea", TableCertType::Crl),
];

fn guid_bytes(s: &str) -> [u8; 16] {
    let h: String = s.chars().filter(|c| *c != '-').collect();
    let mut out = [0u8; 16];
    // The table is compile-time constant text; decoding cannot fail.
    if let Ok(v) = hex::decode(h) {
        out.copy_from_slice(&v);
    }
    out
}

/// Swaps an RFC 4122 byte-order GUID to the mixed-endian (EFI) layout and back.
fn swap_mixed(g: &[u8; 16]) -> [u8; 16] {
    let mut o = *g;
    o[0..4].reverse();
    o[4..6].reverse();
    o[6..8].reverse();
    o
}

fn classify(guid: &[u8; 16]) -> TableCertType {
    for (s, t) in GUIDS {
        let b = guid_bytes(s);
        // The sev crate and the kernel ABI use RFC byte order; accept the EFI layout too.
        if *guid == b || *guid == swap_mixed(&b) {
            return t;
        }
    }
    TableCertType::Other(*guid)
}

/// One certificate from an extended-report certificate table.
#[derive(Debug, Clone)]
pub struct TableEntry {
    /// What the GUID says it is.
    pub kind: TableCertType,
    /// The certificate bytes (DER in practice).
    pub data: Vec<u8>,
}

/// Parses a certificate table. Hostile input yields errors, never panics.
pub fn parse_cert_table(buf: &[u8]) -> Result<Vec<TableEntry>> {
    const ENTRY: usize = 24;
    let mut out = Vec::new();
    let mut pos = 0usize;
    loop {
        let hdr = buf.get(pos..pos + ENTRY).ok_or_else(|| {
            Error::CertTable(format!(
                "entry {} at byte {pos} runs past the end ({} bytes) before the all-zero terminator",
                out.len(),
                buf.len()
            ))
        })?;
        let mut guid = [0u8; 16];
        guid.copy_from_slice(&hdr[..16]);
        let offset = u32::from_le_bytes([hdr[16], hdr[17], hdr[18], hdr[19]]) as usize;
        let length = u32::from_le_bytes([hdr[20], hdr[21], hdr[22], hdr[23]]) as usize;
        if guid == [0u8; 16] && offset == 0 && length == 0 {
            break;
        }
        let data = offset
            .checked_add(length)
            .and_then(|end| buf.get(offset..end))
            .ok_or_else(|| {
                Error::CertTable(format!(
                    "entry {} claims bytes {offset}..{} but the table has {} bytes",
                    out.len(),
                    offset.saturating_add(length),
                    buf.len()
                ))
            })?;
        out.push(TableEntry {
            kind: classify(&guid),
            data: data.to_vec(),
        });
        pos += ENTRY;
    }
    Ok(out)
}

/// Builds a certificate table (for tests and for hosts that serve one).
pub fn build_cert_table(entries: &[(TableCertType, &[u8])]) -> Vec<u8> {
    let header_len = (entries.len() + 1) * 24;
    let mut head = Vec::with_capacity(header_len);
    let mut body = Vec::new();
    for (kind, data) in entries {
        let guid = match kind {
            TableCertType::Other(g) => *g,
            k => GUIDS
                .iter()
                .find(|(_, t)| t == k)
                .map(|(s, _)| guid_bytes(s))
                .unwrap_or([0u8; 16]),
        };
        head.extend_from_slice(&guid);
        head.extend_from_slice(&((header_len + body.len()) as u32).to_le_bytes());
        head.extend_from_slice(&(data.len() as u32).to_le_bytes());
        body.extend_from_slice(data);
    }
    head.extend_from_slice(&[0u8; 24]);
    head.extend_from_slice(&body);
    head
}

/// The KDS URL of the VCEK for this chip at this TCB. Uses REPORTED_TCB (the TCB the VCEK is
/// derived for), never CURRENT_TCB.
pub fn kds_vcek_url(product: Product, chip_id: &[u8], reported_tcb: &Tcb) -> Result<String> {
    if chip_id.iter().all(|&b| b == 0) {
        return Err(Error::NoVek {
            what: "VCEK".into(),
            hint: "CHIP_ID is masked in this report, so the KDS URL cannot be built; pass the VCEK file"
                .into(),
        });
    }
    // Turin hwIDs are the first 8 bytes of CHIP_ID.
    let hwid = if product.is_turin_like() {
        hex::encode(&chip_id[..8.min(chip_id.len())])
    } else {
        hex::encode(chip_id)
    };
    let t = reported_tcb;
    let mut q = String::new();
    if let Some(fmc) = t.fmc {
        q.push_str(&format!("fmcSPL={fmc:02}&"));
    }
    q.push_str(&format!(
        "blSPL={:02}&teeSPL={:02}&snpSPL={:02}&ucodeSPL={:02}",
        t.bootloader, t.tee, t.snp, t.microcode
    ));
    Ok(format!("{KDS_BASE}/vcek/v1/{}/{hwid}?{q}", product.name()))
}

/// The KDS URL of the product's ASK+ARK (or ASVK+ARK for `vlek`) chain.
pub fn kds_chain_url(product: Product, vlek: bool) -> String {
    let kind = if vlek { "vlek" } else { "vcek" };
    format!("{KDS_BASE}/{kind}/v1/{}/cert_chain", product.name())
}

/// File name of a VCEK in the cache directory: product, hwID and SPLs make it unique.
pub fn cache_file_name(product: Product, chip_id: &[u8], tcb: &Tcb) -> String {
    let fmc = tcb.fmc.map(|f| format!("-fmc{f}")).unwrap_or_default();
    format!(
        "vcek-{}-{}-bl{}-tee{}-snp{}-ucode{}{fmc}.der",
        product.name().to_ascii_lowercase(),
        hex::encode(chip_id),
        tcb.bootloader,
        tcb.tee,
        tcb.snp,
        tcb.microcode
    )
}

/// Looks the VCEK up in `dir`; `Ok(None)` when absent.
pub fn cache_lookup(dir: &Path, product: Product, report: &SnpReport) -> Result<Option<Vec<u8>>> {
    let path = dir.join(cache_file_name(
        product,
        report.chip_id(),
        &report.reported_tcb(product),
    ));
    match std::fs::read(&path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(Error::Io { path, source }),
    }
}

/// Stores a VCEK into the cache directory (created if needed).
pub fn cache_store(
    dir: &Path,
    product: Product,
    report: &SnpReport,
    der: &[u8],
) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let path = dir.join(cache_file_name(
        product,
        report.chip_id(),
        &report.reported_tcb(product),
    ));
    let tmp = path.with_extension("der.tmp");
    std::fs::write(&tmp, der)
        .and_then(|_| std::fs::rename(&tmp, &path))
        .map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
    Ok(path)
}

/// Fetches a URL from AMD KDS with `curl` (no HTTP stack is linked into microbox). Without
/// network access this fails with an error naming the URL, so the user can fetch it elsewhere.
pub fn fetch_kds(url: &str) -> Result<Vec<u8>> {
    let out = Command::new("curl")
        .args(["--fail", "--silent", "--show-error", "--location"])
        .args(["--proto", "=https", "--max-time", "30", url])
        .output()
        .map_err(|e| Error::Fetch {
            url: url.to_string(),
            reason: format!("cannot run curl: {e}; download it elsewhere and pass it as a file"),
        })?;
    if !out.status.success() {
        return Err(Error::Fetch {
            url: url.to_string(),
            reason: format!(
                "curl failed ({}): {}; if this machine is offline, download the URL elsewhere and pass the file or put it in the cache",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(out.stdout)
}

/// The endorsement key (and any intermediates) obtained from a [`VekSource`].
#[derive(Debug, Clone)]
pub struct ResolvedVek {
    /// The VCEK/VLEK bytes (DER or PEM).
    pub vek: Vec<u8>,
    /// An ASK/ASVK supplied with the evidence; trusted only if the pinned ARK signed it.
    pub intermediate: Option<Vec<u8>>,
    /// An ARK supplied with the evidence; must equal the pinned one.
    pub ark: Option<Vec<u8>>,
    /// Human-readable origin ("file /x", "certificate table", "cache /dir/..", "AMD KDS `url`").
    pub origin: String,
}

/// Gets the VEK for `report` from `source`. `product` is needed for cache and KDS lookups.
pub fn resolve(
    source: &VekSource,
    report: &SnpReport,
    product: Option<Product>,
) -> Result<ResolvedVek> {
    let key = report.signing_key()?;
    let what = if key == SigningKey::Vlek {
        "VLEK"
    } else {
        "VCEK"
    };
    let plain = |vek: Vec<u8>, origin: String| ResolvedVek {
        vek,
        intermediate: None,
        ark: None,
        origin,
    };
    match source {
        VekSource::File(p) => Ok(plain(crate::read_file(p)?, format!("file {}", p.display()))),
        VekSource::Bytes(b) => Ok(plain(b.clone(), "caller-supplied bytes".into())),
        VekSource::CertTable(t) => {
            let entries = parse_cert_table(t)?;
            let want = if key == SigningKey::Vlek {
                TableCertType::Vlek
            } else {
                TableCertType::Vcek
            };
            let find = |k: TableCertType| entries.iter().find(|e| e.kind == k).map(|e| e.data.clone());
            let vek = find(want).ok_or_else(|| Error::NoVek {
                what: what.into(),
                hint: format!(
                    "the certificate table has {} entries but none is a {what}",
                    entries.len()
                ),
            })?;
            Ok(ResolvedVek {
                vek,
                intermediate: find(TableCertType::Ask),
                ark: find(TableCertType::Ark),
                origin: "extended-report certificate table".into(),
            })
        }
        VekSource::Cache(dir) | VekSource::Kds { cache_dir: Some(dir) }
            if key == SigningKey::Vlek =>
        {
            Err(Error::NoVek {
                what: what.into(),
                hint: format!(
                    "VLEKs are not served by KDS per chip; pass the VLEK file or the certificate table (cache {} is for VCEKs)",
                    dir.display()
                ),
            })
        }
        VekSource::Kds { cache_dir: None } if key == SigningKey::Vlek => Err(Error::NoVek {
            what: what.into(),
            hint: "VLEKs are not served by KDS per chip; pass the VLEK file or the certificate table"
                .into(),
        }),
        VekSource::Cache(dir) => {
            // v2 reports carry no CPUID: try every product's cache name.
            let candidates: Vec<Product> = match product {
                Some(p) => vec![p],
                None => crate::product::ALL_PRODUCTS.to_vec(),
            };
            for p in &candidates {
                if let Some(b) = cache_lookup(dir, *p, report)? {
                    return Ok(plain(b, format!("cache {}", dir.display())));
                }
            }
            let p = candidates[0];
            Err(Error::NoVek {
                what: what.into(),
                hint: format!(
                    "offline mode: {} is not in cache {}; fetch {} and store it there",
                    cache_file_name(p, report.chip_id(), &report.reported_tcb(p)),
                    dir.display(),
                    kds_vcek_url(p, report.chip_id(), &report.reported_tcb(p))
                        .unwrap_or_else(|e| e.to_string())
                ),
            })
        }
        VekSource::Kds { cache_dir } => {
            let product = product.ok_or_else(|| Error::NoVek {
                what: what.into(),
                hint: "the product is unknown (v2 report), so no KDS URL can be built; pass the VCEK file".into(),
            })?;
            if let Some(dir) = cache_dir {
                if let Some(b) = cache_lookup(dir, product, report)? {
                    return Ok(plain(b, format!("cache {}", dir.display())));
                }
            }
            let url = kds_vcek_url(product, report.chip_id(), &report.reported_tcb(product))?;
            let der = fetch_kds(&url)?;
            if let Some(dir) = cache_dir {
                cache_store(dir, product, report, &der)?;
            }
            Ok(plain(der, format!("AMD KDS {url}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cert_table_round_trip() {
        let t = build_cert_table(&[
            (TableCertType::Ark, b"ark-bytes"),
            (TableCertType::Ask, b"ask"),
            (TableCertType::Vcek, b"vcek-bytes!"),
        ]);
        let e = parse_cert_table(&t).unwrap();
        assert_eq!(e.len(), 3);
        assert_eq!(e[0].kind, TableCertType::Ark);
        assert_eq!(e[2].kind, TableCertType::Vcek);
        assert_eq!(e[2].data, b"vcek-bytes!");
    }

    #[test]
    fn cert_table_mixed_endian_guid() {
        let mut t = build_cert_table(&[(TableCertType::Vlek, b"x")]);
        let g: [u8; 16] = t[..16].try_into().unwrap();
        t[..16].copy_from_slice(&swap_mixed(&g));
        assert_eq!(parse_cert_table(&t).unwrap()[0].kind, TableCertType::Vlek);
    }

    #[test]
    fn cert_table_hostile() {
        // No terminator: one entry pointing at its own bytes, then the buffer ends.
        let mut t = build_cert_table(&[(TableCertType::Vcek, b"abc")]);
        t.truncate(24);
        t[16..20].copy_from_slice(&0u32.to_le_bytes());
        let e = parse_cert_table(&t).unwrap_err().to_string();
        assert!(e.contains("terminator"), "{e}");
        // Offset past the end.
        let mut t = build_cert_table(&[(TableCertType::Vcek, b"abc")]);
        t[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        let e = parse_cert_table(&t).unwrap_err().to_string();
        assert!(e.contains("claims bytes"), "{e}");
        assert!(parse_cert_table(&[]).is_err());
    }

    #[test]
    fn kds_url_uses_given_tcb() {
        let chip = [0xabu8; 64];
        let tcb = Tcb {
            fmc: None,
            bootloader: 3,
            tee: 0,
            snp: 8,
            microcode: 115,
        };
        let url = kds_vcek_url(Product::Milan, &chip, &tcb).unwrap();
        assert_eq!(
            url,
            format!(
                "https://kdsintf.amd.com/vcek/v1/Milan/{}?blSPL=03&teeSPL=00&snpSPL=08&ucodeSPL=115",
                "ab".repeat(64)
            )
        );
        let turin = Tcb {
            fmc: Some(1),
            ..tcb
        };
        let url = kds_vcek_url(Product::Turin, &chip, &turin).unwrap();
        assert!(url.starts_with(&format!(
            "https://kdsintf.amd.com/vcek/v1/Turin/{}?fmcSPL=01&blSPL=03",
            "ab".repeat(8)
        )));
        assert!(kds_vcek_url(Product::Milan, &[0u8; 64], &tcb).is_err());
        assert_eq!(
            kds_chain_url(Product::Genoa, true),
            "https://kdsintf.amd.com/vlek/v1/Genoa/cert_chain"
        );
    }
}
