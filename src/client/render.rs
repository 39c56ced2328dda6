//! What people read: the status table, one line per daemon event, a transition's report.

use std::fmt::Write;
use std::time::Duration;

use crate::can_fit::CanFit;
use crate::footprints::Forgotten;
use crate::status::{ActionRecord, ClaimStatus, DaemonEvent, ProxyStatus, Status};
use crate::transition::TransitionReport;
use crate::utc::UtcTime;

const BAR_WIDTH: u64 = 40;

/// The status as a table: GPU, a VRAM bar, the desired state, then one line per service.
pub fn status_table(status: &Status) -> String {
    let mut out = String::new();
    let gpu = &status.gpu;
    let _ = write!(
        out,
        "GPU   {} ({})",
        gpu.name.as_deref().unwrap_or("unknown"),
        gpu.source
    );
    if let Some(temperature) = gpu.temperature_c {
        let _ = write!(out, ", {temperature} °C");
    }
    if let Some(utilization) = gpu.utilization_pct {
        let _ = write!(out, ", {utilization}% busy");
    }
    out.push('\n');
    if let Some(error) = &gpu.error {
        let _ = writeln!(out, "      {error}");
    }
    let vram = &status.vram;
    let _ = writeln!(
        out,
        "VRAM {} {}/{} MB used, {} MB free ({} MB external, {} MB reclaiming, {} MB reserve)",
        bar(vram.used_mb, vram.total_mb),
        vram.used_mb,
        vram.total_mb,
        vram.free_mb,
        vram.external_mb,
        vram.reclaiming_mb,
        vram.reserve_mb
    );
    let desired = &status.desired;
    let _ = writeln!(
        out,
        "WANT  phase {}, pinned [{}], held [{}]; generation {} ({})",
        desired
            .phase
            .map(|p| p.to_string())
            .unwrap_or_else(|| "none".to_owned()),
        desired.pinned.join(", "),
        desired.held.join(", "),
        desired.generation,
        if desired.converged_generation >= desired.generation {
            "converged".to_owned()
        } else {
            format!("converged on {}", desired.converged_generation)
        }
    );
    if let Some(error) = &desired.error {
        let _ = writeln!(
            out,
            "      desired-state file refused: {}",
            first_line(error)
        );
    }
    if !desired.claims.is_empty() {
        let claims: Vec<String> = desired.claims.iter().map(claim).collect();
        let _ = writeln!(out, "CLAIM {}", claims.join("; "));
    }
    let lease = match &status.lock.holder {
        Some(holder) => format!("held by {holder}"),
        None => "free".to_owned(),
    };
    let _ = writeln!(out, "LEASE {lease} ({})\n", status.lock.backend);
    let _ = writeln!(
        out,
        "{:<12} {:<10} {:>9} {:>9} {:>9} {:>5}  WHY",
        "SERVICE", "STATE", "DECLARED", "OBSERVED", "LEARNED", "PRIO"
    );
    let mut warnings = Vec::new();
    for (name, service) in &status.services {
        let figure = |mb: Option<u64>| mb.map_or_else(|| "-".to_owned(), |mb| format!("{mb} MB"));
        let observed = figure(service.observed_vram_mb);
        let learned = figure(service.learned_peak_mb);
        warnings.extend(service.footprint_warning.clone());
        let why = match (&service.last_error, &service.reason) {
            (Some(error), Some(reason)) => format!("{reason}; last error: {}", first_line(error)),
            (Some(error), None) => format!("last error: {}", first_line(error)),
            (None, Some(reason)) => reason.clone(),
            (None, None) => String::new(),
        };
        let line = format!(
            "{name:<12} {:<10} {:>6} MB {observed:>9} {learned:>9} {:>5}  {why}",
            service.state.to_string(),
            service.declared_vram_mb,
            service.priority,
        );
        let _ = writeln!(out, "{}", line.trim_end());
        if let Some(proxy) = &service.proxy {
            let _ = writeln!(
                out,
                "{:12} {}",
                "",
                proxy_line(proxy, status.observed_at_ms)
            );
        }
    }
    for warning in warnings {
        let _ = writeln!(out, "warning: {warning}");
    }
    out
}

/// `comfyui by "render-job-42", 9m 58s left`.
fn claim(claim: &ClaimStatus) -> String {
    format!(
        "{} by {:?}, {} left",
        claim.service,
        claim.holder,
        time_left(claim.seconds_left)
    )
}

/// `9m 58s`: what is left of a claim or a demand, to the second.
fn time_left(seconds: u64) -> humantime::FormattedDuration {
    humantime::format_duration(Duration::from_secs(seconds))
}

/// A proxied service's traffic and demand, under its line of the table:
/// `proxy 127.0.0.1:11434 -> http://127.0.0.1:11435: 0 in flight, 0 waiting; demanded
/// until 2026-12-03T10:15:00Z (4m 58s left)`. The time left is counted from the
/// snapshot's time (`now_ms`), not this machine's clock, so that a client on another
/// host with a skewed clock shows what the daemon will do.
fn proxy_line(proxy: &ProxyStatus, now_ms: u64) -> String {
    let mut line = format!(
        "proxy {} -> {}: {} in flight, {} waiting",
        proxy.listen, proxy.upstream, proxy.in_flight, proxy.waiting
    );
    if proxy.upgraded > 0 {
        let _ = write!(line, ", {} upgraded", proxy.upgraded);
    }
    let in_use = proxy.in_flight + proxy.waiting + proxy.upgraded > 0;
    let demand = match (proxy.demanded, proxy.demanded_until_ms) {
        (false, _) => "not demanded".to_owned(),
        (true, Some(until_ms)) => format!(
            "demanded until {} ({} left)",
            UtcTime::at_or_after_ms(until_ms),
            time_left(until_ms.saturating_sub(now_ms).div_ceil(1000))
        ),
        // The status leaves the end out while requests are under way: it is idle_ms
        // after the last one ends.
        (true, None) if in_use => "demanded while in use".to_owned(),
        (true, None) => "demanded, with no end (idle_ms: null)".to_owned(),
    };
    let _ = write!(line, "; {demand}");
    line
}

/// `[#####.....]`: the share of `total` that `used` is.
fn bar(used: u64, total: u64) -> String {
    let filled = (used.min(total) * BAR_WIDTH + total / 2)
        .checked_div(total)
        .unwrap_or(0) as usize;
    format!(
        "[{}{}]",
        "#".repeat(filled),
        ".".repeat(BAR_WIDTH as usize - filled)
    )
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or("")
}

/// One progress line for an event of the stream.
/// `gpu-manager can-fit`: the verdict, then the daemon's reason.
pub fn can_fit(answer: &CanFit) -> String {
    let verdict = if answer.fits { "fits" } else { "does not fit" };
    let mut out = format!(
        "{} MB {verdict} ({} MB free of a {} MB budget)\n{}\n",
        answer.mb, answer.free_mb, answer.budget_mb, answer.reason
    );
    if !answer.would_preempt.is_empty() {
        let _ = writeln!(out, "would preempt: {}", answer.would_preempt.join(", "));
    }
    out
}

/// `gpu-manager forget NAME`: what was reset.
pub fn forgotten(answer: &Forgotten, whence: &str) -> String {
    let service = &answer.service;
    match &answer.forgotten {
        None => format!("{service}: nothing was learned of its footprint ({whence})\n"),
        Some(footprint) => {
            let figure = |mb: Option<u64>| mb.map_or("-".to_owned(), |mb| format!("{mb} MB"));
            format!(
                "{service}: {whence} its learned peak {} and residual {}; it is budgeted at its declared vram_mb until it runs again\n",
                figure(footprint.peak_mb),
                figure(footprint.residual_mb)
            )
        }
    }
}

pub fn event_line(event: &DaemonEvent) -> String {
    match event {
        DaemonEvent::DesiredAccepted {
            generation,
            phase,
            pinned,
            held,
        } => format!(
            "desired state accepted (generation {generation}): phase {}, pinned [{}], held [{}]",
            phase
                .map(|p| p.to_string())
                .unwrap_or_else(|| "none".to_owned()),
            pinned.join(", "),
            held.join(", ")
        ),
        DaemonEvent::DesiredRefused { error } => {
            format!("desired-state file refused: {}", first_line(error))
        }
        DaemonEvent::ActionStarted {
            op,
            service,
            reason,
            ..
        } => format!("{op} {service}: {reason}"),
        DaemonEvent::ActionFinished { action } => action_line(action),
        DaemonEvent::StateChanged {
            service, from, to, ..
        } => format!("{service}: {from} -> {to}"),
        DaemonEvent::ClaimTaken {
            service,
            holder,
            until,
        } => format!("{service}: claimed by {holder:?} until {until}"),
        DaemonEvent::ClaimRenewed {
            service,
            holder,
            until,
        } => format!("{service}: claim by {holder:?} renewed until {until}"),
        DaemonEvent::ClaimEnded {
            service,
            holder,
            why,
            ..
        } => format!("{service}: claim by {holder:?} ended ({why:?})"),
        DaemonEvent::ConfigReloaded { report, .. } => {
            format!("config reloaded: {}", report.summary())
        }
        DaemonEvent::ConfigRefused { error, .. } => {
            format!("config reload refused: {}", first_line(error))
        }
        DaemonEvent::DemandStarted { service } => {
            format!("{service}: demanded (a request came through its proxy)")
        }
        DaemonEvent::DemandEnded { service } => {
            format!("{service}: demand ended (no request for its idle_ms)")
        }
        DaemonEvent::Lagged { missed } => {
            format!("(fell behind the event stream: {missed} events not shown)")
        }
    }
}

fn action_line(action: &ActionRecord) -> String {
    match &action.outcome {
        Ok(detail) => format!(
            "{} {} done in {} ms: {detail}",
            action.op, action.service, action.duration_ms
        ),
        Err(error) => format!(
            "{} {} FAILED after {} ms: {}",
            action.op,
            action.service,
            action.duration_ms,
            first_line(error)
        ),
    }
}

/// A finished transition: its actions in order, then the services' final states.
pub fn report(what: &str, report: &TransitionReport) -> String {
    if report.accepted_only {
        return format!(
            "{what}: accepted as generation {}; follow it with `gpu-manager status` or GET /gpu/events\n",
            report.generation
        );
    }
    let mut out = format!(
        "{what}: converged in {} ms (generation {}), {} action(s)\n",
        report.duration_ms,
        report.generation,
        report.actions.len()
    );
    for action in &report.actions {
        let _ = writeln!(out, "  {}", action_line(action));
    }
    let states: Vec<String> = report
        .services
        .iter()
        .map(|(name, state)| format!("{name} {state}"))
        .collect();
    let _ = writeln!(out, "  now: {}", states.join(", "));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{ServiceState, ServiceStatus};

    #[test]
    fn the_bar_shows_the_used_share() {
        assert_eq!(bar(0, 100), format!("[{}]", ".".repeat(40)));
        assert_eq!(
            bar(50, 100),
            format!("[{}{}]", "#".repeat(20), ".".repeat(20))
        );
        assert_eq!(bar(200, 100), format!("[{}]", "#".repeat(40)));
        assert_eq!(bar(5, 0), format!("[{}]", ".".repeat(40)));
    }

    #[test]
    fn the_table_has_one_line_per_service_with_its_first_error_line() {
        let mut status = Status::default();
        status.vram.total_mb = 24576;
        status.vram.used_mb = 5120;
        status.services.insert(
            "vidi".into(),
            ServiceStatus {
                state: ServiceState::Failed,
                observed_vram_mb: None,
                learned_peak_mb: Some(9000),
                footprint_warning: Some("vidi was seen using 9000 MB".into()),
                pids: Vec::new(),
                reason: Some("restarting in 2s".into()),
                last_error: Some("vidi exited\nlog line".into()),
                restarts: 1,
                ..ServiceStatus::ready_for_test(4096, 0, vec![2])
            },
        );
        let table = status_table(&status);
        assert!(table.contains("5120/24576 MB used"), "{table}");
        let line = table.lines().find(|l| l.starts_with("vidi")).unwrap();
        assert!(
            line.contains("failed") && line.contains("4096 MB         -   9000 MB"),
            "declared, observed, learned: {line}"
        );
        assert!(
            table.ends_with("warning: vidi was seen using 9000 MB\n"),
            "{table}"
        );
        assert!(
            line.ends_with("restarting in 2s; last error: vidi exited"),
            "{line}"
        );
        assert!(!table.contains("log line"));
    }

    #[test]
    fn a_proxied_service_shows_its_proxy_traffic_and_demand_under_its_line() {
        let mut status = Status {
            observed_at_ms: UtcTime::parse("2026-12-03T10:10:00Z").unwrap().epoch_ms(),
            ..Status::default()
        };
        let proxy = ProxyStatus {
            listen: "127.0.0.1:11434".into(),
            upstream: "http://127.0.0.1:11435".into(),
            demanded: true,
            demanded_until_ms: Some(status.observed_at_ms + 298_400),
            last_request_ms: Some(status.observed_at_ms - 1_600),
            ..ProxyStatus::default()
        };
        status.services.insert(
            "ollama".into(),
            ServiceStatus {
                proxy: Some(proxy.clone()),
                ..ServiceStatus::ready_for_test(18432, 18432, vec![])
            },
        );
        status.services.insert(
            "vidi".into(),
            ServiceStatus::ready_for_test(4096, 4096, vec![2]),
        );
        let table = status_table(&status);
        let lines: Vec<&str> = table.lines().collect();
        let at = lines.iter().position(|l| l.starts_with("ollama")).unwrap();
        assert_eq!(
            lines[at + 1],
            format!(
                "{:12} proxy 127.0.0.1:11434 -> http://127.0.0.1:11435: 0 in flight, 0 waiting; \
                 demanded until 2026-12-03T10:14:59Z (4m 59s left)",
                ""
            ),
            "{table}"
        );
        assert!(
            lines[at + 2].starts_with("vidi"),
            "vidi has no proxy line: {table}"
        );
        assert_eq!(table.matches("proxy ").count(), 1, "{table}");

        let now = status.observed_at_ms;
        let busy = ProxyStatus {
            in_flight: 2,
            waiting: 1,
            upgraded: 1,
            demanded_until_ms: None,
            ..proxy.clone()
        };
        assert!(
            proxy_line(&busy, now)
                .ends_with(": 2 in flight, 1 waiting, 1 upgraded; demanded while in use"),
            "{}",
            proxy_line(&busy, now)
        );
        let forever = ProxyStatus {
            demanded_until_ms: None,
            ..proxy.clone()
        };
        assert!(proxy_line(&forever, now).ends_with("demanded, with no end (idle_ms: null)"));
        let idle = ProxyStatus {
            demanded: false,
            demanded_until_ms: None,
            ..proxy.clone()
        };
        assert!(proxy_line(&idle, now).ends_with("0 waiting; not demanded"));
        // A snapshot taken after the end (the loop has not ended it yet): nothing left.
        assert!(proxy_line(&proxy, now + 400_000).ends_with("(0s left)"));
    }

    #[test]
    fn the_table_lists_live_claims_with_their_time_left() {
        let mut status = Status::default();
        assert!(!status_table(&status).contains("CLAIM"));
        status.desired.claims.push(ClaimStatus {
            service: "comfyui".into(),
            holder: "render-job-42".into(),
            until: crate::utc::UtcTime::parse("2026-12-03T10:15:00Z").unwrap(),
            seconds_left: 598,
        });
        let table = status_table(&status);
        assert!(
            table.contains("CLAIM comfyui by \"render-job-42\", 9m 58s left\n"),
            "{table}"
        );
    }
}
