//! Warm parking against cold starts (issue 10, "Measured"): the real daemon (`gpu-manager
//! serve`) on the test harness's simulated 24 GB GPU (300 ms reclaim) with the
//! requirements' inventory (ComfyUI 20 GB phase 4, CosyVoice 4 GB phase 3, Vidi 4 GB
//! phase 2), stand-ins modelling a 5 s cold start and a 0.3 s wake. A warm-up 2 -> 3 -> 2
//! (every service has run once, as in a pipeline that goes through its phases again and
//! again), then the round trip 2 -> 3 -> 2 -> 3 through `POST /gpu/prepare-phase/N`, each
//! answer timed:
//!
//! - "parked": CosyVoice and Vidi park over HTTP keeping 512 MB, so the phase they leave
//!   parks them and the phase they come back to resumes them;
//! - "cold": the same services without `park:`, stopped and started.
//!
//! The warm-up's first transition to 3 pays CosyVoice's cold start in both modes (it has
//! never run, so nothing is parked yet): it is timed apart, as the first visit. Targets: each resume (its action's `duration_ms`) <= wake + 100 ms; the round trip
//! parked <= 0.2 x cold. The modes alternate, `REPETITIONS` times each, and medians are
//! reported. Run: `cargo build --release --workspace && cargo bench --bench parking`. It
//! only talks to 127.0.0.1 and stops what it starts.

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use serde_json::Value;

use common::{mcn_inventory, Harness, Standin};
use support::{prepare_phase, Sorted};

const REPETITIONS: usize = 3;
const COLD_START_MS: u64 = 5000;
const WAKE_MS: u64 = 300;
/// What a resume may take beyond the wake itself.
const RESUME_MARGIN_MS: u64 = 100;
const RESIDUAL_MB: u64 = 512;
const TARGET_RATIO: f64 = 0.2;
/// After phase 2: the warm-up's 3 and 2, then the round trip's 3, 2, 3.
const WARM_UP: [u32; 2] = [3, 2];
const ROUND_TRIP: [u32; 3] = [3, 2, 3];

/// One run: the first visit to phase 3 (a cold start in both modes), each timed
/// transition's wall time (ms), and the resumes' `duration_ms`.
struct RoundTrip {
    first_visit: u64,
    walls: Vec<u64>,
    resumes: Vec<u64>,
}

impl RoundTrip {
    fn total(&self) -> u64 {
        self.walls.iter().sum()
    }

    fn first_visit(&self) -> u64 {
        self.first_visit
    }
}

/// The requirements' services of phases 2 to 4 (Ollama belongs to none), each with a
/// 5 s cold start; with `parking`, CosyVoice and Vidi park over HTTP.
fn inventory(parking: bool) -> Vec<Standin> {
    mcn_inventory()
        .into_iter()
        .filter(|s| s.name != "ollama")
        .map(|mut s| {
            s.start_delay_ms = COLD_START_MS;
            if parking && s.name != "comfyui" {
                s.parking_over_http(RESIDUAL_MB, WAKE_MS)
            } else {
                s
            }
        })
        .collect()
}

fn round_trip(parking: bool) -> RoundTrip {
    let mut harness = Harness::new(inventory(parking));
    let api = harness.serve("");
    prepare_phase(&api, 2);
    let (_, first_visit) = prepare_phase(&api, WARM_UP[0]);
    prepare_phase(&api, WARM_UP[1]);
    let mut trip = RoundTrip {
        first_visit,
        walls: Vec::new(),
        resumes: Vec::new(),
    };
    for phase in ROUND_TRIP {
        let (report, wall) = prepare_phase(&api, phase);
        let actions = report["actions"].as_array().expect("actions");
        let op = |a: &Value| a["op"].as_str().unwrap_or_default().to_owned();
        let mut ops: Vec<String> = actions.iter().map(op).collect();
        ops.sort();
        // What each mode is meant to measure; anything else (a park that fell back to a
        // stop, a restart instead of a resume) would make the figures mean something else.
        let expected = match parking {
            false => ["start", "stop"],
            true => ["park", "resume"],
        };
        assert_eq!(ops, expected, "phase {phase}: {report}");
        trip.resumes.extend(
            actions
                .iter()
                .filter(|a| a["op"] == "resume")
                .map(|a| a["duration_ms"].as_u64().expect("duration_ms")),
        );
        trip.walls.push(wall);
    }
    assert!(harness.oom_log().is_empty(), "OOM: {:?}", harness.oom_log());
    trip
}

/// "median ms (max ms)" of some samples.
fn cell(samples: impl Iterator<Item = u64>) -> String {
    let sorted = Sorted::new(samples.collect());
    format!("{} ms ({} ms)", sorted.median(), sorted.max())
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "missed"
    }
}

fn main() {
    let mut parked = Vec::new();
    let mut cold = Vec::new();
    // Alternated, so that whatever else loads this machine weighs on both modes alike.
    for _ in 0..REPETITIONS {
        parked.push(round_trip(true));
        cold.push(round_trip(false));
    }

    println!(
        "Round trip 2 -> 3 -> 2 -> 3 after a warm-up 2 -> 3 -> 2: the wall times of the \
         answers to POST /gpu/prepare-phase/3, /2, /3. The first visit to 3 (in the \
         warm-up) pays CosyVoice's {COLD_START_MS} ms cold start in both modes (nothing is \
         parked yet). {REPETITIONS} repetitions of each mode, alternated: median (max).\n"
    );
    println!("| mode | first visit to 3 | -> 3 | -> 2 | -> 3 | round trip |");
    println!("|---|---|---|---|---|---|");
    for (mode, trips) in [("parked", &parked), ("cold", &cold)] {
        let leg = |i: usize| cell(trips.iter().map(|t| t.walls[i]));
        println!(
            "| {mode} | {} | {} | {} | {} | {} |",
            cell(trips.iter().map(RoundTrip::first_visit)),
            leg(0),
            leg(1),
            leg(2),
            cell(trips.iter().map(RoundTrip::total)),
        );
    }

    let median = |trips: &[RoundTrip], f: fn(&RoundTrip) -> u64| {
        Sorted::new(trips.iter().map(f).collect()).median() as f64
    };
    let ratio = median(&parked, RoundTrip::total) / median(&cold, RoundTrip::total);
    let resumes = Sorted::new(parked.iter().flat_map(|t| t.resumes.clone()).collect());
    let resume_limit = WAKE_MS + RESUME_MARGIN_MS;

    println!("\n| measure | target | measured | |");
    println!("|---|---|---|---|");
    println!(
        "| each resume: its action's duration_ms, {} resumes | <= {resume_limit} ms ({WAKE_MS} ms wake + {RESUME_MARGIN_MS} ms) | median {} ms, max {} ms | {} |",
        resumes.len(),
        resumes.median(),
        resumes.max(),
        verdict(resumes.max() <= resume_limit)
    );
    println!(
        "| round trip 2 -> 3 -> 2 -> 3: parked / cold (medians) | <= {TARGET_RATIO} | {ratio:.3} | {} |",
        verdict(ratio <= TARGET_RATIO)
    );
}
