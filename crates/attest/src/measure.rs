//! Expected SNP launch digest of a QEMU direct-boot guest (OVMF + kernel + initrd + cmdline).
//!
//! Mirrors what the PSP measures during SNP_LAUNCH_UPDATE, in the order QEMU issues it:
//! 1. every 4 KiB page of the OVMF image, mapped so that it ends at 4 GiB (normal pages);
//! 2. the sections declared in OVMF's SEV metadata: zero pages for SNP_SEC_MEM, the secrets
//!    page, the CPUID page, and the kernel-hashes page holding QEMU's SEV hash table
//!    (SHA-256 of kernel, initrd and NUL-terminated command line);
//! 3. one VMSA page per vCPU (BSP starts at the reset vector, APs at OVMF's SEV-ES reset
//!    block), with RDX = the vCPU type's CPUID signature.
//!
//! Each step folds `PAGE_INFO` (SNP spec, "Layout of the PAGE_INFO structure") into a
//! SHA-384 chain. Checked against the `sev-snp-measure` tool (QEMU VMM type).

use crate::{Error, Result};
use sha2::{Digest, Sha256, Sha384};
use std::path::{Path, PathBuf};

const PAGE: usize = 4096;
const FOUR_GB: u64 = 0x1_0000_0000;
const VMSA_GPA: u64 = 0xFFFF_FFFF_F000;

const GUID_FOOTER: &str = "96b582de-1fb2-45f7-baea-a366c55a082d";
const GUID_HASH_TABLE_RV: &str = "7255371f-3a3b-4b04-927b-1da6efa8d454";
const GUID_SEV_ES_RESET: &str = "00f771de-1a7e-4fcb-890e-68c77e2fb44e";
const GUID_SEV_METADATA: &str = "dc886566-984a-4798-a75e-5585a7bf67cc";

const GUID_HT_HEADER: &str = "9438d606-4f22-4cc9-b479-a793d411fd21";
const GUID_HT_KERNEL: &str = "4de79437-abd2-427f-b835-d5b172d2045b";
const GUID_HT_INITRD: &str = "44baf731-3a2f-4bd7-9af1-41e29169781d";
const GUID_HT_CMDLINE: &str = "97d02dd8-bd20-4c94-aa78-e7714d36ab2a";

const SEC_SNP_SEC_MEM: u32 = 1;
const SEC_SNP_SECRETS: u32 = 2;
const SEC_CPUID: u32 = 3;
const SEC_SVSM_CAA: u32 = 4;
const SEC_SNP_KERNEL_HASHES: u32 = 0x10;

/// Full set of inputs; [`measure()`] covers the common case.
#[derive(Debug, Clone)]
pub struct MeasureParams {
    /// OVMF firmware image (must carry SEV metadata).
    pub ovmf: PathBuf,
    /// Kernel for direct boot; `None` measures firmware-only boot.
    pub kernel: Option<PathBuf>,
    /// Initrd; `None` hashes an empty initrd, as QEMU does.
    pub initrd: Option<PathBuf>,
    /// Kernel command line (QEMU `-append`).
    pub append: String,
    /// Number of vCPUs (VMSA pages).
    pub vcpus: u32,
    /// QEMU CPU model name (e.g. "EPYC-v4", "EPYC-Milan").
    pub vcpu_type: String,
    /// SEV features in the VMSA (the tool's `--guest-features`, default 0x1 = SNPActive).
    pub guest_features: u64,
}

/// SNP launch digest of a QEMU direct-boot guest, as `sev-snp-measure --mode snp` computes it.
pub fn measure(
    ovmf: &Path,
    kernel: &Path,
    initrd: &Path,
    append: &str,
    vcpus: u32,
    vcpu_type: &str,
) -> Result<[u8; 48]> {
    measure_with(&MeasureParams {
        ovmf: ovmf.to_path_buf(),
        kernel: Some(kernel.to_path_buf()),
        initrd: Some(initrd.to_path_buf()),
        append: append.to_string(),
        vcpus,
        vcpu_type: vcpu_type.to_string(),
        guest_features: 0x1,
    })
}

/// CPUID Fn0000_0001_EAX signature of a QEMU EPYC CPU model.
pub fn vcpu_signature(vcpu_type: &str) -> Option<u32> {
    fn sig(family: u32, model: u32, stepping: u32) -> u32 {
        let (fam_low, fam_high) = if family > 0xf {
            (0xf, (family - 0xf) & 0xff)
        } else {
            (family, 0)
        };
        (fam_high << 20)
            | (((model >> 4) & 0xf) << 16)
            | (fam_low << 8)
            | ((model & 0xf) << 4)
            | (stepping & 0xf)
    }
    let (f, m, s) = match vcpu_type {
        "EPYC" | "EPYC-v1" | "EPYC-v2" | "EPYC-IBPB" | "EPYC-v3" | "EPYC-v4" => (23, 1, 2),
        "EPYC-Rome" | "EPYC-Rome-v1" | "EPYC-Rome-v2" | "EPYC-Rome-v3" => (23, 49, 0),
        "EPYC-Milan" | "EPYC-Milan-v1" | "EPYC-Milan-v2" => (25, 1, 1),
        "EPYC-Genoa" | "EPYC-Genoa-v1" => (25, 17, 0),
        "EPYC-Turin" => (26, 0, 0),
        _ => return None,
    };
    Some(sig(f, m, s))
}

/// The general form of [`measure()`].
pub fn measure_with(p: &MeasureParams) -> Result<[u8; 48]> {
    if p.vcpus == 0 {
        return Err(Error::Measure("vcpus must be at least 1".into()));
    }
    let sig = vcpu_signature(&p.vcpu_type).ok_or_else(|| {
        Error::Measure(format!(
            "unknown vCPU type `{}`; expected a QEMU EPYC model: EPYC, EPYC-v1..v4, EPYC-IBPB, EPYC-Rome[-v1..v3], EPYC-Milan[-v1,-v2], EPYC-Genoa[-v1], EPYC-Turin",
            p.vcpu_type
        ))
    })?;
    let data = crate::read_file(&p.ovmf)?;
    let ovmf = Ovmf::parse(&p.ovmf, data)?;

    let hashes = match &p.kernel {
        None => None,
        Some(k) => {
            let kernel = Sha256::digest(crate::read_file(k)?);
            let initrd = match &p.initrd {
                Some(i) => Sha256::digest(crate::read_file(i)?),
                None => Sha256::digest([]),
            };
            let mut cmdline = p.append.as_bytes().to_vec();
            cmdline.push(0);
            let cmdline = Sha256::digest(&cmdline);
            Some(hash_table(&kernel.into(), &initrd.into(), &cmdline.into()))
        }
    };

    let mut g = Gctx::new();
    g.update_normal_pages(ovmf.gpa, &ovmf.data);

    let mut has_hashes_section = false;
    for s in &ovmf.sections {
        let gpa = u64::from(s.gpa);
        let size = s.size as usize;
        match s.kind {
            SEC_SNP_SEC_MEM | SEC_SVSM_CAA => g.update_zero_pages(gpa, size, &ovmf.path)?,
            SEC_SNP_SECRETS => g.update(0x05, gpa, &[0u8; 48]),
            SEC_CPUID => g.update(0x06, gpa, &[0u8; 48]),
            SEC_SNP_KERNEL_HASHES => {
                has_hashes_section = true;
                match &hashes {
                    Some(table) => {
                        if size != PAGE {
                            return Err(ovmf.err(format!(
                                "SNP_KERNEL_HASHES section is {size} bytes; expected one 4096-byte page"
                            )));
                        }
                        let off = (ovmf.hash_table_gpa()? & 0xfff) as usize;
                        if off + table.len() > PAGE {
                            return Err(ovmf.err("SEV hash table would cross its page".into()));
                        }
                        let mut page = vec![0u8; PAGE];
                        page[off..off + table.len()].copy_from_slice(table);
                        g.update_normal_pages(gpa, &page);
                    }
                    None => g.update_zero_pages(gpa, size, &ovmf.path)?,
                }
            }
            other => return Err(ovmf.err(format!("unknown SEV metadata section type {other:#x}"))),
        }
    }
    if hashes.is_some() && !has_hashes_section {
        return Err(ovmf.err(
            "its SEV metadata has no SNP_KERNEL_HASHES section, so a direct-boot kernel cannot be measured \
             (this is a generic OVMF build; an SNP direct-boot guest needs the AmdSev build, OVMF.amdsev.fd)"
                .into(),
        ));
    }

    let ap_eip = ovmf.sev_es_reset_eip()?;
    let bsp = vmsa_page(0xffff_fff0, p.guest_features, sig);
    let ap = vmsa_page(ap_eip, p.guest_features, sig);
    for i in 0..p.vcpus {
        g.update(
            0x02,
            VMSA_GPA,
            &Sha384::digest(if i == 0 { &bsp } else { &ap }).into(),
        );
    }
    Ok(g.ld)
}

/// Launch-digest chain (the PSP's GCTX.LD).
struct Gctx {
    ld: [u8; 48],
}

impl Gctx {
    fn new() -> Self {
        Gctx { ld: [0u8; 48] }
    }

    /// Folds one PAGE_INFO: LD = SHA-384(LD || contents || len16 || type || imi || vmpl perms || 0 || gpa).
    fn update(&mut self, page_type: u8, gpa: u64, contents: &[u8; 48]) {
        let mut info = Vec::with_capacity(0x70);
        info.extend_from_slice(&self.ld);
        info.extend_from_slice(contents);
        info.extend_from_slice(&0x70u16.to_le_bytes());
        info.push(page_type);
        info.push(0); // IS_IMI
        info.extend_from_slice(&[0, 0, 0, 0]); // VMPL3..1 permissions, reserved
        info.extend_from_slice(&gpa.to_le_bytes());
        self.ld = Sha384::digest(&info).into();
    }

    fn update_normal_pages(&mut self, gpa: u64, data: &[u8]) {
        for (i, page) in data.chunks(PAGE).enumerate() {
            self.update(0x01, gpa + (i * PAGE) as u64, &Sha384::digest(page).into());
        }
    }

    fn update_zero_pages(&mut self, gpa: u64, len: usize, path: &Path) -> Result<()> {
        if len % PAGE != 0 {
            return Err(Error::Ovmf {
                path: path.to_path_buf(),
                reason: format!(
                    "metadata section at {gpa:#x} has size {len:#x}, not a multiple of 4096"
                ),
            });
        }
        for i in 0..len / PAGE {
            self.update(0x03, gpa + (i * PAGE) as u64, &[0u8; 48]);
        }
        Ok(())
    }
}

/// GUID in the little-endian (EFI) byte layout used inside firmware and QEMU tables.
fn guid_le(s: &str) -> [u8; 16] {
    let h: String = s.chars().filter(|c| *c != '-').collect();
    let mut b = [0u8; 16];
    if let Ok(v) = hex::decode(h) {
        b.copy_from_slice(&v);
    }
    b[0..4].reverse();
    b[4..6].reverse();
    b[6..8].reverse();
    b
}

/// QEMU's SEV hash table, padded to 16 bytes: header GUID + length, then cmdline, initrd and
/// kernel entries of {GUID, u16 length = 50, SHA-256}.
fn hash_table(kernel: &[u8; 32], initrd: &[u8; 32], cmdline: &[u8; 32]) -> Vec<u8> {
    const ENTRY: u16 = 16 + 2 + 32;
    const TABLE: u16 = 16 + 2 + 3 * ENTRY;
    let mut t = Vec::with_capacity(176);
    t.extend_from_slice(&guid_le(GUID_HT_HEADER));
    t.extend_from_slice(&TABLE.to_le_bytes());
    for (g, h) in [
        (GUID_HT_CMDLINE, cmdline),
        (GUID_HT_INITRD, initrd),
        (GUID_HT_KERNEL, kernel),
    ] {
        t.extend_from_slice(&guid_le(g));
        t.extend_from_slice(&ENTRY.to_le_bytes());
        t.extend_from_slice(h);
    }
    t.resize(t.len().div_ceil(16) * 16, 0);
    t
}

/// A VMSA (SEV-ES save area) page with QEMU's reset state.
fn vmsa_page(eip: u32, sev_features: u64, vcpu_sig: u32) -> Vec<u8> {
    let mut p = vec![0u8; PAGE];
    let mut seg = |idx: usize, selector: u16, attrib: u16, limit: u32, base: u64| {
        let o = idx * 16;
        p[o..o + 2].copy_from_slice(&selector.to_le_bytes());
        p[o + 2..o + 4].copy_from_slice(&attrib.to_le_bytes());
        p[o + 4..o + 8].copy_from_slice(&limit.to_le_bytes());
        p[o + 8..o + 16].copy_from_slice(&base.to_le_bytes());
    };
    // Order: es, cs, ss, ds, fs, gs, gdtr, ldtr, idtr, tr.
    seg(0, 0, 0x93, 0xffff, 0);
    seg(1, 0xf000, 0x9b, 0xffff, u64::from(eip & 0xffff_0000));
    seg(2, 0, 0x93, 0xffff, 0);
    seg(3, 0, 0x93, 0xffff, 0);
    seg(4, 0, 0x93, 0xffff, 0);
    seg(5, 0, 0x93, 0xffff, 0);
    seg(6, 0, 0, 0xffff, 0);
    seg(7, 0, 0x82, 0xffff, 0);
    seg(8, 0, 0, 0xffff, 0);
    seg(9, 0, 0x8b, 0xffff, 0);
    let mut put =
        |off: usize, v: u64, n: usize| p[off..off + n].copy_from_slice(&v.to_le_bytes()[..n]);
    put(0xd0, 0x1000, 8); // EFER.SVME
    put(0x148, 0x40, 8); // CR4.MCE
    put(0x158, 0x10, 8); // CR0.ET
    put(0x160, 0x400, 8); // DR7
    put(0x168, 0xffff_0ff0, 8); // DR6
    put(0x170, 0x2, 8); // RFLAGS
    put(0x178, u64::from(eip & 0xffff), 8); // RIP
    put(0x268, 0x0007_0406_0007_0406, 8); // G_PAT
    put(0x310, u64::from(vcpu_sig), 8); // RDX = CPUID signature
    put(0x3b0, sev_features, 8); // SEV_FEATURES
    put(0x3e8, 0x1, 8); // XCR0
    put(0x408, 0x1f80, 4); // MXCSR
    put(0x410, 0x37f, 2); // x87 FCW
    p
}

struct MetaSection {
    gpa: u32,
    size: u32,
    kind: u32,
}

struct Ovmf {
    path: PathBuf,
    data: Vec<u8>,
    gpa: u64,
    table: Vec<([u8; 16], Vec<u8>)>,
    sections: Vec<MetaSection>,
}

impl Ovmf {
    fn err(&self, reason: String) -> Error {
        Error::Ovmf {
            path: self.path.clone(),
            reason,
        }
    }

    fn parse(path: &Path, data: Vec<u8>) -> Result<Ovmf> {
        let err = |reason: String| Error::Ovmf {
            path: path.to_path_buf(),
            reason,
        };
        let size = data.len();
        if size == 0 || size % PAGE != 0 || size as u64 > FOUR_GB {
            return Err(err(format!(
                "{size} bytes; a firmware image is a non-empty multiple of 4096 bytes below 4 GiB"
            )));
        }
        // The GUIDed footer table ends 32 bytes before the end of the image; entries are
        // {data, u16 size, GUID} read backwards from the footer entry.
        const HDR: usize = 18;
        let footer_at = size
            .checked_sub(32 + HDR)
            .ok_or_else(|| err("too small for an OVMF footer table".into()))?;
        let footer = &data[footer_at..footer_at + HDR];
        if footer[2..18] != guid_le(GUID_FOOTER) {
            return Err(err(
                "no OVMF footer table (GUID 96b582de-...); not an SEV-capable OVMF build".into(),
            ));
        }
        let table_size = usize::from(u16::from_le_bytes([footer[0], footer[1]]));
        let body_len = table_size
            .checked_sub(HDR)
            .ok_or_else(|| err(format!("footer table size {table_size} is too small")))?;
        let start = footer_at
            .checked_sub(body_len)
            .ok_or_else(|| err("footer table extends before the image start".into()))?;
        let mut body = &data[start..footer_at];
        let mut table = Vec::new();
        while body.len() >= HDR {
            let h = &body[body.len() - HDR..];
            let esize = usize::from(u16::from_le_bytes([h[0], h[1]]));
            if esize < HDR || esize > body.len() {
                return Err(err(format!("footer table entry has invalid size {esize}")));
            }
            let mut guid = [0u8; 16];
            guid.copy_from_slice(&h[2..18]);
            table.push((guid, body[body.len() - esize..body.len() - HDR].to_vec()));
            body = &body[..body.len() - esize];
        }
        let mut ovmf = Ovmf {
            path: path.to_path_buf(),
            gpa: FOUR_GB - size as u64,
            data,
            table,
            sections: Vec::new(),
        };
        ovmf.parse_metadata()?;
        Ok(ovmf)
    }

    fn entry(&self, guid: &str) -> Option<&[u8]> {
        let g = guid_le(guid);
        self.table
            .iter()
            .find(|(k, _)| *k == g)
            .map(|(_, v)| v.as_slice())
    }

    fn entry_u32(&self, guid: &str, name: &str) -> Result<u32> {
        let e = self
            .entry(guid)
            .ok_or_else(|| self.err(format!("footer table has no {name} entry ({guid})")))?;
        let b: [u8; 4] = e
            .get(..4)
            .and_then(|s| s.try_into().ok())
            .ok_or_else(|| self.err(format!("{name} entry is shorter than 4 bytes")))?;
        Ok(u32::from_le_bytes(b))
    }

    fn sev_es_reset_eip(&self) -> Result<u32> {
        self.entry_u32(GUID_SEV_ES_RESET, "SEV-ES reset block")
    }

    fn hash_table_gpa(&self) -> Result<u32> {
        self.entry_u32(GUID_HASH_TABLE_RV, "SEV hash table")
    }

    fn parse_metadata(&mut self) -> Result<()> {
        let off = self.entry_u32(GUID_SEV_METADATA, "SEV metadata").map_err(|_| {
            self.err("footer table has no SEV metadata entry (dc886566-...); this OVMF cannot launch an SNP guest".into())
        })? as usize;
        let start =
            self.data.len().checked_sub(off).ok_or_else(|| {
                self.err(format!("SEV metadata offset {off} is outside the image"))
            })?;
        let hdr = self
            .data
            .get(start..start + 16)
            .ok_or_else(|| self.err("SEV metadata header runs past the image end".into()))?;
        if &hdr[0..4] != b"ASEV" {
            return Err(self.err("SEV metadata signature is not ASEV".into()));
        }
        let rd = |o: usize| u32::from_le_bytes([hdr[o], hdr[o + 1], hdr[o + 2], hdr[o + 3]]);
        let (version, count) = (rd(8), rd(12) as usize);
        if version != 1 {
            return Err(self.err(format!("SEV metadata version {version}; expected 1")));
        }
        let items = self
            .data
            .get(start + 16..start + 16 + count.saturating_mul(12))
            .ok_or_else(|| {
                self.err(format!(
                    "{count} SEV metadata sections run past the image end"
                ))
            })?;
        self.sections = items
            .chunks(12)
            .map(|c| MetaSection {
                gpa: u32::from_le_bytes([c[0], c[1], c[2], c[3]]),
                size: u32::from_le_bytes([c[4], c[5], c[6], c[7]]),
                kind: u32::from_le_bytes([c[8], c[9], c[10], c[11]]),
            })
            .collect();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_match_cpuid_spec() {
        // Family 19h model 01h stepping 1 -> 0x00A00F11 (Milan).
        assert_eq!(vcpu_signature("EPYC-Milan"), Some(0x00A0_0F11));
        assert_eq!(vcpu_signature("EPYC-v4"), Some(0x0080_0F12));
        assert_eq!(vcpu_signature("EPYC-Genoa"), Some(0x00A1_0F10));
        assert_eq!(vcpu_signature("pentium"), None);
    }

    #[test]
    fn hash_table_layout() {
        let t = hash_table(&[1; 32], &[2; 32], &[3; 32]);
        assert_eq!(t.len(), 176); // 168 rounded up to 16
        assert_eq!(u16::from_le_bytes([t[16], t[17]]), 168);
        assert_eq!(&t[18 + 18..18 + 50], &[3u8; 32]); // cmdline first
    }
}
