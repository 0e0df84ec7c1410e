//! Several boxes of one image at once share one unpacked read-only rootfs and never see each
//! other's writes (real VMs, real registry, real agent).

mod common;

use std::time::Duration;

use common::*;
use microbox_core::EventEmitter;
use microbox_runtime::ExecRequest;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_boxes_share_the_rootfs_but_not_their_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let emitter = EventEmitter::default();
    let boxes: Vec<_> = (0..3).map(|_| busybox_box(tmp.path(), &emitter)).collect();
    let boots = futures::future::join_all(boxes.iter().map(|b| b.boot())).await;
    for r in boots {
        r.unwrap();
    }

    // One virtiofsd per box exports the same host directory.
    let mut shared = Vec::new();
    for b in &boxes {
        let p = b
            .processes()
            .into_iter()
            .find(|p| p.name == "virtiofsd-rootfs")
            .expect("rootfs virtiofsd");
        let cmd =
            String::from_utf8(std::fs::read(format!("/proc/{}/cmdline", p.pid)).unwrap()).unwrap();
        let dir = cmd
            .split('\0')
            .find_map(|a| a.strip_prefix("--shared-dir="))
            .unwrap()
            .to_string();
        shared.push(dir);
    }
    assert!(shared.iter().all(|d| d == &shared[0]), "{shared:?}");
    let rootfs = std::path::PathBuf::from(&shared[0]);
    assert!(rootfs.join("bin/busybox").exists());

    for (i, b) in boxes.iter().enumerate() {
        let r = b
            .exec(ExecRequest::new([
                "sh",
                "-c",
                &format!("echo box{i} > /etc/owner && echo box{i} > /bin/mark{i}"),
            ]))
            .await
            .unwrap();
        assert_eq!(r.exit_code, Some(0), "{}", r.stderr_str());
    }
    for (i, b) in boxes.iter().enumerate() {
        let r = b
            .exec(ExecRequest::new([
                "sh",
                "-c",
                "cat /etc/owner; ls /bin | grep mark",
            ]))
            .await
            .unwrap();
        assert_eq!(
            r.stdout_str(),
            format!("box{i}\nmark{i}\n"),
            "box {i} sees: {}",
            r.stdout_str()
        );
    }
    // Nothing reached the shared image copy on the host.
    assert!(!rootfs.join("etc/owner").exists());
    for i in 0..3 {
        assert!(!rootfs.join(format!("bin/mark{i}")).exists());
    }

    for b in &boxes {
        b.stop(Duration::from_secs(20)).await.unwrap();
        b.destroy().await.unwrap();
    }
    assert!(processes_mentioning(&tmp.path().to_string_lossy()).is_empty());
}
