//! Failure handling with real VMs: the VMM killed from outside, a boot that times out, a
//! network helper that cannot start.

mod common;

use std::time::Duration;

use common::*;
use microbox_core::{BoxEvent, BoxState, Delivered, EventEmitter};
use microbox_runtime::{ExecRequest, RuntimeError};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_killed_from_outside_stops_the_box_and_its_helpers() {
    let tmp = tempfile::tempdir().unwrap();
    let emitter = EventEmitter::default();
    let vm = busybox_box(tmp.path(), &emitter);
    vm.boot().await.unwrap();
    let mut sub = emitter.subscribe();
    let procs = vm.processes();
    let qemu = procs.iter().find(|p| p.name == "qemu").unwrap().pid;
    // SAFETY: plain kill(2) of the test's own QEMU child.
    unsafe {
        libc::kill(qemu as i32, libc::SIGKILL);
    }
    let (mut saw_error, mut stopped_reason) = (false, None);
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(d) = sub.recv().await {
            if let Delivered::Event(e) = d {
                match e.event {
                    BoxEvent::Error { .. } => saw_error = true,
                    BoxEvent::StateChanged {
                        to: BoxState::Stopped,
                        reason,
                        ..
                    } => {
                        stopped_reason = reason;
                        break;
                    }
                    _ => {}
                }
            }
        }
    })
    .await
    .expect("the box noticed QEMU's death");
    assert!(saw_error);
    let reason = stopped_reason.expect("a reason");
    assert!(
        reason.contains("exited unexpectedly") && reason.contains("signal 9"),
        "{reason}"
    );
    assert_eq!(vm.state(), BoxState::Stopped);
    assert_eq!(vm.stop_reason().as_deref(), Some(reason.as_str()));
    for p in &procs {
        assert!(gone(p.pid), "{} ({}) survived", p.name, p.pid);
    }
    let err = vm.exec(ExecRequest::new(["true"])).await.unwrap_err();
    assert!(
        matches!(
            err,
            RuntimeError::InvalidState {
                state: BoxState::Stopped,
                ..
            }
        ),
        "{err}"
    );
    vm.destroy().await.unwrap();
    assert!(!vm.box_dir().exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boot_timeout_reports_console_and_leaves_no_process() {
    let tmp = tempfile::tempdir().unwrap();
    let emitter = EventEmitter::default();
    let mut cfg = busybox_box(tmp.path(), &emitter).config().clone();
    cfg.boot_timeout = Duration::from_secs(25);
    let vm = microbox_runtime::VmManager::with_root(cfg, emitter.clone(), tmp.path());
    // No init: the kernel panics and, with panic=0, waits forever; the boot must time out.
    vm.set_kernel_args("rdinit=/nonexistent panic=0");
    let err = vm.boot().await.unwrap_err();
    match &err {
        RuntimeError::BootTimeout { console_tail, .. } => {
            assert!(
                console_tail.contains("Kernel panic"),
                "the error quotes the console: {console_tail}"
            );
        }
        other => panic!("expected a boot timeout, got {other}"),
    }
    assert!(vm.processes().is_empty());
    assert!(processes_mentioning(&tmp.path().to_string_lossy()).is_empty());
    assert_eq!(vm.state(), BoxState::Created);
    vm.destroy().await.unwrap();
    assert!(!vm.box_dir().exists());
}

/// Child half of `runtime_killed_takes_its_box_along`: boots a box under the root given in the
/// environment and waits to be killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "helper process of runtime_killed_takes_its_box_along"]
async fn child_boots_and_waits() {
    let Some(root) = std::env::var_os("MICROBOX_TEST_CHILD_ROOT") else {
        return;
    };
    let vm = busybox_box(std::path::Path::new(&root), &EventEmitter::default());
    vm.boot().await.unwrap();
    tokio::time::sleep(Duration::from_secs(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_killed_takes_its_box_along() {
    let tmp = tempfile::tempdir().unwrap();
    // Resolve the test image here: the child must not start its own registry (it would die with
    // the child and leave nothing to compare).
    let _ = microbox_testsupport::image("busybox");
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "child_boots_and_waits",
            "--nocapture",
        ])
        .env("MICROBOX_TEST_CHILD_ROOT", tmp.path())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let boxes = tmp.path().join("boxes");
    let state = tokio::time::timeout(Duration::from_secs(180), async {
        loop {
            let found = std::fs::read_dir(&boxes)
                .ok()
                .and_then(|mut d| d.next())
                .and_then(|e| e.ok())
                .and_then(|e| microbox_runtime::BoxStateFile::read(&e.path()));
            if let Some(s) = found.filter(|s| s.state == BoxState::Ready) {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the child booted its box");
    assert_eq!(state.owner_pid, child.id());
    assert!(state.processes.len() >= 3);
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!state.owner_alive());
    // PR_SET_PDEATHSIG: every helper dies with the runtime process.
    tokio::time::timeout(Duration::from_secs(10), async {
        while !state.processes.iter().all(|(_, pid)| gone(*pid)) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("helpers survived their runtime: {:?}", state.processes));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passt_that_cannot_publish_a_port_fails_the_boot_with_its_own_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let emitter = EventEmitter::default();
    // The port is taken after the caller's own check would have passed: passt cannot bind it,
    // exits at once, and the fail-stop kills QEMU. The boot error must name passt, not QEMU.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let mut cfg = busybox_box(tmp.path(), &emitter).config().clone();
    cfg.network = microbox_core::NetworkMode::Passt;
    cfg.ports = vec![microbox_core::PortMapping::tcp(port, 80)];
    let vm = microbox_runtime::VmManager::with_root(cfg, emitter, tmp.path());
    let err = vm.boot().await.unwrap_err().to_string();
    assert!(err.contains("passt") && err.contains("passt.log"), "{err}");
    assert!(err.contains("Failed to bind"), "passt's own words: {err}");
    assert!(!err.contains("qemu did not come up"), "{err}");
    assert!(processes_mentioning(&tmp.path().to_string_lossy()).is_empty());
    vm.destroy().await.unwrap();
}
