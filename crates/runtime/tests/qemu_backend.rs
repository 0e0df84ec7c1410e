//! The QEMU backend on its own, without the agent: a busybox `/init` loads the virtio modules
//! microbox resolved, mounts the virtio-fs root exported by virtiofsd and prints a file from it
//! on the serial console, then powers off. Real QEMU (TCG here), virtiofsd, vhost-device-vsock.

use std::path::Path;
use std::time::Duration;

use microbox_runtime::accel::{detect, Accel};
use microbox_runtime::assets::cpio::CpioWriter;
use microbox_runtime::assets::{kernel, modules};
use microbox_runtime::hypervisor::qemu::QemuBackend;
use microbox_runtime::hypervisor::{Hypervisor, Share, VmSpec};
use microbox_runtime::paths::{BoxPaths, Paths};

fn busybox_initrd(k: &kernel::Kernel, out: &Path) {
    let mods = modules::resolve(&k.modules_dir, &["virtio_mmio", "virtiofs"]).unwrap();
    let mut w = CpioWriter::new(Vec::new());
    w.file(
        "bin/busybox",
        0o755,
        &std::fs::read("/bin/busybox").expect("busybox-static installed"),
    )
    .unwrap();
    let mut script = String::from("#!/bin/busybox sh\n/bin/busybox mkdir -p /proc /mnt\n/bin/busybox mount -t proc proc /proc\n");
    for m in &mods {
        let gp = format!("lib/{}", m.rel_path.replace('/', "_"));
        w.file(
            &gp,
            0o644,
            &std::fs::read(modules::host_path(&k.modules_dir, m)).unwrap(),
        )
        .unwrap();
        script.push_str(&format!("/bin/busybox insmod /{gp}\n"));
    }
    script.push_str("/bin/busybox mount -t virtiofs rootfs /mnt\n/bin/busybox echo \"MARKER:$(/bin/busybox cat /mnt/marker)\"\n");
    script.push_str("/bin/busybox poweroff -f\n");
    w.file("init", 0o755, script.as_bytes()).unwrap();
    std::fs::write(out, w.finish().unwrap()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn microvm_boots_mounts_virtiofs_and_cleans_up() {
    let tmp = tempfile::tempdir().unwrap();
    let paths = Paths::new(tmp.path());
    let bp = BoxPaths::new(paths.create_box_dir("qemutest").unwrap());
    let share = tmp.path().join("share");
    std::fs::create_dir(&share).unwrap();
    std::fs::write(share.join("marker"), "from-the-host-42").unwrap();
    let k = kernel::find_kernel(None).unwrap();
    busybox_initrd(&k, &bp.initrd());
    let accel = detect(None).unwrap();
    let spec = VmSpec {
        box_paths: bp.clone(),
        kernel: k.path.clone(),
        initrd: bp.initrd(),
        extra_cmdline: String::new(),
        vcpus: 1,
        memory_mib: 256,
        accel: accel.accel,
        shares: vec![Share {
            tag: "rootfs".into(),
            host_dir: share.clone(),
            read_only: true,
            immutable: false,
        }],
        net: None,
        agent_port: 4088,
    };
    let backend = QemuBackend::new();
    backend.check(Accel::Tcg).unwrap();
    let vm = backend.launch(&spec).await.unwrap();
    let procs = vm.processes();
    let names: Vec<_> = procs.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["qemu", "virtiofsd-rootfs", "vhost-device-vsock"]);
    for p in &procs {
        assert!(bp.pidfile(&p.name).exists(), "pidfile of {}", p.name);
    }
    let mut exit = vm.vmm_exit();
    tokio::time::timeout(Duration::from_secs(120), async {
        while exit.borrow_and_update().is_none() {
            exit.changed().await.unwrap();
        }
    })
    .await
    .expect("guest powered off");
    let console = std::fs::read_to_string(bp.console_log()).unwrap();
    assert!(
        console.contains("MARKER:from-the-host-42"),
        "console:\n{console}"
    );
    vm.terminate(Duration::from_secs(1)).await;
    for p in &procs {
        assert!(
            !Path::new(&format!("/proc/{}", p.pid)).exists(),
            "{} ({}) still exists",
            p.name,
            p.pid
        );
        assert!(!bp.pidfile(&p.name).exists());
    }
    assert!(!bp.vsock_uds().exists());
}
