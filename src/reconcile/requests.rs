//! API requests: a change is checked (404, 409, 423, 503), written to the desired-state
//! file and accepted; a dry run plans a change without making it.

use std::collections::BTreeMap;

use crate::desired::{self, Claim, ClaimEnd, DesiredState};
use crate::lease::{LeaseBackend, LeaseRole};
use crate::plan::{self, Plan, StartGate};
use crate::status::ServiceState;
use crate::transition::{Change, TransitionError, TransitionReply, TransitionReport};

use super::effects::ServiceEffects;
use super::{Command, Reconciler};

impl<E: ServiceEffects, L: LeaseBackend> Reconciler<E, L> {
    pub(super) async fn on_command(&mut self, command: Command) {
        match command {
            Command::Transition { reply, .. } if self.shutting_down() => {
                let _ = reply.send(Err(TransitionError::shutting_down()));
            }
            Command::Transition {
                change,
                wait,
                force,
                reply,
            } => match self.accept_change(&change, force).await {
                Ok(Accepted {
                    blocked: Some(error),
                    ..
                }) => {
                    // Written and in force, but its services wait for claims to end.
                    self.dirty = true;
                    let _ = reply.send(Err(error));
                }
                Ok(Accepted {
                    generation,
                    ended_claims,
                    blocked: None,
                }) => {
                    // Asked again: a stop or park that found the service busy is tried
                    // again now, not after its backoff.
                    for record in self.records.iter_mut().filter(|r| r.busy()) {
                        record.forgive();
                    }
                    self.dirty = true;
                    if force {
                        // Drains under way, and those this state begins, end at once.
                        tracing::warn!(
                            ?change,
                            "forced: draining is skipped; work in flight may be lost"
                        );
                        self.skip_drain.cancel();
                    }
                    self.answer_accepted(generation, wait, reply, ended_claims);
                }
                Err(error) => {
                    let _ = reply.send(Err(error));
                }
            },
            Command::Plan { change, reply } => {
                let _ = reply.send(self.plan_for(change.as_ref()).await.map(|(_, plan)| plan));
            }
            Command::Forget { service, reply } => {
                let _ = reply.send(self.forget_footprint(&service).await);
            }
            Command::Demand { service } => self.on_demand(&service),
            Command::Reload {
                removed,
                trigger,
                reply,
            } => {
                let _ = reply.send(self.reload_config(removed, trigger).await);
            }
        }
    }

    /// A waiting caller is answered when the generation converges; otherwise at once.
    fn answer_accepted(
        &mut self,
        generation: u64,
        wait: bool,
        reply: TransitionReply,
        ended_claims: Vec<Claim>,
    ) {
        match wait {
            true => self.waiters.add(generation, reply, ended_claims),
            false => {
                let _ = reply.send(Ok(TransitionReport {
                    generation,
                    accepted_only: true,
                    actions: Vec::new(),
                    services: BTreeMap::new(),
                    duration_ms: 0,
                    ended_claims,
                }));
            }
        }
    }

    /// The desired state a change leads to, and the plan for it on a fresh observation.
    async fn plan_for(
        &mut self,
        change: Option<&Change>,
    ) -> Result<(DesiredState, Plan), TransitionError> {
        self.expire_claims();
        let current = self.desired.clone().unwrap_or_default();
        let next = match change {
            Some(change) => {
                change.check(&self.config.inventory)?;
                change.apply(&current)
            }
            None => current,
        };
        let mut observation = self.observe().await;
        // A new desired state reopens the start gates that failures closed (see
        // accept_desired); an unreachable backend keeps its gate closed.
        if change.is_some() {
            for (name, view) in observation.services.iter_mut() {
                let unknown = self
                    .records
                    .get(name)
                    .is_none_or(|r| r.state() == ServiceState::Unknown);
                if !unknown {
                    view.gate = StartGate::Open;
                }
            }
        }
        let plan = plan::plan(&self.config.inventory, &next, &observation);
        Ok((next, plan))
    }

    /// What a daemon that does not act answers (`LeaseError::not_leading`).
    pub(super) fn standby_refusal(&self) -> TransitionError {
        self.lease.status().standby_refusal().into()
    }

    /// Checks a change (404, 409, 423 on a standby, 503 when a backend is down), writes
    /// it to the desired-state file and accepts it.
    async fn accept_change(
        &mut self,
        change: &Change,
        force: bool,
    ) -> Result<Accepted, TransitionError> {
        if self.lease.status().role == LeaseRole::Standby {
            // Asked again: the last answer may be from before Redis came up.
            self.lease.confirm_lead().await?;
        }
        self.expire_claims();
        let current = self.desired.clone().unwrap_or_default();
        change.check_against(&current, force)?;
        let ended_claims = change.ends_claims(&current);
        let (next, plan) = self.plan_for(Some(change)).await?;
        for name in change.targets(&self.config.inventory) {
            let Some(record) = self.records.get(name) else {
                continue;
            };
            if record.state() == ServiceState::Unknown {
                return Err(TransitionError::BackendDown {
                    backend: "docker".to_owned(),
                    detail: record
                        .last_error()
                        .map(str::to_owned)
                        .unwrap_or_else(|| format!("{name}'s backend cannot be reached")),
                });
            }
        }
        change.check_fits(&self.config.inventory, &plan)?;
        let blocked = change.blocked_by_claims(&self.config.inventory, &plan);
        match desired::save(&self.config.desired_state, &next).await {
            Ok(()) => {}
            // The new state is in place (and the folder watch sees it): it is in force.
            Err(error @ desired::DesiredError::NotDurable { .. }) => {
                tracing::warn!(%error, "desired state written but not synced")
            }
            Err(error) => {
                return Err(TransitionError::NotWritten {
                    detail: error.to_string(),
                })
            }
        }
        tracing::info!(?change, "desired state changed through the API");
        self.desired_error = None;
        if self.desired.as_ref() != Some(&next) {
            let why = match ended_claims.is_empty() {
                true => ClaimEnd::Released,
                false => ClaimEnd::Forced,
            };
            self.accept_desired(next, why);
        }
        if blocked.is_some() {
            // Answered at once: the caller reads status next, and should see why.
            self.apply_verdicts(&plan);
            self.publish();
        }
        Ok(Accepted {
            generation: self.generation,
            ended_claims,
            blocked,
        })
    }
}

/// A change written and in force.
struct Accepted {
    generation: u64,
    /// The claims a forced stop ended, for its report.
    ended_claims: Vec<Claim>,
    /// A phase or start whose services wait for claims to end: answered 409 at once.
    blocked: Option<TransitionError>,
}
