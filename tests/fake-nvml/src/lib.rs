//! A libnvidia-ml.so stand-in that answers from the simulated GPU folder named by
//! `FAKE_NVML_DIR`, so that the daemon's real NVML code path runs in tests and the demo.
//!
//! The types and constants come from nvml-wrapper-sys, the bindings nvml-wrapper calls
//! through, and every export is checked at compile time against the type those bindings
//! load it as (see the end of this file): an ABI mismatch fails the build instead of
//! corrupting memory at run time.
//!
//! The folder is looked up on every call, so a test may point the variable elsewhere
//! between calls. Panics never cross the C boundary: every failure is an NVML code.

#![deny(unsafe_op_in_unsafe_fn)]
// The exported names are NVML's C names.
#![allow(non_snake_case)]

use std::ffi::{c_char, c_uint, CStr};
use std::ptr;
use std::sync::atomic::{AtomicU32, Ordering};

use nvml_wrapper_sys::bindings::{
    nvmlDevice_st, nvmlDevice_t, nvmlMemory_t, nvmlMemory_v2_t, nvmlProcessInfo_t,
    nvmlReturn_enum_NVML_ERROR_ARGUMENT_VERSION_MISMATCH as ARGUMENT_VERSION_MISMATCH,
    nvmlReturn_enum_NVML_ERROR_DRIVER_NOT_LOADED as DRIVER_NOT_LOADED,
    nvmlReturn_enum_NVML_ERROR_INSUFFICIENT_SIZE as INSUFFICIENT_SIZE,
    nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT as INVALID_ARGUMENT,
    nvmlReturn_enum_NVML_ERROR_UNINITIALIZED as UNINITIALIZED,
    nvmlReturn_enum_NVML_ERROR_UNKNOWN as UNKNOWN, nvmlReturn_enum_NVML_SUCCESS as SUCCESS,
    nvmlReturn_t, nvmlTemperatureSensors_enum_NVML_TEMPERATURE_GPU as TEMPERATURE_GPU,
    nvmlTemperatureSensors_t, nvmlUtilization_t, NVML_VALUE_NOT_AVAILABLE,
};
use sim_gpu::{DeviceSpec, SimGpuDir, Snapshot};

/// `NVML_STRUCT_VERSION(Memory, 2)` from nvml.h: the struct size with the version in the
/// top byte.
const MEMORY_V2_VERSION: c_uint = (std::mem::size_of::<nvmlMemory_v2_t>() | (2 << 24)) as c_uint;
/// What NVML reports for a GPU or compute instance id outside MIG.
const NO_INSTANCE: c_uint = NVML_VALUE_NOT_AVAILABLE as c_uint;
const BYTES_PER_MB: u64 = 1024 * 1024;
const DRIVER_VERSION: &str = concat!("fake-nvml-", env!("CARGO_PKG_VERSION"));

/// `nvmlInit` calls not yet matched by `nvmlShutdown`; like NVML, the library is usable
/// while this is above zero.
static INIT_COUNT: AtomicU32 = AtomicU32::new(0);

/// The one device's handle: any stable non-null address; callers never dereference it.
static DEVICE: u8 = 0;

fn device_handle() -> nvmlDevice_t {
    ptr::addr_of!(DEVICE).cast::<nvmlDevice_st>().cast_mut()
}

/// Runs a call's body, turning its error into the NVML code it carries.
fn answer(body: impl FnOnce() -> Result<(), nvmlReturn_t>) -> nvmlReturn_t {
    body().err().unwrap_or(SUCCESS)
}

fn check_initialized() -> Result<(), nvmlReturn_t> {
    if INIT_COUNT.load(Ordering::SeqCst) == 0 {
        Err(UNINITIALIZED)
    } else {
        Ok(())
    }
}

fn check_device(device: nvmlDevice_t) -> Result<(), nvmlReturn_t> {
    check_initialized()?;
    if device == device_handle() {
        Ok(())
    } else {
        Err(INVALID_ARGUMENT)
    }
}

/// The folder's allocations, read afresh; a folder that vanished after init reads as an
/// unknown error.
fn snapshot() -> Result<Snapshot, nvmlReturn_t> {
    SimGpuDir::from_env()
        .and_then(|dir| dir.snapshot())
        .map_err(|_| UNKNOWN)
}

/// The folder's device alone: cheaper than a snapshot for what does not depend on
/// allocations.
fn device_spec() -> Result<DeviceSpec, nvmlReturn_t> {
    SimGpuDir::from_env()
        .and_then(|dir| dir.device())
        .map_err(|_| UNKNOWN)
}

fn bytes(mb: u64) -> u64 {
    mb.saturating_mul(BYTES_PER_MB)
}

/// Turns an out-pointer into a reference; null is the caller's invalid argument.
///
/// # Safety
/// `pointer` is null or valid for writes of a `T` for the duration of the call.
unsafe fn out<'a, T>(pointer: *mut T) -> Result<&'a mut T, nvmlReturn_t> {
    // SAFETY: guaranteed by the caller.
    unsafe { pointer.as_mut() }.ok_or(INVALID_ARGUMENT)
}

/// Copies `text` and a terminating NUL into a caller's buffer of `length` bytes, or
/// answers `INSUFFICIENT_SIZE` as NVML does when it does not fit.
///
/// # Safety
/// `buffer` is null or valid for writes of `length` bytes.
unsafe fn write_c_string(
    text: &str,
    buffer: *mut c_char,
    length: c_uint,
) -> Result<(), nvmlReturn_t> {
    if buffer.is_null() {
        return Err(INVALID_ARGUMENT);
    }
    let bytes = text.as_bytes();
    if bytes.len() >= length as usize {
        return Err(INSUFFICIENT_SIZE);
    }
    // SAFETY: the buffer holds `length` > `bytes.len()` bytes, as the caller guarantees.
    unsafe {
        ptr::copy_nonoverlapping(bytes.as_ptr(), buffer.cast::<u8>(), bytes.len());
        *buffer.add(bytes.len()) = 0;
    }
    Ok(())
}

/// Succeeds only when `FAKE_NVML_DIR` names a readable folder: without one there is no
/// "driver", which is what a host without the NVIDIA driver answers.
fn init() -> nvmlReturn_t {
    match SimGpuDir::from_env() {
        Ok(_) => {
            INIT_COUNT.fetch_add(1, Ordering::SeqCst);
            SUCCESS
        }
        Err(_) => DRIVER_NOT_LOADED,
    }
}

/// # Safety
/// None: it takes no pointers; `unsafe` as every NVML entry point is.
#[no_mangle]
pub unsafe extern "C" fn nvmlInit_v2() -> nvmlReturn_t {
    init()
}

/// The flags only tune which GPUs are attached; the one simulated GPU is always there.
///
/// # Safety
/// None: it takes no pointers; `unsafe` as every NVML entry point is.
#[no_mangle]
pub unsafe extern "C" fn nvmlInitWithFlags(_flags: c_uint) -> nvmlReturn_t {
    init()
}

/// # Safety
/// None: it takes no pointers; `unsafe` as every NVML entry point is.
#[no_mangle]
pub unsafe extern "C" fn nvmlShutdown() -> nvmlReturn_t {
    let decremented = INIT_COUNT.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |count| {
        count.checked_sub(1)
    });
    match decremented {
        Ok(_) => SUCCESS,
        Err(_) => UNINITIALIZED,
    }
}

/// # Safety
/// `version` is null or valid for writes of `length` bytes.
#[no_mangle]
pub unsafe extern "C" fn nvmlSystemGetDriverVersion(
    version: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    answer(|| {
        check_initialized()?;
        // SAFETY: NVML's contract: `version` holds `length` bytes.
        unsafe { write_c_string(DRIVER_VERSION, version, length) }
    })
}

/// # Safety
/// `device_count` is null or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetCount_v2(device_count: *mut c_uint) -> nvmlReturn_t {
    answer(|| {
        check_initialized()?;
        // SAFETY: NVML's contract: a valid out-pointer or null.
        *unsafe { out(device_count) }? = 1;
        Ok(())
    })
}

/// # Safety
/// `device` is null or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex_v2(
    index: c_uint,
    device: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    answer(|| {
        check_initialized()?;
        if index != 0 {
            return Err(INVALID_ARGUMENT);
        }
        // SAFETY: NVML's contract: a valid out-pointer or null.
        *unsafe { out(device) }? = device_handle();
        Ok(())
    })
}

/// # Safety
/// `name` is null or valid for writes of `length` bytes.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetName(
    device: nvmlDevice_t,
    name: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    answer(|| {
        check_device(device)?;
        let device = device_spec()?;
        // SAFETY: NVML's contract: `name` holds `length` bytes.
        unsafe { write_c_string(&device.name, name, length) }
    })
}

/// # Safety
/// `memory` is null or valid for reads and writes.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo(
    device: nvmlDevice_t,
    memory: *mut nvmlMemory_t,
) -> nvmlReturn_t {
    answer(|| {
        check_device(device)?;
        // SAFETY: NVML's contract: a valid out-pointer or null.
        let memory = unsafe { out(memory) }?;
        let snapshot = snapshot()?;
        memory.total = bytes(snapshot.device.total_mb);
        memory.used = bytes(snapshot.used_mb);
        memory.free = bytes(snapshot.free_mb);
        Ok(())
    })
}

/// The caller sets `version`, as nvml.h asks; a wrong one is refused as NVML does.
///
/// # Safety
/// `memory` is null or valid for reads and writes.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo_v2(
    device: nvmlDevice_t,
    memory: *mut nvmlMemory_v2_t,
) -> nvmlReturn_t {
    answer(|| {
        check_device(device)?;
        // SAFETY: NVML's contract: a valid out-pointer or null.
        let memory = unsafe { out(memory) }?;
        if memory.version != MEMORY_V2_VERSION {
            return Err(ARGUMENT_VERSION_MISMATCH);
        }
        let snapshot = snapshot()?;
        memory.total = bytes(snapshot.device.total_mb);
        memory.reserved = 0;
        memory.used = bytes(snapshot.used_mb);
        memory.free = bytes(snapshot.free_mb);
        Ok(())
    })
}

/// One process per `alloc/<pid>` file. As NVML: `*info_count` in is the buffer's
/// capacity and out the number of processes; a null or short buffer answers
/// `INSUFFICIENT_SIZE` (unless there are none), which is how callers size it.
///
/// # Safety
/// `info_count` is null or valid for reads and writes, and `infos` is null or
/// valid for writes of `*info_count` entries.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetComputeRunningProcesses_v3(
    device: nvmlDevice_t,
    info_count: *mut c_uint,
    infos: *mut nvmlProcessInfo_t,
) -> nvmlReturn_t {
    answer(|| {
        check_device(device)?;
        // SAFETY: NVML's contract: a valid out-pointer or null.
        let count = unsafe { out(info_count) }?;
        let processes = snapshot()?.processes;
        let needed = c_uint::try_from(processes.len()).map_err(|_| UNKNOWN)?;
        let capacity = *count;
        *count = needed;
        if needed == 0 {
            return Ok(());
        }
        if infos.is_null() || capacity < needed {
            return Err(INSUFFICIENT_SIZE);
        }
        // SAFETY: NVML's contract: `infos` holds `capacity` >= `needed` entries.
        let slots = unsafe { std::slice::from_raw_parts_mut(infos, processes.len()) };
        for (slot, process) in slots.iter_mut().zip(&processes) {
            *slot = nvmlProcessInfo_t {
                pid: process.pid,
                usedGpuMemory: bytes(process.mb),
                gpuInstanceId: NO_INSTANCE,
                computeInstanceId: NO_INSTANCE,
            };
        }
        Ok(())
    })
}

/// # Safety
/// `temperature` is null or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetTemperature(
    device: nvmlDevice_t,
    sensor: nvmlTemperatureSensors_t,
    temperature: *mut c_uint,
) -> nvmlReturn_t {
    answer(|| {
        check_device(device)?;
        if sensor != TEMPERATURE_GPU {
            return Err(INVALID_ARGUMENT);
        }
        // SAFETY: NVML's contract: a valid out-pointer or null.
        let temperature = unsafe { out(temperature) }?;
        *temperature = device_spec()?.temperature_c;
        Ok(())
    })
}

/// `memory` is the memory controller's busy percentage in NVML, not how full the memory
/// is; the folder has no such figure, so it reads 0.
///
/// # Safety
/// `utilization` is null or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetUtilizationRates(
    device: nvmlDevice_t,
    utilization: *mut nvmlUtilization_t,
) -> nvmlReturn_t {
    answer(|| {
        check_device(device)?;
        // SAFETY: NVML's contract: a valid out-pointer or null.
        let utilization = unsafe { out(utilization) }?;
        utilization.gpu = device_spec()?.utilization_pct;
        utilization.memory = 0;
        Ok(())
    })
}

/// # Safety
/// None: it takes no pointers; the text it returns is static.
#[no_mangle]
pub unsafe extern "C" fn nvmlErrorString(result: nvmlReturn_t) -> *const c_char {
    error_text(result).as_ptr()
}

fn error_text(result: nvmlReturn_t) -> &'static CStr {
    match result {
        SUCCESS => c"Success",
        UNINITIALIZED => c"Uninitialized",
        INVALID_ARGUMENT => c"Invalid Argument",
        INSUFFICIENT_SIZE => c"Insufficient Size",
        DRIVER_NOT_LOADED => {
            c"Driver Not Loaded (fake-nvml: FAKE_NVML_DIR is unset or not a simulated GPU folder)"
        }
        ARGUMENT_VERSION_MISMATCH => c"Argument Version Mismatch",
        _ => c"Unknown Error",
    }
}

/// Compiles only if every export has exactly the type nvml-wrapper-sys loads that symbol
/// as: the closure is type-checked, never run.
const _: fn(&mut nvml_wrapper_sys::bindings::NvmlLib) = |lib| {
    lib.nvmlInit_v2 = Ok(nvmlInit_v2);
    lib.nvmlInitWithFlags = Ok(nvmlInitWithFlags);
    lib.nvmlShutdown = Ok(nvmlShutdown);
    lib.nvmlSystemGetDriverVersion = Ok(nvmlSystemGetDriverVersion);
    lib.nvmlDeviceGetCount_v2 = Ok(nvmlDeviceGetCount_v2);
    lib.nvmlDeviceGetHandleByIndex_v2 = Ok(nvmlDeviceGetHandleByIndex_v2);
    lib.nvmlDeviceGetName = Ok(nvmlDeviceGetName);
    lib.nvmlDeviceGetMemoryInfo = Ok(nvmlDeviceGetMemoryInfo);
    lib.nvmlDeviceGetMemoryInfo_v2 = Ok(nvmlDeviceGetMemoryInfo_v2);
    lib.nvmlDeviceGetComputeRunningProcesses_v3 = Ok(nvmlDeviceGetComputeRunningProcesses_v3);
    lib.nvmlDeviceGetTemperature = Ok(nvmlDeviceGetTemperature);
    lib.nvmlDeviceGetUtilizationRates = Ok(nvmlDeviceGetUtilizationRates);
    lib.nvmlErrorString = Ok(nvmlErrorString);
};

#[cfg(test)]
mod tests {
    use std::sync::{Mutex, MutexGuard, PoisonError};

    use super::*;

    /// The environment and the init count are process-wide: tests take turns.
    static TURN: Mutex<()> = Mutex::new(());

    /// An initialised fake over a folder where this process holds 3 MB; shut down and
    /// removed when dropped.
    struct Fake {
        _turn: MutexGuard<'static, ()>,
        _temp: tempfile::TempDir,
        device: nvmlDevice_t,
    }

    impl Fake {
        fn start() -> Self {
            let turn = TURN.lock().unwrap_or_else(PoisonError::into_inner);
            let temp = tempfile::tempdir().unwrap();
            let spec = DeviceSpec {
                name: "Simulated GPU".into(),
                total_mb: 100,
                baseline_mb: 10,
                reclaim_ms: 0,
                temperature_c: 40,
                utilization_pct: 5,
            };
            let dir = SimGpuDir::create(temp.path(), &spec).unwrap();
            dir.allocate(std::process::id(), 3).unwrap();
            std::env::set_var(sim_gpu::ENV_VAR, temp.path());
            let mut device = ptr::null_mut();
            // SAFETY: valid out-pointers.
            unsafe {
                assert_eq!(nvmlInit_v2(), SUCCESS);
                assert_eq!(nvmlDeviceGetHandleByIndex_v2(0, &mut device), SUCCESS);
            }
            Self {
                _turn: turn,
                _temp: temp,
                device,
            }
        }
    }

    impl Drop for Fake {
        fn drop(&mut self) {
            // SAFETY: no pointers.
            unsafe { nvmlShutdown() };
        }
    }

    #[test]
    fn the_process_list_is_sized_by_a_first_call() {
        let fake = Fake::start();
        let mut count = 0;
        let mut infos = [nvmlProcessInfo_t {
            pid: 0,
            usedGpuMemory: 0,
            gpuInstanceId: 0,
            computeInstanceId: 0,
        }; 2];
        // SAFETY: valid pointers; `count` never exceeds the buffer's 2 entries.
        unsafe {
            let null = ptr::null_mut();
            let call = nvmlDeviceGetComputeRunningProcesses_v3;
            assert_eq!(call(fake.device, &mut count, null), INSUFFICIENT_SIZE);
            assert_eq!(count, 1);
            count = 0;
            assert_eq!(
                call(fake.device, &mut count, infos.as_mut_ptr()),
                INSUFFICIENT_SIZE
            );
            count = 2;
            assert_eq!(call(fake.device, &mut count, infos.as_mut_ptr()), SUCCESS);
        }
        assert_eq!(count, 1);
        assert_eq!(infos[0].pid, std::process::id());
        assert_eq!(infos[0].usedGpuMemory, 3 * BYTES_PER_MB);
        assert_eq!(infos[0].gpuInstanceId, NO_INSTANCE);
    }

    #[test]
    fn a_name_buffer_without_room_for_the_nul_is_insufficient_size() {
        let fake = Fake::start();
        let mut name = [0 as c_char; 14];
        // SAFETY: the lengths given are the buffer's or less.
        unsafe {
            assert_eq!(
                nvmlDeviceGetName(fake.device, name.as_mut_ptr(), 13),
                INSUFFICIENT_SIZE
            );
            assert_eq!(
                nvmlDeviceGetName(fake.device, name.as_mut_ptr(), 14),
                SUCCESS
            );
            assert_eq!(CStr::from_ptr(name.as_ptr()), c"Simulated GPU");
        }
    }

    #[test]
    fn memory_v2_refuses_a_wrong_version_and_reports_bytes() {
        let fake = Fake::start();
        let mut memory = nvmlMemory_v2_t {
            version: 1,
            total: 0,
            reserved: 0,
            free: 0,
            used: 0,
        };
        // SAFETY: a valid pointer.
        unsafe {
            let call = nvmlDeviceGetMemoryInfo_v2;
            assert_eq!(call(fake.device, &mut memory), ARGUMENT_VERSION_MISMATCH);
            memory.version = MEMORY_V2_VERSION;
            assert_eq!(call(fake.device, &mut memory), SUCCESS);
        }
        assert_eq!(memory.total, 100 * BYTES_PER_MB);
        assert_eq!(memory.used, 13 * BYTES_PER_MB);
        assert_eq!(memory.free, 87 * BYTES_PER_MB);
    }

    #[test]
    fn only_device_0_exists_and_handles_need_init() {
        let fake = Fake::start();
        let mut device = ptr::null_mut();
        let mut count = 0;
        // SAFETY: valid out-pointers.
        unsafe {
            assert_eq!(nvmlDeviceGetCount_v2(&mut count), SUCCESS);
            assert_eq!(
                nvmlDeviceGetHandleByIndex_v2(1, &mut device),
                INVALID_ARGUMENT
            );
            assert_eq!(nvmlShutdown(), SUCCESS);
            assert_eq!(nvmlDeviceGetHandleByIndex_v2(0, &mut device), UNINITIALIZED);
            assert_eq!(
                nvmlDeviceGetName(fake.device, ptr::null_mut(), 0),
                UNINITIALIZED
            );
            assert_eq!(nvmlInit_v2(), SUCCESS, "for the shutdown when dropped");
        }
        assert_eq!(count, 1);
    }
}
