//! The daemon runs for months: a soak through its HTTP API, as a black box. Stand-ins
//! with 100 ms start and stop delays go through many phase transitions on the simulated
//! 24 GB GPU, while services are killed (crashes), frozen until their health checks fail,
//! and 100 event-stream clients connect and leave. The daemon's memory, fds, threads,
//! zombie children and status size must stay flat, nothing may hit OOM, and the last
//! desired state must be the one served.
//!
//! Both are ignored by a plain `cargo test`, as they take minutes. `soak_in_ci` (1,000
//! transitions) is run by `tests/run.sh`, so by CI; `soak_long` (`SOAK_TRANSITIONS`,
//! default 10,000) is the longer run for the README's Measured section:
//! `cargo build --workspace && cargo test --test soak soak_long -- --ignored --nocapture`.

mod common;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use common::api::{Api, EventStream};
use common::process_stats::{usage, zombie_children, Usage};
use common::{Harness, Standin};
use sim_gpu::{DeviceSpec, SimGpuDir};

/// Three services, one per phase, so every transition stops one and starts another.
const PHASES: [(u32, &str); 3] = [(2, "vidi"), (3, "cosyvoice"), (4, "comfyui")];
const SSE_CLIENTS: usize = 100;
/// At most this many event-stream clients are connected at once.
const SSE_OPEN_AT_ONCE: usize = 10;
const CRASHES: usize = 10;
const HEALTH_FAILURES: usize = 5;
/// Readings in the table.
const SAMPLES: usize = 10;

/// How much the daemon may grow between the first reading after warm-up and the last.
const RSS_MARGIN_KB: u64 = 6 * 1024;
/// A long soak holds its memory within `SETTLED_MARGIN_KB` of what it held after this
/// many transitions: past them, any growth is a leak (or the allocator keeping what
/// was freed, see src/memory.rs).
const SETTLED_AT: usize = 1000;
const SETTLED_MARGIN_KB: u64 = 1024;
const FD_MARGIN: usize = 4;
/// The blocking pool's idle threads linger for 10 s after a burst.
const THREAD_MARGIN: usize = 8;
const STATUS_MAX_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, Copy)]
struct Sample {
    transitions: usize,
    elapsed: Duration,
    usage: Usage,
    status_bytes: usize,
}

#[test]
#[ignore = "minutes long: tests/run.sh runs it"]
fn soak_in_ci() {
    soak(1000);
}

#[test]
#[ignore = "the longer soak for the README: SOAK_TRANSITIONS=N (default 10000)"]
fn soak_long() {
    let transitions = std::env::var("SOAK_TRANSITIONS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(10_000);
    soak(transitions);
}

fn soak(transitions: usize) {
    let mut h = Harness::new(
        PHASES
            .iter()
            .zip([40, 50, 100])
            .map(|((phase, name), priority)| {
                let phases: &'static str = Box::leak(format!("[{phase}]").into_boxed_str());
                let mut s = Standin::new(name, 4096, priority, phases);
                s.start_delay_ms = 100;
                s.stop_delay_ms = 100;
                // A frozen service is killed soon after its health checks fail.
                s.stop_timeout_ms = 500;
                s
            })
            .collect(),
    );
    // Memory comes back 20 ms after a process exits, so that a transition costs about
    // the stand-ins' own 200 ms.
    h.gpu = SimGpuDir::create(
        h.gpu.path(),
        &DeviceSpec {
            reclaim_ms: 20,
            ..h.gpu.device().unwrap()
        },
    )
    .unwrap();
    let api = h.serve("");
    let daemon = h.daemon.as_ref().expect("daemon").id();
    let started = Instant::now();
    let mut sse: VecDeque<EventStream> = VecDeque::new();
    let mut sse_opened = 0;
    let mut samples = Vec::new();
    let sample_every = (transitions / SAMPLES).max(1);
    let crash_every = (transitions / CRASHES).max(1);
    let freeze_every = (transitions / HEALTH_FAILURES).max(1);
    let sse_every = (transitions / SSE_CLIENTS).max(1);
    let mut last_phase = 0;

    for i in 1..=transitions {
        let (phase, service) = PHASES[i % PHASES.len()];
        let reply = api.post(&format!("/gpu/prepare-phase/{phase}"));
        assert_eq!(
            reply.code, 200,
            "transition {i} to phase {phase}: {}",
            reply.body
        );
        last_phase = phase;
        assert!(
            h.is_ready(service),
            "transition {i}: {service} serves phase {phase}"
        );

        if i % crash_every == crash_every / 2 {
            crash(&h, &api, service);
        }
        if i % freeze_every == freeze_every / 3 {
            fail_health(&h, &api, service);
        }
        if i % sse_every == 0 && sse_opened < SSE_CLIENTS {
            sse.push_back(api.events());
            sse_opened += 1;
            if sse.len() > SSE_OPEN_AT_ONCE {
                sse.pop_front();
            }
        }
        if i % sample_every == 0 || i == 1 {
            samples.push(Sample {
                transitions: i,
                elapsed: started.elapsed(),
                usage: usage(daemon),
                status_bytes: api.get("/gpu/status").body.len(),
            });
        }
    }
    // The last clients leave; the daemon must close their connections. Idle blocking
    // threads end after 10 s.
    sse.clear();
    std::thread::sleep(Duration::from_secs(11));
    samples.push(Sample {
        transitions,
        elapsed: started.elapsed(),
        usage: usage(daemon),
        status_bytes: api.get("/gpu/status").body.len(),
    });
    print_table(&samples);

    // Warm-up: the first tenth fills the action history and the allocator's pools.
    let warm = samples[1.min(samples.len() - 1)];
    let last = *samples.last().unwrap();
    assert!(
        last.usage.rss_kb <= warm.usage.rss_kb + RSS_MARGIN_KB,
        "RSS grew from {} to {} KB",
        warm.usage.rss_kb,
        last.usage.rss_kb
    );
    let settled = samples
        .iter()
        .find(|s| s.transitions >= SETTLED_AT)
        .filter(|_| last.transitions >= 2 * SETTLED_AT);
    if let Some(settled) = settled {
        assert!(
            last.usage.rss_kb <= settled.usage.rss_kb + SETTLED_MARGIN_KB,
            "RSS grew from {} KB after {} transitions to {} KB after {}",
            settled.usage.rss_kb,
            settled.transitions,
            last.usage.rss_kb,
            last.transitions
        );
    }
    assert!(
        last.usage.fds <= warm.usage.fds + FD_MARGIN,
        "fds grew: {warm:?} -> {last:?}"
    );
    assert!(
        last.usage.threads <= warm.usage.threads + THREAD_MARGIN,
        "threads grew: {warm:?} -> {last:?}"
    );
    assert!(
        samples.iter().all(|s| s.status_bytes <= STATUS_MAX_BYTES),
        "status stays bounded: {samples:?}"
    );
    assert!(
        zombie_children(daemon).is_empty(),
        "no zombie children at the end"
    );
    assert!(h.oom_log().is_empty(), "OOM: {:?}", h.oom_log());

    // No lost desired state: the file, the status and what runs all say the last phase.
    let file = std::fs::read_to_string(h.path("desired-state/state.yaml")).unwrap();
    assert!(file.contains(&format!("phase: {last_phase}")), "{file}");
    let status = api.status();
    assert_eq!(status["desired"]["phase"], last_phase, "{status}");
    assert_eq!(
        status["desired"]["generation"], status["desired"]["converged_generation"],
        "{status}"
    );
    let serving = PHASES.iter().find(|(p, _)| *p == last_phase).unwrap().1;
    h.wait_converged(&[serving]);
}

/// Kills the service with SIGKILL, as a crash would, and waits until the daemon has
/// started it again.
fn crash(h: &Harness, api: &Api, service: &str) {
    let pid = main_pid(api, service);
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    h.wait_until(&format!("{service} restarted after a crash"), |h| {
        h.is_ready(service)
            && api.status()["services"][service]["pids"][0].as_u64() != Some(pid.into())
    });
    api.wait_state(service, "ready");
}

/// Freezes the service (SIGSTOP) until its health checks fail, then thaws it; waits until
/// it is ready again, restarted or recovered.
fn fail_health(h: &Harness, api: &Api, service: &str) {
    let pid = main_pid(api, service);
    kill(Pid::from_raw(pid as i32), Signal::SIGSTOP).unwrap();
    h.wait_until(&format!("{service}'s health checks fail"), |_| {
        api.state(service) != "ready"
    });
    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGCONT);
    api.wait_state(service, "ready");
    h.wait_until(&format!("{service} answers again"), |h| h.is_ready(service));
}

fn main_pid(api: &Api, service: &str) -> u32 {
    let status = api.status();
    status["services"][service]["pids"][0]
        .as_u64()
        .unwrap_or_else(|| panic!("{service} has a pid: {status}")) as u32
}

fn print_table(samples: &[Sample]) {
    println!(
        "| transitions | elapsed | RSS | of it anonymous | fds | threads | zombies | status |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for s in samples {
        println!(
            "| {} | {:.0} s | {:.1} MB | {:.1} MB | {} | {} | {} | {:.1} KB |",
            s.transitions,
            s.elapsed.as_secs_f64(),
            s.usage.rss_kb as f64 / 1024.0,
            s.usage.rss_anon_kb as f64 / 1024.0,
            s.usage.fds,
            s.usage.threads,
            s.usage.zombies,
            s.status_bytes as f64 / 1024.0
        );
    }
}
