//! Failure modes against the real registry: corrupted bytes, concurrent pulls of one image,
//! a pull killed with SIGKILL mid-download.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use microbox_image::{Error, ImageStore, NoProgress, PullOptions};
use microbox_testsupport as ts;

fn via(proxy: &Proxy, name: &str) -> String {
    format!("{}/microbox-test/{name}:latest", proxy.addr)
}

fn assert_nothing_stored(store: &ImageStore, reference: &str, digest: &str) {
    assert!(store.lookup(reference).unwrap().is_none());
    let blobs = dir_entries(&store.layout_dir().join("blobs/sha256"));
    assert!(
        !blobs.contains(&digest[7..].to_string()),
        "corrupt blob {digest} was stored"
    );
    assert!(
        dir_entries(&store.root().join("images-state/tmp")).is_empty(),
        "temp files left"
    );
    assert!(store.check().unwrap().is_clean());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_bytes_fail_with_digest_error_and_store_nothing() {
    let reg = ts::registry();
    ts::image("busybox");
    let scratch = tempfile::tempdir().unwrap();
    let h = ImageStore::open(scratch.path())
        .unwrap()
        .pull(&ts::image("busybox"), &PullOptions::default(), &NoProgress)
        .await
        .unwrap();

    for (what, digest) in [
        ("layer", h.layers[0].digest.clone()),
        ("config", h.config_digest.clone()),
    ] {
        let proxy = Proxy::start(&reg.addr, ProxyMode::Corrupt(digest.clone())).await;
        let root = tempfile::tempdir().unwrap();
        let store = ImageStore::open(root.path()).unwrap();
        let reference = via(&proxy, "busybox");
        let err = store
            .pull(&reference, &PullOptions::default(), &NoProgress)
            .await
            .expect_err("corrupted blob must fail the pull");
        assert!(matches!(err, Error::DigestMismatch { .. }), "{what}: {err}");
        assert!(err.to_string().contains(&digest), "{what}: {err}");
        assert_eq!(
            proxy.blob_gets().values().filter(|n| **n > 1).count(),
            0,
            "digest errors are not retried"
        );
        assert_nothing_stored(&store, &reference, &digest);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pulls_both_succeed_and_fetch_each_blob_once() {
    let reg = ts::registry();
    ts::image("multilayer");
    let proxy = Proxy::start(&reg.addr, ProxyMode::Pass).await;
    let reference = via(&proxy, "multilayer");
    let root = tempfile::tempdir().unwrap();
    // Two stores on one root: separate lock file descriptions, as two processes would have.
    let (a, b) = (
        ImageStore::open(root.path()).unwrap(),
        ImageStore::open(root.path()).unwrap(),
    );
    let opts = PullOptions::default();
    let (ra, rb) = tokio::join!(
        a.pull(&reference, &opts, &NoProgress),
        b.pull(&reference, &opts, &NoProgress)
    );
    let (ha, hb) = (ra.unwrap(), rb.unwrap());
    assert_eq!(ha, hb);
    let gets = proxy.blob_gets();
    assert_eq!(gets.len(), 4, "config + 3 layers: {gets:?}");
    assert!(
        gets.values().all(|n| *n == 1),
        "a blob was fetched twice: {gets:?}"
    );
    assert!(a.check().unwrap().is_clean());
    assert_eq!(a.list().unwrap().len(), 1);
    // Concurrent rootfs materialisation also agrees.
    let (pa, pb) = std::thread::scope(|s| {
        let ta = s.spawn(|| a.rootfs(&ha).unwrap());
        let tb = s.spawn(|| b.rootfs(&hb).unwrap());
        (ta.join().unwrap(), tb.join().unwrap())
    });
    assert_eq!(pa, pb);
}

/// Child half of `sigkill_mid_pull_leaves_no_visible_damage` (no-op in normal runs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_pull_helper() {
    let (Ok(root), Ok(reference)) = (
        std::env::var("MB_CHILD_ROOT"),
        std::env::var("MB_CHILD_REF"),
    ) else {
        return;
    };
    let store = ImageStore::open(Path::new(&root)).unwrap();
    let _ = store
        .pull(&reference, &PullOptions::default(), &NoProgress)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_pull_leaves_no_visible_damage() {
    let reg = ts::registry();
    let direct = ts::image("multilayer");
    let proxy = Proxy::start(&reg.addr, ProxyMode::Slow(20)).await;
    let root = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_pull_helper",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("MB_CHILD_ROOT", root.path())
        .env("MB_CHILD_REF", via(&proxy, "multilayer"))
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill once a layer download is under way (a non-empty temp blob exists).
    let tmp = root.path().join("images-state/tmp");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let busy = std::fs::read_dir(&tmp)
            .map(|r| {
                r.flatten().any(|e| {
                    e.file_name().to_string_lossy().starts_with("blob-")
                        && e.metadata().map(|m| m.len() > 0).unwrap_or(false)
                })
            })
            .unwrap_or(false);
        if busy {
            break;
        }
        assert!(Instant::now() < deadline, "child never started downloading");
        assert!(
            child.try_wait().unwrap().is_none(),
            "child finished before it could be killed"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    let store = ImageStore::open(root.path()).unwrap();
    assert!(store.lookup(&direct).unwrap().is_none());
    let report = store.check().unwrap();
    assert!(report.is_clean(), "{report:?}");
    // The next pull completes; nothing is damaged; prune clears the dead temp file.
    let h = store
        .pull(&direct, &PullOptions::default(), &NoProgress)
        .await
        .unwrap();
    assert_eq!(h.layers.len(), 3);
    let report = store.check().unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.blobs_checked, 5);
    store.prune().unwrap();
    assert!(dir_entries(&tmp).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_connection_is_retried_and_resumed_with_range() {
    let reg = ts::registry();
    ts::image("multilayer");
    let proxy = Proxy::start(&reg.addr, ProxyMode::CutOnce("/blobs/".into())).await;
    let root = tempfile::tempdir().unwrap();
    let store = ImageStore::open(root.path()).unwrap();
    let events = std::sync::Mutex::new(Vec::new());
    let progress = |e: &microbox_image::PullEvent| events.lock().unwrap().push(e.clone());
    let h = store
        .pull(
            &via(&proxy, "multilayer"),
            &PullOptions::default(),
            &progress,
        )
        .await
        .unwrap();
    let retries = events
        .into_inner()
        .unwrap()
        .iter()
        .filter(|e| matches!(e, microbox_image::PullEvent::LayerRetry { .. }))
        .count();
    assert!(
        retries >= 3,
        "each layer was cut once, so each retried: {retries}"
    );
    let ranges = proxy.ranges.lock().unwrap().clone();
    let big = &h.layers[0].digest;
    assert!(
        ranges.iter().any(|(p, r)| p.contains(big.as_str())
            && r.starts_with("bytes=")
            && !r.starts_with("bytes=0-")),
        "resumed with a Range from the cut point: {ranges:?}"
    );
    assert!(store.check().unwrap().is_clean());
}

/// Pushes the multilayer test image with its layers recompressed (`zstd` or `plain`),
/// straight through the registry API (skopeo would reuse the gzip blobs).
async fn push_recompressed(kind: &str) -> String {
    use std::io::Read;
    let layout = ts::layout("multilayer");
    let blob = |d: &str| std::fs::read(layout.join("blobs/sha256").join(&d[7..])).unwrap();
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let mdigest = index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let mut manifest: serde_json::Value = serde_json::from_slice(&blob(&mdigest)).unwrap();
    let reference = format!("{}/formats/{kind}:latest", ts::registry().addr);
    let r: oci_client::Reference = reference.parse().unwrap();
    let client = oci_client::Client::new(oci_client::client::ClientConfig {
        protocol: oci_client::client::ClientProtocol::Http,
        ..Default::default()
    });
    client
        .auth(
            &r,
            &oci_client::secrets::RegistryAuth::Anonymous,
            oci_client::RegistryOperation::Push,
        )
        .await
        .unwrap();
    let cdigest = manifest["config"]["digest"].as_str().unwrap().to_string();
    client
        .push_blob(&r, blob(&cdigest), &cdigest)
        .await
        .unwrap();
    for layer in manifest["layers"].as_array_mut().unwrap() {
        let gz = blob(layer["digest"].as_str().unwrap());
        let mut tar = Vec::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_end(&mut tar)
            .unwrap();
        let (bytes, media) = match kind {
            "zstd" => (
                zstd::encode_all(&tar[..], 3).unwrap(),
                "application/vnd.oci.image.layer.v1.tar+zstd",
            ),
            _ => (tar, "application/vnd.oci.image.layer.v1.tar"),
        };
        let digest = format!(
            "sha256:{}",
            hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes))
        );
        layer["digest"] = digest.clone().into();
        layer["size"] = bytes.len().into();
        layer["mediaType"] = media.into();
        client.push_blob(&r, bytes, &digest).await.unwrap();
    }
    client
        .push_manifest_raw(
            &r,
            serde_json::to_vec(&manifest).unwrap(),
            http::HeaderValue::from_static("application/vnd.oci.image.manifest.v1+json"),
        )
        .await
        .unwrap();
    reference
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_schema2_zstd_and_uncompressed_layers() {
    let layout = ts::layout("multilayer");
    let work = tempfile::tempdir().unwrap();
    let reference_tree = {
        let h = ImageStore::open(work.path())
            .unwrap()
            .pull(
                &ts::image("multilayer"),
                &PullOptions::default(),
                &NoProgress,
            )
            .await
            .unwrap();
        snapshot(&ImageStore::open(work.path()).unwrap().rootfs(&h).unwrap())
    };
    for (name, media) in [
        (
            "schema2",
            "application/vnd.docker.image.rootfs.diff.tar.gzip",
        ),
        ("zstd", "application/vnd.oci.image.layer.v1.tar+zstd"),
        ("plain", "application/vnd.oci.image.layer.v1.tar"),
    ] {
        let reference = if name == "schema2" {
            ts::push_layout_with(
                &layout,
                "latest",
                "formats/schema2:latest",
                &["--format", "v2s2"],
            )
        } else {
            push_recompressed(name).await
        };
        let root = tempfile::tempdir().unwrap();
        let store = ImageStore::open(root.path()).unwrap();
        let h = store
            .pull(&reference, &PullOptions::default(), &NoProgress)
            .await
            .unwrap();
        assert!(
            h.layers.iter().all(|l| l.media_type == media),
            "{name}: {:?}",
            h.layers
        );
        let d = diff(&snapshot(&store.rootfs(&h).unwrap()), &reference_tree);
        assert!(d.is_empty(), "{name}: {}", d.join("\n"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_index_resolves_host_platform_or_override() {
    let reg = ts::registry();
    // Two single-platform images in one repository, then an index naming them amd64/arm64.
    let amd = ts::push_layout(&ts::layout("busybox"), "latest", "multi/arch:amd");
    let arm = ts::push_layout(&ts::layout("multilayer"), "latest", "multi/arch:arm");
    let scratch = tempfile::tempdir().unwrap();
    let s = ImageStore::open(scratch.path()).unwrap();
    let (ha, hr) = (
        s.pull(&amd, &PullOptions::default(), &NoProgress)
            .await
            .unwrap(),
        s.pull(&arm, &PullOptions::default(), &NoProgress)
            .await
            .unwrap(),
    );
    let size = |d: &str| {
        std::fs::metadata(s.layout_dir().join("blobs/sha256").join(&d[7..]))
            .unwrap()
            .len()
    };
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": hr.manifest_digest, "size": size(&hr.manifest_digest),
             "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": ha.manifest_digest, "size": size(&ha.manifest_digest),
             "platform": {"os": "linux", "architecture": "amd64"}},
        ]
    });
    let reference = format!("{}/multi/arch:latest", reg.addr);
    let r: oci_client::Reference = reference.parse().unwrap();
    let client = oci_client::Client::new(oci_client::client::ClientConfig {
        protocol: oci_client::client::ClientProtocol::Http,
        ..Default::default()
    });
    client
        .push_manifest_raw(
            &r,
            serde_json::to_vec(&index).unwrap(),
            http::HeaderValue::from_static("application/vnd.oci.image.index.v1+json"),
        )
        .await
        .unwrap();

    let root = tempfile::tempdir().unwrap();
    let store = ImageStore::open(root.path()).unwrap();
    let host = store
        .pull(&reference, &PullOptions::default(), &NoProgress)
        .await
        .unwrap();
    assert_eq!(host.manifest_digest, ha.manifest_digest);
    assert_eq!(host.platform, "linux/amd64");
    let opts = PullOptions {
        platform: Some("linux/arm64".into()),
        ..Default::default()
    };
    let other = store.pull(&reference, &opts, &NoProgress).await.unwrap();
    assert_eq!(other.manifest_digest, hr.manifest_digest);
    assert_eq!(other.platform, "linux/arm64/v8");
    assert_eq!(
        store.lookup(&reference).unwrap().unwrap().platform,
        "linux/arm64/v8"
    );
    let opts = PullOptions {
        platform: Some("linux/s390x".into()),
        ..Default::default()
    };
    let e = store
        .pull(&reference, &opts, &NoProgress)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("linux/s390x") && e.contains("linux/arm64/v8") && e.contains("linux/amd64"),
        "{e}"
    );
    // A single-platform image is refused for another platform.
    let e = store
        .pull(&amd, &opts, &NoProgress)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("no image for platform linux/s390x"), "{e}");
    let e = store
        .pull(
            &amd,
            &PullOptions {
                platform: Some("linux".into()),
                ..Default::default()
            },
            &NoProgress,
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("expected os/arch"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layer_not_matching_config_diff_id_is_refused() {
    // busybox with its config's diff_id replaced: layer bytes match the manifest digest, but
    // the uncompressed content does not match what the config promises.
    let layout = ts::layout("busybox");
    let blob = |d: &str| std::fs::read(layout.join("blobs/sha256").join(&d[7..])).unwrap();
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&blob(index["manifests"][0]["digest"].as_str().unwrap())).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_slice(&blob(manifest["config"]["digest"].as_str().unwrap())).unwrap();
    let bogus = format!("sha256:{}", "0".repeat(64));
    config["rootfs"]["diff_ids"][0] = bogus.clone().into();
    let cbytes = serde_json::to_vec(&config).unwrap();
    let cdigest = format!(
        "sha256:{}",
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&cbytes))
    );
    manifest["config"]["digest"] = cdigest.clone().into();
    manifest["config"]["size"] = cbytes.len().into();
    let layer_digest = manifest["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();

    let reference = format!("{}/bad/diffid:latest", ts::registry().addr);
    let r: oci_client::Reference = reference.parse().unwrap();
    let client = oci_client::Client::new(oci_client::client::ClientConfig {
        protocol: oci_client::client::ClientProtocol::Http,
        ..Default::default()
    });
    client
        .auth(
            &r,
            &oci_client::secrets::RegistryAuth::Anonymous,
            oci_client::RegistryOperation::Push,
        )
        .await
        .unwrap();
    client.push_blob(&r, cbytes, &cdigest).await.unwrap();
    client
        .push_blob(&r, blob(&layer_digest), &layer_digest)
        .await
        .unwrap();
    client
        .push_manifest_raw(
            &r,
            serde_json::to_vec(&manifest).unwrap(),
            http::HeaderValue::from_static("application/vnd.oci.image.manifest.v1+json"),
        )
        .await
        .unwrap();

    let root = tempfile::tempdir().unwrap();
    let store = ImageStore::open(root.path()).unwrap();
    let err = store
        .pull(&reference, &PullOptions::default(), &NoProgress)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("diff_ids") && msg.contains(&bogus) && msg.contains(&layer_digest),
        "{msg}"
    );
    assert_nothing_stored(&store, &reference, &layer_digest);
}
