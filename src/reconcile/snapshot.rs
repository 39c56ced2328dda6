//! Publishing status: the snapshot the API, metrics and CLI read, and a state-changed
//! event for every service whose state moved since the last one.

use tokio::time::Instant;

use crate::config::{Runtime, ServiceSpec};
use crate::lease::LeaseBackend;
use crate::status::{
    now_ms, ClaimStatus, DaemonEvent, DesiredStatus, GpuProcessStatus, GpuStatus, ProxyStatus,
    ServiceState, ServiceStatus, Status, Vram,
};
use crate::utc::UtcTime;

use super::effects::ServiceEffects;
use super::{GpuSource, Reconciler};

impl<E: ServiceEffects, L: LeaseBackend> Reconciler<E, L> {
    /// Publishes a fresh snapshot, and a state-changed event for each service whose
    /// state differs from the last snapshot's.
    pub(super) fn publish(&self) {
        let status = self.snapshot();
        let previous = self.status_tx.send_replace(status.clone());
        for (name, service) in &status.services {
            let before = previous.services.get(name).map(|s| s.state);
            if before.is_some_and(|b| b != service.state) {
                let _ = self.feed.send(DaemonEvent::StateChanged {
                    service: name.clone(),
                    from: before.unwrap_or(ServiceState::Stopped),
                    to: service.state,
                    reason: service.reason.clone(),
                });
            }
        }
    }

    /// A proxied service's traffic as the proxy counts it, and its demand.
    fn proxy_status(&self, spec: &ServiceSpec) -> Option<ProxyStatus> {
        let proxy = spec.proxy.as_ref()?;
        let idle = proxy.idle.unwrap_or_default();
        let traffic = self.traffic.current(&spec.name).unwrap_or_default();
        let (now, now_at_ms) = (Instant::now(), now_ms());
        Some(ProxyStatus {
            listen: proxy.listen.to_string(),
            upstream: proxy.upstream.clone(),
            in_flight: traffic.in_flight,
            waiting: traffic.waiting,
            upgraded: traffic.upgraded,
            demanded: self.demand.is_demanded(&spec.name),
            // The review at the next round moves the end to the last request's idle_ms.
            demanded_until_ms: self
                .demand
                .until(&spec.name)
                .filter(|_| !traffic.in_use())
                .map(|until| until.max(traffic.last_active.map_or(until, |t| t + idle)))
                .map(|until| now_at_ms + until.saturating_duration_since(now).as_millis() as u64),
            last_request_ms: traffic.last_request_ms,
        })
    }

    fn snapshot(&self) -> Status {
        let view = &self.gpu_view;
        let budget = self.budget();
        let vram = match &view.sample {
            Some(sample) => Vram {
                total_mb: sample.total_mb,
                used_mb: sample.used_mb,
                free_mb: sample.free_mb,
                external_mb: view.external_mb,
                reclaiming_mb: view.reclaiming_mb,
                reserve_mb: budget.reserve_mb,
            },
            None => {
                let used: u64 = self
                    .records
                    .iter()
                    .filter(|r| r.instance().is_some())
                    .map(|r| r.spec.vram_mb)
                    .sum();
                Vram {
                    total_mb: budget.total_mb,
                    used_mb: used,
                    free_mb: budget.total_mb.saturating_sub(used),
                    reserve_mb: budget.reserve_mb,
                    ..Default::default()
                }
            }
        };
        let wanted = self
            .desired
            .as_ref()
            .map(|d| d.wanted_with(&self.config.inventory, &self.demand.names()))
            .unwrap_or_default();
        let desired = self.desired.clone().unwrap_or_default();
        let observed_at_ms = now_ms();
        let now = UtcTime::of_ms(observed_at_ms);
        let claims_on = |name| {
            desired
                .claims_on(name)
                .map(|c| ClaimStatus::at(c, now))
                .collect()
        };
        let services = self
            .records
            .iter()
            .map(|record| {
                let spec = &record.spec;
                let learned = self.footprints.get(&spec.name);
                let container = match &spec.runtime {
                    Runtime::Docker(docker) => Some(docker.container.clone()),
                    Runtime::Native(_) => None,
                };
                let status = ServiceStatus {
                    state: record.state(),
                    kind: spec.runtime.kind().to_owned(),
                    priority: spec.priority,
                    phases: spec.phases.clone(),
                    declared_vram_mb: spec.vram_mb,
                    observed_vram_mb: record.observed_mb,
                    learned_peak_mb: learned.and_then(|f| f.peak_mb),
                    learned_residual_mb: learned.and_then(|f| f.residual_mb),
                    footprint_warning: self
                        .footprints
                        .warning(spec, record.observed_mb)
                        .map(|w| w.to_string()),
                    pids: record
                        .instance()
                        .and_then(E::root_pid)
                        .into_iter()
                        .collect(),
                    container,
                    wanted: wanted.contains_key(&spec.name),
                    reason: record.reason().map(str::to_owned),
                    last_error: record.last_error().map(str::to_owned),
                    since_ms: record.since_ms(),
                    restarts: record.restarts(),
                    park: spec.park.as_ref().map(|p| p.method.kind().to_owned()),
                    residual_mb: spec
                        .park
                        .as_ref()
                        .map(|p| learned.and_then(|f| f.residual_mb).unwrap_or(p.residual_mb)),
                    park_error: self.effects.park_unavailable(spec),
                    parked_at_ms: record.parked_at_ms(),
                    resumed_at_ms: record.resumed_at_ms(),
                    claims: claims_on(&spec.name),
                    proxy: self.proxy_status(spec),
                };
                (spec.name.to_string(), status)
            })
            .collect();
        let gpu = GpuStatus {
            source: match &self.gpu {
                GpuSource::Observed { source, .. } => (*source).to_owned(),
                GpuSource::Unavailable { .. } => "unavailable".to_owned(),
            },
            name: view.sample.as_ref().map(|s| s.name.clone()),
            temperature_c: view.sample.as_ref().and_then(|s| s.temperature_c),
            utilization_pct: view.sample.as_ref().and_then(|s| s.utilization_pct),
            error: view.error.clone(),
            processes: view
                .sample
                .iter()
                .flat_map(|s| &s.processes)
                .map(|p| GpuProcessStatus {
                    pid: p.pid,
                    used_mb: p.used_mb,
                    service: view.owners.get(&p.pid).map(|s| s.to_string()),
                })
                .collect(),
        };
        Status {
            vram,
            services,
            lock: self.lease.status(),
            gpu,
            desired: DesiredStatus {
                phase: desired.phase,
                pinned: desired.pinned.iter().map(|n| n.to_string()).collect(),
                held: desired.held.iter().map(|n| n.to_string()).collect(),
                generation: self.generation,
                converged_generation: self.converged_generation,
                error: self.desired_error.clone(),
                claims: desired
                    .claims
                    .iter()
                    .map(|c| ClaimStatus::at(c, now))
                    .collect(),
            },
            recent_actions: self.history.clone(),
            transitions: self.transitions.clone(),
            observed_at_ms,
            first_round_done: self.first_round_done,
            config: self.config_status.clone(),
        }
    }
}
