//! The reconciler's own record of each service: what it knows, what it is doing, and
//! how its failures back off. Lookups return `Option`: an event about a service the
//! inventory does not hold is ignored, never a panic.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;

use crate::clock::now_ms;
use crate::config::{Inventory, ServiceName, ServiceSpec};
use crate::plan::{Cause, Condition, Op};
use crate::status::ServiceState;

/// Failed actions back off 1 s, 2 s, 4 s... up to this.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// After this many failures in a row a service stays `failed` until the desired state
/// changes.
pub(super) const MAX_CONSECUTIVE_FAILURES: u32 = 5;

/// An action under way for a service: at most one at a time.
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

/// A parked service: what its park acted on and left.
pub(super) struct ParkedAt {
    /// The processes the park acted on; its resume acts on them.
    pub pids: Vec<u32>,
}

/// Since when a planned start has waited for the GPU to show its room.
pub(super) struct RoomWait {
    pub since: Instant,
}

pub(super) struct Record<I> {
    pub spec: ServiceSpec,
    pub state: ServiceState,
    pub since_ms: u64,
    pub instance: Option<I>,
    pub monitor: Option<AbortHandle>,
    pub last_error: Option<String>,
    pub reason: Option<String>,
    pub restarts: u32,
    pub consecutive_failures: u32,
    pub retry_at: Option<Instant>,
    pub condition: Condition,
    pub observed_mb: Option<u64>,
    pub in_flight: Option<InFlight>,
    pub room_wait: Option<RoomWait>,
    /// Alive but parked: its instance holds only its residual.
    pub parked: Option<ParkedAt>,
    pub parked_at_ms: Option<u64>,
    pub resumed_at_ms: Option<u64>,
    /// Its last stop or park found it busy: the gate is closed until `retry_at`.
    pub busy: bool,
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
            observed_mb: None,
            in_flight: None,
            room_wait: None,
            parked: None,
            parked_at_ms: None,
            resumed_at_ms: None,
            busy: false,
        }
    }

    pub fn name(&self) -> &ServiceName {
        &self.spec.name
    }

    pub fn set_state(&mut self, state: ServiceState) {
        if self.state != state {
            tracing::info!(service = %self.spec.name, from = %self.state, to = %state, "service state");
            self.state = state;
            self.since_ms = now_ms();
        }
    }

    pub fn stop_monitor(&mut self) {
        if let Some(monitor) = self.monitor.take() {
            monitor.abort();
        }
    }

    /// Whether a start or a resume is under way and still wanted.
    pub fn starting(&self) -> bool {
        self.in_flight
            .as_ref()
            .is_some_and(|f| matches!(f.op, Op::Start | Op::Resume) && !f.superseded)
    }

    /// Records a failure and closes the gate for a backoff, or for good after
    /// `MAX_CONSECUTIVE_FAILURES` in a row; `what` says what failed ("start", "stop").
    pub fn fail(&mut self, what: &str, message: String) {
        self.consecutive_failures += 1;
        self.last_error = Some(message);
        self.set_state(ServiceState::Failed);
        if self.consecutive_failures >= MAX_CONSECUTIVE_FAILURES {
            self.retry_at = None;
            self.reason = Some(format!(
                "{what} failed {} times in a row; change the desired state to try again",
                self.consecutive_failures
            ));
        } else {
            let backoff = backoff(self.consecutive_failures);
            self.retry_at = Some(Instant::now() + backoff);
            self.reason = Some(format!(
                "{what} failed; trying again in {}s",
                backoff.as_secs()
            ));
        }
    }

    /// Its stop or park found work in flight that did not end in time: it is left as it
    /// is, and the next try backs off like a failure (without the `failed` state: the
    /// service is fine).
    pub fn hold_busy(&mut self, message: String) {
        self.busy = true;
        self.consecutive_failures += 1;
        let backoff = backoff(self.consecutive_failures);
        self.retry_at = Some(Instant::now() + backoff);
        self.reason = Some(format!(
            "busy: trying again in {}s (or ask with ?force=true)",
            backoff.as_secs()
        ));
        self.last_error = Some(message);
    }

    /// A new chance: failures are forgotten (a new desired state, or a success).
    pub fn forgive(&mut self) {
        self.consecutive_failures = 0;
        self.retry_at = None;
        self.busy = false;
    }

    /// Whether its gate is closed now: failed (or busy) for good, or backing off.
    pub fn gate_closed(&self, now: Instant) -> bool {
        (self.state == ServiceState::Failed || self.busy) && self.retry_at.is_none_or(|at| at > now)
    }
}

/// 1 s, 2 s, 4 s... after the first, second, third failure, capped.
pub(super) fn backoff(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.saturating_sub(1).min(16)).min(MAX_BACKOFF)
}

pub(super) struct Records<I> {
    by_name: BTreeMap<ServiceName, Record<I>>,
}

impl<I> Records<I> {
    pub fn new(inventory: &Inventory) -> Self {
        let by_name = inventory
            .iter()
            .map(|spec| (spec.name.clone(), Record::new(spec.clone())))
            .collect();
        Self { by_name }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        let seconds: Vec<u64> = (1..=8).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(seconds, [1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(backoff(u32::MAX), MAX_BACKOFF);
    }
}
