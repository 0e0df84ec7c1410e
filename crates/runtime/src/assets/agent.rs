//! Locating the guest agent binary (it becomes `/init` in the initramfs).
//!
//! Order: `MICROBOX_AGENT`, then `microbox-agent` next to the running executable (how it is
//! installed), then the workspace's static build output (development).

use std::path::{Path, PathBuf};

use super::AssetError;

/// The workspace build location of the static agent.
pub fn workspace_agent_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/agent/x86_64-unknown-linux-gnu/release/microbox-agent")
}

/// Finds the agent and checks that it can run as PID 1 of an empty initramfs (static ELF).
pub fn find_agent() -> Result<PathBuf, AssetError> {
    let mut tried = Vec::new();
    if let Some(p) = std::env::var_os("MICROBOX_AGENT").filter(|v| !v.is_empty()) {
        let p = PathBuf::from(p);
        if !p.is_file() {
            return Err(AssetError::AgentMissing(format!(
                "MICROBOX_AGENT={} does not exist",
                p.display()
            )));
        }
        check_static(&p)?;
        return Ok(p);
    }
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            // Test and bench binaries live in target/<profile>/deps: look one level up too.
            for d in [Some(dir), dir.parent()].into_iter().flatten() {
                let c = d.join("microbox-agent");
                if c.is_file() && check_static(&c).is_ok() {
                    return Ok(c);
                }
                tried.push(c);
            }
        }
    }
    let ws = workspace_agent_path();
    if ws.is_file() {
        check_static(&ws)?;
        return Ok(ws);
    }
    tried.push(ws);
    Err(AssetError::AgentMissing(format!(
        "set MICROBOX_AGENT or build it with `CARGO_TARGET_DIR=target/agent RUSTFLAGS=\"-C target-feature=+crt-static\" \
         cargo build --release -p microbox-agent --target x86_64-unknown-linux-gnu`; tried {}",
        tried.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )))
}

/// A static executable has no `PT_INTERP` program header (the dynamic loader does not exist
/// in the initramfs).
pub fn check_static(path: &Path) -> Result<(), AssetError> {
    let data = std::fs::read(path).map_err(|e| AssetError::io(path, e))?;
    check_static_bytes(&data).map_err(|reason| AssetError::AgentNotStatic {
        path: path.to_path_buf(),
        reason,
    })
}

pub(crate) fn check_static_bytes(d: &[u8]) -> Result<(), String> {
    if d.len() < 64 || &d[..4] != b"\x7fELF" {
        return Err("no ELF magic".into());
    }
    if d[4] != 2 || d[5] != 1 {
        return Err("not a 64-bit little-endian ELF".into());
    }
    let u16_at = |o: usize| u16::from_le_bytes([d[o], d[o + 1]]);
    if u16_at(0x12) != 62 {
        return Err(format!("machine {} is not x86-64", u16_at(0x12)));
    }
    let e_type = u16_at(0x10);
    if e_type != 2 && e_type != 3 {
        return Err(format!("ELF type {e_type} is not an executable"));
    }
    let phoff = u64::from_le_bytes(d[0x20..0x28].try_into().expect("8 bytes")) as usize;
    let phentsize = u16_at(0x36) as usize;
    let phnum = u16_at(0x38) as usize;
    for i in 0..phnum {
        let off = phoff
            .checked_add(i.checked_mul(phentsize).ok_or("program header overflow")?)
            .ok_or("program header overflow")?;
        let p_type = d.get(off..off + 4).ok_or("truncated program headers")?;
        if u32::from_le_bytes(p_type.try_into().expect("4 bytes")) == 3 {
            return Err(
                "it has a PT_INTERP (dynamically linked); build with -C target-feature=+crt-static"
                    .into(),
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busybox_static_passes_dynamic_fails() {
        if Path::new("/bin/busybox").exists() {
            check_static(Path::new("/bin/busybox")).unwrap();
        }
        let e = check_static(Path::new("/bin/ls")).unwrap_err();
        assert!(e.to_string().contains("PT_INTERP"), "{e}");
        assert!(check_static_bytes(b"#!/bin/sh\n").is_err());
        let mut fake = vec![0u8; 64];
        fake[..4].copy_from_slice(b"\x7fELF");
        fake[4] = 2;
        fake[5] = 1;
        fake[0x12] = 62;
        fake[0x10] = 2;
        fake[0x20] = 0xff; // phoff beyond the data
        fake[0x38] = 1;
        fake[0x36] = 56;
        assert!(check_static_bytes(&fake).unwrap_err().contains("truncated"));
    }
}
