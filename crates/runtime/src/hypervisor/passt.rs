//! passt, the user-mode network stack that runs as its own process (`--network passt` on QEMU,
//! every network on libkrun, which has no built-in stack).
//!
//! This module owns passt's command line and its start: one end of a socket pair goes to passt,
//! the other to the VMM, so passt needs no socket path (it drops to user `nobody` and could
//! not reach the box's 0700 directory anyway) and nothing else can connect to it.

use std::os::fd::OwnedFd;
use std::path::PathBuf;

use super::{HypervisorError, UserNet};
use crate::paths::BoxPaths;
use crate::process::{find_program, ManagedProcess, PASSED_FD};

/// The passt executable (`MICROBOX_PASST` overrides the `PATH` lookup).
pub fn program() -> Result<PathBuf, HypervisorError> {
    find_program("passt", "MICROBOX_PASST").ok_or_else(|| HypervisorError::HelperFailed {
        what: "passt".into(),
        detail: "passt is not in PATH (apt-get install passt, or set MICROBOX_PASST); \
                 on QEMU, --network user uses its built-in stack instead"
            .into(),
    })
}

/// passt's arguments for `net`: talk to the VMM over the inherited descriptor, serve the same
/// guest addresses as QEMU's slirp (the gateway maps to the host's loopback, DNS sent to
/// 10.0.2.3 goes to the host's resolver), forward the published ports, and stay in the
/// foreground as our child so that it is reaped and stopped with the box.
pub fn args(net: &UserNet) -> Vec<String> {
    let mut a: Vec<String> = [
        "--foreground",
        "--quiet",
        // Errors (a published port it cannot bind) into passt.log, not only to syslog.
        "--stderr",
        "--fd",
        &PASSED_FD.to_string(),
        "--ipv4-only",
        "--address",
        "10.0.2.15",
        "--netmask",
        "24",
        "--gateway",
        "10.0.2.2",
        "--dns-forward",
        "10.0.2.3",
        // The agent configures eth0 statically from the boot config.
        "--no-dhcp",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for (proto, ip, hp, gp) in &net.forwards {
        let flag = if proto == "udp" { "-u" } else { "-t" };
        a.push(flag.into());
        a.push(format!("{ip}/{hp}:{gp}"));
    }
    a
}

/// The helper's name (in process listings, pidfiles and fail-stop reasons).
pub const NAME: &str = "passt";

fn log_path(bp: &BoxPaths) -> PathBuf {
    bp.dir.join("passt.log")
}

/// An error, with passt's own last words, when the passt started by [`spawn`] has exited.
pub fn check_running(p: &ManagedProcess, bp: &BoxPaths) -> Result<(), HypervisorError> {
    match p.exit_info() {
        None => Ok(()),
        Some(info) => {
            let log = log_path(bp);
            Err(HypervisorError::HelperFailed {
                what: NAME.into(),
                detail: format!(
                    "it exited ({info}); log {}: {}",
                    log.display(),
                    super::tail_of(&log, 5)
                ),
            })
        }
    }
}

/// Starts passt for `net`; returns it and the VMM's end of the socket pair (to be handed to
/// the VMM as descriptor [`PASSED_FD`]).
pub fn spawn(net: &UserNet, bp: &BoxPaths) -> Result<(ManagedProcess, OwnedFd), HypervisorError> {
    let (vmm_end, passt_end) = std::os::unix::net::UnixStream::pair()?;
    let passt_end = OwnedFd::from(passt_end);
    let p = ManagedProcess::spawn_with_fd(
        NAME,
        &program()?,
        &args(net),
        Some(&log_path(bp)),
        Some(bp.pidfile(NAME)),
        Some(&passt_end),
    )
    .map_err(|e| HypervisorError::Spawn {
        what: "passt".into(),
        source: e,
    })?;
    Ok((p, OwnedFd::from(vmm_end)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_and_addresses_match_the_slirp_layout() {
        let net = UserNet {
            forwards: vec![
                ("tcp".into(), "127.0.0.1".parse().unwrap(), 8080, 80),
                ("udp".into(), "0.0.0.0".parse().unwrap(), 5353, 53),
            ],
            stack: super::super::NetStack::Passt,
        };
        let a = args(&net).join(" ");
        assert!(a.contains("--fd 3"), "{a}");
        assert!(a.contains("-t 127.0.0.1/8080:80"), "{a}");
        assert!(a.contains("-u 0.0.0.0/5353:53"), "{a}");
        assert!(
            a.contains("--address 10.0.2.15") && a.contains("--gateway 10.0.2.2"),
            "{a}"
        );
        assert!(a.contains("--dns-forward 10.0.2.3"), "{a}");
        assert!(a.contains("--foreground") && a.contains("--stderr"), "{a}");
    }
}
