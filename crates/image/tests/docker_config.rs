//! Credentials from Docker's own config file (`$DOCKER_CONFIG/config.json`), as `docker login`
//! leaves them, found by a pull that is given none. Alone in its binary: it sets an
//! environment variable for the whole process.

use base64::Engine;
use microbox_image::{ImageStore, NoProgress, PullOptions};
use microbox_testsupport as ts;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_uses_docker_config_json_credentials() {
    let reg = ts::registry_with_basic_auth();
    let user_pass = format!("{}:{}", ts::AUTH_USER, ts::AUTH_PASSWORD);
    let reference = ts::push_layout_to(
        reg,
        &ts::layout("busybox"),
        "latest",
        "docker-config/busybox:latest",
        &["--dest-creds", &user_pass],
    );
    let root = tempfile::tempdir().unwrap();
    let store = ImageStore::open(root.path()).unwrap();
    let docker = tempfile::tempdir().unwrap();
    // The only test in this binary, so no other thread reads the environment meanwhile.
    std::env::set_var("DOCKER_CONFIG", docker.path());
    // No config file yet: anonymous, refused.
    assert!(store
        .pull(&reference, &PullOptions::default(), &NoProgress)
        .await
        .is_err());
    let auth = base64::engine::general_purpose::STANDARD.encode(&user_pass);
    std::fs::write(
        docker.path().join("config.json"),
        serde_json::json!({"auths": {format!("http://{}", reg.addr): {"auth": auth}}}).to_string(),
    )
    .unwrap();
    store
        .pull(&reference, &PullOptions::default(), &NoProgress)
        .await
        .expect("credentials from $DOCKER_CONFIG/config.json");
    assert!(store.lookup(&reference).unwrap().is_some());
}
