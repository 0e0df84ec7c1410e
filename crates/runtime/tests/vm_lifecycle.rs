//! Real microVMs (QEMU microvm; TCG on machines without hardware virtualization) booted from the
//! busybox test image served by a real registry, with the real guest agent.

mod common;

use std::time::Duration;

use common::*;
use microbox_core::{BootPhase, BoxEvent, BoxState, EventEmitter};
use microbox_runtime::{ExecRequest, RuntimeError, VmManager};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boot_health_exec_stop_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let emitter = EventEmitter::default();
    let mut sub = emitter.subscribe();
    let vm = busybox_box(tmp.path(), &emitter);
    assert_eq!(vm.state(), BoxState::Created);
    vm.boot().await.unwrap();
    assert_eq!(vm.state(), BoxState::Ready);
    assert!(vm.health_check().await.unwrap());

    let procs = vm.processes();
    assert!(procs.len() >= 3, "{procs:?}");
    let box_dir = vm.box_dir().to_path_buf();
    assert!(vm.agent_socket().exists());
    let sf = microbox_runtime::BoxStateFile::read(&box_dir).expect("state.json");
    assert_eq!(sf.state, BoxState::Ready);
    assert_eq!(sf.id, vm.id().to_string());
    assert!(sf.owner_alive());
    assert_eq!(sf.processes.len(), procs.len());

    let out = vm.exec(ExecRequest::new(["uname", "-r"])).await.unwrap();
    assert_eq!(out.exit_code, Some(0), "stderr: {}", out.stderr_str());
    let kernel = microbox_runtime::assets::kernel::find_kernel(None).unwrap();
    assert_eq!(out.stdout_str().trim(), kernel.version);

    // The image's rootfs is visible and writes land in the box's own layer.
    let w = vm
        .exec(ExecRequest::new([
            "sh",
            "-c",
            "echo hi > /newfile && cat /newfile && ls /bin/busybox",
        ]))
        .await
        .unwrap();
    assert_eq!(
        w.stdout_str(),
        "hi\n/bin/busybox\n",
        "stderr: {}",
        w.stderr_str()
    );

    let fail = vm
        .exec(ExecRequest::new(["sh", "-c", "exit 7"]))
        .await
        .unwrap();
    assert_eq!(fail.exit_code, Some(7));

    // Pause and resume through QMP; the VMM reports each. What reaches for the agent meanwhile,
    // through the runtime or through agent.sock, waits and goes on after the resume (a host event
    // on the stopped vsock queues would have killed the guest's vsock for good).
    assert_eq!(vm.vmm_status().await.unwrap(), "running");
    vm.pause().await.unwrap();
    assert_eq!(vm.vmm_status().await.unwrap(), "paused");
    let sock = vm.agent_socket().to_path_buf();
    let outside = std::thread::spawn(move || {
        use std::io::Write;
        let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
        let _ = s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
    });
    let held = vm.exec(ExecRequest::new(["echo", "after the pause"]));
    tokio::pin!(held);
    assert!(
        tokio::time::timeout(Duration::from_secs(1), &mut held)
            .await
            .is_err(),
        "an exec ran in a paused VM"
    );
    outside.join().unwrap();
    vm.resume().await.unwrap();
    assert_eq!(vm.vmm_status().await.unwrap(), "running");
    let out = tokio::time::timeout(Duration::from_secs(60), held)
        .await
        .expect("the exec held over the pause never finished: the guest's vsock is dead")
        .unwrap();
    assert_eq!(out.stdout_str(), "after the pause\n");
    assert!(vm.health_check().await.unwrap());

    // Streaming: stdin from a reader, output into writers as it arrives.
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let st = vm
        .exec_streaming(
            ExecRequest::new(["sh", "-c", "tr a-z A-Z; echo done >&2"]),
            Some(std::io::Cursor::new(b"streamed input".to_vec())),
            &mut out,
            &mut err,
        )
        .await
        .unwrap();
    assert_eq!(st.exit_code, Some(0));
    assert_eq!(out, b"STREAMED INPUT");
    assert_eq!(err, b"done\n");

    // A paused box stops as cleanly as a running one: the guest powers itself off.
    vm.pause().await.unwrap();
    vm.stop(Duration::from_secs(20)).await.unwrap();
    assert_eq!(vm.state(), BoxState::Stopped);
    let console = std::fs::read_to_string(box_dir.join("console.log")).unwrap();
    assert!(console.contains("reboot: Power down"), "{console}");
    for p in &procs {
        assert!(gone(p.pid), "{} ({}) survived stop", p.name, p.pid);
    }
    assert!(processes_mentioning(&box_dir.to_string_lossy()).is_empty());
    assert!(!vm.agent_socket().exists());
    assert_eq!(
        microbox_runtime::BoxStateFile::read(&box_dir)
            .unwrap()
            .state,
        BoxState::Stopped
    );

    let events = drain(&mut sub);
    let phases: Vec<BootPhase> = events
        .iter()
        .filter_map(|e| match e.event {
            BoxEvent::BootPhase { phase, .. } => Some(phase),
            _ => None,
        })
        .collect();
    assert_eq!(phases, BootPhase::ALL.to_vec());
    let states: Vec<(BoxState, BoxState)> = events
        .iter()
        .filter_map(|e| match e.event {
            BoxEvent::StateChanged { from, to, .. } => Some((from, to)),
            _ => None,
        })
        .collect();
    assert_eq!(states.first(), Some(&(BoxState::Created, BoxState::Ready)));
    assert!(states.contains(&(BoxState::Ready, BoxState::Busy)));
    assert!(states.contains(&(BoxState::Busy, BoxState::Ready)));
    assert_eq!(states.last(), Some(&(BoxState::Ready, BoxState::Stopped)));
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e.event, BoxEvent::ExecFinished { .. }))
            .count(),
        5
    );

    vm.destroy().await.unwrap();
    assert!(!box_dir.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_kernel_fails_before_any_process_starts() {
    let tmp = tempfile::tempdir().unwrap();
    let emitter = EventEmitter::default();
    let mut cfg = microbox_core::BoxConfig::new("/"); // a local root dir: no registry needed
    cfg.kernel = Some(tmp.path().join("no-such-vmlinuz"));
    cfg.network = microbox_core::NetworkMode::None;
    let vm = VmManager::with_root(cfg, emitter, tmp.path());
    let err = vm.boot().await.unwrap_err();
    assert!(
        matches!(
            err,
            RuntimeError::Assets(microbox_runtime::assets::AssetError::NoKernel(_))
        ),
        "{err}"
    );
    assert!(err.to_string().contains("no-such-vmlinuz"), "{err}");
    assert!(vm.processes().is_empty());
    assert!(
        !vm.box_dir().exists(),
        "no box directory (and so no helper) was created"
    );
    assert!(processes_mentioning(&tmp.path().to_string_lossy()).is_empty());
    assert_eq!(vm.state(), BoxState::Created);
    vm.destroy().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_box_keeps_its_writes_across_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let emitter = EventEmitter::default();
    let mut cfg = busybox_box(tmp.path(), &emitter).config().clone();
    cfg.persistent = true;
    let id = microbox_core::BoxId::random();
    let vm = VmManager::with_id(cfg.clone(), emitter.clone(), tmp.path(), id.clone());
    let w = vm
        .exec(ExecRequest::new([
            "sh",
            "-c",
            "echo kept > /etc/kept && rm /bin/true",
        ]))
        .await
        .unwrap();
    assert_eq!(w.exit_code, Some(0), "{}", w.stderr_str());
    vm.stop(Duration::from_secs(20)).await.unwrap();
    // The writable layer lives in the box directory on the host, not in the shared image.
    assert_eq!(
        std::fs::read_to_string(vm.box_dir().join("upper/upper/etc/kept")).unwrap(),
        "kept\n"
    );

    let again = VmManager::with_id(cfg, emitter, tmp.path(), id);
    let r = again
        .exec(ExecRequest::new([
            "sh",
            "-c",
            "cat /etc/kept; ls /bin/true 2>&1 || echo deleted",
        ]))
        .await
        .unwrap();
    assert!(r.stdout_str().starts_with("kept\n"), "{}", r.stdout_str());
    assert!(
        r.stdout_str().trim_end().ends_with("deleted"),
        "{}",
        r.stdout_str()
    );
    again.destroy().await.unwrap();
    assert!(!again.box_dir().exists());
}
