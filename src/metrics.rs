//! `GET /metrics`: the status snapshot and the API's own counters in Prometheus text
//! format, named by Prometheus conventions: base units (bytes, seconds), `_total` on
//! counters, a `# HELP` and `# TYPE` line on every family. The status JSON keeps MB.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::broadcast;

use crate::status::{
    ActionRecord, DaemonEvent, FailureKind, ServiceState, ServiceStatus, Status, TransitionStats,
};
use crate::traffic::TrafficBoard;

const STATES: [ServiceState; 10] = [
    ServiceState::Stopped,
    ServiceState::Starting,
    ServiceState::Ready,
    ServiceState::Unhealthy,
    ServiceState::Stopping,
    ServiceState::Preempted,
    ServiceState::Failed,
    ServiceState::Unknown,
    ServiceState::Parked,
    ServiceState::Draining,
];

/// Status figures are MiB (what NVML reports divided by 2^20); metrics are in bytes.
const BYTES_PER_MB: f64 = (1u64 << 20) as f64;

/// What the status snapshot does not keep: every action ever finished (status keeps only
/// the last ones) and every error answer the API gave. Counted in the API layer, from the
/// event stream and from the API's error replies.
#[derive(Default)]
pub struct Counters {
    inner: Mutex<Counted>,
}

#[derive(Default)]
struct Counted {
    /// (op, outcome) -> actions.
    actions: BTreeMap<(String, &'static str), u64>,
    /// op -> durations.
    action_durations: BTreeMap<String, TransitionStats>,
    /// error kind -> answers.
    refusals: BTreeMap<String, u64>,
    /// outcome (applied, refused) -> config reloads.
    reloads: BTreeMap<&'static str, u64>,
}

impl Counters {
    /// Counters fed by a task that follows the event stream's finished actions.
    pub fn start(feed: &broadcast::Sender<DaemonEvent>) -> Arc<Self> {
        let counters = Arc::new(Self::default());
        let mut events = feed.subscribe();
        let weak = Arc::downgrade(&counters);
        tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(DaemonEvent::ActionFinished { action }) => match weak.upgrade() {
                        Some(counters) => counters.record_action(&action),
                        None => return,
                    },
                    Ok(DaemonEvent::ConfigReloaded { .. }) => match weak.upgrade() {
                        Some(counters) => counters.record_reload("applied"),
                        None => return,
                    },
                    Ok(DaemonEvent::ConfigRefused { .. }) => match weak.upgrade() {
                        Some(counters) => counters.record_reload("refused"),
                        None => return,
                    },
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        counters
    }

    pub fn record_action(&self, action: &ActionRecord) {
        let outcome = match (&action.outcome, action.failure) {
            (Ok(_), _) => "ok",
            (Err(_), Some(FailureKind::Timeout)) => "timeout",
            (Err(_), Some(FailureKind::BackendDown)) => "backend_down",
            (Err(_), Some(FailureKind::Cancelled)) => "cancelled",
            (Err(_), _) => "error",
        };
        let mut counted = self.lock();
        *counted
            .actions
            .entry((action.op.clone(), outcome))
            .or_default() += 1;
        counted
            .action_durations
            .entry(action.op.clone())
            .or_default()
            .observe(action.duration_ms);
    }

    /// Counts a config reload (docs/ARCHITECTURE.md, "Reloading the config").
    fn record_reload(&self, outcome: &'static str) {
        *self.lock().reloads.entry(outcome).or_default() += 1;
    }

    /// Counts an error answer by its body's `kind`, or by its status code for the
    /// answers that carry none (routing and authorization errors).
    pub fn record_refusal(&self, code: u16, body: &serde_json::Value) {
        let kind = match body["kind"].as_str() {
            Some(kind) => kind,
            None => match code {
                401 => "unauthorized",
                404 => "no_such_endpoint",
                405 => "method_not_allowed",
                _ => "bad_request",
            },
        };
        *self.lock().refusals.entry(kind.to_owned()).or_default() += 1;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counted> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Renders the metrics. Label values are service names (`[a-z0-9_-]`), ops, error kinds
/// and fixed words, so they need no escaping except the lease holder, which is escaped.
pub fn render(status: &Status, counters: &Counters) -> String {
    let mut out = String::with_capacity(8192);
    let vram = &status.vram;
    for (name, help, mb) in [
        ("total", "GPU memory in total", vram.total_mb),
        ("used", "GPU memory in use", vram.used_mb),
        ("free", "GPU memory free", vram.free_mb),
        (
            "external",
            "GPU memory used by no managed service",
            vram.external_mb,
        ),
        (
            "reclaiming",
            "GPU memory of exited processes not yet freed",
            vram.reclaiming_mb,
        ),
        ("reserve", "GPU memory never handed out", vram.reserve_mb),
    ] {
        gauge(
            &mut out,
            &format!("gpu_manager_vram_{name}_bytes"),
            help,
            &[(String::new(), mb as f64 * BYTES_PER_MB)],
        );
    }
    let gpu = &status.gpu;
    if let Some(celsius) = gpu.temperature_c {
        gauge(
            &mut out,
            "gpu_manager_gpu_temperature_celsius",
            "GPU temperature",
            &[(String::new(), f64::from(celsius))],
        );
    }
    if let Some(pct) = gpu.utilization_pct {
        gauge(
            &mut out,
            "gpu_manager_gpu_utilization_ratio",
            "Fraction of the last sample period the GPU was busy (0 to 1)",
            &[(String::new(), f64::from(pct) / 100.0)],
        );
    }

    let state_samples: Vec<(String, f64)> = status
        .services
        .iter()
        .flat_map(|(service, s)| {
            STATES.iter().map(move |state| {
                (
                    format!("service=\"{service}\",state=\"{state}\""),
                    f64::from(u8::from(s.state == *state)),
                )
            })
        })
        .collect();
    gauge(
        &mut out,
        "gpu_manager_service_state",
        "1 for the state each service is in",
        &state_samples,
    );
    let per_service = |value: &dyn Fn(&ServiceStatus) -> f64| -> Vec<(String, f64)> {
        status
            .services
            .iter()
            .map(|(service, s)| (format!("service=\"{service}\""), value(s)))
            .collect()
    };
    gauge(
        &mut out,
        "gpu_manager_service_observed_vram_bytes",
        "GPU memory the service's processes hold",
        &per_service(&|s| s.observed_vram_mb.unwrap_or(0) as f64 * BYTES_PER_MB),
    );
    gauge(
        &mut out,
        "gpu_manager_service_declared_vram_bytes",
        "GPU memory the service declares",
        &per_service(&|s| s.declared_vram_mb as f64 * BYTES_PER_MB),
    );
    counter(
        &mut out,
        "gpu_manager_service_restarts_total",
        "Restarts after failures",
        &per_service(&|s| f64::from(s.restarts)),
    );
    gauge(
        &mut out,
        "gpu_manager_claims",
        "Live claims on the service: while any lives it is never stopped, parked or preempted",
        &per_service(&|s| s.claims.len() as f64),
    );

    counter(
        &mut out,
        "gpu_manager_orphans_reaped_total",
        "Orphaned processes of services the daemon reaped as their subreaper",
        &[(String::new(), crate::act::reaper::orphans_reaped() as f64)],
    );

    histogram_header(
        &mut out,
        "gpu_manager_transition_duration_seconds",
        "Duration of transitions that acted",
    );
    histogram(
        &mut out,
        "gpu_manager_transition_duration_seconds",
        "",
        &status.transitions,
    );

    let counted = counters.lock();
    histogram_header(
        &mut out,
        "gpu_manager_action_duration_seconds",
        "Duration of finished actions, by op",
    );
    for (op, stats) in &counted.action_durations {
        histogram(
            &mut out,
            "gpu_manager_action_duration_seconds",
            &format!("op=\"{op}\","),
            stats,
        );
    }
    let actions: Vec<(String, f64)> = counted
        .actions
        .iter()
        .map(|((op, outcome), n)| (format!("op=\"{op}\",outcome=\"{outcome}\""), *n as f64))
        .collect();
    counter(
        &mut out,
        "gpu_manager_actions_total",
        "Finished actions, by op and outcome (ok, timeout, backend_down, cancelled, error)",
        &actions,
    );
    let refusals: Vec<(String, f64)> = counted
        .refusals
        .iter()
        .map(|(kind, n)| (format!("kind=\"{kind}\""), *n as f64))
        .collect();
    counter(
        &mut out,
        "gpu_manager_api_refusals_total",
        "API requests answered with an error, by the error's kind",
        &refusals,
    );
    let reloads: Vec<(String, f64)> = counted
        .reloads
        .iter()
        .map(|(outcome, n)| (format!("outcome=\"{outcome}\""), *n as f64))
        .collect();
    counter(
        &mut out,
        "gpu_manager_config_reloads_total",
        "Config reloads, by outcome (applied, refused)",
        &reloads,
    );
    drop(counted);

    let holder = status.lock.holder.as_deref().unwrap_or("");
    gauge(
        &mut out,
        "gpu_manager_lease_held",
        "1 while someone holds the GPU lease, labelled with the holder",
        &[(
            format!("holder=\"{}\"", escape(holder)),
            f64::from(u8::from(status.lock.holder.is_some())),
        )],
    );
    out
}

/// The demand proxy's series (docs/ARCHITECTURE.md, "The demand proxy"), read live from
/// its counters; empty when no service has a proxy.
pub fn render_proxy(traffic: &TrafficBoard) -> String {
    let services = traffic.all();
    let mut out = String::new();
    if services.is_empty() {
        return out;
    }
    let in_flight: Vec<(String, f64)> = services
        .iter()
        .map(|(name, t)| (format!("service=\"{name}\""), t.current().in_flight as f64))
        .collect();
    gauge(
        &mut out,
        "gpu_manager_proxy_in_flight",
        "Requests forwarded through the proxy and not yet answered in full",
        &in_flight,
    );
    let metrics: Vec<_> = services
        .iter()
        .map(|(name, t)| (name, t.metrics()))
        .collect();
    let answered: Vec<(String, f64)> = metrics
        .iter()
        .flat_map(|(name, m)| {
            m.answered
                .iter()
                .map(move |(code, n)| (format!("service=\"{name}\",code=\"{code}\""), *n as f64))
        })
        .collect();
    counter(
        &mut out,
        "gpu_manager_proxy_requests_total",
        "Requests answered through the proxy, by service and HTTP status",
        &answered,
    );
    histogram_header(
        &mut out,
        "gpu_manager_proxy_wait_seconds",
        "How long requests waited for their service to be ready",
    );
    for (name, m) in &metrics {
        histogram(
            &mut out,
            "gpu_manager_proxy_wait_seconds",
            &format!("service=\"{name}\","),
            &m.waits,
        );
    }
    out
}

fn gauge(out: &mut String, name: &str, help: &str, samples: &[(String, f64)]) {
    family(out, name, help, "gauge", samples);
}

fn counter(out: &mut String, name: &str, help: &str, samples: &[(String, f64)]) {
    family(out, name, help, "counter", samples);
}

fn family(out: &mut String, name: &str, help: &str, kind: &str, samples: &[(String, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, value) in samples {
        if labels.is_empty() {
            let _ = writeln!(out, "{name} {value}");
        } else {
            let _ = writeln!(out, "{name}{{{labels}}} {value}");
        }
    }
}

fn histogram_header(out: &mut String, name: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} histogram");
}

/// One histogram's series; `labels` is empty or ends with a comma (it precedes `le`).
fn histogram(out: &mut String, name: &str, labels: &str, stats: &TransitionStats) {
    for (le, count) in stats.bucket_le_ms.iter().zip(&stats.bucket_counts) {
        let le = *le as f64 / 1000.0;
        let _ = writeln!(out, "{name}_bucket{{{labels}le=\"{le}\"}} {count}");
    }
    let _ = writeln!(
        out,
        "{name}_bucket{{{labels}le=\"+Inf\"}} {count}",
        count = stats.count
    );
    let labels = labels.trim_end_matches(',');
    let braces = if labels.is_empty() {
        String::new()
    } else {
        format!("{{{labels}}}")
    };
    let _ = writeln!(out, "{name}_sum{braces} {}", stats.sum_ms as f64 / 1000.0);
    let _ = writeln!(out, "{name}_count{braces} {}", stats.count);
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn action(op: &str, duration_ms: u64, outcome: Result<String, String>) -> ActionRecord {
        ActionRecord {
            op: op.into(),
            service: "vidi".into(),
            reason: "test".into(),
            cause: None,
            generation: 1,
            duration_ms,
            failure: outcome.as_ref().err().map(|_| FailureKind::Timeout),
            outcome,
            started_at_ms: 0,
            finished_at_ms: 0,
            busy: None,
        }
    }

    #[test]
    fn renders_vram_in_bytes_states_and_histograms() {
        let mut status = Status::default();
        status.vram.total_mb = 24576;
        status.gpu.temperature_c = Some(50);
        status.gpu.utilization_pct = Some(7);
        let mut vidi = ServiceStatus::ready_for_test(4096, 4000, vec![2]);
        vidi.restarts = 2;
        vidi.claims = vec![crate::status::ClaimStatus {
            service: "vidi".into(),
            holder: "job".into(),
            until: crate::utc::UtcTime::from_epoch_s(60),
            seconds_left: 60,
        }];
        status.services.insert("vidi".into(), vidi);
        status.transitions.observe(700);
        status.lock.holder = Some("a\"b".into());
        let counters = Counters::default();
        counters.record_action(&action("start", 600, Ok("ready".into())));
        counters.record_action(&action("start", 20_000, Err("late".into())));
        counters.record_action(&action("stop", 90, Ok("stopped".into())));
        counters.record_refusal(
            409,
            &serde_json::json!({"error": "x", "kind": "cannot_fit"}),
        );
        counters.record_refusal(401, &serde_json::json!({"error": "token"}));
        let text = render(&status, &counters);
        for line in [
            "# TYPE gpu_manager_vram_total_bytes gauge",
            "gpu_manager_vram_total_bytes 25769803776",
            "gpu_manager_gpu_temperature_celsius 50",
            "gpu_manager_gpu_utilization_ratio 0.07",
            "gpu_manager_service_state{service=\"vidi\",state=\"ready\"} 1",
            "gpu_manager_service_state{service=\"vidi\",state=\"stopped\"} 0",
            "gpu_manager_service_observed_vram_bytes{service=\"vidi\"} 4194304000",
            "gpu_manager_service_restarts_total{service=\"vidi\"} 2",
            "gpu_manager_claims{service=\"vidi\"} 1",
            "gpu_manager_transition_duration_seconds_bucket{le=\"1\"} 1",
            "gpu_manager_transition_duration_seconds_bucket{le=\"0.5\"} 0",
            "gpu_manager_transition_duration_seconds_sum 0.7",
            "# TYPE gpu_manager_action_duration_seconds histogram",
            "gpu_manager_action_duration_seconds_bucket{op=\"start\",le=\"1\"} 1",
            "gpu_manager_action_duration_seconds_bucket{op=\"start\",le=\"+Inf\"} 2",
            "gpu_manager_action_duration_seconds_count{op=\"stop\"} 1",
            "gpu_manager_action_duration_seconds_sum{op=\"start\"} 20.6",
            "gpu_manager_actions_total{op=\"start\",outcome=\"ok\"} 1",
            "gpu_manager_actions_total{op=\"start\",outcome=\"timeout\"} 1",
            "gpu_manager_api_refusals_total{kind=\"cannot_fit\"} 1",
            "gpu_manager_api_refusals_total{kind=\"unauthorized\"} 1",
            "gpu_manager_lease_held{holder=\"a\\\"b\"} 1",
            "# TYPE gpu_manager_orphans_reaped_total counter",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} in:\n{text}");
        }
        assert!(!text.contains("_mb"), "no abbreviated units:\n{text}");
        for family in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
            let name = family.split(' ').next().unwrap();
            assert!(text.contains(&format!("# HELP {name} ")), "HELP for {name}");
        }
    }

    #[tokio::test]
    async fn counts_actions_from_the_event_stream() {
        let (feed, _) = broadcast::channel(16);
        let counters = Counters::start(&feed);
        feed.send(DaemonEvent::ActionFinished {
            action: action("stop", 100, Ok("stopped".into())),
        })
        .unwrap();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        feed.send(DaemonEvent::ConfigRefused {
            trigger: crate::reload::ReloadTrigger::Api,
            error: "bad".into(),
        })
        .unwrap();
        while !render(&Status::default(), &counters)
            .contains("gpu_manager_actions_total{op=\"stop\",outcome=\"ok\"} 1\n")
            || !render(&Status::default(), &counters)
                .contains("gpu_manager_config_reloads_total{outcome=\"refused\"} 1\n")
        {
            assert!(tokio::time::Instant::now() < deadline, "never counted");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }
}
