//! `GET /metrics`: the status snapshot in Prometheus text format.

use std::fmt::Write;

use crate::status::{ServiceState, Status};

const STATES: [ServiceState; 8] = [
    ServiceState::Stopped,
    ServiceState::Starting,
    ServiceState::Ready,
    ServiceState::Unhealthy,
    ServiceState::Stopping,
    ServiceState::Preempted,
    ServiceState::Failed,
    ServiceState::Unknown,
];

/// Renders the metrics. Label values are service names (`[a-z0-9_-]`) and fixed words,
/// so they need no escaping except the lease holder, which is escaped.
pub fn render(status: &Status) -> String {
    let mut out = String::with_capacity(4096);
    let vram = &status.vram;
    for (name, help, value) in [
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
    ] {
        gauge(
            &mut out,
            &format!("gpu_manager_vram_{name}_mb"),
            help,
            &[(String::new(), value as f64)],
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
    let per_service = |value: &dyn Fn(&crate::status::ServiceStatus) -> f64| -> Vec<(String, f64)> {
        status
            .services
            .iter()
            .map(|(service, s)| (format!("service=\"{service}\""), value(s)))
            .collect()
    };
    gauge(
        &mut out,
        "gpu_manager_service_observed_vram_mb",
        "GPU memory the service's processes hold",
        &per_service(&|s| s.observed_vram_mb.unwrap_or(0) as f64),
    );
    gauge(
        &mut out,
        "gpu_manager_service_declared_vram_mb",
        "GPU memory the service declares",
        &per_service(&|s| s.declared_vram_mb as f64),
    );
    counter(
        &mut out,
        "gpu_manager_service_restarts_total",
        "Restarts after failures",
        &per_service(&|s| f64::from(s.restarts)),
    );

    counter(
        &mut out,
        "gpu_manager_orphans_reaped_total",
        "Orphaned processes of services the daemon reaped as their subreaper",
        &[(String::new(), crate::act::reaper::orphans_reaped() as f64)],
    );

    let stats = &status.transitions;
    let _ = writeln!(
        out,
        "# HELP gpu_manager_transition_duration_seconds Duration of transitions that acted"
    );
    let _ = writeln!(
        out,
        "# TYPE gpu_manager_transition_duration_seconds histogram"
    );
    for (le, count) in stats.bucket_le_ms.iter().zip(&stats.bucket_counts) {
        let _ = writeln!(
            out,
            "gpu_manager_transition_duration_seconds_bucket{{le=\"{}\"}} {count}",
            *le as f64 / 1000.0
        );
    }
    let _ = writeln!(
        out,
        "gpu_manager_transition_duration_seconds_bucket{{le=\"+Inf\"}} {}",
        stats.count
    );
    let _ = writeln!(
        out,
        "gpu_manager_transition_duration_seconds_sum {}",
        stats.sum_ms as f64 / 1000.0
    );
    let _ = writeln!(
        out,
        "gpu_manager_transition_duration_seconds_count {}",
        stats.count
    );

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

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::ServiceStatus;

    #[test]
    fn renders_vram_states_and_histogram() {
        let mut status = Status::default();
        status.vram.total_mb = 24576;
        status.services.insert(
            "vidi".into(),
            ServiceStatus {
                state: ServiceState::Ready,
                kind: "native".into(),
                priority: 40,
                phases: vec![2],
                declared_vram_mb: 4096,
                observed_vram_mb: Some(4000),
                pids: vec![1],
                container: None,
                wanted: true,
                reason: None,
                last_error: None,
                since_ms: 0,
                restarts: 2,
            },
        );
        status.transitions.observe(700);
        status.lock.holder = Some("a\"b".into());
        let text = render(&status);
        assert!(text.contains("gpu_manager_vram_total_mb 24576\n"), "{text}");
        assert!(text.contains("gpu_manager_service_state{service=\"vidi\",state=\"ready\"} 1\n"));
        assert!(text.contains("gpu_manager_service_state{service=\"vidi\",state=\"stopped\"} 0\n"));
        assert!(text.contains("gpu_manager_service_observed_vram_mb{service=\"vidi\"} 4000\n"));
        assert!(text.contains("gpu_manager_service_restarts_total{service=\"vidi\"} 2\n"));
        assert!(text.contains("gpu_manager_transition_duration_seconds_bucket{le=\"1\"} 1\n"));
        assert!(text.contains("gpu_manager_transition_duration_seconds_bucket{le=\"0.5\"} 0\n"));
        assert!(text.contains("gpu_manager_lease_held{holder=\"a\\\"b\"} 1\n"));
        assert!(text.contains("# TYPE gpu_manager_orphans_reaped_total counter\n"));
    }
}
