//! `park: {kind: cuda-checkpoint}`: moving a whole CUDA process's device memory to host
//! memory and back, through the CUDA driver API's checkpoint calls (CUDA 12.8, driver
//! 570; docs/ARCHITECTURE.md, "cuda-checkpoint").
//!
//! The driver library is loaded at run time from the path the config gives
//! (`gpu.cuda_library`, `libcuda.so.1` by default), so the daemon builds and runs without
//! CUDA; a host whose driver lacks the checkpoint symbols gets [`CheckpointError::Unavailable`]
//! and its services are stopped instead of parked. Loaded with `libloading`, already in
//! the tree through nvml-wrapper: it closes the library on drop and resolves each symbol
//! to a typed function pointer, with dlerror's text on failure.
//!
//! Every call blocks (a lock waits for the process's submitted GPU work; a checkpoint
//! or restore copies gigabytes): run them on the blocking pool.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use libloading::Library;

/// `CUresult`, a C enum: an `int` on every ABI CUDA supports.
type CuResult = c_int;

const CUDA_SUCCESS: CuResult = 0;

/// `cuDriverGetVersion` of the first driver with the checkpoint API (570: CUDA 12.8).
const CHECKPOINT_DRIVER_VERSION: c_int = 12080;

/// `CUcheckpointLockArgs` from cuda.h (CUDA 12.8 and later): reserved fields zeroed.
#[repr(C)]
struct LockArgs {
    timeout_ms: c_uint,
    reserved0: c_uint,
    reserved1: [u64; 7],
}

type InitFn = unsafe extern "C" fn(c_uint) -> CuResult;
type DriverGetVersionFn = unsafe extern "C" fn(*mut c_int) -> CuResult;
type GetErrorNameFn = unsafe extern "C" fn(CuResult, *mut *const c_char) -> CuResult;
type GetStateFn = unsafe extern "C" fn(c_int, *mut c_int) -> CuResult;
type LockFn = unsafe extern "C" fn(c_int, *mut LockArgs) -> CuResult;
/// Checkpoint, restore and unlock: their optional args are passed as null, which asks for
/// the defaults (host memory, the same GPUs).
type PidFn = unsafe extern "C" fn(c_int, *mut c_void) -> CuResult;

/// A process's state for the checkpoint API (`CUprocessState`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessState {
    /// Making CUDA calls: its memory is on the GPU.
    Running,
    /// Its CUDA calls block; its memory is still on the GPU.
    Locked,
    /// Its memory is in host RAM and it holds nothing on the GPU.
    Checkpointed,
    /// An uncorrectable error during a checkpoint or a restore: only a restart helps.
    Failed,
    /// A checkpoint to custom storage is under way (CUDA 13).
    Checkpointing,
    /// A restore from custom storage is under way (CUDA 13).
    Restoring,
}

impl ProcessState {
    fn from_raw(value: c_int) -> Option<Self> {
        Some(match value {
            0 => Self::Running,
            1 => Self::Locked,
            2 => Self::Checkpointed,
            3 => Self::Failed,
            4 => Self::Checkpointing,
            5 => Self::Restoring,
            _ => return None,
        })
    }
}

impl fmt::Display for ProcessState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Running => "running",
            Self::Locked => "locked",
            Self::Checkpointed => "checkpointed",
            Self::Failed => "failed",
            Self::Checkpointing => "checkpointing",
            Self::Restoring => "restoring",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// No usable checkpoint API in this library: it is missing, is no CUDA driver, lacks
    /// the symbols (a driver older than 570), or `cuInit` failed (no GPU).
    #[error("CUDA checkpointing is unavailable through {}: {reason}", library.display())]
    Unavailable { library: PathBuf, reason: String },
    /// A driver call answered an error.
    #[error("{call} for pid {pid} failed: {name} ({code})")]
    Driver {
        call: &'static str,
        pid: u32,
        code: i32,
        name: String,
    },
    #[error("pid {pid} is {state}: it cannot be {wanted}")]
    WrongState {
        pid: u32,
        state: ProcessState,
        wanted: &'static str,
    },
    #[error("cuCheckpointProcessGetState for pid {pid} answered {value}, which is no CUprocessState this daemon knows")]
    UnknownState { pid: u32, value: i32 },
    /// The checkpoint failed after the lock, and the unlock meant to leave the process
    /// running failed too: its CUDA calls stay blocked until someone unlocks it.
    #[error("{checkpoint}; the unlock after it failed too, so pid {pid} stays locked: {unlock}")]
    LeftLocked {
        pid: u32,
        checkpoint: Box<CheckpointError>,
        unlock: Box<CheckpointError>,
    },
    #[error("pid {pid} cannot be passed to the CUDA driver (above i32::MAX)")]
    PidOutOfRange { pid: u32 },
}

/// The checkpoint API of one loaded CUDA driver library.
pub struct CudaCheckpoint {
    driver_version: Option<i32>,
    get_error_name: Option<GetErrorNameFn>,
    get_state: GetStateFn,
    lock: LockFn,
    checkpoint: PidFn,
    restore: PidFn,
    unlock: PidFn,
    /// Keeps the function pointers above valid: dropped last, it closes the library.
    _library: Library,
}

impl fmt::Debug for CudaCheckpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CudaCheckpoint")
            .field("driver_version", &self.driver_version)
            .finish_non_exhaustive()
    }
}

impl CudaCheckpoint {
    /// Loads `library`, finds the checkpoint API in it and calls `cuInit`, which a
    /// restore needs in the calling process unless persistence mode is on. `cuInit`
    /// creates no context, so the daemon holds no GPU memory for it.
    pub fn load(library: &Path) -> Result<Self, CheckpointError> {
        let unavailable = |reason: String| CheckpointError::Unavailable {
            library: library.to_path_buf(),
            reason,
        };
        // SAFETY: loading runs the library's initialisers; a CUDA driver's (or the fake's)
        // have no preconditions.
        let handle = unsafe { Library::new(library) }
            .map_err(|error| unavailable(format!("cannot be loaded: {error}")))?;
        let basic = |name: &str, error: libloading::Error| {
            unavailable(format!("not a CUDA driver library: {name}: {error}"))
        };
        // SAFETY: each symbol is declared with its signature from cuda.h.
        let (init, driver_get_version) = unsafe {
            (
                *handle
                    .get::<InitFn>(b"cuInit\0")
                    .map_err(|e| basic("cuInit", e))?,
                *handle
                    .get::<DriverGetVersionFn>(b"cuDriverGetVersion\0")
                    .map_err(|e| basic("cuDriverGetVersion", e))?,
            )
        };
        let mut version = 0;
        // SAFETY: a valid out-pointer.
        let driver_version =
            (unsafe { driver_get_version(&mut version) } == CUDA_SUCCESS).then_some(version);
        let missing = |name: &str| {
            let found = driver_version.map_or_else(
                || "its version is unknown".to_owned(),
                |version| format!("it supports CUDA {} ({version})", cuda_release(version)),
            );
            unavailable(format!(
                "the driver has no {name}: the checkpoint API needs NVIDIA driver 570 or newer \
                 (CUDA {}), and {found}",
                cuda_release(CHECKPOINT_DRIVER_VERSION)
            ))
        };
        // SAFETY: each symbol is declared with its signature from cuda.h, and the
        // pointers are kept only beside the library that holds them.
        let api = unsafe {
            let get_error_name = handle
                .get::<GetErrorNameFn>(b"cuGetErrorName\0")
                .ok()
                .map(|symbol| *symbol);
            let get_state = *handle
                .get::<GetStateFn>(b"cuCheckpointProcessGetState\0")
                .map_err(|_| missing("cuCheckpointProcessGetState"))?;
            let lock = *handle
                .get::<LockFn>(b"cuCheckpointProcessLock\0")
                .map_err(|_| missing("cuCheckpointProcessLock"))?;
            let checkpoint = *handle
                .get::<PidFn>(b"cuCheckpointProcessCheckpoint\0")
                .map_err(|_| missing("cuCheckpointProcessCheckpoint"))?;
            let restore = *handle
                .get::<PidFn>(b"cuCheckpointProcessRestore\0")
                .map_err(|_| missing("cuCheckpointProcessRestore"))?;
            let unlock = *handle
                .get::<PidFn>(b"cuCheckpointProcessUnlock\0")
                .map_err(|_| missing("cuCheckpointProcessUnlock"))?;
            Self {
                driver_version,
                get_error_name,
                get_state,
                lock,
                checkpoint,
                restore,
                unlock,
                _library: handle,
            }
        };
        // SAFETY: no pointers.
        let code = unsafe { init(0) };
        if code != CUDA_SUCCESS {
            return Err(unavailable(format!(
                "cuInit failed: {} ({code}); a restore needs it",
                api.error_name(code)
            )));
        }
        Ok(api)
    }

    /// What `cuDriverGetVersion` reported: 1000 * major + 10 * minor of the CUDA version
    /// the driver supports (12080 for driver 570).
    pub fn driver_version(&self) -> Option<i32> {
        self.driver_version
    }

    pub fn state(&self, pid: u32) -> Result<ProcessState, CheckpointError> {
        let mut value = -1;
        // SAFETY: a valid out-pointer.
        self.call("cuCheckpointProcessGetState", pid, |pid| unsafe {
            (self.get_state)(pid, &mut value)
        })?;
        ProcessState::from_raw(value).ok_or(CheckpointError::UnknownState { pid, value })
    }

    /// Parks `pid`: `cuCheckpointProcessLock`, waiting up to `lock_timeout` for the work
    /// it has submitted, then `cuCheckpointProcessCheckpoint`, which moves its device
    /// memory to host RAM and releases the GPU. A process already checkpointed is left as
    /// it is; one already locked is only checkpointed.
    ///
    /// A lock that fails (`CUDA_ERROR_NOT_READY` when the timeout passes) leaves the
    /// process running, as the driver documents. A checkpoint that fails after the lock
    /// is undone with an unlock, so the process runs on and can be stopped instead.
    pub fn checkpoint(&self, pid: u32, lock_timeout: Duration) -> Result<(), CheckpointError> {
        match self.state(pid)? {
            ProcessState::Checkpointed => return Ok(()),
            ProcessState::Running => self.lock(pid, lock_timeout)?,
            ProcessState::Locked => {}
            state => {
                return Err(CheckpointError::WrongState {
                    pid,
                    state,
                    wanted: "checkpointed",
                })
            }
        }
        // SAFETY: null args ask for the defaults.
        let checkpointed = self.call("cuCheckpointProcessCheckpoint", pid, |pid| unsafe {
            (self.checkpoint)(pid, std::ptr::null_mut())
        });
        let Err(checkpoint) = checkpointed else {
            return Ok(());
        };
        match self.unlock(pid) {
            Ok(()) => Err(checkpoint),
            Err(unlock) => Err(CheckpointError::LeftLocked {
                pid,
                checkpoint: Box::new(checkpoint),
                unlock: Box::new(unlock),
            }),
        }
    }

    /// Resumes `pid`: `cuCheckpointProcessRestore`, which copies its memory back to the
    /// GPU at the same addresses, then `cuCheckpointProcessUnlock`. A process that is
    /// running already is left as it is; one locked but not checkpointed (a resume cut
    /// short, or a park that never checkpointed) is only unlocked. Anything else is
    /// refused before any call: only a checkpointed process is ever restored.
    ///
    /// The caller must make sure the process's whole footprint is free on the GPU
    /// first, as for a start: a restore that fails (out of memory) may leave the process
    /// stuck, as the driver does not promise to keep it in a good state.
    pub fn restore(&self, pid: u32) -> Result<(), CheckpointError> {
        match self.state(pid)? {
            ProcessState::Running => return Ok(()),
            ProcessState::Checkpointed => {
                // SAFETY: null args ask for the defaults.
                self.call("cuCheckpointProcessRestore", pid, |pid| unsafe {
                    (self.restore)(pid, std::ptr::null_mut())
                })?;
            }
            ProcessState::Locked => {}
            state => {
                return Err(CheckpointError::WrongState {
                    pid,
                    state,
                    wanted: "restored",
                })
            }
        }
        self.unlock(pid)
    }

    /// A zero timeout would mean "wait forever" to the driver; the shortest wait is
    /// 1 ms.
    fn lock(&self, pid: u32, timeout: Duration) -> Result<(), CheckpointError> {
        let timeout_ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
        let mut args = LockArgs {
            timeout_ms: timeout_ms.max(1),
            reserved0: 0,
            reserved1: [0; 7],
        };
        // SAFETY: a valid, zero-reserved CUcheckpointLockArgs.
        self.call("cuCheckpointProcessLock", pid, |pid| unsafe {
            (self.lock)(pid, &mut args)
        })
    }

    fn unlock(&self, pid: u32) -> Result<(), CheckpointError> {
        // SAFETY: null args ask for the defaults.
        self.call("cuCheckpointProcessUnlock", pid, |pid| unsafe {
            (self.unlock)(pid, std::ptr::null_mut())
        })
    }

    /// Runs one driver call on `pid` and names its failure.
    fn call(
        &self,
        call: &'static str,
        pid: u32,
        run: impl FnOnce(c_int) -> CuResult,
    ) -> Result<(), CheckpointError> {
        let raw = c_int::try_from(pid).map_err(|_| CheckpointError::PidOutOfRange { pid })?;
        match run(raw) {
            CUDA_SUCCESS => Ok(()),
            code => Err(CheckpointError::Driver {
                call,
                pid,
                code,
                name: self.error_name(code),
            }),
        }
    }

    /// `cuGetErrorName`'s name for `code`, or the bare number where it has none.
    fn error_name(&self, code: CuResult) -> String {
        let mut name = std::ptr::null();
        let found = self.get_error_name.is_some_and(|get_error_name| {
            // SAFETY: a valid out-pointer.
            let answered = unsafe { get_error_name(code, &mut name) };
            answered == CUDA_SUCCESS && !name.is_null()
        });
        if found {
            // SAFETY: on success the driver points `name` at a static NUL-terminated string.
            unsafe { CStr::from_ptr(name) }
                .to_string_lossy()
                .into_owned()
        } else {
            format!("CUresult {code}")
        }
    }
}

/// The CUDA release a `cuDriverGetVersion` number stands for: "12.8" for 12080.
pub fn cuda_release(version: i32) -> String {
    format!("{}.{}", version / 1000, version % 1000 / 10)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_read_as_cuda_releases() {
        assert_eq!(cuda_release(12080), "12.8");
        assert_eq!(cuda_release(12040), "12.4");
        assert_eq!(cuda_release(13000), "13.0");
    }

    #[test]
    fn process_states_are_cuda_h_values() {
        assert_eq!(ProcessState::from_raw(0), Some(ProcessState::Running));
        assert_eq!(ProcessState::from_raw(2), Some(ProcessState::Checkpointed));
        assert_eq!(ProcessState::from_raw(5), Some(ProcessState::Restoring));
        assert_eq!(ProcessState::from_raw(32718), None);
    }

    #[test]
    fn the_lock_args_have_cuda_h_layout() {
        assert_eq!(std::mem::size_of::<LockArgs>(), 64);
        assert_eq!(std::mem::offset_of!(LockArgs, reserved1), 8);
    }
}
