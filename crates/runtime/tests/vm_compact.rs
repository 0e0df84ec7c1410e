//! Compaction with a real VM: after the guest filled its page cache, `compact()` (drop caches in
//! the guest + virtio-balloon free page reporting) lowers the host RSS of the box's processes.

mod common;

use std::time::Duration;

use common::*;
use microbox_core::{BoxEvent, BoxState, EventEmitter, VolumeMount};
use microbox_runtime::ExecRequest;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compact_returns_page_cache_memory_to_the_host() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).unwrap();
    // 192 MiB of zeros (sparse on the host; real page cache pages in the guest once read).
    let f = std::fs::File::create(data.join("big")).unwrap();
    f.set_len(192 << 20).unwrap();
    drop(f);

    let emitter = EventEmitter::default();
    let mut cfg = busybox_box(tmp.path(), &emitter).config().clone();
    cfg.memory_mib = 512;
    cfg.volumes.push(VolumeMount {
        host: data.clone(),
        guest: "/data".into(),
        read_only: true,
    });
    let vm = microbox_runtime::VmManager::with_root(cfg, emitter.clone(), tmp.path());
    vm.boot().await.unwrap();
    let mut sub = emitter.subscribe();

    let r = vm
        .exec(ExecRequest::new([
            "sh",
            "-c",
            "cat /data/big > /dev/null && grep -E '^(Cached|MemFree)' /proc/meminfo",
        ]))
        .await
        .unwrap();
    assert_eq!(r.exit_code, Some(0), "{}", r.stderr_str());
    let cached_kb: u64 = r
        .stdout_str()
        .lines()
        .find(|l| l.starts_with("Cached:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(
        cached_kb > 150 * 1024,
        "the guest cached the file: {}",
        r.stdout_str()
    );

    let filled = vm.host_rss_bytes();
    let rep = vm.compact().await.unwrap();
    eprintln!(
        "host RSS: filled {filled} before {} after {} ({})",
        rep.rss_before_bytes, rep.rss_after_bytes, rep.method
    );
    assert_eq!(vm.state(), BoxState::Ready);
    // Most of the 192 MiB page cache must come back (allow for what the guest kept).
    assert!(
        rep.rss_after_bytes + (96 << 20) < rep.rss_before_bytes,
        "RSS before {} after {}",
        rep.rss_before_bytes,
        rep.rss_after_bytes
    );
    let events = drain(&mut sub);
    assert!(events.iter().any(
        |e| matches!(e.event, BoxEvent::Compacted { rss_before_bytes, rss_after_bytes }
        if rss_before_bytes == rep.rss_before_bytes && rss_after_bytes == rep.rss_after_bytes)
    ));
    assert!(events.iter().any(|e| matches!(
        e.event,
        BoxEvent::StateChanged {
            from: BoxState::Ready,
            to: BoxState::Compacting,
            ..
        }
    )));
    assert!(events.iter().any(|e| matches!(
        e.event,
        BoxEvent::StateChanged {
            from: BoxState::Compacting,
            to: BoxState::Ready,
            ..
        }
    )));

    // Still usable afterwards.
    let r = vm
        .exec(ExecRequest::new(["cat", "/data/big"]).stdin(Vec::new()))
        .await;
    assert!(r.is_ok());
    vm.stop(Duration::from_secs(20)).await.unwrap();
    vm.destroy().await.unwrap();
}
