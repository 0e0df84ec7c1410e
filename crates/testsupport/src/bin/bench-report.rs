//! `bench-report FIGURES.jsonl OUT.json`: one table of every figure the benchmarks recorded
//! (value, baseline from the same run, ratio, target), and the same as one JSON document
//! (with the commit and the date) so that runs of different commits can be compared.

use std::process::Command;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, input, output] = &args[..] else {
        eprintln!("usage: bench-report FIGURES.jsonl OUT.json");
        std::process::exit(2);
    };
    let text = std::fs::read_to_string(input).unwrap_or_else(|e| {
        eprintln!("bench-report: reading {input}: {e}");
        std::process::exit(1)
    });
    let figures: Vec<serde_json::Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("a JSON figure per line"))
        .collect();
    let s = |v: &serde_json::Value, k: &str| v[k].as_str().unwrap_or("").to_string();
    let num = |v: &serde_json::Value, k: &str, unit: &str| {
        v[k].as_f64()
            .map(|x| format!("{x:.2} {unit}"))
            .unwrap_or_else(|| "-".into())
    };
    let rows: Vec<[String; 7]> = figures
        .iter()
        .map(|f| {
            let unit = s(f, "unit");
            [
                s(f, "bench"),
                s(f, "name"),
                num(f, "value", &unit),
                s(f, "baseline_name"),
                num(f, "baseline", &unit),
                f["ratio"]
                    .as_f64()
                    .map(|r| format!("{r:.3}"))
                    .unwrap_or_else(|| "-".into()),
                s(f, "target"),
            ]
        })
        .collect();
    let head = [
        "bench",
        "figure",
        "microbox",
        "baseline",
        "baseline value",
        "ratio",
        "target",
    ]
    .map(String::from);
    let mut width = [0usize; 7];
    for r in std::iter::once(&head).chain(rows.iter()) {
        for (w, c) in width.iter_mut().zip(r.iter()) {
            *w = (*w).max(c.chars().count());
        }
    }
    for r in std::iter::once(&head).chain(rows.iter()) {
        let line: Vec<String> = r
            .iter()
            .zip(width)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
    let commit = Command::new("git")
        .args(["rev-parse", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    let date = Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%dT%H:%M:%SZ")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let doc = serde_json::json!({ "commit": commit, "date": date, "figures": figures });
    std::fs::write(output, serde_json::to_string_pretty(&doc).unwrap()).unwrap_or_else(|e| {
        eprintln!("bench-report: writing {output}: {e}");
        std::process::exit(1)
    });
    println!("\n{} figures written to {output}", figures.len());
}
