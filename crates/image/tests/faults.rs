//! Pulls through a fault-injecting proxy (resets, stalls, truncations, flipped bytes at random
//! offsets) in front of the real test registry. Every pull must either succeed with exactly the
//! registry's content or fail with an error that says what failed; the store must verify after
//! every pull. Prints what was injected and what happened.
//!
//! `MB_FAULT_PULLS` (default 200) pulls; `MB_FAULT_SEED` replays a run.

use std::collections::BTreeMap;

use microbox_image::{ImageStore, NoProgress, PullOptions};
use microbox_testsupport as ts;
use microbox_testsupport::faultproxy::{FaultPlan, FaultProxy};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_through_injected_faults_succeed_verified_or_fail_cleanly() {
    let reg = ts::registry();
    let names = ["busybox", "multilayer"];
    // The truth: each image's manifest digest, pulled without faults.
    let clean = tempfile::tempdir().unwrap();
    let clean_store = ImageStore::open(clean.path()).unwrap();
    let mut truth = BTreeMap::new();
    for n in names {
        let h = clean_store
            .pull(&ts::image(n), &PullOptions::default(), &NoProgress)
            .await
            .unwrap();
        truth.insert(n, h.manifest_digest.clone());
    }

    let pulls = env_u64("MB_FAULT_PULLS", 200);
    let seed = env_u64("MB_FAULT_SEED", rand_seed());
    let proxy = FaultProxy::start(
        &reg.addr,
        FaultPlan {
            seed,
            probability: 0.35,
            // The busybox layer is about 1 MiB: offsets cover headers, manifests and bodies.
            max_offset: 1_200_000,
            stall: std::time::Duration::from_millis(700),
        },
    );
    let root = tempfile::tempdir().unwrap();
    let store = ImageStore::open(root.path()).unwrap();
    let opts = PullOptions {
        retries: 3,
        ..PullOptions::default()
    };
    let (mut ok, mut failed, mut corrupt) = (0u64, 0u64, 0u64);
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for i in 0..pulls {
        let name = names[(i % 2) as usize];
        let reference = format!("{}/microbox-test/{name}:latest", proxy.addr);
        match store.pull(&reference, &opts, &NoProgress).await {
            Ok(h) => {
                if h.manifest_digest == truth[name] {
                    ok += 1;
                } else {
                    corrupt += 1;
                    eprintln!(
                        "pull {i}: {reference} succeeded with manifest {} instead of {}",
                        h.manifest_digest, truth[name]
                    );
                }
            }
            Err(e) => {
                failed += 1;
                let msg = e.to_string();
                // A clear error names what it was fetching: the image or the blob.
                assert!(
                    msg.contains(&reference) || msg.contains("sha256:"),
                    "pull {i}: unclear error: {msg}"
                );
                // Group by kind (the text before the first digest or reference).
                let kind: String = msg
                    .split([':', '('])
                    .next()
                    .unwrap_or_default()
                    .chars()
                    .take(60)
                    .collect();
                *errors.entry(kind).or_default() += 1;
            }
        }
        // Nothing half-written is visible, whatever happened: the store verifies.
        let report = store.check().unwrap();
        assert!(
            report.is_clean(),
            "pull {i}: store damaged: {:?}",
            report.problems
        );
        // Next pull downloads again.
        let _ = store.remove(&reference);
        store.prune().unwrap();
    }
    let faults = proxy.counts();
    println!(
        "fault injection (seed {seed}): {pulls} pulls, {} connections, faults injected {} \
         (resets {}, stalls {}, truncations {}, flipped bytes {})",
        faults.connections,
        faults.total(),
        faults.resets,
        faults.stalls,
        faults.truncations,
        faults.flips
    );
    println!("pulls succeeded {ok}, pulls failed cleanly {failed}, corruptions {corrupt}");
    for (kind, n) in &errors {
        println!("  {n:>4} x {kind}");
    }
    assert_eq!(corrupt, 0, "a pull succeeded with wrong content");
    assert!(
        faults.total() >= pulls / 4,
        "too few faults injected to mean anything"
    );
    assert!(ok > 0, "no pull got through the faults");
    assert!(faults.resets > 0 && faults.flips > 0 && faults.truncations > 0);
}

fn rand_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
}
