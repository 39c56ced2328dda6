//! A libcuda.so stand-in whose checkpoint API (`cuCheckpointProcess*`, CUDA 12.8, driver
//! 570) works on the simulated GPU folder named by `FAKE_NVML_DIR`, so that the daemon's
//! real cuda-checkpoint code path runs in tests without a GPU.
//!
//! A process's state is read from the folder at each call (docs/ARCHITECTURE.md,
//! "Simulated GPU folder"): CHECKPOINTED while `host/<pid>` holds its memory, LOCKED while
//! `host/<pid>.locked` exists, RUNNING while it holds device memory in `alloc/<pid>`.
//! Every transition is the driver's: RUNNING -lock-> LOCKED -checkpoint-> CHECKPOINTED
//! -restore-> LOCKED -unlock-> RUNNING, and any other call answers
//! `CUDA_ERROR_ILLEGAL_STATE` with nothing changed. A restore moves the memory back
//! through an allocation's fit check: when it does not fit it answers
//! `CUDA_ERROR_OUT_OF_MEMORY`, logs the refusal in `oom.log`, and the process stays
//! CHECKPOINTED.
//!
//! Panics never cross the C boundary: every failure is a CUresult.

#![deny(unsafe_op_in_unsafe_fn)]
// The exported names are the CUDA driver API's C names.
#![allow(non_snake_case)]

use std::ffi::{c_int, c_uint, c_void};

use sim_gpu::{AllocError, CheckpointView};

pub mod driver;

use driver::{
    answer, folder, initialized, out, CuResult, CUDA_ERROR_ILLEGAL_STATE, CUDA_ERROR_INVALID_VALUE,
    CUDA_ERROR_NOT_INITIALIZED, CUDA_ERROR_OUT_OF_MEMORY, CUDA_ERROR_UNKNOWN,
};

/// What `cuDriverGetVersion` reports: CUDA 12.8, as driver 570 does (1000 * major + 10 *
/// minor).
const DRIVER_VERSION: c_int = 12080;

/// `CUprocessState` values.
const CU_PROCESS_STATE_RUNNING: c_int = 0;
const CU_PROCESS_STATE_LOCKED: c_int = 1;
const CU_PROCESS_STATE_CHECKPOINTED: c_int = 2;

/// `CUcheckpointLockArgs` from cuda.h.
#[repr(C)]
pub struct CUcheckpointLockArgs {
    /// 0: no timeout. The simulated GPU runs no kernels, so a lock never waits.
    pub timeoutMs: c_uint,
    pub reserved0: c_uint,
    pub reserved1: [u64; 7],
}

/// The checkpoint state of a live CUDA process, or the code the driver answers for a
/// pid that is not one: `CUDA_ERROR_INVALID_VALUE` for no such process,
/// `CUDA_ERROR_NOT_INITIALIZED` for a process that never initialised CUDA.
fn state_of(pid: c_int) -> Result<(u32, c_int), CuResult> {
    let pid = u32::try_from(pid)
        .ok()
        .filter(|&pid| pid > 0)
        .ok_or(CUDA_ERROR_INVALID_VALUE)?;
    let view = folder()?
        .checkpoint_view(pid)
        .map_err(|_| CUDA_ERROR_UNKNOWN)?;
    let state = match view {
        CheckpointView { alive: false, .. } => return Err(CUDA_ERROR_INVALID_VALUE),
        CheckpointView {
            host_mb: Some(_), ..
        } => CU_PROCESS_STATE_CHECKPOINTED,
        CheckpointView { locked: true, .. } => CU_PROCESS_STATE_LOCKED,
        CheckpointView {
            device_mb: Some(_), ..
        } => CU_PROCESS_STATE_RUNNING,
        CheckpointView {
            device_mb: None, ..
        } => return Err(CUDA_ERROR_NOT_INITIALIZED),
    };
    Ok((pid, state))
}

/// The pid, when the process is in `expected`; otherwise the driver's answer.
fn require(pid: c_int, expected: c_int) -> Result<u32, CuResult> {
    match state_of(pid)? {
        (pid, state) if state == expected => Ok(pid),
        _ => Err(CUDA_ERROR_ILLEGAL_STATE),
    }
}

/// # Safety
/// `state` is null or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn cuCheckpointProcessGetState(pid: c_int, state: *mut c_int) -> CuResult {
    answer(|| {
        // SAFETY: the driver API's contract: a valid out-pointer or null.
        let state = unsafe { out(state) }?;
        *state = state_of(pid)?.1;
        Ok(())
    })
}

/// Reserved fields must be zero, as cuda.h says; a null `args` is no timeout.
///
/// # Safety
/// `args` is null or valid for reads.
#[no_mangle]
pub unsafe extern "C" fn cuCheckpointProcessLock(
    pid: c_int,
    args: *mut CUcheckpointLockArgs,
) -> CuResult {
    answer(|| {
        // SAFETY: the driver API's contract: null or a valid struct.
        if let Some(args) = unsafe { args.as_ref() } {
            if args.reserved0 != 0 || args.reserved1.iter().any(|&word| word != 0) {
                return Err(CUDA_ERROR_INVALID_VALUE);
            }
        }
        let pid = require(pid, CU_PROCESS_STATE_RUNNING)?;
        folder()?
            .set_locked(pid, true)
            .map_err(|_| CUDA_ERROR_UNKNOWN)
    })
}

/// `args` (custom storage, reserved fields) means nothing on the simulated GPU and is
/// not read.
///
/// # Safety
/// None: `args` is never dereferenced.
#[no_mangle]
pub unsafe extern "C" fn cuCheckpointProcessCheckpoint(pid: c_int, _args: *mut c_void) -> CuResult {
    answer(|| {
        let pid = require(pid, CU_PROCESS_STATE_LOCKED)?;
        folder()?
            .checkpoint_to_host(pid)
            .map(drop)
            .map_err(|_| CUDA_ERROR_UNKNOWN)
    })
}

/// Needs `cuInit` in the calling process, as the real one does without persistence
/// mode. `args` (GPU remapping, custom storage) means nothing on the one simulated GPU
/// and is not read.
///
/// # Safety
/// None: `args` is never dereferenced.
#[no_mangle]
pub unsafe extern "C" fn cuCheckpointProcessRestore(pid: c_int, _args: *mut c_void) -> CuResult {
    answer(|| {
        if !initialized() {
            return Err(CUDA_ERROR_NOT_INITIALIZED);
        }
        let pid = require(pid, CU_PROCESS_STATE_CHECKPOINTED)?;
        match folder()?.restore_from_host(pid) {
            Ok(_) => Ok(()),
            Err(AllocError::OutOfMemory { .. }) => Err(CUDA_ERROR_OUT_OF_MEMORY),
            Err(AllocError::Io(_)) => Err(CUDA_ERROR_UNKNOWN),
        }
    })
}

/// # Safety
/// None: `args` (reserved fields) is never dereferenced.
#[no_mangle]
pub unsafe extern "C" fn cuCheckpointProcessUnlock(pid: c_int, _args: *mut c_void) -> CuResult {
    answer(|| {
        let pid = require(pid, CU_PROCESS_STATE_LOCKED)?;
        folder()?
            .set_locked(pid, false)
            .map_err(|_| CUDA_ERROR_UNKNOWN)
    })
}

#[cfg(test)]
mod tests {
    use std::process::{Child, Command};
    use std::ptr;
    use std::sync::{Mutex, MutexGuard, PoisonError};

    use sim_gpu::{DeviceSpec, SimGpuDir};

    use super::*;
    use crate::driver::{cuGetErrorName, cuInit, CUDA_ERROR_NO_DEVICE, CUDA_SUCCESS};

    /// `FAKE_NVML_DIR` and the `cuInit` flag are process-wide: tests take turns.
    static TURN: Mutex<()> = Mutex::new(());

    /// A folder of 1000 MB where a live process holds 600 MB, named by `FAKE_NVML_DIR`.
    struct Gpu {
        _turn: MutexGuard<'static, ()>,
        _temp: tempfile::TempDir,
        dir: SimGpuDir,
        process: Child,
    }

    impl Gpu {
        fn start() -> Self {
            let turn = TURN.lock().unwrap_or_else(PoisonError::into_inner);
            let temp = tempfile::tempdir().unwrap();
            let spec = DeviceSpec {
                name: "Simulated GPU".into(),
                total_mb: 1000,
                baseline_mb: 0,
                reclaim_ms: 60_000,
                temperature_c: 40,
                utilization_pct: 0,
            };
            let dir = SimGpuDir::create(temp.path(), &spec).unwrap();
            let process = Command::new("sleep").arg("60").spawn().unwrap();
            dir.allocate(process.id(), 600).unwrap();
            std::env::set_var(sim_gpu::ENV_VAR, temp.path());
            Self {
                _turn: turn,
                _temp: temp,
                dir,
                process,
            }
        }

        fn pid(&self) -> c_int {
            c_int::try_from(self.process.id()).unwrap()
        }

        fn state(&self) -> Result<c_int, CuResult> {
            let mut state = -1;
            // SAFETY: a valid out-pointer.
            match unsafe { cuCheckpointProcessGetState(self.pid(), &mut state) } {
                CUDA_SUCCESS => Ok(state),
                error => Err(error),
            }
        }
    }

    impl Drop for Gpu {
        fn drop(&mut self) {
            let _ = self.process.kill();
            let _ = self.process.wait();
        }
    }

    fn lock(pid: c_int) -> CuResult {
        // SAFETY: null args are allowed.
        unsafe { cuCheckpointProcessLock(pid, ptr::null_mut()) }
    }

    fn checkpoint(pid: c_int) -> CuResult {
        // SAFETY: args are never read.
        unsafe { cuCheckpointProcessCheckpoint(pid, ptr::null_mut()) }
    }

    fn restore(pid: c_int) -> CuResult {
        // SAFETY: args are never read.
        unsafe { cuCheckpointProcessRestore(pid, ptr::null_mut()) }
    }

    fn unlock(pid: c_int) -> CuResult {
        // SAFETY: args are never read.
        unsafe { cuCheckpointProcessUnlock(pid, ptr::null_mut()) }
    }

    fn init() {
        // SAFETY: no pointers.
        assert_eq!(unsafe { cuInit(0) }, CUDA_SUCCESS);
    }

    #[test]
    fn the_round_trip_moves_memory_to_the_host_and_back() {
        let gpu = Gpu::start();
        init();
        let pid = gpu.pid();
        assert_eq!(gpu.state(), Ok(CU_PROCESS_STATE_RUNNING));
        assert_eq!(lock(pid), CUDA_SUCCESS);
        assert_eq!(gpu.state(), Ok(CU_PROCESS_STATE_LOCKED));
        assert_eq!(checkpoint(pid), CUDA_SUCCESS);
        assert_eq!(gpu.state(), Ok(CU_PROCESS_STATE_CHECKPOINTED));
        assert!(gpu.dir.snapshot().unwrap().processes.is_empty());
        assert_eq!(restore(pid), CUDA_SUCCESS);
        assert_eq!(
            gpu.state(),
            Ok(CU_PROCESS_STATE_LOCKED),
            "a restore leaves it locked"
        );
        assert_eq!(gpu.dir.snapshot().unwrap().used_mb, 600);
        assert_eq!(unlock(pid), CUDA_SUCCESS);
        assert_eq!(gpu.state(), Ok(CU_PROCESS_STATE_RUNNING));
    }

    #[test]
    fn calls_out_of_order_are_illegal_and_change_nothing() {
        let gpu = Gpu::start();
        init();
        let pid = gpu.pid();
        assert_eq!(checkpoint(pid), CUDA_ERROR_ILLEGAL_STATE, "not locked");
        assert_eq!(restore(pid), CUDA_ERROR_ILLEGAL_STATE, "not checkpointed");
        assert_eq!(unlock(pid), CUDA_ERROR_ILLEGAL_STATE, "not locked");
        assert_eq!(gpu.state(), Ok(CU_PROCESS_STATE_RUNNING));
        assert_eq!(lock(pid), CUDA_SUCCESS);
        assert_eq!(lock(pid), CUDA_ERROR_ILLEGAL_STATE, "already locked");
        assert_eq!(checkpoint(pid), CUDA_SUCCESS);
        assert_eq!(
            checkpoint(pid),
            CUDA_ERROR_ILLEGAL_STATE,
            "already checkpointed"
        );
        assert_eq!(
            unlock(pid),
            CUDA_ERROR_ILLEGAL_STATE,
            "checkpointed, not locked"
        );
        assert_eq!(gpu.state(), Ok(CU_PROCESS_STATE_CHECKPOINTED));
    }

    #[test]
    fn a_restore_without_room_is_out_of_memory_and_stays_checkpointed() {
        let gpu = Gpu::start();
        init();
        let pid = gpu.pid();
        assert_eq!(lock(pid), CUDA_SUCCESS);
        assert_eq!(checkpoint(pid), CUDA_SUCCESS);
        let mut newcomer = Command::new("sleep").arg("60").spawn().unwrap();
        gpu.dir.allocate(newcomer.id(), 500).unwrap();
        assert_eq!(restore(pid), CUDA_ERROR_OUT_OF_MEMORY);
        assert_eq!(gpu.state(), Ok(CU_PROCESS_STATE_CHECKPOINTED));
        assert_eq!(gpu.dir.oom_log().unwrap().len(), 1);
        gpu.dir.release(newcomer.id()).unwrap();
        assert_eq!(restore(pid), CUDA_SUCCESS, "once there is room");
        newcomer.kill().unwrap();
        newcomer.wait().unwrap();
    }

    #[test]
    fn pids_that_are_not_cuda_processes_get_the_drivers_codes() {
        let gpu = Gpu::start();
        let mut dead = Command::new("true").spawn().unwrap();
        dead.wait().unwrap();
        let dead = c_int::try_from(dead.id()).unwrap();
        let mut state = -1;
        // SAFETY: valid out-pointers, or null where the call must refuse it.
        unsafe {
            assert_eq!(
                cuCheckpointProcessGetState(dead, &mut state),
                CUDA_ERROR_INVALID_VALUE
            );
            assert_eq!(
                cuCheckpointProcessGetState(-1, &mut state),
                CUDA_ERROR_INVALID_VALUE
            );
            let me = c_int::try_from(std::process::id()).unwrap();
            assert_eq!(
                cuCheckpointProcessGetState(me, &mut state),
                CUDA_ERROR_NOT_INITIALIZED,
                "alive but holding no GPU memory"
            );
            assert_eq!(
                cuCheckpointProcessGetState(gpu.pid(), ptr::null_mut()),
                CUDA_ERROR_INVALID_VALUE
            );
        }
        assert_eq!(lock(dead), CUDA_ERROR_INVALID_VALUE);
    }

    #[test]
    fn lock_refuses_nonzero_reserved_fields() {
        let gpu = Gpu::start();
        let mut args = CUcheckpointLockArgs {
            timeoutMs: 1000,
            reserved0: 0,
            reserved1: [0, 0, 0, 1, 0, 0, 0],
        };
        // SAFETY: a valid struct.
        unsafe {
            assert_eq!(
                cuCheckpointProcessLock(gpu.pid(), &mut args),
                CUDA_ERROR_INVALID_VALUE
            );
            args.reserved1 = [0; 7];
            assert_eq!(cuCheckpointProcessLock(gpu.pid(), &mut args), CUDA_SUCCESS);
        }
    }

    #[test]
    fn no_folder_is_no_device_and_error_names_are_the_drivers() {
        let _gpu = Gpu::start();
        std::env::remove_var(sim_gpu::ENV_VAR);
        let mut name = ptr::null();
        // SAFETY: valid out-pointers; the names are static C strings.
        unsafe {
            assert_eq!(cuInit(0), CUDA_ERROR_NO_DEVICE);
            assert_eq!(cuInit(1), CUDA_ERROR_INVALID_VALUE);
            assert_eq!(
                cuGetErrorName(CUDA_ERROR_ILLEGAL_STATE, &mut name),
                CUDA_SUCCESS
            );
            assert_eq!(std::ffi::CStr::from_ptr(name), c"CUDA_ERROR_ILLEGAL_STATE");
            assert_eq!(cuGetErrorName(12345, &mut name), CUDA_ERROR_INVALID_VALUE);
        }
        assert!(name.is_null());
    }
}
