//! The reconciler's own record of each service (docs/ARCHITECTURE.md, "A service's
//! life"): what it knows, what it is doing, and how its failures back off. A record
//! owns its state: the loop tells it what happened ([`Event`]) and gets back what the
//! action came to and what to do next ([`Applied`]); only [`machine`] moves the state,
//! against a table of legal moves. Lookups return `Option`: an event about a service the
//! inventory does not hold is ignored, never a panic.

mod machine;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tokio::task::AbortHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::clock::now_ms;
use crate::config::{Inventory, ServiceName, ServiceSpec};
use crate::plan::{Cause, Condition, Op};
use crate::status::ServiceState;

pub(super) use machine::{ActionEnd, Event, FollowUp, Reconfigure};

/// Failed actions back off 1 s, 2 s, 4 s... up to this.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// After this many failures in a row a service stays `failed` until the desired state
/// changes.
pub(super) const MAX_CONSECUTIVE_FAILURES: u32 = 5;

/// An action under way for a service: at most one at a time.
#[derive(Debug)]
pub(super) struct InFlight {
    pub op: Op,
    pub cause: Cause,
    pub generation: u64,
    pub started: Instant,
    pub started_at_ms: u64,
    /// Cancelled when a newer desired state no longer wants what a start starts: the
    /// task stops what it started and waits for its memory.
    pub supersede: CancellationToken,
    /// Cancelled at shutdown: the task leaves things as they are, at a safe point.
    pub abandon: CancellationToken,
    /// `supersede` was cancelled: the start is being undone.
    pub superseded: bool,
}

impl InFlight {
    /// A start or a resume, still wanted.
    fn brings_up(&self) -> bool {
        matches!(self.op, Op::Start | Op::Resume) && !self.superseded
    }
}

/// A parked service: what its park acted on and left.
pub(super) struct ParkedAt {
    /// The processes the park acted on; its resume acts on them.
    pub pids: Vec<u32>,
}

/// The spec a reload gave a service whose instance runs the old launch: its next start
/// takes it (docs/ARCHITECTURE.md, "Reloading the config").
pub(super) struct PendingLaunch {
    pub spec: ServiceSpec,
    pub keys: Vec<&'static str>,
}

/// Since when a planned start has waited for the GPU to show its room.
pub(super) struct RoomWait {
    pub since: Instant,
}

pub(super) struct Record<I> {
    pub spec: ServiceSpec,
    state: ServiceState,
    since_ms: u64,
    instance: Option<I>,
    monitor: Option<AbortHandle>,
    last_error: Option<String>,
    reason: Option<String>,
    restarts: u32,
    consecutive_failures: u32,
    retry_at: Option<Instant>,
    condition: Condition,
    in_flight: Option<InFlight>,
    /// Alive but parked: its instance holds only its residual.
    parked: Option<ParkedAt>,
    parked_at_ms: Option<u64>,
    resumed_at_ms: Option<u64>,
    /// Its last stop or park found it busy: the gate is closed until `retry_at`.
    busy: bool,
    /// What the GPU attributes to it, as last observed.
    pub observed_mb: Option<u64>,
    pub room_wait: Option<RoomWait>,
    /// A reload changed how it is launched while it ran: the launch to restart with.
    pending_launch: Option<PendingLaunch>,
}

impl<I> Record<I> {
    fn new(spec: ServiceSpec) -> Self {
        Self {
            spec,
            state: ServiceState::Stopped,
            since_ms: now_ms(),
            instance: None,
            monitor: None,
            last_error: None,
            reason: None,
            restarts: 0,
            consecutive_failures: 0,
            retry_at: None,
            condition: Condition::Healthy,
            in_flight: None,
            parked: None,
            parked_at_ms: None,
            resumed_at_ms: None,
            busy: false,
            observed_mb: None,
            room_wait: None,
            pending_launch: None,
        }
    }

    pub fn name(&self) -> &ServiceName {
        &self.spec.name
    }

    pub fn state(&self) -> ServiceState {
        self.state
    }

    pub fn since_ms(&self) -> u64 {
        self.since_ms
    }

    pub fn instance(&self) -> Option<&I> {
        self.instance.as_ref()
    }

    pub fn in_flight(&self) -> Option<&InFlight> {
        self.in_flight.as_ref()
    }

    /// The pids its park acted on, while it is parked.
    pub fn parked_pids(&self) -> Option<&[u32]> {
        self.parked.as_ref().map(|p| p.pids.as_slice())
    }

    pub fn condition(&self) -> &Condition {
        &self.condition
    }

    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    pub fn reason(&self) -> Option<&str> {
        self.reason.as_deref()
    }

    pub fn restarts(&self) -> u32 {
        self.restarts
    }

    pub fn parked_at_ms(&self) -> Option<u64> {
        self.parked_at_ms
    }

    pub fn resumed_at_ms(&self) -> Option<u64> {
        self.resumed_at_ms
    }

    pub fn retry_at(&self) -> Option<Instant> {
        self.retry_at
    }

    /// The launch keys a reload changed while it ran, until it is restarted.
    pub fn outdated_keys(&self) -> Option<&[&'static str]> {
        self.pending_launch.as_ref().map(|p| p.keys.as_slice())
    }

    /// Its last stop or park found it busy.
    pub fn busy(&self) -> bool {
        self.busy
    }

    /// Whether a start or a resume is under way and still wanted.
    pub fn starting(&self) -> bool {
        self.in_flight.as_ref().is_some_and(InFlight::brings_up)
    }

    /// Whether its gate is closed now: failed (or busy) for good, or backing off.
    pub fn gate_closed(&self, now: Instant) -> bool {
        (self.state == ServiceState::Failed || self.busy) && self.retry_at.is_none_or(|at| at > now)
    }

    /// A health monitor now watches it (replacing any earlier one).
    pub fn watched_by(&mut self, monitor: AbortHandle) {
        self.stop_monitor();
        self.monitor = Some(monitor);
    }

    pub fn stop_monitor(&mut self) {
        if let Some(monitor) = self.monitor.take() {
            monitor.abort();
        }
    }

    /// A new chance: failures are forgotten (a new desired state, or a success).
    pub fn forgive(&mut self) {
        self.consecutive_failures = 0;
        self.retry_at = None;
        self.busy = false;
    }
}

/// 1 s, 2 s, 4 s... after the first, second, third failure, capped.
pub(super) fn backoff(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.saturating_sub(1).min(16)).min(MAX_BACKOFF)
}

pub(super) struct Records<I> {
    by_name: BTreeMap<ServiceName, Record<I>>,
    /// Removed from the config by a reload, still running: stopped, then forgotten.
    leaving: BTreeSet<ServiceName>,
}

impl<I> Records<I> {
    pub fn new(inventory: &Inventory) -> Self {
        let by_name = inventory
            .iter()
            .map(|spec| (spec.name.clone(), Record::new(spec.clone())))
            .collect();
        Self {
            by_name,
            leaving: BTreeSet::new(),
        }
    }

    /// A service a reload added: managed from now on (stopped until found running).
    pub fn add(&mut self, spec: ServiceSpec) {
        self.leaving.remove(&spec.name);
        self.by_name.insert(spec.name.clone(), Record::new(spec));
    }

    /// Forgets a service at once, handing back its record (what it tracked).
    pub fn remove(&mut self, name: &ServiceName) -> Option<Record<I>> {
        self.leaving.remove(name);
        self.by_name.remove(name)
    }

    /// A service a reload removed while it runs: kept until its stop ends.
    pub fn leave(&mut self, name: &ServiceName) {
        if self.by_name.contains_key(name) {
            self.leaving.insert(name.clone());
        }
    }

    /// The records of the services that are leaving.
    pub fn leaving(&self) -> impl Iterator<Item = &Record<I>> {
        self.leaving
            .iter()
            .filter_map(|name| self.by_name.get(name))
    }

    /// Forgets the leaving services that neither run nor are acted on any more.
    pub fn forget_left(&mut self) -> Vec<ServiceName> {
        let gone: Vec<ServiceName> = self
            .leaving()
            .filter(|r| r.instance.is_none() && r.in_flight.is_none())
            .map(|r| r.name().clone())
            .collect();
        for name in &gone {
            self.remove(name);
        }
        gone
    }

    pub fn get(&self, name: &ServiceName) -> Option<&Record<I>> {
        self.by_name.get(name)
    }

    pub fn get_mut(&mut self, name: &ServiceName) -> Option<&mut Record<I>> {
        self.by_name.get_mut(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Record<I>> {
        self.by_name.values()
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Record<I>> {
        self.by_name.values_mut()
    }
}
