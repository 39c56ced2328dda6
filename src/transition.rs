//! Requests to change the desired state (the API's phase, start and stop), their
//! errors with the HTTP status each maps to, and the replies the reconciler owes to the
//! callers still waiting on a transition.

use std::collections::BTreeMap;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::config::{Inventory, Phase, ServiceName};
use crate::desired::{Claim, DesiredState, Holder};
use crate::lease::LeaseError;
use crate::plan::{Plan, Verdict};
use crate::status::{ActionRecord, FailureKind, ServiceState};

/// A change to the desired state, as the API asks for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Sets `phase`, clears `held`.
    Phase(Phase),
    /// Pins the service (and removes it from `held`).
    Start(ServiceName),
    /// Unpins the service and holds it stopped; ends its claims (only a forced stop
    /// gets this far while it has some: see [`Change::check_against`]).
    Stop(ServiceName),
    /// Takes a claim, or renews the holder's claim on the service to the new time.
    Claim(Claim),
    /// Ends one holder's claim.
    Release {
        service: ServiceName,
        holder: Holder,
    },
}

impl Change {
    /// The desired state after this change.
    pub fn apply(&self, current: &DesiredState) -> DesiredState {
        let mut next = current.clone();
        match self {
            Change::Phase(phase) => {
                next.phase = Some(*phase);
                next.held.clear();
            }
            Change::Start(name) => next.pin(name),
            Change::Stop(name) => {
                next.hold(name);
                next.end_claims(name);
            }
            Change::Claim(claim) => next.claim(claim.clone()),
            Change::Release { service, holder } => {
                next.release(service, holder);
            }
        }
        next
    }

    /// The service whose claims this change is about, when it is one.
    fn claimed_service(&self) -> Option<&ServiceName> {
        match self {
            Change::Claim(claim) => Some(&claim.service),
            Change::Release { service, .. } => Some(service),
            _ => None,
        }
    }

    /// Refuses what the current claims forbid: the stop of a claimed service unless
    /// forced (409 `claimed`), the release of a claim that is not there (404).
    pub fn check_against(
        &self,
        current: &DesiredState,
        force: bool,
    ) -> Result<(), TransitionError> {
        match self {
            Change::Stop(name) if !force && current.is_claimed(name) => {
                let claims: Vec<Claim> = current.claims_on(name).cloned().collect();
                Err(TransitionError::Claimed {
                    service: name.to_string(),
                    holders: claims.iter().map(|c| c.holder.to_string()).collect(),
                    claims,
                })
            }
            Change::Release { service, holder }
                if !current.claims_on(service).any(|c| c.holder == *holder) =>
            {
                Err(TransitionError::NoSuchClaim {
                    service: service.to_string(),
                    holder: holder.to_string(),
                    claims: current.claims_on(service).cloned().collect(),
                })
            }
            _ => Ok(()),
        }
    }

    /// The claims a forced stop ends.
    pub fn ends_claims(&self, current: &DesiredState) -> Vec<Claim> {
        match self {
            Change::Stop(name) => current.claims_on(name).cloned().collect(),
            _ => Vec::new(),
        }
    }

    /// Refuses names and phases the inventory does not know (404), listing known ones.
    pub fn check(&self, inventory: &Inventory) -> Result<(), TransitionError> {
        match self {
            Change::Phase(phase) if !inventory.phases().contains(phase) => {
                Err(TransitionError::UnknownPhase {
                    phase: *phase,
                    known: inventory.phases().into_iter().collect(),
                })
            }
            Change::Start(name) | Change::Stop(name) if inventory.get(name).is_none() => {
                Err(unknown_service(name.as_str(), inventory))
            }
            _ => match self.claimed_service() {
                Some(name) if inventory.get(name).is_none() => {
                    Err(unknown_service(name.as_str(), inventory))
                }
                _ => Ok(()),
            },
        }
    }

    /// The services this change wants running.
    pub fn targets<'a>(&'a self, inventory: &'a Inventory) -> Vec<&'a ServiceName> {
        match self {
            Change::Phase(phase) => inventory.in_phase(*phase).map(|s| &s.name).collect(),
            Change::Start(name) => vec![name],
            Change::Claim(claim) => vec![&claim.service],
            Change::Stop(_) | Change::Release { .. } => Vec::new(),
        }
    }

    /// Refuses a change whose own services cannot fit even after preempting lower
    /// priorities (409), judged on the plan for the changed state. A claim that cannot
    /// fit is refused whatever blocks it; a phase or start kept out only by claims is
    /// not refused here: it is written, and answered by [`Change::blocked_by_claims`].
    pub fn check_fits(&self, inventory: &Inventory, plan: &Plan) -> Result<(), TransitionError> {
        let claim = matches!(self, Change::Claim(_));
        match self.cannot_fit(inventory, plan) {
            Some(error @ TransitionError::CannotFit { .. }) if claim || !error.names_claims() => {
                Err(error)
            }
            _ => Ok(()),
        }
    }

    /// The 409 owed, once the change is written, to a phase or start whose services
    /// wait for claims to end: they start by themselves when the claims do.
    pub fn blocked_by_claims(&self, inventory: &Inventory, plan: &Plan) -> Option<TransitionError> {
        self.cannot_fit(inventory, plan)
            .filter(TransitionError::names_claims)
    }

    fn cannot_fit(&self, inventory: &Inventory, plan: &Plan) -> Option<TransitionError> {
        self.targets(inventory)
            .into_iter()
            .find_map(|name| match plan.verdict(name)? {
                Verdict::Preempted {
                    reason,
                    shortfall_mb,
                    claims,
                } => Some(TransitionError::CannotFit {
                    service: name.to_string(),
                    reason: reason.clone(),
                    shortfall_mb: *shortfall_mb,
                    claims: claims.clone(),
                }),
                Verdict::Refused {
                    reason,
                    shortfall_mb,
                } => Some(TransitionError::CannotFit {
                    service: name.to_string(),
                    reason: reason.clone(),
                    shortfall_mb: *shortfall_mb,
                    claims: Vec::new(),
                }),
                _ => None,
            })
    }
}

pub fn unknown_service(name: &str, inventory: &Inventory) -> TransitionError {
    TransitionError::UnknownService {
        name: name.to_owned(),
        known: inventory.names().iter().map(|n| n.to_string()).collect(),
    }
}

/// Why a transition was refused or did not complete. Each maps to one HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TransitionError {
    #[error("unknown service {name:?}: known services are {}", known.join(", "))]
    UnknownService { name: String, known: Vec<String> },
    #[error("unknown phase {phase}: known phases are {}", join(known))]
    UnknownPhase { phase: Phase, known: Vec<Phase> },
    #[error("{service} cannot fit: {reason}")]
    CannotFit {
        service: String,
        reason: String,
        shortfall_mb: u64,
        /// The claims that keep it out: it starts by itself once they end.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        claims: Vec<Claim>,
    },
    /// A stop of a claimed service, not forced: the claims' holders are named.
    #[error("{service} is claimed by {}: release the claims, or stop with ?force=true to end them", holders.join(", "))]
    Claimed {
        service: String,
        holders: Vec<String>,
        claims: Vec<Claim>,
    },
    #[error(
        "{service} has no claim held by {holder:?}: its claims are {}",
        describe_claims(claims)
    )]
    NoSuchClaim {
        service: String,
        holder: String,
        claims: Vec<Claim>,
    },
    #[error("superseded by a later request (generation {by}) before it converged")]
    Superseded { generation: u64, by: u64 },
    #[error("{detail}")]
    LeaseHeld { holder: String, detail: String },
    #[error("{backend} is unreachable: {detail}")]
    BackendDown { backend: String, detail: String },
    /// A start not ready in time, or a stop's memory not reclaimed in time: the detail
    /// names the service and the time.
    #[error("{detail}")]
    TimedOut { service: String, detail: String },
    #[error("{service}: {detail}")]
    Failed { service: String, detail: String },
    #[error("{detail}")]
    NotWritten { detail: String },
    #[error("{detail}")]
    BadRequest { detail: String },
    /// A stop or park found work in flight that did not end within the drain timeout:
    /// the service is untouched. `answer` is what its drain probe said.
    #[error("{detail}")]
    Busy {
        service: String,
        detail: String,
        answer: serde_json::Value,
    },
    /// The daemon is shutting down (SIGTERM, SIGINT): send the request to the next one.
    #[error("{detail}")]
    ShuttingDown { detail: String },
    /// A reload of a config that does not read, parse or validate: the detail names
    /// file:line:col and the key; the config in force stays.
    #[error("{detail}")]
    InvalidConfig { detail: String },
    /// A reload that changes keys only a restart applies (`api.listen`, `state_dir`...).
    #[error("{detail}")]
    NeedsRestart { keys: Vec<String>, detail: String },
    /// A reload that gives a proxy a listen address this host will not let the daemon
    /// bind (in use, not local): the detail names the key; the config in force stays.
    #[error("{detail}")]
    ListenFailed { service: String, detail: String },
}

impl From<LeaseError> for TransitionError {
    /// 423 when someone else holds the lease (named), 503 when Redis cannot be reached.
    fn from(error: LeaseError) -> Self {
        let detail = error.to_string();
        match (error.http_status(), error.holder()) {
            (423, holder) => TransitionError::LeaseHeld {
                holder: holder.unwrap_or("unknown").to_owned(),
                detail,
            },
            _ => TransitionError::BackendDown {
                backend: "redis".to_owned(),
                detail,
            },
        }
    }
}

fn describe_claims(claims: &[Claim]) -> String {
    if claims.is_empty() {
        return "(none)".to_owned();
    }
    let list: Vec<String> = claims
        .iter()
        .map(|c| format!("{:?} until {}", c.holder.as_str(), c.until))
        .collect();
    list.join(", ")
}

fn join(phases: &[Phase]) -> String {
    let list: Vec<String> = phases.iter().map(|p| p.to_string()).collect();
    list.join(", ")
}

impl TransitionError {
    /// A `cannot_fit` that claims cause.
    fn names_claims(&self) -> bool {
        matches!(self, TransitionError::CannotFit { claims, .. } if !claims.is_empty())
    }

    pub fn http_status(&self) -> u16 {
        match self {
            TransitionError::UnknownService { .. }
            | TransitionError::UnknownPhase { .. }
            | TransitionError::NoSuchClaim { .. } => 404,
            TransitionError::CannotFit { .. }
            | TransitionError::Claimed { .. }
            | TransitionError::Superseded { .. }
            | TransitionError::Busy { .. }
            | TransitionError::NeedsRestart { .. }
            | TransitionError::ListenFailed { .. } => 409,
            TransitionError::InvalidConfig { .. } => 422,
            TransitionError::LeaseHeld { .. } => 423,
            TransitionError::BackendDown { .. } | TransitionError::ShuttingDown { .. } => 503,
            TransitionError::TimedOut { .. } => 504,
            TransitionError::BadRequest { .. } => 400,
            TransitionError::Failed { .. } | TransitionError::NotWritten { .. } => 500,
        }
    }

    pub fn shutting_down() -> Self {
        TransitionError::ShuttingDown {
            detail: "gpu-manager is shutting down: GPU services keep running and the next daemon adopts them; retry once it is back".to_owned(),
        }
    }

    /// The JSON error body: `{"error": message, "kind": ..., ...context}`.
    pub fn body(&self) -> serde_json::Value {
        let mut body = serde_json::to_value(self).unwrap_or_else(|_| serde_json::json!({}));
        if let Some(map) = body.as_object_mut() {
            map.insert("error".into(), self.to_string().into());
        }
        body
    }

    /// The error a failed action becomes.
    fn from_action(action: &ActionRecord, detail: &str) -> Self {
        let service = action.service.clone();
        let detail = detail.to_owned();
        match action.failure {
            Some(FailureKind::Timeout) => TransitionError::TimedOut { service, detail },
            Some(FailureKind::BackendDown) => TransitionError::BackendDown {
                backend: service,
                detail,
            },
            Some(FailureKind::Busy) => TransitionError::Busy {
                service,
                detail,
                answer: action.busy.clone().unwrap_or_default(),
            },
            _ => TransitionError::Failed { service, detail },
        }
    }
}

/// What a caller is told once its transition is done.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransitionReport {
    pub generation: u64,
    /// True when answered at once (`?wait=false`): nothing has run yet.
    pub accepted_only: bool,
    /// The actions taken for this generation, in order.
    pub actions: Vec<ActionRecord>,
    pub services: BTreeMap<String, ServiceState>,
    pub duration_ms: u64,
    /// The claims a forced stop ended.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ended_claims: Vec<Claim>,
}

pub type TransitionReply = oneshot::Sender<Result<TransitionReport, TransitionError>>;

/// How a reconcile round ended, as far as waiting callers care.
#[derive(Debug, Clone)]
pub enum RoundEnd {
    /// Every action of the plan ran (some may have failed).
    Completed,
    /// Acting was refused: the lease is held elsewhere or its backend is down.
    Blocked(TransitionError),
}

struct Waiting {
    generation: u64,
    reply: TransitionReply,
    ended_claims: Vec<Claim>,
    actions: Vec<ActionRecord>,
    since: Instant,
}

/// The callers waiting for a generation to converge.
#[derive(Default)]
pub struct Waiters {
    waiting: Vec<Waiting>,
}

impl Waiters {
    /// A caller waits for `generation`; its report will list `ended_claims`.
    pub fn add(&mut self, generation: u64, reply: TransitionReply, ended_claims: Vec<Claim>) {
        self.waiting.push(Waiting {
            generation,
            reply,
            ended_claims,
            actions: Vec::new(),
            since: Instant::now(),
        });
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// Gives every waiter the record of an action that finished while it waited: an
    /// action begun for an earlier generation and still wanted is part of its
    /// transition too (older waiters were superseded already).
    /// Callers that hung up are dropped first: nobody reads what they would collect.
    pub fn record(&mut self, action: &ActionRecord) {
        self.waiting.retain(|w| !w.reply.is_closed());
        for waiting in self.waiting.iter_mut() {
            waiting.actions.push(action.clone());
        }
    }

    /// Answers every waiting caller with `error`.
    pub fn fail_all(&mut self, error: TransitionError) {
        for waiting in self.waiting.drain(..) {
            let _ = waiting.reply.send(Err(error.clone()));
        }
    }

    /// Tells callers of older generations that a later request replaced theirs.
    pub fn supersede(&mut self, by: u64) {
        let (old, current): (Vec<_>, Vec<_>) =
            self.waiting.drain(..).partition(|w| w.generation < by);
        self.waiting = current;
        for waiting in old {
            let _ = waiting.reply.send(Err(TransitionError::Superseded {
                generation: waiting.generation,
                by,
            }));
        }
    }

    /// Answers the callers of `generation` after a round for it ended.
    pub fn finish(
        &mut self,
        generation: u64,
        end: &RoundEnd,
        services: &BTreeMap<String, ServiceState>,
    ) {
        let (done, rest): (Vec<_>, Vec<_>) = self
            .waiting
            .drain(..)
            .partition(|w| w.generation == generation);
        self.waiting = rest;
        for waiting in done {
            let outcome = match end {
                RoundEnd::Blocked(error) => Err(error.clone()),
                RoundEnd::Completed => match first_failure(&waiting.actions) {
                    Some(error) => Err(error),
                    None => Ok(TransitionReport {
                        generation,
                        accepted_only: false,
                        actions: waiting.actions,
                        services: services.clone(),
                        duration_ms: waiting.since.elapsed().as_millis() as u64,
                        ended_claims: waiting.ended_claims,
                    }),
                },
            };
            let _ = waiting.reply.send(outcome);
        }
    }
}

/// The first action that failed; a cancelled one (superseded, left at shutdown) is not
/// a failure of the transition that replaced it.
fn first_failure(actions: &[ActionRecord]) -> Option<TransitionError> {
    actions.iter().find_map(|action| match &action.outcome {
        Err(_) if action.failure == Some(FailureKind::Cancelled) => None,
        Err(detail) => Some(TransitionError::from_action(action, detail)),
        Ok(_) => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::path::Path;

    fn inventory() -> Inventory {
        Config::parse(
            Path::new("/x/c.yaml"),
            "services:\n  a: { kind: native, command: x, vram_mb: 10, priority: 2, phases: [1] }\n  b: { kind: native, command: x, vram_mb: 10, priority: 1, phases: [2] }\n",
        )
        .unwrap()
        .inventory
    }

    fn record(
        generation: u64,
        outcome: Result<String, String>,
        failure: Option<FailureKind>,
    ) -> ActionRecord {
        ActionRecord {
            op: "start".into(),
            service: "a".into(),
            reason: "pinned".into(),
            cause: None,
            generation,
            duration_ms: 5,
            outcome,
            failure,
            started_at_ms: 0,
            finished_at_ms: 0,
            busy: None,
        }
    }

    #[test]
    fn unknown_names_and_phases_are_404_listing_the_known_ones() {
        let inv = inventory();
        let error = Change::Phase(7).check(&inv).unwrap_err();
        assert_eq!(error.http_status(), 404);
        assert!(error.to_string().contains("1, 2"), "{error}");
        let name = ServiceName::parse("zzz").unwrap();
        let error = Change::Start(name).check(&inv).unwrap_err();
        assert_eq!(error.body()["known"], serde_json::json!(["a", "b"]));
        assert!(Change::Phase(2).check(&inv).is_ok());
    }

    #[test]
    fn phase_clears_held_and_stop_unpins() {
        let a = ServiceName::parse("a").unwrap();
        let mut state = DesiredState::default();
        state.hold(&a);
        let next = Change::Phase(1).apply(&state);
        assert!(next.held.is_empty());
        let next = Change::Start(a.clone()).apply(&next);
        assert_eq!(next.pinned, std::slice::from_ref(&a));
        let next = Change::Stop(a.clone()).apply(&next);
        assert!(next.pinned.is_empty() && next.held == [a]);
    }

    #[tokio::test]
    async fn waiters_are_answered_superseded_failed_or_done() {
        let mut waiters = Waiters::default();
        let (old_tx, old_rx) = oneshot::channel();
        let (tx, rx) = oneshot::channel();
        waiters.add(1, old_tx, Vec::new());
        waiters.add(2, tx, Vec::new());
        waiters.supersede(2);
        assert_eq!(
            old_rx.await.unwrap().unwrap_err(),
            TransitionError::Superseded {
                generation: 1,
                by: 2
            }
        );
        waiters.record(&record(2, Err("slow".into()), Some(FailureKind::Timeout)));
        waiters.finish(2, &RoundEnd::Completed, &BTreeMap::new());
        let error = rx.await.unwrap().unwrap_err();
        assert_eq!(error.http_status(), 504);

        let (tx, rx) = oneshot::channel();
        waiters.add(3, tx, Vec::new());
        waiters.record(&record(3, Ok("ready".into()), None));
        waiters.finish(3, &RoundEnd::Completed, &BTreeMap::new());
        let report = rx.await.unwrap().unwrap();
        assert_eq!(report.actions.len(), 1);
        assert!(waiters.is_empty());
    }

    #[test]
    fn a_caller_that_hung_up_collects_no_more_actions() {
        let mut waiters = Waiters::default();
        let (tx, rx) = oneshot::channel();
        waiters.add(1, tx, Vec::new());
        let (kept_tx, _kept_rx) = oneshot::channel();
        waiters.add(1, kept_tx, Vec::new());
        drop(rx);
        waiters.record(&record(1, Ok("ready".into()), None));
        assert_eq!(waiters.waiting.len(), 1, "the closed waiter is dropped");
        assert_eq!(waiters.waiting[0].actions.len(), 1);
    }
}
