//! The entry points every CUDA driver has had since long before the checkpoint API:
//! `cuInit`, `cuDriverGetVersion`, `cuGetErrorName` and `cuGetErrorString`, with the
//! CUresult codes the fakes answer. Shared, through `#[path]`, by the fake of a current
//! driver (`tests/fake-cuda`) and the fake of a driver older than 570
//! (`tests/fake-cuda/r550`); each crate root defines `DRIVER_VERSION`, what its
//! `cuDriverGetVersion` reports.

use std::ffi::{c_char, c_int, c_uint, CStr};
use std::sync::atomic::{AtomicBool, Ordering};

use sim_gpu::SimGpuDir;

/// `CUresult`, a C enum: an `int` on every ABI CUDA supports.
pub type CuResult = c_int;

pub const CUDA_SUCCESS: CuResult = 0;
pub const CUDA_ERROR_INVALID_VALUE: CuResult = 1;
pub const CUDA_ERROR_OUT_OF_MEMORY: CuResult = 2;
pub const CUDA_ERROR_NOT_INITIALIZED: CuResult = 3;
pub const CUDA_ERROR_NO_DEVICE: CuResult = 100;
pub const CUDA_ERROR_ILLEGAL_STATE: CuResult = 401;
pub const CUDA_ERROR_NOT_READY: CuResult = 600;
pub const CUDA_ERROR_NOT_SUPPORTED: CuResult = 801;
pub const CUDA_ERROR_UNKNOWN: CuResult = 999;

/// Name and description of each code, as the real `cuGetErrorName` and
/// `cuGetErrorString` give them.
const ERRORS: [(CuResult, &CStr, &CStr); 9] = [
    (CUDA_SUCCESS, c"CUDA_SUCCESS", c"no error"),
    (
        CUDA_ERROR_INVALID_VALUE,
        c"CUDA_ERROR_INVALID_VALUE",
        c"invalid argument",
    ),
    (
        CUDA_ERROR_OUT_OF_MEMORY,
        c"CUDA_ERROR_OUT_OF_MEMORY",
        c"out of memory",
    ),
    (
        CUDA_ERROR_NOT_INITIALIZED,
        c"CUDA_ERROR_NOT_INITIALIZED",
        c"initialization error",
    ),
    (
        CUDA_ERROR_NO_DEVICE,
        c"CUDA_ERROR_NO_DEVICE",
        c"no CUDA-capable device is detected",
    ),
    (
        CUDA_ERROR_ILLEGAL_STATE,
        c"CUDA_ERROR_ILLEGAL_STATE",
        c"the operation cannot be performed in the present state",
    ),
    (
        CUDA_ERROR_NOT_READY,
        c"CUDA_ERROR_NOT_READY",
        c"device not ready",
    ),
    (
        CUDA_ERROR_NOT_SUPPORTED,
        c"CUDA_ERROR_NOT_SUPPORTED",
        c"operation not supported",
    ),
    (CUDA_ERROR_UNKNOWN, c"CUDA_ERROR_UNKNOWN", c"unknown error"),
];

/// Whether `cuInit` succeeded in this process: the checkpoint API's restore needs it (or
/// persistence mode, which the simulated GPU does not have).
static INITIALIZED: AtomicBool = AtomicBool::new(false);

pub fn initialized() -> bool {
    INITIALIZED.load(Ordering::SeqCst)
}

/// Runs a call's body, turning its error into the CUresult it carries.
pub fn answer(body: impl FnOnce() -> Result<(), CuResult>) -> CuResult {
    body().err().unwrap_or(CUDA_SUCCESS)
}

/// The simulated GPU: without a folder there is no device, as on a host without a GPU.
pub fn folder() -> Result<SimGpuDir, CuResult> {
    SimGpuDir::from_env().map_err(|_| CUDA_ERROR_NO_DEVICE)
}

/// Turns an out-pointer into a reference; null is the caller's invalid value.
///
/// # Safety
/// `pointer` is null or valid for writes of a `T` for the duration of the call.
pub unsafe fn out<'a, T>(pointer: *mut T) -> Result<&'a mut T, CuResult> {
    // SAFETY: guaranteed by the caller.
    unsafe { pointer.as_mut() }.ok_or(CUDA_ERROR_INVALID_VALUE)
}

/// Succeeds when `FAKE_NVML_DIR` names a simulated GPU folder; `Flags` must be 0, as the
/// real one requires.
///
/// # Safety
/// None: it takes no pointers; `unsafe` as every driver entry point is.
#[no_mangle]
pub unsafe extern "C" fn cuInit(flags: c_uint) -> CuResult {
    answer(|| {
        if flags != 0 {
            return Err(CUDA_ERROR_INVALID_VALUE);
        }
        folder()?;
        INITIALIZED.store(true, Ordering::SeqCst);
        Ok(())
    })
}

/// Needs no `cuInit`, as the real one.
///
/// # Safety
/// `version` is null or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn cuDriverGetVersion(version: *mut c_int) -> CuResult {
    answer(|| {
        // SAFETY: the driver API's contract: a valid out-pointer or null.
        *unsafe { out(version) }? = crate::DRIVER_VERSION;
        Ok(())
    })
}

/// # Safety
/// `name` is null or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn cuGetErrorName(error: CuResult, name: *mut *const c_char) -> CuResult {
    // SAFETY: the driver API's contract: a valid out-pointer or null.
    unsafe { describe(error, name, |(_, name, _)| name) }
}

/// # Safety
/// `text` is null or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn cuGetErrorString(error: CuResult, text: *mut *const c_char) -> CuResult {
    // SAFETY: the driver API's contract: a valid out-pointer or null.
    unsafe { describe(error, text, |(_, _, text)| text) }
}

/// Writes the static text `pick` chooses for `error`; an unknown code answers
/// `CUDA_ERROR_INVALID_VALUE` with a null text, as the real driver does.
///
/// # Safety
/// `text` is null or valid for a write.
unsafe fn describe(
    error: CuResult,
    text: *mut *const c_char,
    pick: fn(&(CuResult, &'static CStr, &'static CStr)) -> &'static CStr,
) -> CuResult {
    answer(|| {
        // SAFETY: guaranteed by the caller.
        let text = unsafe { out(text) }?;
        let found = ERRORS.iter().find(|entry| entry.0 == error);
        *text = found.map_or(std::ptr::null(), |entry| pick(entry).as_ptr());
        found.map(|_| ()).ok_or(CUDA_ERROR_INVALID_VALUE)
    })
}
