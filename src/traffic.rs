//! What the demand proxy sees of each service's requests (docs/ARCHITECTURE.md, "The
//! demand proxy"), shared with the loop's drains, the status and the metrics. The proxy
//! writes; everyone else reads.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::{watch, Notify};

use crate::config::ServiceName;
use crate::status::TransitionStats;

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

/// Counters for `/metrics`: answers by HTTP status, and how long requests waited for
/// their service.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestMetrics {
    pub answered: BTreeMap<u16, u64>,
    pub waits: TransitionStats,
}

/// A request to a ready service waits about a millisecond, one to a stopped service its
/// start: buckets from 1 ms up to the longest starts.
const WAIT_BOUNDS_MS: [u64; 15] = [
    1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 120000,
];

impl Default for RequestMetrics {
    fn default() -> Self {
        Self {
            answered: BTreeMap::new(),
            waits: TransitionStats::with_bounds_ms(WAIT_BOUNDS_MS.to_vec()),
        }
    }
}

/// One proxied service's shared counters.
#[derive(Debug, Default)]
pub struct ServiceTraffic {
    now: watch::Sender<Traffic>,
    metrics: Mutex<RequestMetrics>,
    /// The board's: told of every change (see [`TrafficBoard::moved`]).
    moved: Arc<Notify>,
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
        self.moved.notify_one();
        (before, after)
    }

    pub fn subscribe(&self) -> watch::Receiver<Traffic> {
        self.now.subscribe()
    }

    pub fn answered(&self, code: u16) {
        *self.lock().answered.entry(code).or_insert(0) += 1;
    }

    pub fn waited(&self, waited: Duration) {
        self.lock().waits.observe(waited.as_millis() as u64);
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
    moved: Arc<Notify>,
}

impl TrafficBoard {
    pub fn of(&self, service: &ServiceName) -> Arc<ServiceTraffic> {
        let mut services = self.services.lock().unwrap_or_else(PoisonError::into_inner);
        let traffic = services.entry(service.clone()).or_insert_with(|| {
            Arc::new(ServiceTraffic {
                moved: self.moved.clone(),
                ..ServiceTraffic::default()
            })
        });
        traffic.clone()
    }

    /// Whose `notified()` ends once any service's counts changed since it was last
    /// awaited: one wake for a burst of changes, which the loop turns into a status
    /// refresh at most every tenth of a second.
    pub fn moved(&self) -> Arc<Notify> {
        self.moved.clone()
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
    fn answers_and_waits_are_counted() {
        let traffic = ServiceTraffic::default();
        traffic.answered(200);
        traffic.answered(200);
        traffic.answered(503);
        traffic.waited(Duration::from_micros(300));
        traffic.waited(Duration::from_millis(30));
        traffic.waited(Duration::from_secs(2));
        let metrics = traffic.metrics();
        assert_eq!(metrics.answered, BTreeMap::from([(200, 2), (503, 1)]));
        assert_eq!(metrics.waits.count, 3);
        let at_most = |le_ms: u64| {
            let i = metrics
                .waits
                .bucket_le_ms
                .iter()
                .position(|le| *le == le_ms);
            metrics.waits.bucket_counts[i.unwrap()]
        };
        assert_eq!(
            at_most(1),
            1,
            "a ready service's wait is in the first bucket"
        );
        assert_eq!((at_most(25), at_most(50)), (1, 2));
        assert_eq!((at_most(1000), at_most(2500)), (2, 3));
        assert_eq!(metrics.waits.sum_ms, 2030);
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

    #[tokio::test]
    async fn a_change_tells_the_board_once_for_a_burst() {
        let board = TrafficBoard::default();
        let moved = board.moved();
        let name = ServiceName::parse("a").unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(10), moved.notified())
                .await
                .is_err(),
            "nothing changed yet"
        );
        board.of(&name).change(|t| t.waiting += 1);
        board.of(&name).change(|t| t.waiting -= 1);
        moved.notified().await;
        assert!(
            tokio::time::timeout(Duration::from_millis(10), moved.notified())
                .await
                .is_err(),
            "the burst was told once"
        );
    }
}
