//! Demand in the loop (docs/ARCHITECTURE.md, "The demand proxy"): the proxy's "used",
//! the review of each demand against its traffic at every round, and the running
//! proxied services a new leader keeps demanded for their idle time.

use tokio::time::Instant;

use crate::config::ServiceName;
use crate::demand::{Activity, DemandChange};
use crate::lease::LeaseBackend;
use crate::status::DaemonEvent;
use crate::traffic::Traffic;

use super::effects::ServiceEffects;
use super::Reconciler;

impl<E: ServiceEffects, L: LeaseBackend> Reconciler<E, L> {
    /// A request came for `service` and found it not demanded.
    pub(super) fn on_demand(&mut self, service: &ServiceName) {
        let Some(proxy) = self
            .config
            .inventory
            .get(service)
            .and_then(|s| s.proxy.as_ref())
        else {
            return;
        };
        if self.demand.used(service, proxy.idle, Instant::now()) == DemandChange::Started {
            tracing::info!(%service, "demanded: a request came through its proxy");
            let _ = self.feed.send(DaemonEvent::DemandStarted {
                service: service.to_string(),
            });
            self.dirty = true;
            // The proxy reads `demanded` from the snapshot: say it at once.
            self.publish();
        }
    }

    /// Moves each demand's end by its traffic; ends those idle for their `idle_ms`.
    pub(super) fn review_demand(&mut self) {
        let traffic = self.traffic.clone();
        let activity = |service: &ServiceName| match traffic.current(service) {
            Some(now) if now.in_use() => Activity::InUse,
            Some(Traffic { last_active, .. }) => Activity::Idle { since: last_active },
            None => Activity::Idle { since: None },
        };
        for service in self.demand.review(Instant::now(), activity) {
            self.say_demand_ended(&service, "no request for its idle_ms");
        }
    }

    /// Ends `service`'s demand now, if it has one: its proxy, or the service itself, left
    /// the config.
    pub(super) fn end_demand(&mut self, service: &ServiceName, why: &str) {
        if self.demand.end(service) {
            self.say_demand_ended(service, why);
        }
    }

    fn say_demand_ended(&self, service: &ServiceName, why: &str) {
        tracing::info!(%service, "demand ended: {why}");
        let _ = self.feed.send(DaemonEvent::DemandEnded {
            service: service.to_string(),
        });
    }

    /// A proxied service found running when this daemon began to lead may have been in
    /// use through the proxy of the one before: it stays demanded for its `idle_ms`.
    pub(super) fn demand_what_runs(&mut self) {
        let now = Instant::now();
        let running: Vec<_> = self
            .records
            .iter()
            .filter(|r| r.instance().is_some())
            .filter_map(|r| Some((r.name().clone(), r.spec.proxy.as_ref()?.idle)))
            .collect();
        for (service, idle) in running {
            if self.demand.keep_after_restart(&service, idle, now) == DemandChange::Started {
                tracing::info!(%service, "demanded for its idle_ms: running through a proxy when this daemon took over");
                let _ = self.feed.send(DaemonEvent::DemandStarted {
                    service: service.to_string(),
                });
            }
        }
    }
}
