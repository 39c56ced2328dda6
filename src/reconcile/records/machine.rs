//! A service's life as one state machine (docs/ARCHITECTURE.md, "A service's life").
//! The loop reports what happened as an [`Event`]; [`Record::apply`] moves the state (the
//! one writer of it, checked against [`legal`]) and answers with what the action came
//! to and the follow-ups the loop runs (watch health, remember that it is parked...).
//! Nothing here does I/O or spawns a task.

use tokio::time::Instant;

use crate::clock::now_ms;
use crate::config::ServiceSpec;
use crate::plan::{Cause, Condition, Op, Verdict};
use crate::status::{FailureKind, ServiceState};

use super::super::effects::EffectError;
use super::super::tasks::Outcome;
use super::{backoff, InFlight, ParkedAt, PendingLaunch, Record, MAX_CONSECUTIVE_FAILURES};

/// What happened to a service, as the loop saw it.
#[derive(Debug)]
pub(in crate::reconcile) enum Event<I> {
    /// An action's task was launched. `drains`: a stop or park waits for the work in
    /// flight first.
    Began {
        flight: InFlight,
        reason: String,
        drains: bool,
    },
    /// A stop was planned while its start is under way: the start is undone.
    Superseded { reason: String },
    /// A stop or park that was draining found no work in flight (any more).
    Drained,
    /// The start under way spawned this instance.
    Spawned { instance: I },
    /// Found running, left by an earlier daemon; `parked`: a marker says that daemon
    /// parked it, with these pids.
    Adopted {
        instance: I,
        parked: Option<Vec<u32>>,
    },
    /// Its instance exited on its own. `exit` says how; `log` is its last lines.
    Exited { exit: String, log: String },
    /// It failed its health checks: it is to be stopped and restarted.
    Unhealthy { message: String },
    /// The planner's verdict this round.
    Verdict(Verdict),
    /// The action under way ended.
    Finished(Outcome<I>),
    /// The action's task panicked: what it did is not known.
    Panicked { error: String },
    /// Its backend answered whether it runs.
    BackendAnswered,
    /// Its backend could not tell whether it runs.
    LookupFailed(EffectError),
    /// A planned start waited too long for the GPU to show its room.
    RoomTimedOut { message: String },
    /// Another daemon leads now: it keeps running, untracked here.
    LetGo,
    /// A reload changed its spec (docs/ARCHITECTURE.md, "Reloading the config"). Boxed:
    /// a spec is large beside the other events, which the loop sends far more often.
    Reconfigured(Box<Reconfigure>),
}

/// How a reload changed a service's spec.
#[derive(Debug)]
pub(in crate::reconcile) enum Reconfigure {
    /// Only what the planner and the checks read: in force at once.
    Live(ServiceSpec),
    /// How it is launched: a stopped one starts the new way; one that runs (or is
    /// being acted on) keeps its launch until it is stopped, and is restarted.
    Relaunch {
        spec: ServiceSpec,
        keys: Vec<&'static str>,
    },
}

/// What the loop does after an event, for the record (which does no I/O itself).
#[derive(Debug, PartialEq)]
pub(in crate::reconcile) enum FollowUp<I> {
    /// Watch this instance for its exit.
    WatchExit(I),
    /// Probe its health every resync.
    WatchHealth,
    /// Write down that it is parked, for a daemon started later.
    RememberParked { pids: Vec<u32> },
    /// It is no longer parked: remove that note.
    ForgetParked,
    /// The GPU showed it at this much once parked: learn it.
    ObserveResidual { mb: u64 },
    /// Stop tracking this instance (whether it runs is not known).
    LetGo(I),
}

/// How an action ended, for the action history and the waiting callers.
#[derive(Debug)]
pub(in crate::reconcile) struct ActionEnd {
    pub flight: InFlight,
    pub outcome: Result<String, String>,
    pub failure: Option<FailureKind>,
    /// A drain that found the service busy: its probe's last answer.
    pub busy: Option<serde_json::Value>,
}

impl ActionEnd {
    fn ok(flight: InFlight, detail: String) -> Self {
        Self {
            flight,
            outcome: Ok(detail),
            failure: None,
            busy: None,
        }
    }

    fn failed(flight: InFlight, message: String, failure: FailureKind) -> Self {
        Self {
            flight,
            outcome: Err(message),
            failure: Some(failure),
            busy: None,
        }
    }
}

/// What an event came to.
#[derive(Debug)]
pub(in crate::reconcile) struct Applied<I> {
    /// Set when the event ended the action under way.
    pub ended: Option<ActionEnd>,
    pub follow_ups: Vec<FollowUp<I>>,
}

impl<I> Default for Applied<I> {
    fn default() -> Self {
        Self {
            ended: None,
            follow_ups: Vec::new(),
        }
    }
}

impl<I> Applied<I> {
    fn follow(follow_up: FollowUp<I>) -> Self {
        Self {
            ended: None,
            follow_ups: vec![follow_up],
        }
    }
}

/// The moves a service's state may make. A move not listed is a bug: `apply` asserts
/// it in debug builds (docs/ARCHITECTURE.md, "A service's life", has the diagram).
/// Every state may go to `stopped`: a standby lets go of everything it tracked.
pub(in crate::reconcile) fn legal(from: ServiceState, to: ServiceState) -> bool {
    use ServiceState::*;
    from == to
        || to == Stopped
        || match from {
            Stopped | Preempted => matches!(to, Starting | Preempted | Unknown | Parked | Failed),
            Unknown => matches!(to, Starting | Parked | Failed),
            Failed => matches!(
                to,
                Starting | Preempted | Draining | Stopping | Unknown | Parked
            ),
            Starting => matches!(to, Ready | Failed | Unhealthy | Unknown | Stopping),
            Ready => matches!(to, Draining | Stopping | Failed | Unhealthy),
            Unhealthy => matches!(to, Draining | Stopping | Failed),
            Draining => matches!(to, Stopping | Ready | Parked | Preempted | Failed | Unknown),
            Stopping => matches!(
                to,
                Preempted | Failed | Unknown | Parked | Ready | Unhealthy
            ),
            Parked => matches!(to, Starting | Draining | Stopping | Failed),
        }
}

impl<I: Clone> Record<I> {
    /// The one way a record changes: the state moves, and the loop learns what the
    /// event came to. Once it neither runs nor is acted on, a launch a reload left
    /// waiting is taken.
    pub fn apply(&mut self, event: Event<I>) -> Applied<I> {
        let applied = self.apply_event(event);
        if self.instance.is_none() && self.in_flight.is_none() {
            if let Some(pending) = self.pending_launch.take() {
                self.spec = pending.spec;
            }
        }
        applied
    }

    fn apply_event(&mut self, event: Event<I>) -> Applied<I> {
        match event {
            Event::Began {
                flight,
                reason,
                drains,
            } => {
                self.begin(flight, reason, drains);
                Applied::default()
            }
            Event::Superseded { reason } => {
                if let Some(flight) = self.in_flight.as_mut() {
                    flight.supersede.cancel();
                    flight.superseded = true;
                    self.reason = Some(format!("superseded: {reason}"));
                    self.move_to(ServiceState::Stopping);
                }
                Applied::default()
            }
            Event::Drained => {
                if self.in_flight.as_ref().is_some_and(|f| f.op.frees()) {
                    self.move_to(ServiceState::Stopping);
                }
                Applied::default()
            }
            Event::Spawned { instance } if self.starting() => {
                self.instance = Some(instance.clone());
                Applied::follow(FollowUp::WatchExit(instance))
            }
            Event::Spawned { .. } => Applied::default(),
            Event::Adopted { instance, parked } => {
                self.instance = Some(instance.clone());
                if let Some(pids) = parked {
                    self.parked = Some(ParkedAt { pids });
                    self.move_to(ServiceState::Parked);
                }
                Applied::follow(FollowUp::WatchExit(instance))
            }
            Event::Exited { exit, log } => self.exited(&exit, &log),
            Event::Unhealthy { message } => {
                if self.in_flight.is_none() {
                    self.stop_monitor();
                    self.condition = Condition::Unhealthy {
                        reason: message.clone(),
                    };
                    self.last_error = Some(message);
                    self.move_to(ServiceState::Unhealthy);
                }
                Applied::default()
            }
            Event::Verdict(verdict) => {
                self.judged(verdict);
                Applied::default()
            }
            Event::Finished(outcome) => match self.in_flight.take() {
                Some(flight) => self.finished(flight, outcome),
                None => Applied::default(),
            },
            Event::Panicked { error } => match self.in_flight.take() {
                Some(flight) => self.panicked(flight, &error),
                None => Applied::default(),
            },
            Event::BackendAnswered => {
                if self.state == ServiceState::Unknown {
                    tracing::info!(service = %self.spec.name, "its backend answers again");
                    self.last_error = None;
                    self.reason = None;
                    self.move_to(ServiceState::Stopped);
                }
                Applied::default()
            }
            Event::LookupFailed(error) => {
                if self.last_error.as_deref() != Some(error.message.as_str()) {
                    tracing::warn!(service = %self.spec.name, error = %error.message, "cannot tell whether it runs");
                }
                if error.is_backend_down() {
                    self.move_to(ServiceState::Unknown);
                }
                self.last_error = Some(error.message);
                Applied::default()
            }
            Event::RoomTimedOut { message } => {
                self.room_wait = None;
                self.fail("start", message);
                Applied::default()
            }
            Event::LetGo => {
                self.stop_monitor();
                self.instance = None;
                self.parked = None;
                self.reason =
                    Some("managed by the leading gpu-manager: this one is standby".into());
                self.move_to(ServiceState::Stopped);
                Applied::default()
            }
            Event::Reconfigured(change) => self.reconfigured(*change),
        }
    }

    /// Takes a reload's spec: live fields at once (a health monitor restarts with the
    /// new check), launch fields at once only if nothing runs the old launch.
    fn reconfigured(&mut self, change: Reconfigure) -> Applied<I> {
        let (spec, keys) = match change {
            Reconfigure::Live(spec) => match self.pending_launch.as_mut() {
                Some(pending) => (spec, pending.keys.clone()),
                None => {
                    self.spec = spec;
                    return self.rewatch();
                }
            },
            Reconfigure::Relaunch { spec, keys } => (spec, keys),
        };
        // What runs keeps its launch (a stop must find the old container) and takes
        // the rest; the `apply` that follows takes the launch once nothing runs.
        self.spec = ServiceSpec {
            runtime: self.spec.runtime.clone(),
            ..spec.clone()
        };
        self.pending_launch = Some(PendingLaunch { spec, keys });
        self.rewatch()
    }

    /// A ready service is watched again, with its spec's health check as it is now.
    fn rewatch(&mut self) -> Applied<I> {
        match (self.state, self.instance.is_some()) {
            (ServiceState::Ready, true) => Applied::follow(FollowUp::WatchHealth),
            _ => Applied::default(),
        }
    }

    /// The one writer of `state`.
    fn move_to(&mut self, to: ServiceState) {
        debug_assert!(
            legal(self.state, to),
            "{}: {} -> {to} is not a legal move",
            self.spec.name,
            self.state
        );
        if self.state != to {
            tracing::info!(service = %self.spec.name, from = %self.state, to = %to, "service state");
            self.state = to;
            self.since_ms = now_ms();
        }
    }

    fn begin(&mut self, flight: InFlight, reason: String, drains: bool) {
        match flight.op {
            Op::Stop | Op::Park => {
                self.stop_monitor();
                self.move_to(match drains {
                    true => ServiceState::Draining,
                    false => ServiceState::Stopping,
                });
            }
            Op::Resume => {
                self.parked = None;
                self.condition = Condition::Healthy;
                self.move_to(ServiceState::Starting);
            }
            Op::Start => {
                // A restart is a start retried after failures; a new desired state
                // forgives failures, so a start it asks for is not one.
                if self.consecutive_failures > 0 && flight.cause != Cause::Adopted {
                    self.restarts += 1;
                }
                self.condition = Condition::Healthy;
                self.move_to(ServiceState::Starting);
            }
        }
        self.reason = Some(reason);
        self.room_wait = None;
        self.in_flight = Some(flight);
    }

    fn exited(&mut self, exit: &str, log: &str) -> Applied<I> {
        if self.in_flight.is_some() {
            // The action under way hears of it itself.
            return Applied::default();
        }
        let service = self.spec.name.clone();
        self.instance = None;
        self.stop_monitor();
        if self.parked.take().is_some() {
            // Parked, it was not serving: nothing to restart unless it is wanted.
            tracing::warn!(%service, %exit, "service exited while parked");
            self.last_error = Some(format!("{service} {exit} while parked"));
            self.move_to(ServiceState::Stopped);
            return Applied::follow(FollowUp::ForgetParked);
        }
        tracing::warn!(%service, %exit, "service exited unexpectedly");
        self.fail(
            "start",
            format!("{service} {exit} unexpectedly; last log lines:\n{log}"),
        );
        Applied::default()
    }

    /// Shows the planner's verdict on a service that neither runs nor is acted on:
    /// preempted or refused with why. A drain under way for a service wanted again is
    /// called off (nothing was done yet).
    fn judged(&mut self, verdict: Verdict) {
        if let Some(flight) = &self.in_flight {
            if verdict.runs() && self.state == ServiceState::Draining {
                flight.supersede.cancel();
            }
            return;
        }
        if self.instance.is_some() {
            // Kept running: say why it is wanted now (a phase that started it may have
            // passed while a request or a claim keeps it).
            if let Verdict::Run { reason } = verdict {
                if self.state == ServiceState::Ready {
                    self.reason = Some(reason);
                }
            }
            return;
        }
        match verdict {
            Verdict::Preempted { reason, .. } | Verdict::Refused { reason, .. } => {
                self.reason = Some(reason);
                self.move_to(ServiceState::Preempted);
            }
            Verdict::Idle | Verdict::Run { .. } if self.state == ServiceState::Preempted => {
                self.reason = None;
                self.move_to(ServiceState::Stopped);
            }
            Verdict::Idle if self.state != ServiceState::Unknown => {
                // Not wanted and not running: an old reason or failure is history.
                self.reason = None;
                self.condition = Condition::Healthy;
                self.move_to(ServiceState::Stopped);
            }
            _ => {}
        }
    }

    fn finished(&mut self, flight: InFlight, outcome: Outcome<I>) -> Applied<I> {
        let mut follow_ups = Vec::new();
        let ended = match outcome {
            Outcome::Started {
                instance,
                took,
                fell_back,
            } => {
                self.instance = Some(instance);
                let ready = format!("ready after {} ms", took.as_millis());
                let detail = match (flight.cause, flight.op, fell_back) {
                    (Cause::Adopted, _, _) => format!("adopted; {ready}"),
                    (_, Op::Resume, None) => {
                        self.resumed_at_ms = Some(now_ms());
                        format!("resumed, same instance; {ready}")
                    }
                    (_, _, Some(why)) => format!("{why}; started cold instead: {ready}"),
                    _ => ready,
                };
                self.forgive();
                self.last_error = None;
                self.condition = Condition::Healthy;
                self.move_to(ServiceState::Ready);
                follow_ups.push(FollowUp::WatchHealth);
                ActionEnd::ok(flight, detail)
            }
            Outcome::Parked {
                detail,
                pids,
                residual_mb,
            } => {
                follow_ups.push(FollowUp::RememberParked { pids: pids.clone() });
                follow_ups.push(FollowUp::ObserveResidual { mb: residual_mb });
                self.parked = Some(ParkedAt { pids });
                self.parked_at_ms = Some(now_ms());
                self.condition = Condition::Healthy;
                self.forgive();
                self.move_to(ServiceState::Parked);
                ActionEnd::ok(
                    flight,
                    format!("{detail}; the GPU shows {residual_mb} MB left"),
                )
            }
            Outcome::Busy { answer, waited } => {
                let message = format!(
                    "{} still has work in flight after {waited:?}: its drain probe answered {answer}; it was left as it was. Try again later, or add ?force=true to {} it anyway (the work in flight is lost)",
                    self.spec.name, flight.op
                );
                self.hold_busy(message.clone());
                follow_ups.extend(self.untouched());
                ActionEnd {
                    busy: Some(answer),
                    ..ActionEnd::failed(flight, message, FailureKind::Busy)
                }
            }
            Outcome::Kept => {
                follow_ups.extend(self.untouched());
                ActionEnd::failed(
                    flight,
                    "wanted again while it drained: left as it was".to_owned(),
                    FailureKind::Cancelled,
                )
            }
            Outcome::StartFailed {
                error,
                left_running,
            } => {
                let message = error.message.clone();
                match left_running {
                    Some(instance) => {
                        // Still running: stopped as unhealthy, under the lease.
                        self.instance = Some(instance);
                        self.last_error = Some(message.clone());
                        self.condition = Condition::Unhealthy {
                            reason: message.clone(),
                        };
                        self.move_to(ServiceState::Unhealthy);
                    }
                    None if error.is_backend_down() => {
                        self.instance = None;
                        self.last_error = Some(message.clone());
                        self.move_to(ServiceState::Unknown);
                    }
                    None => {
                        self.instance = None;
                        self.fail("start", message.clone());
                    }
                }
                ActionEnd::failed(flight, message, error.kind)
            }
            Outcome::Stopped { detail, reclaim } => {
                self.instance = None;
                self.parked = None;
                let failed_health = match &self.condition {
                    Condition::Unhealthy { reason } => Some(reason.clone()),
                    Condition::Healthy => None,
                };
                self.condition = Condition::Healthy;
                match (flight.cause, failed_health) {
                    (Cause::Unhealthy, Some(reason)) => self.fail("start", reason),
                    (Cause::Preempted, _) => {
                        self.forgive();
                        self.move_to(ServiceState::Preempted);
                    }
                    _ => {
                        self.forgive();
                        self.move_to(ServiceState::Stopped);
                    }
                }
                match reclaim {
                    Ok(()) => ActionEnd::ok(flight, detail),
                    Err(error) => {
                        self.last_error = Some(error.message.clone());
                        ActionEnd::failed(flight, error.message, error.kind)
                    }
                }
            }
            Outcome::StopFailed { error } => {
                let message = error.message.clone();
                if error.is_backend_down() {
                    // Whether it still runs is not known: let the instance go; the next
                    // rounds ask the engine again and adopt it if it runs.
                    follow_ups.extend(self.instance.take().map(FollowUp::LetGo));
                    self.last_error = Some(message.clone());
                    self.move_to(ServiceState::Unknown);
                } else {
                    self.fail("stop", message.clone());
                }
                ActionEnd::failed(flight, message, error.kind)
            }
            Outcome::Cancelled { detail, reclaim } => {
                self.instance = None;
                self.parked = None;
                self.move_to(ServiceState::Stopped);
                let message = match reclaim {
                    Ok(()) => format!("cancelled: {detail}"),
                    Err(error) => format!("cancelled: {detail}; {error}"),
                };
                ActionEnd::failed(flight, message, FailureKind::Cancelled)
            }
            Outcome::Abandoned => ActionEnd::failed(
                flight,
                "left as it was at shutdown, for the next daemon to adopt".to_owned(),
                FailureKind::Cancelled,
            ),
        };
        follow_ups.extend(self.forget_unless_parked());
        Applied {
            ended: Some(ended),
            follow_ups,
        }
    }

    /// A task that panicked did an unknown part of its work. What it acted on stays
    /// tracked (its exit watched, its memory counted as its own), in a state that says
    /// what is known: a start or resume that may have left a process is unhealthy, so
    /// it is stopped under the lease and restarted; a stop or park that may have left
    /// it running failed, and is tried again after a backoff.
    fn panicked(&mut self, flight: InFlight, error: &str) -> Applied<I> {
        let message = format!("the {} panicked: {error}", flight.op);
        match (flight.op, self.instance.is_some()) {
            (Op::Start | Op::Resume, true) => {
                self.last_error = Some(message.clone());
                self.condition = Condition::Unhealthy {
                    reason: message.clone(),
                };
                self.move_to(ServiceState::Unhealthy);
            }
            (Op::Start | Op::Resume, false) => self.fail("start", message.clone()),
            (Op::Stop | Op::Park, _) => self.fail(&flight.op.to_string(), message.clone()),
        }
        Applied {
            ended: Some(ActionEnd::failed(flight, message, FailureKind::Other)),
            follow_ups: self.forget_unless_parked().into_iter().collect(),
        }
    }

    /// A stop or park that did nothing: it is ready again (or still parked), and
    /// watched again if it runs.
    fn untouched(&mut self) -> Option<FollowUp<I>> {
        match self.parked {
            Some(_) => {
                self.move_to(ServiceState::Parked);
                None
            }
            None => {
                self.move_to(ServiceState::Ready);
                Some(FollowUp::WatchHealth)
            }
        }
    }

    fn forget_unless_parked(&self) -> Option<FollowUp<I>> {
        self.parked.is_none().then_some(FollowUp::ForgetParked)
    }

    /// Records a failure and closes the gate for a backoff, or for good after
    /// `MAX_CONSECUTIVE_FAILURES` in a row; `what` says what failed ("start", "stop").
    fn fail(&mut self, what: &str, message: String) {
        self.consecutive_failures += 1;
        self.last_error = Some(message);
        self.move_to(ServiceState::Failed);
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
    fn hold_busy(&mut self, message: String) {
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
}
