//! What the demand proxy sees of each service's requests (docs/ARCHITECTURE.md, "The
//! demand proxy"), shared with the loop's drains, the status and the metrics. The proxy
//! writes; everyone else reads.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::watch;

use crate::config::ServiceName;

/// One service's requests now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Plain requests forwarded and not yet answered in full: work in flight.
    pub in_flight: usize,
    /// Requests waiting for the service to be ready (or for a concurrency slot).
    pub waiting: usize,
    /// Upgraded connections (WebSocket) open: they keep the service demanded but are
    /// not work in flight.
    pub upgraded: usize,
    /// When the last request arrived, milliseconds since the epoch.
    pub last_request_ms: Option<u64>,
    /// When a request last arrived or ended: its idle time counts from then.
    pub last_active: Option<Instant>,
}

impl Traffic {
    /// Anything that keeps the service in use.
    pub fn in_use(&self) -> bool {
        self.in_flight + self.waiting + self.upgraded > 0
    }
}

/// The upper bounds of the wait histogram's buckets, in seconds (Prometheus' `le`).
pub const WAIT_BUCKETS_S: [f64; 12] = [
    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// Counters for `/metrics`: answers by HTTP status, and how long requests waited.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestMetrics {
    pub answered: BTreeMap<u16, u64>,
    /// Cumulative counts per bucket of [`WAIT_BUCKETS_S`].
    pub wait_buckets: [u64; WAIT_BUCKETS_S.len()],
    pub wait_count: u64,
    pub wait_sum_s: f64,
}

impl RequestMetrics {
    fn waited(&mut self, waited: Duration) {
        let seconds = waited.as_secs_f64();
        for (bound, count) in WAIT_BUCKETS_S.iter().zip(self.wait_buckets.iter_mut()) {
            if seconds <= *bound {
                *count += 1;
            }
        }
        self.wait_count += 1;
        self.wait_sum_s += seconds;
    }
}

/// One proxied service's shared counters.
#[derive(Debug, Default)]
pub struct ServiceTraffic {
    now: watch::Sender<Traffic>,
    metrics: Mutex<RequestMetrics>,
}

impl ServiceTraffic {
    pub fn current(&self) -> Traffic {
        *self.now.borrow()
    }

    /// Changes the counts; returns them as they were before and after.
    pub fn change(&self, edit: impl FnOnce(&mut Traffic)) -> (Traffic, Traffic) {
        let mut before = Traffic::default();
        let mut after = Traffic::default();
        self.now.send_modify(|traffic| {
            before = *traffic;
            edit(traffic);
            after = *traffic;
        });
        (before, after)
    }

    pub fn subscribe(&self) -> watch::Receiver<Traffic> {
        self.now.subscribe()
    }

    pub fn answered(&self, code: u16) {
        *self.lock().answered.entry(code).or_insert(0) += 1;
    }

    pub fn waited(&self, waited: Duration) {
        self.lock().waited(waited);
    }

    pub fn metrics(&self) -> RequestMetrics {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RequestMetrics> {
        // Counters stay usable after a panic elsewhere: they are plain numbers.
        self.metrics.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Every proxied service's counters, by name; entries are made on first use.
#[derive(Debug, Clone, Default)]
pub struct TrafficBoard {
    services: Arc<Mutex<BTreeMap<ServiceName, Arc<ServiceTraffic>>>>,
}

impl TrafficBoard {
    pub fn of(&self, service: &ServiceName) -> Arc<ServiceTraffic> {
        let mut services = self.services.lock().unwrap_or_else(PoisonError::into_inner);
        services.entry(service.clone()).or_default().clone()
    }

    /// The counts now, if the proxy has a route for it.
    pub fn current(&self, service: &ServiceName) -> Option<Traffic> {
        let services = self.services.lock().unwrap_or_else(PoisonError::into_inner);
        services.get(service).map(|s| s.current())
    }

    /// Every service's counters, for `/metrics`.
    pub fn all(&self) -> Vec<(ServiceName, Arc<ServiceTraffic>)> {
        let services = self.services.lock().unwrap_or_else(PoisonError::into_inner);
        services
            .iter()
            .map(|(name, traffic)| (name.clone(), traffic.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_fill_every_bucket_at_or_above_them() {
        let traffic = ServiceTraffic::default();
        traffic.waited(Duration::from_millis(3));
        traffic.waited(Duration::from_secs(2));
        let metrics = traffic.metrics();
        assert_eq!(metrics.wait_count, 2);
        assert_eq!(metrics.wait_buckets[0], 0, "le 0.001");
        assert_eq!(metrics.wait_buckets[1], 1, "le 0.005");
        assert_eq!(metrics.wait_buckets[6], 1, "le 1");
        assert_eq!(metrics.wait_buckets[7], 2, "le 5");
        assert!((metrics.wait_sum_s - 2.003).abs() < 1e-9);
    }

    #[test]
    fn a_change_reports_the_counts_before_and_after() {
        let traffic = ServiceTraffic::default();
        let (before, after) = traffic.change(|t| t.waiting += 1);
        assert!(!before.in_use());
        assert!(after.in_use());
        let board = TrafficBoard::default();
        let name = ServiceName::parse("a").unwrap();
        assert_eq!(board.current(&name), None);
        board.of(&name).change(|t| t.in_flight = 2);
        assert_eq!(board.current(&name).map(|t| t.in_flight), Some(2));
    }
}
