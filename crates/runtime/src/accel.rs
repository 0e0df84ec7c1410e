//! Choice of CPU acceleration (KVM or TCG) and the reason for it.
//!
//! KVM is chosen only when the CPU advertises hardware virtualization (`vmx`/`svm`) *and*
//! `/dev/kvm` opens: some hosts expose a `/dev/kvm` that only runs special guests (PVM), where a
//! standard kernel hangs. `MICROBOX_ACCEL=kvm|tcg` overrides the detection.

use std::fmt;

/// The acceleration a VM runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// What was chosen and why (shown by `microbox info`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccelDecision {
    pub accel: Accel,
    pub reason: String,
}

/// Facts about the host relevant to the decision (separate so the logic is testable).
#[derive(Debug, Clone)]
pub struct HostVirt {
    pub cpu_flags_virt: bool,
    pub kvm_opens: Result<(), String>,
}

impl HostVirt {
    pub fn probe() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        Self {
            cpu_flags_virt: cpu_has_virt_flags(&cpuinfo),
            kvm_opens: std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/kvm")
                .map(drop)
                .map_err(|e| e.to_string()),
        }
    }

    /// Whether KVM can run a standard kernel here.
    pub fn kvm_usable(&self) -> Result<(), String> {
        if !self.cpu_flags_virt {
            return Err(
                "the CPU flags in /proc/cpuinfo show no hardware virtualization (vmx/svm)".into(),
            );
        }
        self.kvm_opens
            .as_ref()
            .map(|_| ())
            .map_err(|e| format!("/dev/kvm does not open: {e}"))
    }
}

fn cpu_has_virt_flags(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .flat_map(|l| l.split_whitespace())
        .any(|f| f == "vmx" || f == "svm")
}

/// A user request: config value (`Some(Kvm|Tcg)`, `None` for auto) and the environment variable.
pub fn decide(
    requested: Option<Accel>,
    env: Option<&str>,
    host: &HostVirt,
) -> Result<AccelDecision, String> {
    let env_choice = match env.map(str::trim).filter(|s| !s.is_empty()) {
        None | Some("auto") => None,
        Some("kvm") => Some(Accel::Kvm),
        Some("tcg") => Some(Accel::Tcg),
        Some(other) => {
            return Err(format!(
                "MICROBOX_ACCEL={other:?}: expected kvm, tcg or auto"
            ))
        }
    };
    if let Some(a) = env_choice {
        return Ok(AccelDecision {
            accel: a,
            reason: format!("forced by MICROBOX_ACCEL={a}"),
        });
    }
    if let Some(a) = requested {
        return Ok(AccelDecision {
            accel: a,
            reason: format!("requested by the box configuration ({a})"),
        });
    }
    Ok(match host.kvm_usable() {
        Ok(()) => AccelDecision {
            accel: Accel::Kvm,
            reason: "hardware virtualization in the CPU flags and /dev/kvm opens".into(),
        },
        Err(why) => AccelDecision {
            accel: Accel::Tcg,
            reason: format!("software emulation: {why}"),
        },
    })
}

/// Detects the acceleration for this host, honouring `MICROBOX_ACCEL`.
pub fn detect(requested: Option<Accel>) -> Result<AccelDecision, String> {
    let env = std::env::var("MICROBOX_ACCEL").ok();
    decide(requested, env.as_deref(), &HostVirt::probe())
}

/// The host TSC frequency in kHz, given to a TCG guest as `tsc_early_khz` so the kernel does not
/// calibrate against the emulated PIT (that calibration fails now and then and hangs the boot).
pub fn host_tsc_khz() -> Option<u64> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    parse_cpu_mhz(&cpuinfo)
}

fn parse_cpu_mhz(cpuinfo: &str) -> Option<u64> {
    let line = cpuinfo.lines().find(|l| l.starts_with("cpu MHz"))?;
    let mhz: f64 = line.split(':').nth(1)?.trim().parse().ok()?;
    if !(mhz.is_finite() && mhz > 1.0) {
        return None;
    }
    Some((mhz * 1000.0).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(flags: bool, opens: bool) -> HostVirt {
        HostVirt {
            cpu_flags_virt: flags,
            kvm_opens: if opens { Ok(()) } else { Err("ENOENT".into()) },
        }
    }

    #[test]
    fn pvm_host_falls_back_to_tcg() {
        let d = decide(None, None, &host(false, true)).unwrap();
        assert_eq!(d.accel, Accel::Tcg);
        assert!(d.reason.contains("vmx/svm"), "{}", d.reason);
    }

    #[test]
    fn kvm_needs_flags_and_device() {
        assert_eq!(
            decide(None, None, &host(true, true)).unwrap().accel,
            Accel::Kvm
        );
        let d = decide(None, None, &host(true, false)).unwrap();
        assert_eq!(d.accel, Accel::Tcg);
        assert!(d.reason.contains("/dev/kvm"));
    }

    #[test]
    fn env_overrides_everything() {
        let d = decide(Some(Accel::Tcg), Some("kvm"), &host(false, false)).unwrap();
        assert_eq!(d.accel, Accel::Kvm);
        assert!(decide(None, Some("xen"), &host(true, true))
            .unwrap_err()
            .contains("xen"));
        assert_eq!(
            decide(Some(Accel::Tcg), None, &host(true, true))
                .unwrap()
                .accel,
            Accel::Tcg
        );
    }

    #[test]
    fn flags_and_mhz_parse() {
        let info = "processor: 0\nflags\t\t: fpu vme svm sse\ncpu MHz\t\t: 2999.998\n";
        assert!(cpu_has_virt_flags(info));
        assert!(!cpu_has_virt_flags("flags : fpu sse\n"));
        assert_eq!(parse_cpu_mhz(info), Some(2_999_998));
        assert_eq!(parse_cpu_mhz("cpu MHz : nan\n"), None);
    }
}
