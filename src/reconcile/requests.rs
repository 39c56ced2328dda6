//! API requests: a change is checked (404, 409, 423, 503), written to the desired-state
//! file and accepted; a dry run plans a change without making it.

use std::collections::BTreeMap;

use crate::desired::{self, DesiredState};
use crate::lease::LeaseError;
use crate::plan::{self, Plan, StartGate};
use crate::status::{LeaseRole, ServiceState};
use crate::transition::{Change, TransitionError, TransitionReport};

use super::{Command, Reconciler};

impl Reconciler {
    pub(super) async fn on_command(&mut self, command: Command) {
        match command {
            Command::Transition {
                change,
                wait,
                reply,
            } => match self.accept_change(&change).await {
                Ok(generation) if wait => self.waiters.add(generation, reply),
                Ok(generation) => {
                    let _ = reply.send(Ok(TransitionReport {
                        generation,
                        accepted_only: true,
                        actions: Vec::new(),
                        services: BTreeMap::new(),
                        duration_ms: 0,
                    }));
                }
                Err(error) => {
                    let _ = reply.send(Err(error));
                }
            },
            Command::Plan { change, reply } => {
                let _ = reply.send(self.plan_for(change.as_ref()).await.map(|(_, plan)| plan));
            }
        }
    }

    /// The desired state a change leads to, and the plan for it on a fresh observation.
    async fn plan_for(
        &mut self,
        change: Option<&Change>,
    ) -> Result<(DesiredState, Plan), TransitionError> {
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
                if self.records[name].state != ServiceState::Unknown {
                    view.gate = StartGate::Open;
                }
            }
        }
        let plan = plan::plan(&self.config.inventory, &next, &observation);
        Ok((next, plan))
    }

    /// What a standby answers: it does not act, the leader does (423, naming it).
    pub(super) fn standby_refusal(&self) -> TransitionError {
        let leader = self
            .lease
            .status()
            .leader
            .unwrap_or_else(|| "another gpu-manager".to_owned());
        LeaseError::NotLeader { leader }.into()
    }

    /// Checks a change (404, 409, 423 on a standby), writes it to the desired-state file
    /// and accepts it.
    async fn accept_change(&mut self, change: &Change) -> Result<u64, TransitionError> {
        if self.lease.status().role == LeaseRole::Standby {
            return Err(self.standby_refusal());
        }
        let (next, plan) = self.plan_for(Some(change)).await?;
        for name in change.targets(&self.config.inventory) {
            let record = &self.records[name];
            if record.state == ServiceState::Unknown {
                return Err(TransitionError::BackendDown {
                    backend: "docker".to_owned(),
                    detail: record
                        .last_error
                        .clone()
                        .unwrap_or_else(|| format!("{name}'s backend cannot be reached")),
                });
            }
        }
        change.check_fits(&self.config.inventory, &plan)?;
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
            self.accept_desired(next);
        }
        Ok(self.generation)
    }
}
