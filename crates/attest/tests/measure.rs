//! Launch digests compared with the PyPI `sev-snp-measure` tool (install it with
//! `pip install sev-snp-measure`; without it these tests say so and return).
//!
//! Debian's OVMF carries SEV metadata (so firmware-only SNP launches can be measured) but no
//! SNP_KERNEL_HASHES section, i.e. Debian ships no AmdSev (direct-boot) build. Direct boot is
//! therefore compared on a synthetic firmware image built here with the same footer-table and
//! metadata layout as OVMF.amdsev.fd, hashed together with real and synthetic kernels.

use microbox_attest::{measure, measure_with, MeasureParams};
use std::path::{Path, PathBuf};
use std::process::Command;

fn tool() -> Option<&'static str> {
    let ok = Command::new("sev-snp-measure")
        .arg("--help")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if ok {
        Some("sev-snp-measure")
    } else {
        eprintln!(
            "sev-snp-measure is NOT installed (pip install sev-snp-measure); skipping the comparison"
        );
        None
    }
}

fn debian_ovmf() -> Option<PathBuf> {
    let found = [
        "/usr/share/OVMF/OVMF.amdsev.fd",
        "/usr/share/OVMF/OVMF_CODE.fd",
        "/usr/share/ovmf/OVMF.fd",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.is_file());
    if found.is_none() {
        eprintln!("no Debian OVMF image found (apt-get install ovmf); skipping");
    }
    found
}

fn debian_kernel() -> Option<(PathBuf, Option<PathBuf>)> {
    let mut kernels: Vec<PathBuf> = std::fs::read_dir("/boot")
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .collect();
    kernels.sort();
    let k = kernels.pop()?;
    let version = k
        .file_name()?
        .to_str()?
        .trim_start_matches("vmlinuz-")
        .to_string();
    let initrd = Path::new("/boot").join(format!("initrd.img-{version}"));
    Some((k, initrd.is_file().then_some(initrd)))
}

/// Runs the Python tool; `Err(stderr)` when it refuses.
fn reference(p: &MeasureParams) -> Result<String, String> {
    let mut c = Command::new("sev-snp-measure");
    c.args(["--mode", "snp", "--output-format", "hex"])
        .arg("--vcpus")
        .arg(p.vcpus.to_string())
        .arg("--vcpu-type")
        .arg(&p.vcpu_type)
        .arg("--ovmf")
        .arg(&p.ovmf);
    if let Some(k) = &p.kernel {
        c.arg("--kernel").arg(k);
        if let Some(i) = &p.initrd {
            c.arg("--initrd").arg(i);
        }
        c.arg("--append").arg(&p.append);
    }
    let out = c.output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

fn params(
    ovmf: &Path,
    kernel: Option<&Path>,
    initrd: Option<&Path>,
    append: &str,
    vcpus: u32,
    t: &str,
) -> MeasureParams {
    MeasureParams {
        ovmf: ovmf.to_path_buf(),
        kernel: kernel.map(Path::to_path_buf),
        initrd: initrd.map(Path::to_path_buf),
        append: append.to_string(),
        vcpus,
        vcpu_type: t.to_string(),
        guest_features: 0x1,
    }
}

/// Deterministic filler so pages differ (a real firmware's pages all differ too).
fn filler(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 8) as u8
        })
        .collect()
}

fn guid_le(s: &str) -> [u8; 16] {
    let mut b: [u8; 16] = hex::decode(s.replace('-', "")).unwrap().try_into().unwrap();
    b[0..4].reverse();
    b[4..6].reverse();
    b[6..8].reverse();
    b
}

/// A 256 KiB firmware image laid out like OVMF.amdsev.fd: SEV metadata with SEC_MEM, secrets,
/// CPUID and kernel-hashes sections, a hash-table GPA inside the hashes page, and an SEV-ES
/// reset block.
fn synthetic_amdsev_ovmf(dir: &Path) -> PathBuf {
    let size = 256 * 1024;
    let mut img = filler(size, 7);
    // SEV metadata block somewhere in the image.
    let meta_at = size - 0x2000;
    let sections: [(u32, u32, u32); 5] = [
        (0x80_0000, 0x9000, 1),
        (0x80_A000, 0x3000, 1),
        (0x80_D000, 0x1000, 2),
        (0x80_E000, 0x1000, 3),
        (0x80_F000, 0x1000, 0x10),
    ];
    let mut meta = Vec::new();
    meta.extend_from_slice(b"ASEV");
    meta.extend_from_slice(&((16 + 12 * sections.len()) as u32).to_le_bytes());
    meta.extend_from_slice(&1u32.to_le_bytes());
    meta.extend_from_slice(&(sections.len() as u32).to_le_bytes());
    for (gpa, sz, kind) in sections {
        meta.extend_from_slice(&gpa.to_le_bytes());
        meta.extend_from_slice(&sz.to_le_bytes());
        meta.extend_from_slice(&kind.to_le_bytes());
    }
    img[meta_at..meta_at + meta.len()].copy_from_slice(&meta);
    // Footer table entries {data, u16 size, guid}, ending 32 bytes before the image end.
    let entry = |guid: &str, data: &[u8]| {
        let mut e = data.to_vec();
        e.extend_from_slice(&((data.len() + 18) as u16).to_le_bytes());
        e.extend_from_slice(&guid_le(guid));
        e
    };
    let mut table = Vec::new();
    table.extend(entry(
        "dc886566-984a-4798-a75e-5585a7bf67cc",
        &((size - meta_at) as u32).to_le_bytes(),
    ));
    let mut ht = 0x80_F400u32.to_le_bytes().to_vec();
    ht.extend_from_slice(&0x400u32.to_le_bytes());
    table.extend(entry("7255371f-3a3b-4b04-927b-1da6efa8d454", &ht));
    table.extend(entry(
        "00f771de-1a7e-4fcb-890e-68c77e2fb44e",
        &0x80_B004u32.to_le_bytes(),
    ));
    let footer_len = (table.len() + 18) as u16;
    table.extend_from_slice(&footer_len.to_le_bytes());
    table.extend_from_slice(&guid_le("96b582de-1fb2-45f7-baea-a366c55a082d"));
    let end = size - 32;
    img[end - table.len()..end].copy_from_slice(&table);
    let p = dir.join("synthetic-amdsev.fd");
    std::fs::write(&p, img).unwrap();
    p
}

fn assert_same(p: &MeasureParams) {
    let ours = hex::encode(measure_with(p).unwrap_or_else(|e| panic!("{p:?}: {e}")));
    let theirs = reference(p).unwrap_or_else(|e| panic!("sev-snp-measure failed for {p:?}: {e}"));
    assert_eq!(ours, theirs, "{p:?}");
}

#[test]
fn debian_ovmf_firmware_only_matches_tool() {
    let (Some(_), Some(ovmf)) = (tool(), debian_ovmf()) else {
        return;
    };
    for (vcpus, t) in [
        (1, "EPYC-v4"),
        (2, "EPYC-Milan"),
        (4, "EPYC-Genoa"),
        (3, "EPYC-Rome"),
    ] {
        assert_same(&params(&ovmf, None, None, "", vcpus, t));
    }
}

#[test]
fn debian_ovmf_cannot_measure_direct_boot() {
    let (Some(_), Some(ovmf), Some((kernel, _))) = (tool(), debian_ovmf(), debian_kernel()) else {
        return;
    };
    let empty = tempfile::NamedTempFile::new().unwrap();
    let e = measure(&ovmf, &kernel, empty.path(), "console=ttyS0", 1, "EPYC-v4")
        .unwrap_err()
        .to_string();
    assert!(e.contains("SNP_KERNEL_HASHES"), "{e}");
    // The reference tool refuses too.
    let p = params(
        &ovmf,
        Some(&kernel),
        Some(empty.path()),
        "console=ttyS0",
        1,
        "EPYC-v4",
    );
    let r = reference(&p).unwrap_err();
    assert!(r.contains("SNP_KERNEL_HASHES"), "{r}");
}

#[test]
fn direct_boot_matches_tool() {
    let Some(_) = tool() else { return };
    let dir = tempfile::tempdir().unwrap();
    let ovmf = synthetic_amdsev_ovmf(dir.path());
    let k1 = dir.path().join("kernel-a");
    let k2 = dir.path().join("kernel-b");
    let i1 = dir.path().join("initrd-a");
    let empty = dir.path().join("initrd-empty");
    std::fs::write(&k1, filler(300_000, 1)).unwrap();
    std::fs::write(&k2, filler(4096 * 3 + 17, 2)).unwrap();
    std::fs::write(&i1, filler(123_457, 3)).unwrap();
    std::fs::write(&empty, b"").unwrap();
    let cases: Vec<(PathBuf, PathBuf, &str, u32, &str)> = vec![
        (
            k1.clone(),
            i1.clone(),
            "console=ttyS0 root=/dev/vda",
            1,
            "EPYC-v4",
        ),
        (k1.clone(), empty.clone(), "", 2, "EPYC-Milan"),
        (
            k2.clone(),
            i1.clone(),
            "quiet panic=-1 microbox.agent=1",
            4,
            "EPYC-Genoa",
        ),
        (k2, empty, "a", 8, "EPYC-Turin"),
    ];
    for (k, i, append, vcpus, t) in &cases {
        assert_same(&params(&ovmf, Some(k), Some(i), append, *vcpus, t));
    }
    // Any change of input changes the digest.
    let (k, i) = (&cases[0].0, &cases[0].1);
    let a = measure(&ovmf, k, i, "x", 2, "EPYC-v4").unwrap();
    assert_ne!(a, measure(&ovmf, k, i, "x ", 2, "EPYC-v4").unwrap());
    assert_ne!(a, measure(&ovmf, k, i, "x", 3, "EPYC-v4").unwrap());
    assert_ne!(a, measure(&ovmf, k, i, "x", 2, "EPYC-Milan").unwrap());
    assert_ne!(a, measure(&ovmf, i, k, "x", 2, "EPYC-v4").unwrap());
    // The Debian cloud kernel and initrd through the convenience signature, if present.
    if let Some((kernel, initrd)) = debian_kernel() {
        let initrd = initrd.unwrap_or_else(|| cases[1].1.clone());
        let ours = measure(&ovmf, &kernel, &initrd, "console=ttyS0 quiet", 2, "EPYC-v4").unwrap();
        let p = params(
            &ovmf,
            Some(&kernel),
            Some(&initrd),
            "console=ttyS0 quiet",
            2,
            "EPYC-v4",
        );
        assert_eq!(hex::encode(ours), reference(&p).unwrap(), "{p:?}");
    } else {
        eprintln!("no /boot/vmlinuz-*: skipped the Debian kernel case");
    }
}

#[test]
fn bad_inputs_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.fd");
    std::fs::write(&junk, vec![0u8; 8192]).unwrap();
    let k = dir.path().join("k");
    std::fs::write(&k, b"k").unwrap();
    let e = measure(&junk, &k, &k, "", 1, "EPYC-v4")
        .unwrap_err()
        .to_string();
    assert!(e.contains("junk.fd") && e.contains("footer table"), "{e}");
    let e = measure(&junk, &k, &k, "", 1, "Skylake")
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown vCPU type `Skylake`"), "{e}");
    let e = measure(&junk, &k, &k, "", 0, "EPYC-v4")
        .unwrap_err()
        .to_string();
    assert!(e.contains("vcpus"), "{e}");
    let e = measure(&dir.path().join("missing.fd"), &k, &k, "", 1, "EPYC-v4")
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing.fd"), "{e}");
    let odd = dir.path().join("odd.fd");
    std::fs::write(&odd, vec![0u8; 100]).unwrap();
    let e = measure(&odd, &k, &k, "", 1, "EPYC-v4")
        .unwrap_err()
        .to_string();
    assert!(e.contains("multiple of 4096"), "{e}");
}
