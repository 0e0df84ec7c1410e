//! Basic auth against a real docker-registry with htpasswd: anonymous pulls are refused,
//! `login` credentials and explicit credentials work.

use microbox_image::{auth, Credentials, Error, ImageStore, NoProgress, PullOptions};
use microbox_testsupport as ts;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_via_login_and_options() {
    let reg = ts::registry_with_basic_auth();
    let creds_flag = format!("{}:{}", ts::AUTH_USER, ts::AUTH_PASSWORD);
    let reference = ts::push_layout_to(
        reg,
        &ts::layout("busybox"),
        "latest",
        "private/busybox:latest",
        &["--dest-creds", &creds_flag],
    );
    let root = tempfile::tempdir().unwrap();
    let store = ImageStore::open(root.path()).unwrap();

    let err = store
        .pull(&reference, &PullOptions::default(), &NoProgress)
        .await
        .expect_err("anonymous pull of a private registry must fail");
    assert!(
        matches!(
            err,
            Error::Registry {
                transient: false,
                ..
            }
        ),
        "{err}"
    );
    assert!(store.lookup(&reference).unwrap().is_none());

    let wrong = PullOptions {
        credentials: Some(Credentials {
            username: ts::AUTH_USER.into(),
            password: "nope".into(),
        }),
        ..Default::default()
    };
    assert!(store.pull(&reference, &wrong, &NoProgress).await.is_err());

    let creds = Credentials {
        username: ts::AUTH_USER.into(),
        password: ts::AUTH_PASSWORD.into(),
    };
    let explicit = PullOptions {
        credentials: Some(creds.clone()),
        ..Default::default()
    };
    let h = store
        .pull(&reference, &explicit, &NoProgress)
        .await
        .unwrap();
    store.remove(&reference).unwrap();
    store.prune().unwrap();

    auth::login(root.path(), &reg.addr, &creds).unwrap();
    let h2 = store
        .pull(&reference, &PullOptions::default(), &NoProgress)
        .await
        .unwrap();
    assert_eq!(h, h2);
    assert!(auth::logout(root.path(), &reg.addr).unwrap());
}

/// Docker Hub's flow: the registry answers 401 with a Bearer challenge, the client fetches an
/// anonymous token from the realm and retries with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_bearer_token_pull() {
    let (reg, tokens) = ts::registry_with_token_auth();
    let reference = ts::push_layout_to(
        reg,
        &ts::layout("busybox"),
        "latest",
        "hub-style/busybox:latest",
        &[],
    );
    // Without a token the registry refuses.
    let plain = std::process::Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg(format!(
            "http://{}/v2/hub-style/busybox/manifests/latest",
            reg.addr
        ))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&plain.stdout), "401");

    let root = tempfile::tempdir().unwrap();
    let store = ImageStore::open(root.path()).unwrap();
    let before = tokens.issued();
    let h = store
        .pull(&reference, &PullOptions::default(), &NoProgress)
        .await
        .unwrap();
    assert!(tokens.issued() > before, "the pull fetched a token");
    assert!(store.lookup(&reference).unwrap().is_some());
    assert_eq!(
        h.reference,
        store.lookup(&reference).unwrap().unwrap().reference
    );
}
