//! Benchmark figures: each one with the baseline measured in the same run and their ratio.
//! [`record`] prints the figure and, when `MICROBOX_BENCH_OUT` names a file, appends it there
//! as one JSON line; `bench-report` (this crate's binary, run by `scripts/bench.sh`) turns those
//! lines into one table and a JSON file per commit.

use std::io::Write;

/// One measured figure.
#[derive(Debug, Clone)]
pub struct Figure<'a> {
    /// Which benchmark program measured it (`boot`, `pull_unpack`, ...).
    pub bench: &'a str,
    /// What was measured, e.g. "boot to agent ready (median)".
    pub name: &'a str,
    /// Unit of `value` and `baseline`: "ms", "MiB", "MiB/s", "boxes".
    pub unit: &'a str,
    pub value: f64,
    /// What microbox is compared with, and its value from the same run.
    pub baseline: Option<(&'a str, f64)>,
    /// A target, in words, when the issue sets one ("ratio <= 1.10").
    pub target: Option<&'a str>,
}

impl Figure<'_> {
    /// value / baseline (for times: above 1 is slower than the baseline).
    pub fn ratio(&self) -> Option<f64> {
        self.baseline
            .and_then(|(_, b)| (b != 0.0).then(|| self.value / b))
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "bench": self.bench,
            "name": self.name,
            "unit": self.unit,
            "value": self.value,
            "baseline_name": self.baseline.map(|b| b.0),
            "baseline": self.baseline.map(|b| b.1),
            "ratio": self.ratio(),
            "target": self.target,
        })
    }
}

/// Prints `f` and appends it to `$MICROBOX_BENCH_OUT` when set.
pub fn record(f: Figure<'_>) {
    let ratio = f
        .ratio()
        .map(|r| format!(", ratio {r:.3}"))
        .unwrap_or_default();
    let base = f
        .baseline
        .map(|(n, v)| format!(" vs {n} {v:.2} {}", f.unit))
        .unwrap_or_default();
    println!(
        "FIGURE {}: {} = {:.2} {}{base}{ratio}",
        f.bench, f.name, f.value, f.unit
    );
    if let Some(path) = std::env::var_os("MICROBOX_BENCH_OUT") {
        let line = format!("{}\n", f.to_json());
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut file| file.write_all(line.as_bytes()));
        if let Err(e) = written {
            eprintln!("writing {}: {e}", std::path::Path::new(&path).display());
        }
    }
}

/// Median of durations in milliseconds (sorts `v`).
pub fn median_ms(v: &mut [std::time::Duration]) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1e3
}

/// The `p`-th percentile (0..=100) of durations in milliseconds (sorts `v`).
pub fn percentile_ms(v: &mut [std::time::Duration], p: f64) -> f64 {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p / 100.0).round() as usize;
    v[i.min(v.len() - 1)].as_secs_f64() * 1e3
}
