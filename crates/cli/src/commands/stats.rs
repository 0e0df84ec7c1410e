//! `stats`: a live table of boxes. Host side: CPU% and RSS summed over the box's processes
//! (VMM and helpers) from /proc; guest side: memory in use and process count from the agent.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use anyhow::Result;
use microbox_runtime::agent_client::AgentClient;

use super::Ctx;
use crate::boxes::BoxRecord;

/// How long `stats` waits for one box's agent.
const AGENT_QUERY_TIMEOUT: Duration = Duration::from_secs(3);

/// (utime + stime) in clock ticks and RSS in bytes of one process.
fn proc_usage(pid: u32) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0);
    Some((ticks, rss_kb * 1024))
}

/// CPU clock ticks and RSS bytes summed over `pids` (the processes that exist).
pub fn usage_of(pids: impl Iterator<Item = u32>) -> (u64, u64) {
    pids.filter_map(proc_usage)
        .fold((0, 0), |(t, r), (t2, r2)| (t + t2, r + r2))
}

fn box_usage(rec: &BoxRecord) -> (u64, u64) {
    usage_of(rec.pids.values().copied())
}

struct Row {
    name: String,
    id: String,
    cpu_pct: f64,
    rss: u64,
    guest_used: Option<u64>,
    guest_total: Option<u64>,
    procs: Option<u32>,
    net: Option<(u64, u64)>,
}

/// Received and sent bytes of the guest's non-loopback interfaces, from its /proc/net/dev.
pub fn parse_net_dev(text: &str) -> (u64, u64) {
    text.lines()
        .skip(2)
        .filter_map(|l| l.split_once(':'))
        .filter(|(iface, _)| iface.trim() != "lo")
        .map(|(_, rest)| {
            let f: Vec<u64> = rest
                .split_whitespace()
                .filter_map(|v| v.parse().ok())
                .collect();
            (
                f.first().copied().unwrap_or(0),
                f.get(8).copied().unwrap_or(0),
            )
        })
        .fold((0, 0), |(r, t), (r2, t2)| (r + r2, t + t2))
}

pub fn stats(ctx: &Ctx, keys: &[String], no_stream: bool) -> Result<()> {
    let store = ctx.boxes()?;
    let rt = ctx.tokio()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let live = !no_stream && std::io::stdout().is_terminal();
    let mut last: HashMap<String, (u64, Instant)> = HashMap::new();
    loop {
        let recs: Vec<BoxRecord> = if keys.is_empty() {
            store
                .list()?
                .into_iter()
                .map(|r| store.observe(r))
                .filter(|r| r.state.is_running())
                .collect()
        } else {
            keys.iter()
                .map(|k| store.resolve(k).map(|r| store.observe(r)))
                .collect::<Result<_>>()?
        };
        // First sample for CPU%: measure over a short interval.
        if last.is_empty() {
            for r in &recs {
                last.insert(r.id.to_string(), (box_usage(r).0, Instant::now()));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        let mut rows = Vec::new();
        for r in &recs {
            let (ticks, rss) = box_usage(r);
            let now = Instant::now();
            let (prev, at) = last.get(r.id.as_str()).copied().unwrap_or((ticks, now));
            let secs = now.duration_since(at).as_secs_f64().max(1e-3);
            let cpu_pct = (ticks.saturating_sub(prev) as f64 / hz) / secs * 100.0;
            last.insert(r.id.to_string(), (ticks, now));
            let (guest, net) = match (&r.agent_socket, r.state.is_running()) {
                // A box whose agent is starved (a fork bomb) or frozen must not stall the
                // table: its guest columns stay empty.
                (Some(sock), true) => rt.block_on(async {
                    let query = async {
                        let Ok(c) = AgentClient::connect_unix(sock).await else {
                            return (None, None);
                        };
                        let net = c.read_file("/proc/net/dev").await.ok();
                        (
                            c.stats().await.ok(),
                            net.map(|b| parse_net_dev(&String::from_utf8_lossy(&b))),
                        )
                    };
                    tokio::time::timeout(AGENT_QUERY_TIMEOUT, query)
                        .await
                        .unwrap_or((None, None))
                }),
                _ => (None, None),
            };
            rows.push(Row {
                name: r.name.clone(),
                id: r.id.short().to_string(),
                cpu_pct,
                rss,
                guest_used: guest
                    .as_ref()
                    .map(|g| g.mem_total_bytes.saturating_sub(g.mem_available_bytes)),
                guest_total: guest.as_ref().map(|g| g.mem_total_bytes),
                procs: guest.as_ref().map(|g| g.process_count),
                net,
            });
        }
        let mut out = std::io::stdout().lock();
        if live {
            write!(out, "\x1b[2J\x1b[H")?;
        }
        writeln!(
            out,
            "{:<12}  {:<20}  {:>7}  {:>10}  {:>21}  {:>21}  {:>5}",
            "BOX ID", "NAME", "CPU %", "HOST RSS", "GUEST MEM USED/TOTAL", "NET RX / TX", "PIDS"
        )?;
        let hb = |b: u64| indicatif::HumanBytes(b).to_string();
        for row in &rows {
            let guest = match (row.guest_used, row.guest_total) {
                (Some(u), Some(t)) => format!("{} / {}", hb(u), hb(t)),
                _ => "-".into(),
            };
            let net = row
                .net
                .map(|(rx, tx)| format!("{} / {}", hb(rx), hb(tx)))
                .unwrap_or_else(|| "-".into());
            writeln!(
                out,
                "{:<12}  {:<20}  {:>6.1}%  {:>10}  {:>21}  {:>21}  {:>5}",
                row.id,
                row.name,
                row.cpu_pct,
                hb(row.rss),
                guest,
                net,
                row.procs
                    .map(|p| p.to_string())
                    .unwrap_or_else(|| "-".into())
            )?;
        }
        out.flush()?;
        if !live {
            return Ok(());
        }
        drop(out);
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn net_dev_sums_non_loopback_interfaces() {
        let text = "Inter-|   Receive                                                |  Transmit\n face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    lo:     100       1    0    0    0     0          0         0      100       1    0    0    0     0       0          0\n  eth0:    5000      10    0    0    0     0          0         0     3000       8    0    0    0     0       0          0\n";
        assert_eq!(super::parse_net_dev(text), (5000, 3000));
    }
}
