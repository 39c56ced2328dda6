//! `GET /gpu/history`: the last 15 minutes of VRAM per service, external and reclaiming
//! memory, and the phase, for the dashboard's timeline. A task beside the API samples the
//! status snapshots (at most once a second) into a bounded ring buffer, so the picture
//! is there when someone opens the page after the fact. The reconciler knows nothing of
//! it.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::config::Phase;
use crate::status::Status;

/// How far back the history reaches.
pub const WINDOW_MS: u64 = 15 * 60 * 1000;
/// The shortest time between two samples.
pub const INTERVAL: Duration = Duration::from_secs(1);
/// One sample a second over the window, and a little slack.
const CAPACITY: usize = 1000;

/// One moment of the GPU, in MB as status reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// When the snapshot was observed, ms since the epoch.
    pub at_ms: u64,
    pub phase: Option<Phase>,
    /// Observed MB of each service that holds any.
    pub services: BTreeMap<String, u64>,
    pub external_mb: u64,
    pub reclaiming_mb: u64,
    pub used_mb: u64,
}

impl Sample {
    pub fn of(status: &Status) -> Self {
        Self {
            at_ms: status.observed_at_ms,
            phase: status.desired.phase,
            services: status
                .services
                .iter()
                .filter_map(|(name, s)| {
                    s.observed_vram_mb
                        .filter(|mb| *mb > 0)
                        .map(|mb| (name.clone(), mb))
                })
                .collect(),
            external_mb: status.vram.external_mb,
            reclaiming_mb: status.vram.reclaiming_mb,
            used_mb: status.vram.used_mb,
        }
    }
}

/// What `GET /gpu/history` answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryReply {
    pub window_ms: u64,
    pub interval_ms: u64,
    pub total_mb: u64,
    pub reserve_mb: u64,
    /// Oldest first.
    pub samples: Vec<Sample>,
}

/// A sample as the ring keeps it: the services' names are shared by every sample, not
/// copied into each. A full ring is the daemon's largest structure (a sample a second
/// for 15 minutes), and it fills long after start: kept as [`Sample`]s, it grew the
/// daemon's RSS by about 1 MB over its first 15 minutes (the soak, tests/soak.rs).
#[derive(Debug)]
struct Kept {
    at_ms: u64,
    phase: Option<Phase>,
    services: Box<[(Arc<str>, u64)]>,
    external_mb: u64,
    reclaiming_mb: u64,
    used_mb: u64,
}

impl Kept {
    fn sample(&self) -> Sample {
        Sample {
            at_ms: self.at_ms,
            phase: self.phase,
            services: self
                .services
                .iter()
                .map(|(name, mb)| (name.to_string(), *mb))
                .collect(),
            external_mb: self.external_mb,
            reclaiming_mb: self.reclaiming_mb,
            used_mb: self.used_mb,
        }
    }
}

#[derive(Debug)]
struct Ring {
    samples: VecDeque<Kept>,
    /// Every service name seen, shared by the samples.
    names: Vec<Arc<str>>,
    total_mb: u64,
    reserve_mb: u64,
}

impl Default for Ring {
    fn default() -> Self {
        Self {
            samples: VecDeque::with_capacity(CAPACITY),
            names: Vec::new(),
            total_mb: 0,
            reserve_mb: 0,
        }
    }
}

impl Ring {
    fn push(&mut self, sample: Sample) {
        let oldest_kept = sample.at_ms.saturating_sub(WINDOW_MS);
        while self.samples.front().is_some_and(|s| s.at_ms < oldest_kept)
            || self.samples.len() >= CAPACITY
        {
            self.samples.pop_front();
        }
        let services = sample
            .services
            .into_iter()
            .map(|(name, mb)| (self.shared(&name), mb))
            .collect();
        self.samples.push_back(Kept {
            at_ms: sample.at_ms,
            phase: sample.phase,
            services,
            external_mb: sample.external_mb,
            reclaiming_mb: sample.reclaiming_mb,
            used_mb: sample.used_mb,
        });
    }

    /// The one copy of a service's name.
    fn shared(&mut self, name: &str) -> Arc<str> {
        if let Some(known) = self.names.iter().find(|n| &***n == name) {
            return known.clone();
        }
        let name: Arc<str> = Arc::from(name);
        self.names.push(name.clone());
        name
    }
}

/// The ring buffer, shared by the sampling task and the route.
#[derive(Clone, Debug, Default)]
pub struct History {
    ring: Arc<Mutex<Ring>>,
}

impl History {
    /// A history fed by a task that follows `snapshots` until the reconciler is gone.
    pub fn start(mut snapshots: watch::Receiver<Status>) -> Self {
        let history = Self::default();
        let ring = Arc::downgrade(&history.ring);
        tokio::spawn(async move {
            let mut next_due = tokio::time::Instant::now();
            while snapshots.changed().await.is_ok() {
                // Changes closer together than INTERVAL are folded into the latest.
                tokio::time::sleep_until(next_due).await;
                next_due = tokio::time::Instant::now() + INTERVAL;
                let Some(ring) = ring.upgrade() else { return };
                let status = snapshots.borrow_and_update();
                if status.observed_at_ms == 0 {
                    continue; // the placeholder before the first observation
                }
                let mut ring = ring.lock().unwrap_or_else(PoisonError::into_inner);
                ring.total_mb = status.vram.total_mb;
                ring.reserve_mb = status.vram.reserve_mb;
                ring.push(Sample::of(&status));
            }
        });
        history
    }

    pub fn reply(&self) -> HistoryReply {
        let ring = self.ring.lock().unwrap_or_else(PoisonError::into_inner);
        HistoryReply {
            window_ms: WINDOW_MS,
            interval_ms: INTERVAL.as_millis() as u64,
            total_mb: ring.total_mb,
            reserve_mb: ring.reserve_mb,
            samples: ring.samples.iter().map(Kept::sample).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::ServiceStatus;

    fn sample(at_ms: u64) -> Sample {
        Sample {
            at_ms,
            phase: None,
            services: BTreeMap::new(),
            external_mb: 0,
            reclaiming_mb: 0,
            used_mb: 0,
        }
    }

    #[test]
    fn keeps_fifteen_minutes_and_at_most_its_capacity() {
        let mut ring = Ring::default();
        for second in 0..2000u64 {
            ring.push(sample(second * 1000));
        }
        assert_eq!(ring.samples.len(), 901, "15 min at one a second, both ends");
        assert_eq!(ring.samples.back().unwrap().at_ms, 1_999_000);
        assert_eq!(ring.samples.front().unwrap().at_ms, 1_999_000 - WINDOW_MS);

        let mut dense = Ring::default();
        for ms in 0..(CAPACITY as u64 + 50) {
            dense.push(sample(ms));
        }
        assert_eq!(dense.samples.len(), CAPACITY);
    }

    #[test]
    fn samples_share_one_copy_of_each_name_and_read_back_whole() {
        let mut ring = Ring::default();
        for second in 0..3u64 {
            let mut s = sample(second * 1000);
            s.services =
                BTreeMap::from([("vidi".to_owned(), 4096 + second), ("ollama".to_owned(), 1)]);
            ring.push(s);
        }
        assert_eq!(ring.names.len(), 2);
        let first = &ring.samples[0].services[0].0;
        assert!(ring
            .samples
            .iter()
            .all(|k| Arc::ptr_eq(&k.services[0].0, first)));
        let back = ring.samples[2].sample();
        assert_eq!(back.services["vidi"], 4098);
        assert_eq!(back.services["ollama"], 1);
        assert_eq!(back.at_ms, 2000);
    }

    #[tokio::test(start_paused = true)]
    async fn samples_at_most_once_a_second_and_keeps_the_latest() {
        let (snapshots, receiver) = watch::channel(Status::default());
        let history = History::start(receiver);
        let mut status = Status::default();
        status.vram.total_mb = 24576;
        status.desired.phase = Some(2);
        status.services.insert(
            "vidi".into(),
            ServiceStatus::ready_for_test(4096, 4096, vec![2]),
        );
        // Ten snapshots within 100 ms: one sample now, one for the latest a second on.
        for ms in 1..=10u64 {
            status.observed_at_ms = ms;
            snapshots.send_replace(status.clone());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let reply = history.reply();
        let times: Vec<u64> = reply.samples.iter().map(|s| s.at_ms).collect();
        assert_eq!(times, [1, 10], "{reply:?}");
        assert_eq!(reply.total_mb, 24576);
        assert_eq!(reply.samples[1].services["vidi"], 4096);
        assert_eq!(reply.samples[1].phase, Some(2));
    }
}
