//! `info` and `version`: what this host offers and what microbox would choose, with reasons.

use anyhow::Result;
use microbox_runtime::accel;
use microbox_runtime::assets::{agent, kernel};
use microbox_runtime::hypervisor::{krun::KrunBackend, qemu::QemuBackend, Hypervisor};

use super::Ctx;

pub fn version() -> Result<()> {
    println!("microbox {}", env!("CARGO_PKG_VERSION"));
    println!("agent protocol: microbox.agent.v1 on vsock port 4088");
    Ok(())
}

pub fn info(ctx: &Ctx) -> Result<()> {
    println!("microbox {}", env!("CARGO_PKG_VERSION"));
    println!("root:          {}", ctx.root.display());
    let decision = accel::detect(None);
    match &decision {
        Ok(d) => println!("acceleration:  {} ({})", d.accel, d.reason),
        Err(e) => println!("acceleration:  unusable ({e})"),
    }
    if let Ok(d) = &decision {
        let q = QemuBackend::new();
        let k = KrunBackend::new();
        let line = |r: Result<(), _>| match r {
            Ok(()) => "usable".to_string(),
            Err(e) => format!("not usable: {e}"),
        };
        println!("backend qemu:  {}", line(q.check(d.accel)));
        println!("backend krun:  {}", line(k.check(d.accel)));
        // The default box has a user-mode network.
        match microbox_runtime::hypervisor::select_backend(Default::default(), d, true) {
            Ok(b) => println!(
                "backend:       {} (auto choice for a box with a network; MICROBOX_BACKEND overrides)",
                b.name()
            ),
            Err(e) => println!("backend:       none ({e})"),
        }
    }
    match kernel::find_kernel(None) {
        Ok(k) => println!(
            "kernel:        {} ({}), modules {}",
            k.path.display(),
            k.version,
            k.modules_dir.display()
        ),
        Err(e) => println!("kernel:        not found ({e})"),
    }
    match agent::find_agent() {
        Ok(p) => println!("agent:         {}", p.display()),
        Err(e) => println!("agent:         not found ({e})"),
    }
    Ok(())
}
