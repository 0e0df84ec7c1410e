//! Shared helpers of the VM integration tests.
#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

use microbox_core::{BoxConfig, Delivered, EventEmitter, EventRecord, NetworkMode, Subscription};
use microbox_runtime::VmManager;

/// A box of the busybox test image (pulled from the harness's real registry) under `root`.
pub fn busybox_box(root: &Path, emitter: &EventEmitter) -> VmManager {
    let mut cfg = BoxConfig::new(microbox_testsupport::image("busybox"));
    cfg.network = NetworkMode::None;
    cfg.memory_mib = 256;
    cfg.boot_timeout = Duration::from_secs(180);
    VmManager::with_root(cfg, emitter.clone(), root)
}

/// Everything already delivered to `sub`.
pub fn drain(sub: &mut Subscription) -> Vec<EventRecord> {
    let mut out = Vec::new();
    while let Some(d) = sub.try_recv() {
        if let Delivered::Event(e) = d {
            out.push(e);
        }
    }
    out
}

/// True when no process with this pid exists (zombies of ours are reaped by tokio).
pub fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // A zombie is dead; only its parent's reap is pending.
        Ok(s) => s
            .rsplit(')')
            .next()
            .map(|r| r.trim_start().starts_with('Z'))
            .unwrap_or(true),
    }
}

/// Processes whose command line mentions `needle` (e.g. a box directory).
pub fn processes_mentioning(needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmd).contains(needle) && !gone(pid) {
            out.push(pid);
        }
    }
    out
}
