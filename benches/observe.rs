//! How long one full GPU observation (`Gpu::sample`) takes, through the fake
//! libnvidia-ml (NvmlGpu: nvml-wrapper, the C ABI, the folder) and through SimulatedGpu
//! (the folder directly), on a folder holding 4 allocations. The reconciler observes
//! after every action and on each resync; the target is a median under 1 ms through NVML.
//!
//! Run: `cargo build --release -p fake-nvml && cargo bench --bench observe`

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use gpu_manager::observe::gpu::Gpu;
use gpu_manager::observe::nvml::NvmlGpu;
use gpu_manager::observe::simulated::SimulatedGpu;
use sim_gpu::{DeviceSpec, SimGpuDir, ENV_VAR};

const ITERATIONS: usize = 2000;
const WARMUP: usize = 100;
const ALLOCATIONS: u64 = 4;
const TARGET_MEDIAN: Duration = Duration::from_millis(1);

/// A live process to hold an allocation, killed and reaped when dropped.
struct Sleeper(Child);

impl Drop for Sleeper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Timing {
    backend: &'static str,
    median: Duration,
    p99: Duration,
    max: Duration,
}

fn main() {
    let library = fake_library();
    let temp = tempfile::tempdir().expect("a temporary folder");
    let dir = SimGpuDir::create(temp.path(), &device()).expect("a simulated GPU folder");
    let sleepers: Vec<Sleeper> = (0..ALLOCATIONS)
        .map(|_| Sleeper(Command::new("sleep").arg("600").spawn().expect("sleep")))
        .collect();
    for (sleeper, mb) in sleepers.iter().zip((1..).map(|n| n * 1024)) {
        dir.allocate(sleeper.0.id(), mb)
            .expect("room for the allocation");
    }
    std::env::set_var(ENV_VAR, temp.path());

    let nvml = NvmlGpu::open(Some(&library), 0).expect("the fake NVML opens");
    let simulated = SimulatedGpu::open(temp.path()).expect("the folder opens");
    let timings = [
        measure("NVML via fake libnvidia-ml", &nvml),
        measure("SimulatedGpu", &simulated),
    ];
    print_table(&timings);
}

fn device() -> DeviceSpec {
    DeviceSpec {
        name: "Simulated RTX 4090".into(),
        total_mb: 24_576,
        baseline_mb: 700,
        reclaim_ms: 1000,
        temperature_c: 50,
        utilization_pct: 10,
    }
}

/// The fake library built for the same profile as this benchmark.
fn fake_library() -> PathBuf {
    let exe = std::env::current_exe().expect("the benchmark's path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("benchmarks live in <target>/<profile>/deps/");
    let library = profile_dir.join("libnvidia_ml.so");
    if !library.is_file() {
        let release = if profile_dir.ends_with("debug") {
            ""
        } else {
            " --release"
        };
        panic!(
            "{} is missing: run `cargo build -p fake-nvml{release}` first",
            library.display()
        );
    }
    library
}

fn measure(backend: &'static str, gpu: &dyn Gpu) -> Timing {
    let first = gpu.sample().expect("a sample");
    assert_eq!(first.processes.len(), ALLOCATIONS as usize, "{backend}");
    for _ in 0..WARMUP {
        black_box(gpu.sample().expect("a sample"));
    }
    let mut times: Vec<Duration> = (0..ITERATIONS)
        .map(|_| {
            let start = Instant::now();
            black_box(gpu.sample().expect("a sample"));
            start.elapsed()
        })
        .collect();
    times.sort_unstable();
    Timing {
        backend,
        median: percentile(&times, 0.50),
        p99: percentile(&times, 0.99),
        max: times[times.len() - 1],
    }
}

/// Nearest-rank percentile of sorted times.
fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
    let rank = (fraction * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn print_table(timings: &[Timing]) {
    println!(
        "\nobserve: one Gpu::sample() with {ALLOCATIONS} allocations, {ITERATIONS} iterations after {WARMUP} warm-up\n"
    );
    println!(
        "{:<28} {:>12} {:>12} {:>12}",
        "backend", "median", "p99", "max"
    );
    for timing in timings {
        println!(
            "{:<28} {:>12} {:>12} {:>12}",
            timing.backend,
            micros(timing.median),
            micros(timing.p99),
            micros(timing.max)
        );
    }
    let nvml = &timings[0];
    let verdict = if nvml.median < TARGET_MEDIAN {
        "met"
    } else {
        "MISSED"
    };
    println!(
        "\ntarget: {} median < {} µs: {verdict}",
        nvml.backend,
        TARGET_MEDIAN.as_micros()
    );
}

fn micros(duration: Duration) -> String {
    format!("{:.1} µs", duration.as_secs_f64() * 1e6)
}
