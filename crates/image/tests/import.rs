//! `ImageStore::import` of an OCI layout directory, an OCI layout tar and a `docker save`
//! archive; each gives the same root filesystem as a registry pull.

mod common;

use std::io::Read;
use std::process::Command;

use common::*;
use microbox_image::{ImageStore, NoProgress, PullOptions};
use microbox_testsupport as ts;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_oci_dir_tar_and_docker_save() {
    let layout = ts::layout("multilayer");
    let pulled_root = tempfile::tempdir().unwrap();
    let pulled = ImageStore::open(pulled_root.path()).unwrap();
    let hp = pulled
        .pull(
            &ts::image("multilayer"),
            &PullOptions::default(),
            &NoProgress,
        )
        .await
        .unwrap();
    let want = snapshot(&pulled.rootfs(&hp).unwrap());

    let root = tempfile::tempdir().unwrap();
    let store = ImageStore::open(root.path()).unwrap();

    // OCI layout directory.
    let e = store.import(&layout, None).unwrap_err().to_string();
    assert!(e.contains("needs a reference"), "{e}");
    let h = store.import(&layout, Some("imported/dir:v1")).unwrap();
    assert_eq!(h.reference, "docker.io/imported/dir:v1");
    assert_eq!(h.manifest_digest, hp.manifest_digest);
    assert!(diff(&snapshot(&store.rootfs(&h).unwrap()), &want).is_empty());

    // OCI layout as a tar.
    let work = tempfile::tempdir().unwrap();
    let tar = work.path().join("layout.tar");
    ts::run(
        Command::new("tar")
            .arg("-C")
            .arg(&layout)
            .arg("-cf")
            .arg(&tar)
            .arg("."),
    );
    let h2 = store.import(&tar, Some("imported/tar:v1")).unwrap();
    assert_eq!(h2.manifest_digest, hp.manifest_digest);
    assert_eq!(store.lookup("imported/tar:v1").unwrap().unwrap(), h2);

    // docker save archive (legacy layout: config json + uncompressed layer tars).
    let save = work.path().join("save");
    std::fs::create_dir(&save).unwrap();
    let blob = |d: &str| std::fs::read(layout.join("blobs/sha256").join(&d[7..])).unwrap();
    std::fs::write(save.join("config.json"), blob(&hp.config_digest)).unwrap();
    let mut layers = Vec::new();
    for (i, l) in hp.layers.iter().enumerate() {
        let mut t = Vec::new();
        flate2::read::GzDecoder::new(&blob(&l.digest)[..])
            .read_to_end(&mut t)
            .unwrap();
        std::fs::create_dir(save.join(format!("l{i}"))).unwrap();
        std::fs::write(save.join(format!("l{i}/layer.tar")), t).unwrap();
        layers.push(format!("l{i}/layer.tar"));
    }
    let manifest = serde_json::json!([{"Config": "config.json", "RepoTags": ["saved/app:2"], "Layers": layers}]);
    std::fs::write(save.join("manifest.json"), manifest.to_string()).unwrap();
    let archive = work.path().join("save.tar");
    ts::run(
        Command::new("tar")
            .arg("-C")
            .arg(&save)
            .arg("-cf")
            .arg(&archive)
            .arg("."),
    );
    let h3 = store.import(&archive, None).unwrap();
    assert_eq!(h3.reference, "docker.io/saved/app:2");
    assert_eq!(h3.config_digest, hp.config_digest);
    assert!(h3.layers.iter().all(|l| l.media_type.ends_with(".tar")));
    assert!(diff(&snapshot(&store.rootfs(&h3).unwrap()), &want).is_empty());
    assert!(store.check().unwrap().is_clean());

    // A member path leaving the archive is refused.
    let manifest =
        serde_json::json!([{"Config": "../../../etc/passwd", "RepoTags": ["x:1"], "Layers": []}]);
    std::fs::write(save.join("manifest.json"), manifest.to_string()).unwrap();
    let e = store.import(&save, None).unwrap_err().to_string();
    assert!(e.contains("leaves the archive"), "{e}");
}
