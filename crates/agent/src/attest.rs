//! Reads AMD SEV-SNP attestation reports for GetAttestationReport: through the kernel's
//! configfs-tsm interface when present, else through the /dev/sev-guest ioctl.

use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

pub const REPORT_DATA_LEN: usize = 64;
const TSM_REPORT_DIR: &str = "/sys/kernel/config/tsm/report";
const SEV_GUEST_DEV: &str = "/dev/sev-guest";

#[derive(Debug)]
pub struct Report {
    pub report: Vec<u8>,
    pub certs: Vec<u8>,
    pub provider: &'static str,
}

#[derive(Debug)]
pub enum AttestError {
    /// Neither interface exists: the VM is not a TEE guest.
    NoTee,
    /// report_data has the wrong size.
    BadReportData(usize),
    /// The interface exists but failed.
    Failed(String),
}

/// Gets a report bound to `report_data` (exactly 64 bytes).
pub fn get_report(report_data: &[u8]) -> Result<Report, AttestError> {
    let data: [u8; REPORT_DATA_LEN] = report_data
        .try_into()
        .map_err(|_| AttestError::BadReportData(report_data.len()))?;
    if Path::new(TSM_REPORT_DIR).is_dir() {
        return configfs_report(Path::new(TSM_REPORT_DIR), &data)
            .map_err(|e| AttestError::Failed(format!("configfs-tsm: {e}")));
    }
    if Path::new(SEV_GUEST_DEV).exists() {
        return sev_guest_report(&data)
            .map_err(|e| AttestError::Failed(format!("{SEV_GUEST_DEV}: {e}")));
    }
    Err(AttestError::NoTee)
}

fn configfs_report(base: &Path, data: &[u8; REPORT_DATA_LEN]) -> io::Result<Report> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let dir = base.join(format!(
        "microbox-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    fs::create_dir(&dir)?;
    let result = (|| {
        fs::write(dir.join("inblob"), data)?;
        let report = fs::read(dir.join("outblob"))?;
        // The certificate table is only there for extended reports; absence is not an error.
        let certs = fs::read(dir.join("auxblob")).unwrap_or_default();
        Ok(Report {
            report,
            certs,
            provider: "configfs-tsm",
        })
    })();
    // configfs report entries are removed with rmdir (their attribute files go with them).
    let _ = fs::remove_dir(&dir);
    result
}

/// `struct snp_report_req` from <linux/sev-guest.h>.
#[repr(C)]
struct SnpReportReq {
    user_data: [u8; 64],
    vmpl: u32,
    rsvd: [u8; 28],
}

/// `struct snp_report_resp`.
#[repr(C)]
struct SnpReportResp {
    data: [u8; 4000],
}

/// `struct snp_guest_request_ioctl`.
#[repr(C)]
struct SnpGuestRequestIoctl {
    msg_version: u8,
    req_data: u64,
    resp_data: u64,
    exitinfo2: u64,
}

/// `SNP_GET_REPORT = _IOWR('S', 0x0, struct snp_guest_request_ioctl)`.
const SNP_GET_REPORT: libc::c_ulong = (3 << 30)
    | ((std::mem::size_of::<SnpGuestRequestIoctl>() as libc::c_ulong) << 16)
    | ((b'S' as libc::c_ulong) << 8);

fn sev_guest_report(data: &[u8; REPORT_DATA_LEN]) -> io::Result<Report> {
    let dev = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(SEV_GUEST_DEV)?;
    let req = SnpReportReq {
        user_data: *data,
        vmpl: 0,
        rsvd: [0; 28],
    };
    let mut resp = SnpReportResp { data: [0; 4000] };
    let mut ioc = SnpGuestRequestIoctl {
        msg_version: 1,
        req_data: &req as *const SnpReportReq as u64,
        resp_data: &mut resp as *mut SnpReportResp as u64,
        exitinfo2: 0,
    };
    // SAFETY: SNP_GET_REPORT reads `req` and writes `resp` through the addresses in `ioc`; all
    // three live on this stack frame for the duration of the call and have the kernel's layout.
    let rc = unsafe { libc::ioctl(dev.as_raw_fd(), SNP_GET_REPORT, &mut ioc) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!(
                "SNP_GET_REPORT failed: {e} (firmware/VMM error {:#x})",
                ioc.exitinfo2
            ),
        ));
    }
    // MSG_REPORT_RSP: status u32, report_size u32, 24 reserved bytes, then the report.
    let status = u32::from_le_bytes(resp.data[0..4].try_into().unwrap_or_default());
    let size = u32::from_le_bytes(resp.data[4..8].try_into().unwrap_or_default()) as usize;
    if status != 0 {
        return Err(io::Error::other(format!(
            "firmware answered status {status:#x}"
        )));
    }
    let end = 32usize
        .checked_add(size)
        .filter(|&e| e <= resp.data.len())
        .ok_or_else(|| io::Error::other(format!("firmware reported a report size of {size}")))?;
    Ok(Report {
        report: resp.data[32..end].to_vec(),
        certs: Vec::new(),
        provider: "sev-guest",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_number_matches_the_kernel_header() {
        assert_eq!(std::mem::size_of::<SnpGuestRequestIoctl>(), 32);
        assert_eq!(std::mem::size_of::<SnpReportReq>(), 96);
        assert_eq!(SNP_GET_REPORT, 0xC020_5300);
    }

    #[test]
    fn wrong_size_is_rejected_before_touching_devices() {
        assert!(matches!(
            get_report(&[0; 32]),
            Err(AttestError::BadReportData(32))
        ));
    }

    #[test]
    fn configfs_flow_writes_exactly_64_bytes_and_reports_missing_outblob() {
        // A plain directory stands in for configfs: inblob becomes a regular file (so the entry
        // cannot be removed afterwards) and outblob does not exist.
        let base = tempfile::tempdir().unwrap();
        let err = configfs_report(base.path(), &[7; 64]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        let entry = fs::read_dir(base.path()).unwrap().next().unwrap().unwrap();
        assert_eq!(
            fs::read(entry.path().join("inblob")).unwrap(),
            vec![7u8; 64]
        );
    }
}
