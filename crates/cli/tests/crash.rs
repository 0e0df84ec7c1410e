//! SIGKILL of the CLI or of a box's supervisor at random points of pull, boot and exec, against
//! real microVMs. After every kill `ps` and `rm` work; at the end no process of a removed box
//! remains, the image store verifies, and `pull` and `run` still work. Prints the counts.
//!
//! `MB_KILL_ROUNDS` (default 52) kills; `MB_KILL_SEED` replays a run.

mod common;

use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{processes_mentioning, Env};
use microbox_testsupport as ts;

/// A small deterministic generator: the seed is printed, so a failing run can be replayed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) % n.max(1)
    }
}

fn sigkill(pid: u32) {
    // SAFETY: kill(2) of a process this test started (directly or through the CLI).
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
}

fn spawn(env: &Env, args: &[&str]) -> Child {
    env.cmd(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Waits for `child` at most `limit`, killing it after that (a CLI must never hang).
fn reap(mut child: Child, limit: Duration) -> bool {
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return true;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The supervisor pid of box `name`, once its record names one.
fn supervisor_of(env: &Env, name: &str, limit: Duration) -> Option<u32> {
    let start = Instant::now();
    while start.elapsed() < limit {
        let out = env.cmd(&["inspect", name]).output().unwrap();
        if out.status.success() {
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            if let Some(p) = v[0]["pids"]["supervisor"].as_u64() {
                return Some(p as u32);
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

/// Processes whose command line mentions `needle` (a box directory or id).
fn processes_with(needle: &str) -> Vec<u32> {
    processes_mentioning(std::path::Path::new(needle))
}

#[test]
fn sigkill_of_cli_or_supervisor_at_random_points_leaves_everything_usable() {
    let env = Env::new();
    let img = ts::image("busybox");
    let rounds: u64 = std::env::var("MB_KILL_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(52);
    let seed: u64 = std::env::var("MB_KILL_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("MB_KILL_SEED={seed}");
    let mut rng = Rng(seed);
    env.ok(&["pull", &img]);
    env.ok(&["run", "-d", "--name", "steady", &img, "sleep", "100000"]);

    let (mut kills, mut hung_clis) = (0u64, 0u64);
    let mut by_kind = [0u64; 4];
    let mut removed: Vec<(String, PathBuf)> = Vec::new();
    for round in 0..rounds {
        let kind = (round % 4) as usize;
        match kind {
            0 => {
                // The CLI during a pull (the store starts empty each time).
                env.ok(&["rmi", "-f", &img]);
                env.ok(&["image", "prune"]);
                let child = spawn(&env, &["pull", &img]);
                std::thread::sleep(Duration::from_millis(rng.below(400)));
                sigkill(child.id());
                reap(child, Duration::from_secs(5));
            }
            1 => {
                // The CLI of `run --rm` anywhere from its pull check to its teardown.
                let child = spawn(&env, &["run", "--rm", &img, "sh", "-c", "echo hi; sleep 1"]);
                std::thread::sleep(Duration::from_millis(rng.below(5000)));
                sigkill(child.id());
                reap(child, Duration::from_secs(5));
            }
            2 => {
                // A box's supervisor during boot or while the box runs.
                let name = format!("k{round}");
                let child = spawn(&env, &["run", "-d", "--name", &name, &img, "sleep", "1000"]);
                if let Some(sup) = supervisor_of(&env, &name, Duration::from_secs(10)) {
                    std::thread::sleep(Duration::from_millis(rng.below(4000)));
                    sigkill(sup);
                }
                // `run -d` waits for the boot: it must notice the dead supervisor and return.
                if !reap(child, Duration::from_secs(30)) {
                    hung_clis += 1;
                }
            }
            _ => {
                // The CLI during an exec into a running box.
                let child = spawn(&env, &["exec", "steady", "sh", "-c", "echo x; sleep 1"]);
                std::thread::sleep(Duration::from_millis(rng.below(1500)));
                sigkill(child.id());
                reap(child, Duration::from_secs(5));
            }
        }
        kills += 1;
        by_kind[kind] += 1;

        // Afterwards: ps works, every box but `steady` can be removed, `steady` still answers.
        let ps = env.ok(&["ps", "-aq"]);
        let steady = env.inspect("steady")["id"].as_str().unwrap().to_owned();
        for short in ps.split_whitespace().filter(|id| !steady.starts_with(*id)) {
            // A `run --rm` supervisor may remove its box between our ps and inspect.
            let out = env.cmd(&["inspect", short]).output().unwrap();
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
                continue;
            };
            let id = v[0]["id"].as_str().unwrap().to_owned();
            let dir = v[0]["box_dir"].as_str().unwrap().to_owned();
            let rm = env.run(&["rm", "-f", &id]);
            let gone = !env.ok(&["ps", "-aq"]).contains(short);
            assert!(rm.status.success() || gone, "rm -f {id} failed");
            removed.push((id, PathBuf::from(dir)));
        }
        if kind == 3 {
            assert_eq!(env.ok(&["exec", "steady", "echo", "ok"]), "ok\n");
        }
    }

    // No process of a removed box remains (helpers die with their supervisor or by rm).
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut orphans: Vec<u32> = Vec::new();
    while Instant::now() < deadline {
        orphans = removed
            .iter()
            .flat_map(|(id, dir)| {
                let mut v = processes_mentioning(dir);
                v.extend(processes_with(id));
                v
            })
            .collect();
        if orphans.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    for p in &orphans {
        let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
        eprintln!(
            "orphan {p}: {}",
            String::from_utf8_lossy(&cmd).replace('\0', " ")
        );
    }
    // The store verifies, and pull and run work.
    let check = env.run(&["image", "check"]);
    let report: serde_json::Value =
        serde_json::from_slice(&check.stdout).unwrap_or(serde_json::Value::Null);
    let damaged = report["problems"].as_array().map(|a| a.len()).unwrap_or(0);
    env.ok(&["pull", &img]);
    assert_eq!(env.ok(&["run", "--rm", &img, "echo", "alive"]), "alive\n");
    env.ok(&["rm", "-f", "steady"]);

    println!(
        "SIGKILL suite (seed {seed}): kills {kills} (pull CLI {}, run CLI {}, supervisor {}, \
         exec CLI {}), boxes removed {}, orphans {}, damaged blobs {damaged}, hung CLIs {hung_clis}",
        by_kind[0],
        by_kind[1],
        by_kind[2],
        by_kind[3],
        removed.len(),
        orphans.len()
    );
    assert!(check.status.success(), "image check failed: {report}");
    assert_eq!(damaged, 0);
    assert!(orphans.is_empty(), "processes of removed boxes remain");
    assert_eq!(hung_clis, 0, "a CLI hung after its supervisor was killed");
}
