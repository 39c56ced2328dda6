//! NvmlGpu, loading the fake libnvidia-ml built from `tests/fake-nvml`, must report
//! exactly what SimulatedGpu reads from the same simulated GPU folder: this runs the
//! daemon's real NVML code path (nvml-wrapper's safe API over the C ABI) without a GPU.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::Duration;

use gpu_manager::observe::gpu::{Gpu, GpuError, GpuProcess, GpuSample};
use gpu_manager::observe::nvml::NvmlGpu;
use gpu_manager::observe::simulated::SimulatedGpu;
use sim_gpu::{DeviceSpec, SimGpuDir, ENV_VAR};

const RECLAIM_MS: u64 = 1500;

/// `FAKE_NVML_DIR` is process-wide and the fake library reads it on every call, so the
/// tests that use it take turns.
static ENV: Mutex<()> = Mutex::new(());

fn use_folder(dir: &Path) -> MutexGuard<'static, ()> {
    let turn = ENV.lock().unwrap_or_else(PoisonError::into_inner);
    std::env::set_var(ENV_VAR, dir);
    turn
}

/// The fake library next to the test binaries: they live in `<target>/<profile>/deps/`
/// and the workspace's cdylib in `<target>/<profile>/`.
fn fake_library() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binaries live in <target>/<profile>/deps/");
    let library = profile_dir.join("libnvidia_ml.so");
    assert!(
        library.is_file(),
        "{} is missing: run `cargo build --workspace` first (cargo test does not build the \
         fake-nvml cdylib, and rebuild it after changing tests/fake-nvml or crates/sim-gpu)",
        library.display()
    );
    library
}

fn device() -> DeviceSpec {
    DeviceSpec {
        name: "Simulated RTX 4090".into(),
        total_mb: 24_576,
        baseline_mb: 700,
        reclaim_ms: RECLAIM_MS,
        temperature_c: 61,
        utilization_pct: 42,
    }
}

/// A live process, killed and reaped when dropped.
struct Sleeper(Child);

impl Sleeper {
    fn spawn() -> Self {
        Self(Command::new("sleep").arg("60").spawn().unwrap())
    }
}

impl Drop for Sleeper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn dead_pid() -> u32 {
    let mut child = Command::new("true").spawn().unwrap();
    child.wait().unwrap();
    child.id()
}

fn sorted(mut processes: Vec<GpuProcess>) -> Vec<GpuProcess> {
    processes.sort_by_key(|process| process.pid);
    processes
}

#[test]
fn nvml_through_the_fake_reports_what_the_folder_holds() {
    let temp = tempfile::tempdir().unwrap();
    let dir = SimGpuDir::create(temp.path(), &device()).unwrap();
    let (comfyui, cosyvoice, crashed) = (Sleeper::spawn(), Sleeper::spawn(), dead_pid());
    dir.allocate(comfyui.0.id(), 4096).unwrap();
    dir.allocate(cosyvoice.0.id(), 2048).unwrap();
    dir.allocate(crashed, 1024).unwrap();
    let _turn = use_folder(temp.path());
    let nvml = NvmlGpu::open(Some(&fake_library()), 0).unwrap();
    let simulated = SimulatedGpu::open(temp.path()).unwrap();
    let live = [
        GpuProcess {
            pid: comfyui.0.id(),
            used_mb: 4096,
        },
        GpuProcess {
            pid: cosyvoice.0.id(),
            used_mb: 2048,
        },
    ];

    let during_reclaim = nvml.sample().unwrap();
    let crashed_process = GpuProcess {
        pid: crashed,
        used_mb: 1024,
    };
    let expected = GpuSample {
        name: "Simulated RTX 4090".into(),
        total_mb: 24_576,
        used_mb: 700 + 4096 + 2048 + 1024,
        free_mb: 24_576 - 700 - 4096 - 2048 - 1024,
        temperature_c: Some(61),
        utilization_pct: Some(42),
        processes: sorted([&live[..], &[crashed_process]].concat()),
    };
    assert_eq!(
        during_reclaim, expected,
        "the dead process's memory is held"
    );
    assert_eq!(simulated.sample().unwrap(), during_reclaim);

    thread::sleep(Duration::from_millis(RECLAIM_MS + 100));
    let after_reclaim = nvml.sample().unwrap();
    let expected = GpuSample {
        used_mb: 700 + 4096 + 2048,
        free_mb: 24_576 - 700 - 4096 - 2048,
        processes: sorted(live.to_vec()),
        ..expected
    };
    assert_eq!(after_reclaim, expected, "the dead process's memory is back");
    assert_eq!(simulated.sample().unwrap(), after_reclaim);
}

#[test]
fn a_missing_library_is_library_missing() {
    let library = Path::new("/nonexistent/libnvidia-ml.so.1");
    match NvmlGpu::open(Some(library), 0) {
        Err(GpuError::LibraryMissing { library: named, .. }) => {
            assert_eq!(named, library.display().to_string())
        }
        other => panic!("expected LibraryMissing, got {:?}", other.err()),
    }
}

#[test]
fn the_fake_without_a_folder_answers_driver_not_loaded() {
    let temp = tempfile::tempdir().unwrap();
    let _turn = use_folder(&temp.path().join("nowhere"));
    match NvmlGpu::open(Some(&fake_library()), 0) {
        Err(GpuError::Call { call, detail }) => {
            assert_eq!(call, "nvmlInit_v2");
            assert!(detail.contains("driver is not loaded"), "{detail}");
        }
        other => panic!("expected a failed nvmlInit_v2, got {:?}", other.err()),
    }
}

#[test]
fn an_index_beyond_the_gpus_is_no_such_device() {
    let temp = tempfile::tempdir().unwrap();
    SimGpuDir::create(temp.path(), &device()).unwrap();
    let _turn = use_folder(temp.path());
    match NvmlGpu::open(Some(&fake_library()), 1) {
        Err(GpuError::NoSuchDevice { index, count }) => assert_eq!((index, count), (1, 1)),
        other => panic!("expected NoSuchDevice, got {:?}", other.err()),
    }
}
