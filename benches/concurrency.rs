//! How close a phase change comes to its critical path (docs/ARCHITECTURE.md, "The
//! schedule"): the real daemon (`gpu-manager serve`) on the test harness's simulated
//! 24 GB GPU (300 ms reclaim), with stand-ins of known delays, swapping two running
//! services for two others, back and forth:
//!
//! - "side by side": all four fit together, so the two stops and the two starts run at
//!   once; the critical path is one start.
//! - "after the memory": each start needs a stop's memory; the critical path is a stop,
//!   its reclaim, then a start.
//!
//! Target: wall time <= 1.1 x critical path. Run: `cargo build --release --workspace &&
//! cargo bench --bench concurrency`. It only talks to 127.0.0.1 and stops what it starts.

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use common::{Harness, Standin};
use support::{prepare_phase, Sorted};

const ROUNDS: usize = 6;
const START_MS: u64 = 2000;
const STOP_MS: u64 = 500;
/// The harness's simulated GPU frees a dead process's memory this long after its death.
const RECLAIM_MS: u64 = 300;

fn standin(name: &'static str, vram_mb: u64, priority: i64, phases: &'static str) -> Standin {
    let mut s = Standin::new(name, vram_mb, priority, phases);
    s.start_delay_ms = START_MS;
    s.stop_delay_ms = STOP_MS;
    s
}

fn main() {
    println!("| schedule | actions per change | critical path | sequential | wall time: median (max) | wall / critical path |");
    println!("|---|---|---|---|---|---|");
    scenario("side by side", 4096, START_MS);
    scenario("after the memory", 10240, STOP_MS + RECLAIM_MS + START_MS);
}

/// Phase 1 runs a and b, phase 2 runs c and d, each of `vram_mb`.
fn scenario(name: &str, vram_mb: u64, critical_ms: u64) {
    let mut harness = Harness::new(vec![
        standin("a", vram_mb, 40, "[1]"),
        standin("b", vram_mb, 30, "[1]"),
        standin("c", vram_mb, 20, "[2]"),
        standin("d", vram_mb, 10, "[2]"),
    ]);
    let api = harness.serve("");
    prepare_phase(&api, 1);
    let mut walls = Vec::new();
    for round in 0..ROUNDS {
        let phase = if round % 2 == 0 { 2 } else { 1 };
        let (report, wall) = prepare_phase(&api, phase);
        let actions = report["actions"].as_array().map_or(0, Vec::len);
        assert_eq!(actions, 4, "two stops and two starts: {report}");
        walls.push(wall);
    }
    assert!(harness.oom_log().is_empty(), "OOM: {:?}", harness.oom_log());
    let walls = Sorted::new(walls);
    let median = walls.median();
    let sequential = 2 * (STOP_MS + RECLAIM_MS) + 2 * START_MS;
    println!(
        "| {name} ({vram_mb} MB each) | 4 | {critical_ms} ms | {sequential} ms | {median} ms ({} ms) | {:.3} |",
        walls.max(),
        median as f64 / critical_ms as f64
    );
}
