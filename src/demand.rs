//! Demand: the services the proxy sees used (docs/ARCHITECTURE.md, "The demand proxy").
//!
//! The loop keeps this beside the desired state: a service is demanded from its first
//! request until `idle_ms` after its last one ended, with none in flight or waiting.
//! The proxy says only "used" (when a request finds its service not demanded); the loop
//! reviews the traffic counts at each round to move the ends. The planner takes the
//! names as one more reason to want a service. Pure: the loop passes the clock and the
//! counts in.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::ServiceName;

/// What the proxy's counts say of one service at a review.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activity {
    /// Requests in flight, waiting, or upgraded connections open.
    InUse,
    /// None: since when (None: no request since this daemon started).
    Idle { since: Option<Instant> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Hold {
    /// How long it stays demanded once idle; None: until the next daemon.
    idle: Option<Duration>,
    /// Demanded at least until then.
    until: Instant,
}

#[derive(Debug, Default)]
pub struct Demand {
    holds: BTreeMap<ServiceName, Hold>,
}

/// What a "used" did to the set of demanded services.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DemandChange {
    /// Newly demanded: re-plan, say so.
    Started,
    /// Already demanded: nothing to re-plan.
    Kept,
}

impl Demand {
    /// A request for `service` came; it stays demanded `idle` after its traffic ends.
    pub fn used(
        &mut self,
        service: &ServiceName,
        idle: Option<Duration>,
        now: Instant,
    ) -> DemandChange {
        let until = now + idle.unwrap_or_default();
        self.hold(service, Hold { idle, until })
    }

    /// Demanded until `idle` from now unless a request comes: a running proxied service
    /// at a daemon's start, which may have been in use before the restart.
    pub fn keep_after_restart(
        &mut self,
        service: &ServiceName,
        idle: Option<Duration>,
        now: Instant,
    ) -> DemandChange {
        self.used(service, idle, now)
    }

    fn hold(&mut self, service: &ServiceName, hold: Hold) -> DemandChange {
        match self.holds.get_mut(service) {
            Some(kept) => {
                kept.until = kept.until.max(hold.until);
                kept.idle = hold.idle;
                DemandChange::Kept
            }
            None => {
                self.holds.insert(service.clone(), hold);
                DemandChange::Started
            }
        }
    }

    /// Moves each demand's end by what its traffic did, and ends those whose idle time
    /// is over; returns their services.
    pub fn review(
        &mut self,
        now: Instant,
        activity: impl Fn(&ServiceName) -> Activity,
    ) -> Vec<ServiceName> {
        let mut ended = Vec::new();
        for (name, hold) in self.holds.iter_mut() {
            let Some(idle) = hold.idle else {
                continue;
            };
            let seen = match activity(name) {
                Activity::InUse => Some(now),
                Activity::Idle { since } => since,
            };
            if let Some(seen) = seen {
                hold.until = hold.until.max(seen + idle);
            }
            if hold.until <= now {
                ended.push(name.clone());
            }
        }
        for name in &ended {
            self.holds.remove(name);
        }
        ended
    }

    /// The earliest end of a demand: the loop reviews then.
    pub fn next_end(&self) -> Option<Instant> {
        self.holds
            .values()
            .filter(|hold| hold.idle.is_some())
            .map(|hold| hold.until)
            .min()
    }

    /// A reload changed `service`'s `idle_ms`: a shorter one takes effect now (the
    /// demand ends at the latest `idle` from now); a longer one from the next review,
    /// which measures it from the service's traffic.
    pub fn retime(&mut self, service: &ServiceName, idle: Option<Duration>, now: Instant) {
        if let Some(hold) = self.holds.get_mut(service) {
            hold.idle = idle;
            if let Some(idle) = idle {
                hold.until = hold.until.min(now + idle);
            }
        }
    }

    /// The service lost its proxy, or left the config: its demand ends now. Returns
    /// whether it was demanded.
    pub fn end(&mut self, service: &ServiceName) -> bool {
        self.holds.remove(service).is_some()
    }

    pub fn names(&self) -> BTreeSet<ServiceName> {
        self.holds.keys().cloned().collect()
    }

    /// When the demand ends if no request comes; None: not demanded, or never ends.
    pub fn until(&self, service: &ServiceName) -> Option<Instant> {
        self.holds
            .get(service)
            .filter(|hold| hold.idle.is_some())
            .map(|hold| hold.until)
    }

    pub fn is_demanded(&self, service: &ServiceName) -> bool {
        self.holds.contains_key(service)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> ServiceName {
        ServiceName::parse(s).unwrap()
    }

    const IDLE: Option<Duration> = Some(Duration::from_secs(5));

    #[test]
    fn a_demand_lasts_while_in_use_and_its_idle_time_after() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut demand = Demand::default();
        assert_eq!(demand.used(&name("a"), IDLE, t0), DemandChange::Started);
        assert_eq!(demand.used(&name("a"), IDLE, t0), DemandChange::Kept);
        // In use at 4 s: its end moves to 9 s.
        assert!(demand.review(at(4), |_| Activity::InUse).is_empty());
        assert_eq!(demand.until(&name("a")), Some(at(9)));
        // Idle since 6 s: it ends at 11 s, not before.
        let idle = |_: &ServiceName| Activity::Idle { since: Some(at(6)) };
        assert!(demand.review(at(10), idle).is_empty());
        assert_eq!(demand.next_end(), Some(at(11)));
        assert_eq!(demand.review(at(11), idle), vec![name("a")]);
        assert!(!demand.is_demanded(&name("a")));
        assert_eq!(demand.next_end(), None);
    }

    #[test]
    fn without_an_idle_time_the_demand_never_ends_by_itself() {
        let t0 = Instant::now();
        let mut demand = Demand::default();
        demand.used(&name("a"), None, t0);
        let never_used = |_: &ServiceName| Activity::Idle { since: None };
        assert!(demand
            .review(t0 + Duration::from_secs(86_400), never_used)
            .is_empty());
        assert!(demand.is_demanded(&name("a")));
        assert_eq!(demand.next_end(), None);
    }

    #[test]
    fn a_restart_keeps_a_running_service_demanded_for_its_idle_time() {
        let t0 = Instant::now();
        let mut demand = Demand::default();
        demand.keep_after_restart(&name("a"), IDLE, t0);
        let never_used = |_: &ServiceName| Activity::Idle { since: None };
        assert!(demand
            .review(t0 + Duration::from_secs(4), never_used)
            .is_empty());
        assert_eq!(
            demand.review(t0 + Duration::from_secs(5), never_used),
            vec![name("a")]
        );
        assert_eq!(demand.names(), BTreeSet::new());
    }

    #[test]
    fn a_reload_that_shortens_idle_ends_the_demand_sooner_and_one_that_lengthens_it_later() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let idle_since_0 = |_: &ServiceName| Activity::Idle { since: Some(t0) };
        let mut demand = Demand::default();
        demand.used(&name("a"), Some(Duration::from_secs(60)), t0);
        demand.used(&name("b"), IDLE, t0);
        demand.retime(&name("a"), IDLE, at(1));
        assert_eq!(
            demand.until(&name("a")),
            Some(at(6)),
            "at most 5 s from the reload"
        );
        demand.retime(&name("b"), Some(Duration::from_secs(60)), at(1));
        assert_eq!(demand.review(at(6), idle_since_0), vec![name("a")]);
        assert_eq!(
            demand.until(&name("b")),
            Some(at(60)),
            "measured from its traffic"
        );
        assert!(demand.end(&name("b")));
        assert!(!demand.end(&name("b")));
        assert_eq!(demand.names(), BTreeSet::new());
    }
}
