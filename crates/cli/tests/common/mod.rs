//! What the CLI's end-to-end suites share: a private `MICROBOX_ROOT` per test that removes
//! every box it left, and a scan for processes (QEMU and helpers) of a box directory.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output, Stdio};

pub struct Env {
    pub root: tempfile::TempDir,
}

impl Env {
    pub fn new() -> Env {
        Env {
            root: tempfile::Builder::new()
                .prefix("mbx-cli-")
                .tempdir()
                .unwrap(),
        }
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_microbox"));
        c.args(args).env("MICROBOX_ROOT", self.root.path());
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        let out = self.cmd(args).stdin(Stdio::null()).output().unwrap();
        eprintln!(
            "$ microbox {}\n-> {:?}\nstdout: {}\nstderr: {}",
            args.join(" "),
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(out.status.success(), "microbox {args:?} failed");
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn inspect(&self, name: &str) -> serde_json::Value {
        let v: serde_json::Value = serde_json::from_str(&self.ok(&["inspect", name])).unwrap();
        v[0].clone()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        // Whatever a failed test left: stop it, so no VM outlives the test.
        let _ = self.cmd(&["rm", "-f"]).output();
        if let Ok(out) = self.cmd(&["ps", "-aq"]).output() {
            for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = self.cmd(&["rm", "-f", id]).output();
            }
        }
    }
}

/// Processes whose command line mentions `dir` (the box's directory): QEMU and its helpers.
pub fn processes_mentioning(dir: &Path) -> Vec<u32> {
    let needle = dir.as_os_str().as_encoded_bytes().to_vec();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| c.windows(needle.len()).any(|w| w == needle))
                .unwrap_or(false)
        })
        .collect()
}

/// Calls `probe` every 100 ms, at most `tries` times, until `done` accepts its value; returns
/// the last value (for the caller's assertion).
pub fn poll_until<T>(tries: usize, mut probe: impl FnMut() -> T, done: impl Fn(&T) -> bool) -> T {
    let mut v = probe();
    for _ in 1..tries {
        if done(&v) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        v = probe();
    }
    v
}
