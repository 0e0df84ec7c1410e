//! Prometheus metrics (prometheus-client, names prefixed `microbox_`).
//!
//! There is no long-lived daemon to hold counters, so counters are derived from the durable
//! logs ([`crate::eventlog`]): boot phases, failures, execs and compactions from the event log,
//! pulls and layer-cache hits from the pull log. Gauges come from samples of the boxes that exist
//! now, which the caller (the CLI) takes from /proc and the agents. Rendering the same logs twice
//! gives the same counters, whichever process renders them.

use std::sync::atomic::AtomicU64;

use microbox_core::{BoxEvent, BoxState, EventRecord};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::eventlog::PullRecord;

/// What is known now about one box, sampled by the caller.
#[derive(Debug, Clone, Default)]
pub struct BoxSample {
    pub id: String,
    pub name: String,
    pub state: Option<BoxState>,
    pub cpu_seconds: f64,
    pub host_rss_bytes: u64,
    pub guest_mem_used_bytes: Option<u64>,
    pub guest_mem_available_bytes: Option<u64>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabel {
    phase: String,
}
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BoxLabel {
    r#box: String,
    name: String,
}

fn seconds_buckets() -> impl Iterator<Item = f64> {
    [
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
    ]
    .into_iter()
}

fn new_hist() -> Histogram {
    Histogram::new(seconds_buckets())
}

/// Maps a failure message to a small fixed set of reasons (bounded label cardinality).
pub fn failure_reason(message: &str) -> &'static str {
    let m = message.to_ascii_lowercase();
    if m.contains("timeout") || m.contains("timed out") || m.contains("did not") {
        "timeout"
    } else if m.contains("kernel") {
        "kernel"
    } else if m.contains("image") || m.contains("pull") || m.contains("registry") {
        "image"
    } else if m.contains("qemu")
        || m.contains("virtiofsd")
        || m.contains("vsock")
        || m.contains("vmm")
    {
        "vmm"
    } else if m.contains("agent") || m.contains("health") {
        "agent"
    } else {
        "other"
    }
}

/// Renders the Prometheus text exposition from the logs and the current samples.
pub fn render(events: &[EventRecord], pulls: &[PullRecord], boxes: &[BoxSample]) -> String {
    let mut reg = Registry::default();

    let by_state = Family::<StateLabel, Gauge>::default();
    reg.register("microbox_boxes", "Boxes by state", by_state.clone());
    for s in [
        BoxState::Created,
        BoxState::Ready,
        BoxState::Busy,
        BoxState::Compacting,
        BoxState::Stopped,
    ] {
        let n = boxes.iter().filter(|b| b.state == Some(s)).count();
        by_state
            .get_or_create(&StateLabel {
                state: s.to_string(),
            })
            .set(n as i64);
    }

    let boot = Family::<PhaseLabel, Histogram>::new_with_constructor(new_hist as fn() -> Histogram);
    reg.register(
        "microbox_boot_duration_seconds",
        "Boot phase durations",
        boot.clone(),
    );
    let boot_failures = Family::<ReasonLabel, Counter>::default();
    reg.register(
        "microbox_boot_failures",
        "Boots that failed, by reason",
        boot_failures.clone(),
    );
    let execs = Counter::<u64>::default();
    reg.register("microbox_execs", "Processes run in boxes", execs.clone());
    let exec_errors = Counter::<u64>::default();
    reg.register(
        "microbox_exec_errors",
        "Execs that exited non-zero or by a signal",
        exec_errors.clone(),
    );
    let exec_dur = new_hist();
    reg.register(
        "microbox_exec_duration_seconds",
        "Exec durations",
        exec_dur.clone(),
    );
    let reclaimed = Counter::<u64>::default();
    reg.register(
        "microbox_compaction_reclaimed_bytes",
        "Host memory returned by compaction",
        reclaimed.clone(),
    );

    for rec in events {
        match &rec.event {
            BoxEvent::BootPhase { phase, duration_ms } => boot
                .get_or_create(&PhaseLabel {
                    phase: phase.as_str().to_string(),
                })
                .observe(*duration_ms as f64 / 1000.0),
            BoxEvent::ExecFinished {
                exit_code,
                signal,
                duration_ms,
                ..
            } => {
                execs.inc();
                if *exit_code != Some(0) || signal.is_some() {
                    exec_errors.inc();
                }
                exec_dur.observe(*duration_ms as f64 / 1000.0);
            }
            BoxEvent::Error { message } if message.starts_with("boot failed") => {
                boot_failures
                    .get_or_create(&ReasonLabel {
                        reason: failure_reason(message).to_string(),
                    })
                    .inc();
            }
            BoxEvent::Compacted {
                rss_before_bytes,
                rss_after_bytes,
            } => {
                reclaimed.inc_by(rss_before_bytes.saturating_sub(*rss_after_bytes));
            }
            _ => {}
        }
    }

    let pulls_total = Counter::<u64>::default();
    reg.register(
        "microbox_image_pulls",
        "Image pulls that completed",
        pulls_total.clone(),
    );
    let pull_failures = Counter::<u64>::default();
    reg.register(
        "microbox_image_pull_failures",
        "Image pulls that failed",
        pull_failures.clone(),
    );
    let pull_bytes = Counter::<u64>::default();
    reg.register(
        "microbox_image_pull_bytes",
        "Bytes downloaded by pulls",
        pull_bytes.clone(),
    );
    let pull_dur = new_hist();
    reg.register(
        "microbox_image_pull_duration_seconds",
        "Pull durations",
        pull_dur.clone(),
    );
    let hits = Counter::<u64>::default();
    reg.register(
        "microbox_layer_cache_hits",
        "Layers already stored when pulled",
        hits.clone(),
    );
    let misses = Counter::<u64>::default();
    reg.register(
        "microbox_layer_cache_misses",
        "Layers downloaded",
        misses.clone(),
    );
    for p in pulls {
        if p.ok {
            pulls_total.inc();
            pull_dur.observe(p.duration_ms as f64 / 1000.0);
        } else {
            pull_failures.inc();
        }
        pull_bytes.inc_by(p.bytes);
        hits.inc_by(p.layers_cached as u64);
        misses.inc_by(p.layers_downloaded as u64);
    }

    let cpu = Family::<BoxLabel, Counter<f64, AtomicU64>>::default();
    reg.register(
        "microbox_box_cpu_seconds",
        "Host CPU time of all a box's processes",
        cpu.clone(),
    );
    let rss = Family::<BoxLabel, Gauge>::default();
    reg.register(
        "microbox_box_host_rss_bytes",
        "Host RSS of all a box's processes",
        rss.clone(),
    );
    let gused = Family::<BoxLabel, Gauge>::default();
    reg.register(
        "microbox_box_guest_memory_used_bytes",
        "Guest memory in use (agent Stats)",
        gused.clone(),
    );
    let gavail = Family::<BoxLabel, Gauge>::default();
    reg.register(
        "microbox_box_guest_memory_available_bytes",
        "Guest memory available (agent Stats)",
        gavail.clone(),
    );
    for b in boxes
        .iter()
        .filter(|b| b.state.is_some_and(BoxState::is_running))
    {
        let l = BoxLabel {
            r#box: b.id.clone(),
            name: b.name.clone(),
        };
        cpu.get_or_create(&l).inc_by(b.cpu_seconds);
        rss.get_or_create(&l).set(b.host_rss_bytes as i64);
        if let Some(u) = b.guest_mem_used_bytes {
            gused.get_or_create(&l).set(u as i64);
        }
        if let Some(a) = b.guest_mem_available_bytes {
            gavail.get_or_create(&l).set(a as i64);
        }
    }

    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &reg);
    openmetrics_to_prometheus(&out)
}

/// Rewrites prometheus-client's OpenMetrics text as the classic Prometheus text format (0.0.4),
/// which every Prometheus and `promtool check metrics` accept: a counter's HELP/TYPE lines name
/// the `_total` series, and the `# EOF` / `# UNIT` lines go.
pub fn openmetrics_to_prometheus(text: &str) -> String {
    let counters: std::collections::HashSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let rewritten = ["# HELP ", "# TYPE "].iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{p}{name}_total {tail}"))
        });
        out.push_str(rewritten.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use microbox_core::{BootPhase, BoxId, EventEmitter};

    #[test]
    fn counters_come_from_events_and_pulls() {
        let em = EventEmitter::new(16);
        let id = BoxId::random();
        let events = vec![
            em.emit(
                &id,
                BoxEvent::BootPhase {
                    phase: BootPhase::KernelBoot,
                    duration_ms: 1500,
                },
            ),
            em.emit(
                &id,
                BoxEvent::ExecFinished {
                    exec_id: 1,
                    exit_code: Some(0),
                    signal: None,
                    duration_ms: 20,
                },
            ),
            em.emit(
                &id,
                BoxEvent::ExecFinished {
                    exec_id: 2,
                    exit_code: Some(1),
                    signal: None,
                    duration_ms: 20,
                },
            ),
            em.emit(
                &id,
                BoxEvent::Error {
                    message: "boot failed: boot timeout after 30s".into(),
                },
            ),
            em.emit(
                &id,
                BoxEvent::Compacted {
                    rss_before_bytes: 300,
                    rss_after_bytes: 100,
                },
            ),
        ];
        let pulls = vec![PullRecord {
            time_ms: 0,
            reference: "x".into(),
            ok: true,
            bytes: 1000,
            duration_ms: 10,
            layers_cached: 1,
            layers_downloaded: 2,
        }];
        let boxes = vec![BoxSample {
            id: id.to_string(),
            name: "web".into(),
            state: Some(BoxState::Ready),
            cpu_seconds: 1.5,
            host_rss_bytes: 4096,
            guest_mem_used_bytes: Some(10),
            guest_mem_available_bytes: Some(20),
        }];
        let text = render(&events, &pulls, &boxes);
        for want in [
            "microbox_boxes{state=\"ready\"} 1",
            "microbox_boot_duration_seconds_count{phase=\"kernel_boot\"} 1",
            "microbox_execs_total 2",
            "microbox_exec_errors_total 1",
            "microbox_boot_failures_total{reason=\"timeout\"} 1",
            "microbox_compaction_reclaimed_bytes_total 200",
            "microbox_image_pulls_total 1",
            "microbox_layer_cache_hits_total 1",
            "microbox_layer_cache_misses_total 2",
            "microbox_box_host_rss_bytes{box=",
            "# TYPE microbox_execs_total counter",
            "# HELP microbox_execs_total ",
        ] {
            assert!(text.contains(want), "missing {want} in\n{text}");
        }
        assert!(!text.contains("# EOF"));
    }
}
