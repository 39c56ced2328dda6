//! The GPU through NVML, with nvml-wrapper's safe API only (its raw calls panic on a
//! missing symbol). The library is the system's libnvidia-ml, or another one named in the
//! config: the tests load the fake one built from `tests/fake-nvml`.

use std::path::Path;

use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::struct_wrappers::device::ProcessInfo;
use nvml_wrapper::Nvml;

use super::gpu::{Gpu, GpuError, GpuProcess, GpuSample};

/// What nvml-wrapper loads when no library is named: the driver's runtime library (the
/// unversioned `libnvidia-ml.so` only comes with development packages).
const DEFAULT_LIBRARY: &str = "libnvidia-ml.so.1";
const BYTES_PER_MB: u64 = 1024 * 1024;

/// One initialised NVML, kept for the daemon's lifetime: initialising is slow, and
/// dropping it calls `nvmlShutdown`.
pub struct NvmlGpu {
    nvml: Nvml,
    index: u32,
    library: String,
}

impl NvmlGpu {
    /// Loads and initialises NVML, from `library` when given, and checks that GPU `index`
    /// exists, so that a missing driver or a wrong index fails at start, not at the first
    /// observation.
    pub fn open(library: Option<&Path>, index: u32) -> Result<Self, GpuError> {
        let library_name = library.map_or_else(
            || DEFAULT_LIBRARY.to_owned(),
            |path| path.display().to_string(),
        );
        let initialised = match library {
            Some(path) => Nvml::builder().lib_path(path.as_os_str()).init(),
            None => Nvml::init(),
        };
        let nvml = initialised.map_err(|error| init_error(&library_name, error))?;
        let count = nvml
            .device_count()
            .map_err(call_error("nvmlDeviceGetCount_v2"))?;
        if index >= count {
            return Err(GpuError::NoSuchDevice { index, count });
        }
        Ok(Self {
            nvml,
            index,
            library: library_name,
        })
    }
}

impl Gpu for NvmlGpu {
    fn describe(&self) -> String {
        let driver = self
            .nvml
            .sys_driver_version()
            .unwrap_or_else(|_| "unknown".to_owned());
        format!(
            "NVML ({}), driver {driver}, GPU {}",
            self.library, self.index
        )
    }

    /// Name, memory and processes are required; temperature and utilization are
    /// reported when the device supports them, as many consumer boards do not.
    fn sample(&self) -> Result<GpuSample, GpuError> {
        let device = self
            .nvml
            .device_by_index(self.index)
            .map_err(call_error("nvmlDeviceGetHandleByIndex_v2"))?;
        let name = device.name().map_err(call_error("nvmlDeviceGetName"))?;
        let memory = device
            .memory_info()
            .map_err(call_error("nvmlDeviceGetMemoryInfo_v2"))?;
        let processes = device
            .running_compute_processes()
            .map_err(call_error("nvmlDeviceGetComputeRunningProcesses_v3"))?;
        Ok(GpuSample {
            name,
            total_mb: to_mb(memory.total),
            // The v2 call splits the driver's reserve out of `used`. No service can have
            // it, so it counts as used, and used + free = total as with the v1 call.
            used_mb: to_mb(memory.used.saturating_add(memory.reserved)),
            free_mb: to_mb(memory.free),
            temperature_c: device.temperature(TemperatureSensor::Gpu).ok(),
            utilization_pct: device.utilization_rates().ok().map(|rates| rates.gpu),
            processes: to_processes(processes),
        })
    }
}

/// Sorted by pid, as the simulated backend reports them, so that samples compare.
fn to_processes(infos: Vec<ProcessInfo>) -> Vec<GpuProcess> {
    let mut processes: Vec<GpuProcess> = infos
        .into_iter()
        .map(|info| GpuProcess {
            pid: info.pid,
            used_mb: match info.used_gpu_memory {
                UsedGpuMemory::Used(bytes) => to_mb(bytes),
                UsedGpuMemory::Unavailable => 0,
            },
        })
        .collect();
    processes.sort_by_key(|process| process.pid);
    processes
}

fn to_mb(bytes: u64) -> u64 {
    bytes / BYTES_PER_MB
}

/// A library that cannot be loaded, or lacks `nvmlInit_v2`, is no usable NVML; any other
/// failure (typically "driver not loaded") is the library's answer.
fn init_error(library: &str, error: NvmlError) -> GpuError {
    match error {
        NvmlError::LibloadingError(_) | NvmlError::FailedToLoadSymbol(_) => {
            GpuError::LibraryMissing {
                library: library.to_owned(),
                detail: error.to_string(),
            }
        }
        other => GpuError::Call {
            call: "nvmlInit_v2",
            detail: other.to_string(),
        },
    }
}

fn call_error(call: &'static str) -> impl Fn(NvmlError) -> GpuError {
    move |error| GpuError::Call {
        call,
        detail: error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn megabytes_are_mebibytes_rounded_down() {
        assert_eq!(to_mb(24_576 * BYTES_PER_MB), 24_576);
        assert_eq!(to_mb(BYTES_PER_MB - 1), 0);
    }

    #[test]
    fn processes_are_sorted_and_unavailable_memory_reads_zero() {
        let info = |pid, used_gpu_memory| ProcessInfo {
            pid,
            used_gpu_memory,
            gpu_instance_id: None,
            compute_instance_id: None,
        };
        let processes = to_processes(vec![
            info(30, UsedGpuMemory::Used(2 * BYTES_PER_MB)),
            info(10, UsedGpuMemory::Unavailable),
        ]);
        assert_eq!(
            processes,
            [
                GpuProcess {
                    pid: 10,
                    used_mb: 0
                },
                GpuProcess {
                    pid: 30,
                    used_mb: 2
                },
            ]
        );
    }
}
