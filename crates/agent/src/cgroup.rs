//! The workloads' cgroup (PID 1 mode only).
//!
//! Every process the agent starts for the box joins `/sys/fs/cgroup/workloads`. The agent stays
//! outside it. The group's limits keep a runaway workload from taking the agent down with it:
//! - `memory.max` is the guest's memory minus a reserve, so a leak is OOM-killed inside the
//!   group instead of starving the agent;
//! - `pids.max` stops a fork bomb at a fixed number of processes;
//! - the group competes for CPU as one entity next to the agent's threads.
//!
//! This protects against runaway or careless workloads. It does not stop a guest root that wants
//! to break its own box: such a root can mount cgroup2 itself. The host's protection is the VM
//! boundary. The box's own `/sys` does not show the cgroup tree.

use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::Path;

use nix::mount::{mount, MsFlags};

const ROOT: &str = "/sys/fs/cgroup";
const WORKLOADS: &str = "/sys/fs/cgroup/workloads";

/// The limits for a guest with `mem_total` bytes of memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub memory_max: u64,
    pub pids_max: u64,
}

/// Reserve an eighth of the memory for the agent and the kernel (at least 16 MiB, at most
/// 32 MiB). Allow 4 processes per MiB, and never fewer than 512.
pub fn limits_for(mem_total: u64) -> Limits {
    let reserve = (mem_total / 8).clamp(16 << 20, 32 << 20);
    Limits {
        memory_max: mem_total.saturating_sub(reserve),
        pids_max: ((mem_total >> 20) * 4).max(512),
    }
}

/// Sets up the workloads group for this guest's memory size and returns its `cgroup.procs`;
/// `None` (said on the log) when that is not possible, and workloads then run unlimited.
pub fn for_workloads() -> Option<OwnedFd> {
    let mem_total = std::fs::read_to_string("/proc/meminfo")
        .map(|m| crate::stats::parse(&m, "", "", 0).mem_total_bytes)
        .unwrap_or(0);
    let limits = limits_for(mem_total);
    let set_up = if mem_total == 0 {
        Err("the guest's memory size is unknown (/proc/meminfo)".to_string())
    } else {
        setup(limits)
    };
    match set_up {
        Ok(fd) => {
            tracing::info!(
                memory_max = limits.memory_max,
                pids_max = limits.pids_max,
                "workloads run in {WORKLOADS}"
            );
            Some(fd)
        }
        Err(e) => {
            tracing::warn!("no workloads cgroup (workloads are not limited): {e}");
            None
        }
    }
}

/// Mounts cgroup2, enables the cpu, memory and pids controllers for children, creates the
/// workloads group with `limits`, and returns its `cgroup.procs`, open for writing. A child
/// writes "0" to that file to move itself into the group.
fn setup(limits: Limits) -> Result<OwnedFd, String> {
    let root = Path::new(ROOT);
    if !root.join("cgroup.controllers").exists() {
        mount(
            Some("cgroup2"),
            root,
            Some("cgroup2"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None::<&str>,
        )
        .map_err(|e| format!("mount -t cgroup2 {ROOT}: {e}"))?;
    }
    let available = std::fs::read_to_string(root.join("cgroup.controllers"))
        .map_err(|e| format!("{ROOT}/cgroup.controllers: {e}"))?;
    for c in ["cpu", "memory", "pids"] {
        if available.split_whitespace().any(|a| a == c) {
            write(&root.join("cgroup.subtree_control"), &format!("+{c}"))?;
        }
    }
    let group = Path::new(WORKLOADS);
    match std::fs::create_dir(group) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("mkdir {WORKLOADS}: {e}")),
    }
    if group.join("memory.max").exists() {
        write(&group.join("memory.max"), &limits.memory_max.to_string())?;
    }
    if group.join("pids.max").exists() {
        write(&group.join("pids.max"), &limits.pids_max.to_string())?;
    }
    let procs = group.join("cgroup.procs");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&procs)
        .map_err(|e| format!("{}: {e}", procs.display()))?;
    Ok(OwnedFd::from(f))
}

fn write(path: &Path, value: &str) -> Result<(), String> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .map_err(|e| format!("write {value:?} to {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_scale_with_memory_and_keep_a_reserve() {
        let mib = 1u64 << 20;
        let l = limits_for(256 * mib);
        assert_eq!(l.memory_max, 224 * mib);
        assert_eq!(l.pids_max, 1024);
        // Small guests keep at least 16 MiB and 512 processes.
        let l = limits_for(64 * mib);
        assert_eq!(l.memory_max, 48 * mib);
        assert_eq!(l.pids_max, 512);
        // Large guests keep at most 32 MiB.
        let l = limits_for(4096 * mib);
        assert_eq!(l.memory_max, 4064 * mib);
        assert_eq!(l.pids_max, 16384);
    }
}
