//! Guest resource figures for the Stats RPC, parsed from /proc.

use microbox_agent_proto::v1::StatsResponse;

/// Reads the figures from `proc_dir` (normally "/proc").
pub fn read(proc_dir: &std::path::Path) -> std::io::Result<StatsResponse> {
    let meminfo = std::fs::read_to_string(proc_dir.join("meminfo"))?;
    let loadavg = std::fs::read_to_string(proc_dir.join("loadavg"))?;
    let uptime = std::fs::read_to_string(proc_dir.join("uptime"))?;
    let process_count = std::fs::read_dir(proc_dir)?
        .filter_map(Result::ok)
        .filter(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())
        })
        .count();
    Ok(parse(&meminfo, &loadavg, &uptime, process_count))
}

/// Parses the text of /proc/meminfo, /proc/loadavg and /proc/uptime (unknown fields = 0).
pub fn parse(meminfo: &str, loadavg: &str, uptime: &str, process_count: usize) -> StatsResponse {
    let kib = |key: &str| -> u64 {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map_or(0, |k| k.saturating_mul(1024))
    };
    let mut load = loadavg
        .split_whitespace()
        .map(|v| v.parse::<f64>().unwrap_or(0.0));
    StatsResponse {
        mem_total_bytes: kib("MemTotal"),
        mem_available_bytes: kib("MemAvailable"),
        load_1: load.next().unwrap_or(0.0),
        load_5: load.next().unwrap_or(0.0),
        load_15: load.next().unwrap_or(0.0),
        uptime_seconds: uptime
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0),
        process_count: u32::try_from(process_count).unwrap_or(u32::MAX),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_proc_text() {
        let s = super::parse(
            "MemTotal:        2030000 kB\nMemFree: 1 kB\nMemAvailable:    1500000 kB\n",
            "0.52 0.30 0.10 1/123 4567\n",
            "12.34 20.00\n",
            7,
        );
        assert_eq!(s.mem_total_bytes, 2030000 * 1024);
        assert_eq!(s.mem_available_bytes, 1500000 * 1024);
        assert_eq!((s.load_1, s.load_5, s.load_15), (0.52, 0.30, 0.10));
        assert_eq!(s.uptime_seconds, 12.34);
        assert_eq!(s.process_count, 7);
        let empty = super::parse("", "garbage", "", 0);
        assert_eq!(empty.mem_total_bytes, 0);
    }

    #[test]
    fn reads_this_hosts_proc() {
        let s = super::read(std::path::Path::new("/proc")).unwrap();
        assert!(s.mem_total_bytes > 0 && s.process_count > 0);
    }
}
