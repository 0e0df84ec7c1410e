//! Commands that read and manage box records: ps, inspect, logs, wait, rm.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::Result;
use microbox_core::BoxState;

use super::Ctx;
use crate::boxes::{BoxRecord, BoxStore};
use crate::cli::Format;
use crate::logs;
use crate::UserError;

pub fn ps(ctx: &Ctx, all: bool, quiet: bool, format: Format) -> Result<()> {
    let store = ctx.boxes()?;
    let recs: Vec<BoxRecord> = store
        .list()?
        .into_iter()
        .map(|r| store.observe(r))
        .filter(|r| {
            all || r.state.is_running() || r.state == BoxState::Created && r.supervisor.is_some()
        })
        .collect();
    if quiet {
        for r in &recs {
            println!("{}", r.id.short());
        }
        return Ok(());
    }
    if format == Format::Json {
        let rows: Vec<_> = recs.iter().map(ps_json).collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:<12}  {:<24}  {:<28}  {:<10}  {:<20}  NAME",
        "BOX ID", "IMAGE", "COMMAND", "STATE", "STATUS"
    )?;
    for r in &recs {
        writeln!(
            out,
            "{:<12}  {:<24}  {:<28}  {:<10}  {:<20}  {}",
            r.id.short(),
            ellipsize(&r.image, 24),
            ellipsize(&format!("\"{}\"", r.command.join(" ")), 28),
            r.state,
            ellipsize(&status_text(r), 20),
            r.name
        )?;
    }
    Ok(())
}

fn ps_json(r: &BoxRecord) -> serde_json::Value {
    serde_json::json!({
        "id": r.id, "name": r.name, "image": r.image, "command": r.command,
        "state": r.state, "status": status_text(r), "created_at": r.created_at,
        "exit_code": r.exit_code,
    })
}

fn status_text(r: &BoxRecord) -> String {
    match r.state {
        BoxState::Stopped => match r.exit_code {
            Some(c) => format!("exited ({c})"),
            None => r.reason.clone().unwrap_or_else(|| "stopped".into()),
        },
        BoxState::Created if r.supervisor.is_some() => "booting".into(),
        s => s.to_string(),
    }
}

fn ellipsize(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(n - 1).collect();
        t.push('…');
        t
    }
}

pub fn inspect(ctx: &Ctx, keys: &[String]) -> Result<()> {
    let store = ctx.boxes()?;
    let mut out = Vec::new();
    for k in keys {
        let r = store.observe(store.resolve(k)?);
        out.push(inspect_json(&store, &r));
    }
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

pub fn inspect_json(store: &BoxStore, r: &BoxRecord) -> serde_json::Value {
    let dir = store.box_dir(&r.id);
    serde_json::json!({
        "id": r.id,
        "name": r.name,
        "state": r.state,
        "reason": r.reason,
        "image": r.image,
        "image_digest": r.image_digest,
        "command": r.command,
        "config": r.config,
        "pids": {
            "supervisor": r.supervisor.map(|s| s.pid),
            "processes": r.pids,
        },
        "agent_socket": r.agent_socket,
        "box_dir": dir,
        "console_log": dir.join("console.log"),
        "created_at": r.created_at,
        "started_at": r.started_at,
        "finished_at": r.finished_at,
        "exit_code": r.exit_code,
        "ports": r.config.ports,
    })
}

pub fn logs(
    ctx: &Ctx,
    key: &str,
    follow: bool,
    tail: Option<usize>,
    timestamps: bool,
    console: bool,
) -> Result<()> {
    let store = ctx.boxes()?;
    let rec = store.resolve(key)?;
    let dir = store.box_dir(&rec.id);
    if console {
        let path = dir.join("console.log");
        let text = std::fs::read(&path).unwrap_or_default();
        std::io::stdout().write_all(&text)?;
        return Ok(());
    }
    let (mut follower, chunks) = logs::LogFollower::from_start(&dir)?;
    let chunks = match tail {
        Some(n) => logs::tail(chunks, n),
        None => chunks,
    };
    logs::print_chunks(&chunks, timestamps)?;
    if !follow {
        return Ok(());
    }
    loop {
        let more = follower.poll()?;
        logs::print_chunks(&more, timestamps)?;
        if more.is_empty() {
            let r = match store.load(&rec.id) {
                Ok(r) => store.observe(r),
                Err(_) => return Ok(()), // removed
            };
            if r.state == BoxState::Stopped {
                // Drain what the supervisor wrote before it recorded the end.
                return logs::print_chunks(&follower.poll()?, timestamps);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Blocks until the box is stopped; returns its record.
pub fn wait_stopped(store: &BoxStore, rec: &BoxRecord) -> Result<BoxRecord> {
    Ok(stopped_within(store, rec, None)?.expect("waited without a limit"))
}

/// Waits until the box is stopped, or `limit` has passed (then `None`); returns its record.
pub fn stopped_within(
    store: &BoxStore,
    rec: &BoxRecord,
    limit: Option<Duration>,
) -> Result<Option<BoxRecord>> {
    let deadline = limit.map(|l| Instant::now() + l);
    loop {
        let r = store.observe(store.load(&rec.id)?);
        if r.state == BoxState::Stopped {
            return Ok(Some(r));
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn wait(ctx: &Ctx, keys: &[String]) -> Result<()> {
    let store = ctx.boxes()?;
    for k in keys {
        let rec = store.resolve(k)?;
        let r = wait_stopped(&store, &rec)?;
        println!("{}", r.exit_code.unwrap_or(-1));
    }
    Ok(())
}

pub fn rm(ctx: &Ctx, keys: &[String], force: bool) -> Result<()> {
    let store = ctx.boxes()?;
    for k in keys {
        let rec = store.observe(store.resolve(k)?);
        if rec.state != BoxState::Stopped
            && !(rec.state == BoxState::Created && rec.supervisor.is_none())
        {
            if !force {
                return Err(UserError::new(format!(
                    "box '{}' is {}: stop it first or use: microbox rm -f {}",
                    rec.name, rec.state, rec.name
                ))
                .into());
            }
            super::lifecycle::stop_box(&store, &rec, Duration::from_secs(3))?;
        }
        remove_record_and_leftovers(&store, &rec)?;
        println!("{}", rec.name);
    }
    Ok(())
}

/// Kills whatever a box's processes left behind (a supervisor killed with SIGKILL leaves its
/// VMM only if parent-death signals failed) and deletes its directory.
pub fn remove_record_and_leftovers(store: &BoxStore, rec: &BoxRecord) -> Result<()> {
    let dir = store.box_dir(&rec.id);
    kill_pidfiles(&dir);
    for pid in rec.pids.values() {
        kill_if_ours(*pid, &dir);
    }
    store.remove_dir(&rec.id)
}

/// Every `*.pid` file in the box dir names a process the runtime started for this box.
pub fn kill_pidfiles(dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "pid") {
            if let Some(pid) = std::fs::read_to_string(&p)
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok())
            {
                kill_if_ours(pid, dir);
            }
        }
    }
}

/// SIGKILLs `pid` only if its command line mentions the box directory: a recycled pid that now
/// belongs to someone else is left alone.
fn kill_if_ours(pid: u32, dir: &std::path::Path) {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return;
    };
    let needle = dir.as_os_str().as_encoded_bytes();
    if cmdline.windows(needle.len()).any(|w| w == needle) {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe {
            libc::kill(pid as i32, libc::SIGKILL);
        }
    }
}
