//! A reload in the loop (docs/ARCHITECTURE.md, "Reloading the config"): the file is read
//! and validated whole, its difference from the config in force is applied service by
//! service, and the rounds that follow do the rest under the lease, as for any change:
//! a service whose launch changed is restarted (`config_changed`), one removed is
//! stopped (`removed`) and then forgotten.

use std::sync::Arc;

use tokio::time::Instant;

use crate::clock::now_ms;
use crate::config::diff::{self, ConfigDiff, ServiceChange};
use crate::config::{Config, ProxySpec, ServiceName};
use crate::lease::{LeaseBackend, LeaseRole};
use crate::plan::{Action, Cause, Op};
use crate::reload::{self, ConfigStatus, ReloadReport, ReloadTrigger, RemovedServices};
use crate::status::DaemonEvent;
use crate::transition::TransitionError;

use super::effects::ServiceEffects;
use super::records::{Event, Reconfigure};
use super::Reconciler;

/// A config read and checked, not yet in force.
struct Candidate {
    config: Config,
    sha256: String,
    diff: ConfigDiff,
}

impl<E: ServiceEffects, L: LeaseBackend> Reconciler<E, L> {
    /// Re-reads the config file and applies what changed; a config that does not parse,
    /// validate or fit, or that changes a key only a restart applies, is refused whole
    /// and the config in force stays.
    pub(super) async fn reload_config(
        &mut self,
        removed: RemovedServices,
        trigger: ReloadTrigger,
    ) -> Result<ReloadReport, TransitionError> {
        if self.shutting_down() {
            return Err(TransitionError::shutting_down());
        }
        match self.candidate().await {
            Ok(candidate) => Ok(self.apply_reload(candidate, removed, trigger).await),
            Err(error) => {
                let message = error.to_string();
                tracing::warn!(?trigger, error = %message, "config reload refused: the config in force stays");
                self.config_status.error = Some(message.clone());
                let _ = self.feed.send(DaemonEvent::ConfigRefused {
                    trigger,
                    error: message,
                });
                self.publish();
                Err(error)
            }
        }
    }

    /// The file as it is now, checked as `gpu-manager validate` checks it, and against
    /// the desired state in force (which must still name known services and phases).
    async fn candidate(&self) -> Result<Candidate, TransitionError> {
        let path = &self.config.path;
        let invalid = |detail: String| TransitionError::InvalidConfig { detail };
        let bytes = tokio::fs::read(path)
            .await
            .map_err(|e| invalid(format!("cannot read config {}: {e}", path.display())))?;
        let text = String::from_utf8_lossy(&bytes);
        let config = Config::parse(path, &text).map_err(|e| invalid(e.to_string()))?;
        let total_mb = match &self.gpu_view.sample {
            Some(sample) => Some(sample.total_mb),
            None => config.gpu.total_mb,
        };
        if let Some(total_mb) = total_mb {
            config
                .check_fits_gpu(total_mb)
                .map_err(|e| invalid(e.to_string()))?;
        }
        let diff =
            diff::diff(&self.config, &config).map_err(|e| TransitionError::NeedsRestart {
                keys: e.keys.iter().map(|k| (*k).to_owned()).collect(),
                detail: e.to_string(),
            })?;
        check_new_listens(&self.config, &config)?;
        if let Some(desired) = &self.desired {
            desired
                .check_against(&config.desired_state, &config.inventory)
                .map_err(|e| {
                    invalid(format!(
                        "the desired state in force does not fit the new config ({e}): change it first (another phase, unpin, release), then reload"
                    ))
                })?;
        }
        Ok(Candidate {
            config,
            sha256: reload::sha256(&bytes),
            diff,
        })
    }

    async fn apply_reload(
        &mut self,
        candidate: Candidate,
        removed: RemovedServices,
        trigger: ReloadTrigger,
    ) -> ReloadReport {
        let Candidate {
            config,
            sha256,
            diff,
        } = candidate;
        let mut report = ReloadReport::of(&diff, removed, |name| {
            ServiceName::parse(name)
                .ok()
                .and_then(|n| self.records.get(&n))
                .is_some_and(|r| r.instance().is_some() || r.in_flight().is_some())
        });
        let mut added = Vec::new();
        for (name, change) in &diff.services {
            let spec = config.inventory.get(name).cloned();
            match (change, spec) {
                (ServiceChange::Added, Some(spec)) => {
                    self.records.add(spec);
                    added.push(name.clone());
                }
                (ServiceChange::Removed, _) => self.remove_service(name, removed),
                (ServiceChange::Relaunch { keys }, Some(spec)) => {
                    let keys = keys.clone();
                    self.apply(
                        name,
                        Event::Reconfigured(Box::new(Reconfigure::Relaunch { spec, keys })),
                    );
                }
                (ServiceChange::Live { keys }, Some(spec)) => {
                    if keys.contains(&"proxy") {
                        self.follow_proxy_change(name, spec.proxy.as_ref());
                    }
                    self.apply(name, Event::Reconfigured(Box::new(Reconfigure::Live(spec))));
                }
                (_, None) => {}
            }
        }
        self.config = Arc::new(config);
        // The demand proxy follows the config in force: new listen addresses (checked
        // free above), upstreams and limits.
        self.config_tx.send_replace(self.config.clone());
        let generation = self.config_status.generation + u64::from(!diff.is_empty());
        self.config_status = ConfigStatus {
            path: self.config.path.clone(),
            loaded_at_ms: now_ms(),
            generation,
            sha256,
            error: None,
        };
        report.generation = generation;
        report.sha256 = self.config_status.sha256.clone();
        if !diff.is_empty() {
            // Like a new desired state: callers waiting on the old one are superseded,
            // and what had failed gets a new chance.
            self.generation += 1;
            self.waiters.supersede(self.generation);
            for record in self.records.iter_mut() {
                record.forgive();
            }
        }
        if self.lease.status().role == LeaseRole::Leader {
            self.adopt_each(&added).await;
        }
        tracing::info!(?trigger, generation, ?report, "config reloaded");
        let _ = self.feed.send(DaemonEvent::ConfigReloaded {
            trigger,
            report: report.clone(),
        });
        self.dirty = true;
        self.publish();
        report
    }

    /// A reload changed `service`'s `proxy:`: a new `idle_ms` retimes its demand; without
    /// a proxy any more, nothing can demand it and its demand ends.
    fn follow_proxy_change(&mut self, service: &ServiceName, proxy: Option<&ProxySpec>) {
        match proxy {
            Some(proxy) => self.demand.retime(service, proxy.idle, Instant::now()),
            None => self.end_demand(service, "its proxy was removed from the config"),
        }
    }

    /// A service gone from the config: forgotten at once if nothing of it runs, or
    /// once its stop ends; with `keep_removed`, let go of where it is.
    fn remove_service(&mut self, name: &ServiceName, removed: RemovedServices) {
        self.end_demand(name, "removed from the config");
        let busy = self
            .records
            .get(name)
            .is_some_and(|r| r.instance().is_some() || r.in_flight().is_some());
        if busy && removed == RemovedServices::Stop {
            self.records.leave(name);
            return;
        }
        let Some(mut record) = self.records.remove(name) else {
            return;
        };
        record.stop_monitor();
        if let Some(flight) = record.in_flight() {
            // Left at a safe point, as at shutdown.
            flight.abandon.cancel();
        }
        if let Some(instance) = record.instance() {
            tracing::info!(service = %name, "removed from the config: left running, unmanaged");
            self.effects.let_go(instance);
        }
        self.parked_notes.forget(name);
    }

    /// The stops of services a reload removed that still run, for this round's plan: a
    /// start under way is cancelled (see `begin`).
    pub(super) fn removal_stops(&self) -> Vec<Action> {
        self.records
            .leaving()
            .filter(|r| r.starting() || (r.instance().is_some() && r.in_flight().is_none()))
            .map(|r| Action {
                op: Op::Stop,
                service: r.name().clone(),
                vram_mb: r.observed_mb.unwrap_or(r.spec.vram_mb),
                cause: Cause::Removed,
                reason: "removed from the config".to_owned(),
                after: Vec::new(),
            })
            .collect()
    }

    /// Forgets the removed services whose stop has ended.
    pub(super) fn forget_left(&mut self) {
        for name in self.records.forget_left() {
            tracing::info!(service = %name, "removed from the config: stopped and forgotten");
            self.parked_notes.forget(&name);
        }
    }
}

/// Every proxy listen address the new config adds must be free now, or the reload is
/// refused whole: the demand proxy binds it once the config is in force, and a port
/// taken meanwhile would leave the service's consumers with "connection refused". The
/// addresses the config in force already names are the proxy's own: not checked.
fn check_new_listens(old: &Config, new: &Config) -> Result<(), TransitionError> {
    let ours: Vec<_> = old
        .inventory
        .iter()
        .filter_map(|s| Some(s.proxy.as_ref()?.listen.port()))
        .collect();
    for spec in new.inventory.iter() {
        let Some(proxy) = &spec.proxy else { continue };
        if ours.contains(&proxy.listen.port()) {
            continue;
        }
        if let Err(error) = std::net::TcpListener::bind(proxy.listen) {
            let service = spec.name.to_string();
            return Err(TransitionError::ListenFailed {
                detail: format!(
                    "services.{service}.proxy.listen {} cannot be bound: {error}; free that port or give the proxy another, then reload (the config in force stays)",
                    proxy.listen
                ),
                service,
            });
        }
    }
    Ok(())
}
