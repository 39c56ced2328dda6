//! CudaCheckpoint through the fake libcuda (`tests/fake-cuda`) on a `gpu-standin` holding
//! memory in a simulated GPU folder: the daemon's real cuda-checkpoint code path (dlopen,
//! dlsym, the C ABI, the driver's state machine) without a GPU. What the GPU shows is
//! read through the fake libnvidia-ml, as the daemon reads it.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use gpu_manager::act::cuda_checkpoint::{CheckpointError, CudaCheckpoint, ProcessState};
use gpu_manager::doctor::{check_cuda_checkpoint, Outcome};
use gpu_manager::observe::gpu::Gpu as _;
use gpu_manager::observe::nvml::NvmlGpu;
use sim_gpu::{DeviceSpec, SimGpuDir, ENV_VAR};

const LOCK_TIMEOUT: Duration = Duration::from_secs(5);

/// `FAKE_NVML_DIR` is process-wide and the fake libraries read it on every call, so the
/// tests take turns.
static ENV: Mutex<()> = Mutex::new(());

/// A simulated GPU of `total_mb`, named by `FAKE_NVML_DIR` while this lives.
struct SimGpu {
    _turn: MutexGuard<'static, ()>,
    _temp: tempfile::TempDir,
    dir: SimGpuDir,
}

impl SimGpu {
    fn new(total_mb: u64) -> Self {
        let turn = ENV.lock().unwrap_or_else(PoisonError::into_inner);
        let temp = tempfile::tempdir().unwrap();
        let device = DeviceSpec {
            name: "Simulated RTX 4090".into(),
            total_mb,
            baseline_mb: 500,
            reclaim_ms: 60_000,
            temperature_c: 50,
            utilization_pct: 0,
        };
        let dir = SimGpuDir::create(temp.path(), &device).unwrap();
        std::env::set_var(ENV_VAR, temp.path());
        Self {
            _turn: turn,
            _temp: temp,
            dir,
        }
    }

    /// What NVML (the fake libnvidia-ml) lists for `pid`, in MB.
    fn nvml_mb(&self, pid: u32) -> Option<u64> {
        let nvml = NvmlGpu::open(Some(&common::fake_nvml_library()), 0).unwrap();
        let sample = nvml.sample().unwrap();
        sample
            .processes
            .iter()
            .find(|process| process.pid == pid)
            .map(|process| process.used_mb)
    }
}

/// A `gpu-standin` holding `mb` in the folder; killed and reaped when dropped.
struct Standin(Child);

impl Standin {
    fn start(gpu: &SimGpu, mb: u64) -> Self {
        let child = Command::new(common::standin_binary())
            .args([
                "--name",
                "parked",
                "--vram-mb",
                &mb.to_string(),
                "--sim-dir",
            ])
            .arg(gpu.dir.path())
            .spawn()
            .unwrap();
        let standin = Self(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while gpu.dir.checkpoint_view(standin.pid()).unwrap().device_mb != Some(mb) {
            assert!(Instant::now() < deadline, "the stand-in never allocated");
            thread::sleep(Duration::from_millis(10));
        }
        standin
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Standin {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn fake_cuda() -> PathBuf {
    common::built("libcuda.so")
}

/// The fake under the driver's soname, as `gpu.cuda_library`'s default names it.
fn as_libcuda_so_1(folder: &Path) -> PathBuf {
    let link = folder.join("libcuda.so.1");
    std::os::unix::fs::symlink(fake_cuda(), &link).unwrap();
    link
}

#[test]
fn a_checkpoint_frees_the_gpu_and_a_restore_brings_the_memory_back() {
    let gpu = SimGpu::new(24_576);
    let standin = Standin::start(&gpu, 4096);
    let links = tempfile::tempdir().unwrap();
    let cuda = CudaCheckpoint::load(&as_libcuda_so_1(links.path())).unwrap();
    assert_eq!(cuda.driver_version(), Some(12080));
    let pid = standin.pid();
    assert_eq!(cuda.state(pid).unwrap(), ProcessState::Running);
    assert_eq!(gpu.nvml_mb(pid), Some(4096));

    cuda.checkpoint(pid, LOCK_TIMEOUT).unwrap();
    assert_eq!(cuda.state(pid).unwrap(), ProcessState::Checkpointed);
    assert_eq!(gpu.nvml_mb(pid), None, "NVML lists no memory for it");
    assert_eq!(gpu.dir.snapshot().unwrap().used_mb, 500);
    assert_eq!(gpu.dir.host_mb(pid).unwrap(), Some(4096));
    cuda.checkpoint(pid, LOCK_TIMEOUT)
        .expect("checkpointing a checkpointed process changes nothing");

    cuda.restore(pid).unwrap();
    assert_eq!(cuda.state(pid).unwrap(), ProcessState::Running);
    assert_eq!(gpu.nvml_mb(pid), Some(4096));
    assert_eq!(gpu.dir.host_mb(pid).unwrap(), None);
    cuda.restore(pid)
        .expect("restoring a running process changes nothing");
    assert!(gpu.dir.oom_log().unwrap().is_empty());
}

#[test]
fn a_restore_without_room_is_out_of_memory_and_leaves_it_checkpointed() {
    let gpu = SimGpu::new(10_000);
    let parked = Standin::start(&gpu, 6000);
    let cuda = CudaCheckpoint::load(&fake_cuda()).unwrap();
    cuda.checkpoint(parked.pid(), LOCK_TIMEOUT).unwrap();
    let newcomer = Standin::start(&gpu, 4000);

    let error = cuda.restore(parked.pid()).unwrap_err();
    match &error {
        CheckpointError::Driver {
            call,
            pid,
            code,
            name,
        } => {
            assert_eq!(*call, "cuCheckpointProcessRestore");
            assert_eq!(*pid, parked.pid());
            assert_eq!(*code, 2);
            assert_eq!(name, "CUDA_ERROR_OUT_OF_MEMORY");
        }
        other => panic!("expected the driver's out-of-memory, got {other:?}"),
    }
    let message = error.to_string();
    assert!(
        message.contains(&format!("pid {}", parked.pid())) && message.contains("(2)"),
        "{message}"
    );
    assert_eq!(
        cuda.state(parked.pid()).unwrap(),
        ProcessState::Checkpointed
    );
    assert_eq!(gpu.dir.oom_log().unwrap().len(), 1);
    assert_eq!(
        gpu.nvml_mb(newcomer.pid()),
        Some(4000),
        "the newcomer keeps its memory"
    );

    gpu.dir.release(newcomer.pid()).unwrap();
    cuda.restore(parked.pid())
        .expect("once the footprint is free again");
    assert_eq!(gpu.nvml_mb(parked.pid()), Some(6000));
}

/// Locked by someone else (`cuda-checkpoint --action lock`), or left locked by a resume
/// cut short between its restore and its unlock: a park only checkpoints it, a resume
/// only unlocks it.
#[test]
fn a_locked_process_is_only_checkpointed_or_only_unlocked() {
    let gpu = SimGpu::new(24_576);
    let standin = Standin::start(&gpu, 2048);
    let cuda = CudaCheckpoint::load(&fake_cuda()).unwrap();
    let pid = standin.pid();
    gpu.dir.set_locked(pid, true).unwrap();
    assert_eq!(cuda.state(pid).unwrap(), ProcessState::Locked);
    cuda.restore(pid).unwrap();
    assert_eq!(cuda.state(pid).unwrap(), ProcessState::Running);
    assert_eq!(gpu.nvml_mb(pid), Some(2048), "nothing was restored");

    gpu.dir.set_locked(pid, true).unwrap();
    cuda.checkpoint(pid, LOCK_TIMEOUT).unwrap();
    assert_eq!(cuda.state(pid).unwrap(), ProcessState::Checkpointed);
    assert_eq!(gpu.nvml_mb(pid), None);
}

#[test]
fn a_process_without_cuda_is_an_error_naming_the_call_the_pid_and_the_code() {
    let _gpu = SimGpu::new(24_576);
    let cuda = CudaCheckpoint::load(&fake_cuda()).unwrap();
    let me = std::process::id();
    let error = cuda.checkpoint(me, LOCK_TIMEOUT).unwrap_err();
    assert_eq!(
        error.to_string(),
        format!("cuCheckpointProcessGetState for pid {me} failed: CUDA_ERROR_NOT_INITIALIZED (3)")
    );
}

#[test]
fn a_driver_older_than_570_is_unavailable_and_says_so() {
    let _gpu = SimGpu::new(24_576);
    let library = common::built("libcuda_r550.so");
    let error = CudaCheckpoint::load(&library).unwrap_err();
    assert!(
        matches!(error, CheckpointError::Unavailable { .. }),
        "{error:?}"
    );
    let message = error.to_string();
    for part in [
        "cuCheckpointProcessGetState",
        "driver 570 or newer",
        "CUDA 12.8",
        "CUDA 12.4 (12040)",
    ] {
        assert!(message.contains(part), "{part:?} missing from: {message}");
    }
    let finding = check_cuda_checkpoint(&library);
    assert_eq!(finding.status, Outcome::Warn);
    assert!(finding.detail.contains("570"), "{}", finding.detail);
    assert!(finding.fix.unwrap().contains("gpu.cuda_library"));
}

#[test]
fn a_missing_library_is_unavailable() {
    let missing = Path::new("/nonexistent/libcuda.so.1");
    let error = CudaCheckpoint::load(missing).unwrap_err();
    let CheckpointError::Unavailable { library, reason } = &error else {
        panic!("expected Unavailable, got {error:?}");
    };
    assert_eq!(library, missing);
    assert!(reason.contains("cannot be loaded"), "{reason}");
    assert!(error.to_string().contains("/nonexistent/libcuda.so.1"));
}

#[test]
fn without_a_gpu_cuinit_fails_and_checkpointing_is_unavailable() {
    let gpu = SimGpu::new(24_576);
    std::env::remove_var(ENV_VAR);
    let error = CudaCheckpoint::load(&fake_cuda()).unwrap_err();
    assert!(
        error
            .to_string()
            .contains("cuInit failed: CUDA_ERROR_NO_DEVICE (100)"),
        "{error}"
    );
    std::env::set_var(ENV_VAR, gpu.dir.path());
    let finding = check_cuda_checkpoint(&fake_cuda());
    assert_eq!(finding.status, Outcome::Pass, "{}", finding.detail);
    assert!(finding.detail.contains("CUDA 12.8"), "{}", finding.detail);
}
