//! What the benches that drive `gpu-manager serve` share: a timed phase change through
//! the API, and samples read at quantiles.
#![allow(dead_code)] // each bench uses a different part

use std::time::Instant;

use serde_json::Value;

use crate::common::api::Api;

/// `POST /gpu/prepare-phase/N`: the transition's report (which must be a 200) and the
/// wall time from the request to its answer, in ms.
pub fn prepare_phase(api: &Api, phase: u32) -> (Value, u64) {
    let asked = Instant::now();
    let reply = api.post(&format!("/gpu/prepare-phase/{phase}"));
    let wall = asked.elapsed().as_millis() as u64;
    assert_eq!(reply.code, 200, "phase {phase}: {}", reply.body);
    (reply.json(), wall)
}

/// Samples sorted once, read at quantiles by nearest rank.
pub struct Sorted<T>(Vec<T>);

impl<T: Copy + PartialOrd + std::fmt::Debug> Sorted<T> {
    pub fn new(mut samples: Vec<T>) -> Self {
        assert!(!samples.is_empty(), "no samples");
        samples.sort_by(|a, b| a.partial_cmp(b).expect("comparable samples"));
        Self(samples)
    }

    pub fn at(&self, quantile: f64) -> T {
        self.0[((self.0.len() - 1) as f64 * quantile).round() as usize]
    }

    pub fn median(&self) -> T {
        self.at(0.5)
    }

    pub fn max(&self) -> T {
        self.at(1.0)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }
}

/// The machine's load average (1, 5 and 15 minutes) as /proc/loadavg gives it, to print
/// beside the numbers: these benches share a small machine with builds.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|_| "unknown".to_owned())
}
