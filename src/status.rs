//! The status snapshot: the one serde model the reconciler publishes and the API, the
//! metrics and the CLI read. Its core is the requirements' AC-2 shape
//! (`vram`, `services.NAME.state`, `lock.holder`); the rest is for debugging.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::config::Phase;
use crate::desired::claims::{Claim, ClaimChange, ClaimEnd};
use crate::plan::Cause;
use crate::reload::{ConfigStatus, ReloadReport, ReloadTrigger};
use crate::utc::UtcTime;

pub use crate::clock::now_ms;
pub use crate::lease::{LeaseRefusal, LeaseRole, LockStatus};

/// A service's lifecycle state, as the contract names them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServiceState {
    #[default]
    Stopped,
    Starting,
    Ready,
    Unhealthy,
    Stopping,
    Preempted,
    Failed,
    /// Its backend (Docker) cannot be reached, so nobody knows.
    Unknown,
    /// Alive, holding only its residual VRAM; resumed (not restarted) when wanted.
    Parked,
    /// Waiting for its work in flight to end before a stop or a park.
    Draining,
}

impl fmt::Display for ServiceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        f.write_str(&text)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub vram: Vram,
    pub services: BTreeMap<String, ServiceStatus>,
    pub lock: LockStatus,
    pub gpu: GpuStatus,
    pub desired: DesiredStatus,
    /// The last actions taken, oldest first.
    pub recent_actions: Vec<ActionRecord>,
    pub transitions: TransitionStats,
    /// Wall-clock time of this snapshot, milliseconds since the epoch.
    pub observed_at_ms: u64,
    /// The daemon's first round (observing the GPU and services, and adopting what runs
    /// when it leads) is done: it is ready (systemd's READY=1, see src/notify.rs).
    #[serde(default)]
    pub first_round_done: bool,
    /// The config in force, and why the last reload was refused.
    #[serde(default)]
    pub config: ConfigStatus,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Vram {
    pub total_mb: u64,
    pub used_mb: u64,
    pub free_mb: u64,
    /// Used by no service: a desktop, a stray process, the driver.
    pub external_mb: u64,
    /// Held by processes that have exited, until the driver frees it.
    pub reclaiming_mb: u64,
    pub reserve_mb: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub state: ServiceState,
    pub kind: String,
    pub priority: i64,
    pub phases: Vec<Phase>,
    pub declared_vram_mb: u64,
    pub observed_vram_mb: Option<u64>,
    /// The most VRAM it was seen to take while ready, kept across restarts
    /// (src/footprints.rs): starts are budgeted at it when it exceeds the declared size.
    #[serde(default)]
    pub learned_peak_mb: Option<u64>,
    /// The most it was seen to hold while parked.
    #[serde(default)]
    pub learned_residual_mb: Option<u64>,
    /// Set when what it was seen to take (now, or its learned peak) exceeds its declared
    /// `vram_mb` by more than 10 %: what was seen, and what to do.
    #[serde(default)]
    pub footprint_warning: Option<String>,
    pub pids: Vec<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    pub wanted: bool,
    /// Why it is in this state: a plan verdict or the last action's reason.
    pub reason: Option<String>,
    pub last_error: Option<String>,
    pub since_ms: u64,
    pub restarts: u32,
    /// How it parks (`http`, `ollama`, `cuda-checkpoint`); None: it is stopped instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub park: Option<String>,
    /// What it holds (or would hold) parked: observed at its last park, else configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub residual_mb: Option<u64>,
    /// Why it cannot park as configured (e.g. a driver without the CUDA checkpoint
    /// API): it is stopped instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub park_error: Option<String>,
    /// When it was last parked and resumed, milliseconds since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parked_at_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed_at_ms: Option<u64>,
    /// The live claims on it (docs/ARCHITECTURE.md, "Claims"): while any lives, it is
    /// never stopped, parked or preempted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub claims: Vec<ClaimStatus>,
    /// Its demand proxy, if it has one (docs/ARCHITECTURE.md, "The demand proxy").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<ProxyStatus>,
}

/// A proxied service's traffic and demand, as of the snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyStatus {
    pub listen: String,
    pub upstream: String,
    /// Requests forwarded and not yet answered in full.
    pub in_flight: usize,
    /// Requests waiting for the service to be ready (or for a concurrency slot).
    pub waiting: usize,
    /// Upgraded connections (WebSocket) open.
    pub upgraded: usize,
    /// Wanted because it is used, beside the phase and the pins.
    pub demanded: bool,
    /// When the demand ends if no request comes, milliseconds since the epoch; None
    /// while in use, or when it never ends by itself (`idle_ms: null`).
    pub demanded_until_ms: Option<u64>,
    pub last_request_ms: Option<u64>,
}

/// A live claim as status shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimStatus {
    pub service: String,
    pub holder: String,
    pub until: UtcTime,
    /// At the snapshot's time (`observed_at_ms`).
    pub seconds_left: u64,
}

impl ClaimStatus {
    pub fn at(claim: &Claim, now: UtcTime) -> Self {
        Self {
            service: claim.service.to_string(),
            holder: claim.holder.to_string(),
            until: claim.until,
            seconds_left: claim.seconds_left(now),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GpuStatus {
    /// "nvml", "simulated" or "unavailable".
    pub source: String,
    pub name: Option<String>,
    pub temperature_c: Option<u32>,
    pub utilization_pct: Option<u32>,
    /// Why the GPU cannot be observed; budgets then come from declared sizes alone.
    pub error: Option<String>,
    pub processes: Vec<GpuProcessStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuProcessStatus {
    pub pid: u32,
    pub used_mb: u64,
    /// The service whose process tree holds it; None: external.
    pub service: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DesiredStatus {
    pub phase: Option<Phase>,
    pub pinned: Vec<String>,
    pub held: Vec<String>,
    /// Bumped every time a new desired state is accepted.
    pub generation: u64,
    /// The generation the services last converged on.
    pub converged_generation: u64,
    /// A refused edit: the state above stays in force.
    pub error: Option<String>,
    /// The live claims, every service's.
    #[serde(default)]
    pub claims: Vec<ClaimStatus>,
}

/// A finished action, for status, API answers and the event stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActionRecord {
    pub op: String,
    pub service: String,
    pub reason: String,
    /// Why it was taken, as a type.
    #[serde(default)]
    pub cause: Option<Cause>,
    pub generation: u64,
    pub duration_ms: u64,
    pub outcome: Result<String, String>,
    /// What kind of failure, when it failed: decides the API's status code.
    pub failure: Option<FailureKind>,
    /// When it began and ended, milliseconds since the epoch: actions run side by side.
    #[serde(default)]
    pub started_at_ms: u64,
    pub finished_at_ms: u64,
    /// A drain that timed out: what the service's probe answered (the `busy_if` parts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub busy: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// Not ready, or memory not reclaimed, in time.
    Timeout,
    /// A backend the action needs (Docker) is unreachable.
    BackendDown,
    /// A newer desired state no longer wanted it: stopped before it was ready.
    Cancelled,
    /// Its work in flight did not end within the drain timeout: left untouched.
    Busy,
    Other,
}

/// Durations of transitions (reconcile rounds that acted), as a histogram.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransitionStats {
    pub count: u64,
    pub sum_ms: u64,
    /// Upper bounds in ms, ascending; the counts are cumulative as Prometheus wants.
    pub bucket_le_ms: Vec<u64>,
    pub bucket_counts: Vec<u64>,
}

impl Default for TransitionStats {
    fn default() -> Self {
        Self::with_bounds_ms(vec![
            100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 120000,
        ])
    }
}

impl TransitionStats {
    /// An empty histogram with these upper bounds (ms, ascending).
    pub fn with_bounds_ms(bucket_le_ms: Vec<u64>) -> Self {
        Self {
            count: 0,
            sum_ms: 0,
            bucket_counts: vec![0; bucket_le_ms.len()],
            bucket_le_ms,
        }
    }

    pub fn observe(&mut self, duration_ms: u64) {
        self.count += 1;
        self.sum_ms += duration_ms;
        for (le, count) in self.bucket_le_ms.iter().zip(self.bucket_counts.iter_mut()) {
            if duration_ms <= *le {
                *count += 1;
            }
        }
    }
}

/// What the event stream (`GET /gpu/events`) carries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum DaemonEvent {
    DesiredAccepted {
        generation: u64,
        phase: Option<Phase>,
        pinned: Vec<String>,
        held: Vec<String>,
    },
    DesiredRefused {
        error: String,
    },
    ActionStarted {
        generation: u64,
        op: String,
        service: String,
        reason: String,
        #[serde(default)]
        cause: Option<Cause>,
        #[serde(default)]
        started_at_ms: Option<u64>,
    },
    ActionFinished {
        action: ActionRecord,
    },
    StateChanged {
        service: String,
        from: ServiceState,
        to: ServiceState,
        reason: Option<String>,
    },
    /// A claim was taken (docs/ARCHITECTURE.md, "Claims").
    ClaimTaken {
        service: String,
        holder: String,
        until: UtcTime,
    },
    /// The holder's claim was renewed to a new time.
    ClaimRenewed {
        service: String,
        holder: String,
        until: UtcTime,
    },
    ClaimEnded {
        service: String,
        holder: String,
        until: UtcTime,
        why: ClaimEnd,
    },
    /// A reload applied the config file's difference (docs/ARCHITECTURE.md, "Reloading
    /// the config").
    ConfigReloaded {
        trigger: ReloadTrigger,
        report: ReloadReport,
    },
    /// A reload was refused: the config in force stays.
    ConfigRefused {
        trigger: ReloadTrigger,
        error: String,
    },
    /// A request through its proxy made a service wanted (docs/ARCHITECTURE.md, "The
    /// demand proxy").
    DemandStarted {
        service: String,
    },
    /// No request for `idle_ms`: wanted again only as the phase, pins and claims say.
    DemandEnded {
        service: String,
    },
    /// Sent to a stream client that fell behind: this many events were dropped for it.
    Lagged {
        missed: u64,
    },
}

impl DaemonEvent {
    /// The event a claim's change is.
    pub fn of_claim(change: ClaimChange) -> Self {
        match change {
            ClaimChange::Taken(claim) => DaemonEvent::ClaimTaken {
                service: claim.service.to_string(),
                holder: claim.holder.to_string(),
                until: claim.until,
            },
            ClaimChange::Renewed(claim) => DaemonEvent::ClaimRenewed {
                service: claim.service.to_string(),
                holder: claim.holder.to_string(),
                until: claim.until,
            },
            ClaimChange::Ended { claim, why } => DaemonEvent::ClaimEnded {
                service: claim.service.to_string(),
                holder: claim.holder.to_string(),
                until: claim.until,
                why,
            },
        }
    }
}

#[cfg(test)]
impl ServiceStatus {
    /// A ready native service with one process holding `observed_mb`, for tests.
    pub fn ready_for_test(declared_mb: u64, observed_mb: u64, phases: Vec<Phase>) -> Self {
        Self {
            state: ServiceState::Ready,
            kind: "native".into(),
            priority: 40,
            phases,
            declared_vram_mb: declared_mb,
            observed_vram_mb: Some(observed_mb),
            learned_peak_mb: None,
            learned_residual_mb: None,
            footprint_warning: None,
            pids: vec![1],
            container: None,
            wanted: true,
            reason: None,
            last_error: None,
            since_ms: 0,
            restarts: 0,
            park: None,
            residual_mb: None,
            park_error: None,
            parked_at_ms: None,
            resumed_at_ms: None,
            claims: Vec::new(),
            proxy: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_buckets_are_cumulative() {
        let mut stats = TransitionStats::default();
        stats.observe(90);
        stats.observe(700);
        assert_eq!(stats.count, 2);
        assert_eq!(stats.sum_ms, 790);
        assert_eq!(stats.bucket_counts[0], 1, "le 100");
        assert_eq!(stats.bucket_counts[3], 2, "le 1000");
        assert_eq!(*stats.bucket_counts.last().unwrap(), 2);
    }

    #[test]
    fn states_display_as_the_contract_names_them() {
        assert_eq!(ServiceState::Preempted.to_string(), "preempted");
        assert_eq!(ServiceState::Ready.to_string(), "ready");
    }
}
