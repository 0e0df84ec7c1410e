//! Observability commands: `events` (the durable event log, followed live) and `metrics`
//! (Prometheus text, printed or served over HTTP).

use std::io::{Read, Write};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use microbox_core::EventRecord;
use microbox_runtime::agent_client::AgentClient;
use microbox_runtime::eventlog;
use microbox_runtime::metrics::{self, BoxSample};

use super::Ctx;
use crate::cli::Format;
use crate::UserError;

/// RFC 3339, or an age relative to now (`10m`, `2h`, `0s`), as Unix milliseconds.
fn parse_when(s: &str) -> Result<u64> {
    let t = if let Ok(age) = humantime::parse_duration(s) {
        SystemTime::now() - age
    } else {
        humantime::parse_rfc3339_weak(s).map_err(|_| {
            UserError::new(format!(
                "invalid time '{s}': expected RFC 3339 or an age such as 10m"
            ))
        })?
    };
    Ok(t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0))
}

fn print_event(r: &EventRecord, format: Format) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match format {
        Format::Json => writeln!(out, "{}", serde_json::to_string(r)?)?,
        Format::Table => {
            let t = humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(r.time_ms));
            let mut v = serde_json::to_value(&r.event)?;
            let kind = v
                .get("type")
                .and_then(|k| k.as_str())
                .unwrap_or("")
                .to_string();
            if let Some(o) = v.as_object_mut() {
                o.remove("type");
            }
            writeln!(out, "{t} {} {kind} {v}", r.box_id.short())?;
        }
    }
    out.flush()?;
    Ok(())
}

pub fn events(ctx: &Ctx, format: Format, since: Option<&str>, until: Option<&str>) -> Result<()> {
    let since = since.map(parse_when).transpose()?;
    let until = until.map(parse_when).transpose()?;
    let path = eventlog::events_path(&ctx.root);
    let mut offset = 0;
    loop {
        let (recs, next) = eventlog::read_jsonl::<EventRecord>(&path, offset)?;
        offset = next;
        for r in &recs {
            if since.is_some_and(|s| r.time_ms < s) {
                continue;
            }
            if until.is_some_and(|u| r.time_ms > u) {
                return Ok(());
            }
            print_event(r, format)?;
        }
        if until.is_some_and(|u| now_ms() >= u) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn cpu_and_rss(pids: impl Iterator<Item = u32>) -> (f64, u64) {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let (ticks, rss) = super::stats::usage_of(pids);
    (ticks as f64 / hz, rss)
}

fn gather(ctx: &Ctx, rt: &tokio::runtime::Runtime) -> Result<String> {
    let store = ctx.boxes()?;
    let mut samples = Vec::new();
    for rec in store.list()?.into_iter().map(|r| store.observe(r)) {
        let (cpu_seconds, host_rss_bytes) = cpu_and_rss(rec.pids.values().copied());
        let guest = match (&rec.agent_socket, rec.state.is_running()) {
            (Some(sock), true) => rt.block_on(async {
                let c =
                    tokio::time::timeout(Duration::from_secs(2), AgentClient::connect_unix(sock))
                        .await
                        .ok()?
                        .ok()?;
                tokio::time::timeout(Duration::from_secs(2), c.stats())
                    .await
                    .ok()?
                    .ok()
            }),
            _ => None,
        };
        samples.push(BoxSample {
            id: rec.id.to_string(),
            name: rec.name.clone(),
            state: Some(rec.state),
            cpu_seconds,
            host_rss_bytes,
            guest_mem_used_bytes: guest
                .as_ref()
                .map(|g| g.mem_total_bytes.saturating_sub(g.mem_available_bytes)),
            guest_mem_available_bytes: guest.as_ref().map(|g| g.mem_available_bytes),
        });
    }
    let events = eventlog::read_events(&ctx.root)?;
    let (pulls, _) = eventlog::read_jsonl(&eventlog::pulls_path(&ctx.root), 0)?;
    Ok(metrics::render(&events, &pulls, &samples))
}

pub fn metrics(ctx: &Ctx, listen: Option<&str>) -> Result<()> {
    let rt = ctx.tokio()?;
    let Some(addr) = listen else {
        print!("{}", gather(ctx, &rt)?);
        return Ok(());
    };
    let listener = std::net::TcpListener::bind(addr)
        .map_err(|e| UserError::new(format!("cannot listen on {addr}: {e}")))?;
    eprintln!("serving metrics on http://{addr}/metrics");
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
        let mut buf = [0u8; 2048];
        let n = conn.read(&mut buf).unwrap_or(0);
        let req = String::from_utf8_lossy(&buf[..n]);
        let path = req.split_whitespace().nth(1).unwrap_or("");
        let (status, body, ctype) = if path == "/metrics" {
            match gather(ctx, &rt) {
                Ok(b) => ("200 OK", b, "text/plain; version=0.0.4; charset=utf-8"),
                Err(e) => (
                    "500 Internal Server Error",
                    format!("{e:#}\n"),
                    "text/plain",
                ),
            }
        } else {
            ("404 Not Found", "see /metrics\n".to_string(), "text/plain")
        };
        let _ = write!(
            conn,
            "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    }
    Ok(())
}
