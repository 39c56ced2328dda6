//! The simulated GPU folder (docs/ARCHITECTURE.md in the repository root, "Simulated GPU
//! folder").
//!
//! This is the one implementation of that contract. The daemon's simulated backend, the
//! fake libnvidia-ml and the stand-in services all go through it, so they cannot disagree
//! about what "used", "free" or "reclaimed" mean.
//!
//! Layout of a folder:
//! - `device.json`: the [`DeviceSpec`];
//! - `alloc/<pid>`: decimal MB that process `<pid>` holds; a living process may rewrite
//!   its own ([`SimGpuDir::resize`]: lower when it parks, higher when it resumes);
//! - `alloc/<pid>.exited`: epoch ms when `<pid>` was first seen dead;
//! - `oom.log`: one line per refused allocation;
//! - `lost.log`: one line per stop that cut work short ([`SimGpuDir::record_lost`]);
//! - `host/<pid>`: decimal MB that a CUDA checkpoint moved off the device for `<pid>`;
//! - `host/<pid>.locked`: `<pid>`'s CUDA calls are locked by the checkpoint API;
//! - `.lock`: `flock`ed by every reader and writer.

mod files;
mod folder;
mod host;
mod liveness;
mod lock;
#[cfg(test)]
mod test_support;

pub use folder::SimGpuDir;
pub use host::CheckpointView;

use serde::{Deserialize, Serialize};

/// The environment variable naming the folder for the fake libnvidia-ml and the
/// stand-in services.
pub const ENV_VAR: &str = "FAKE_NVML_DIR";

/// The simulated device, as stored in `device.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceSpec {
    pub name: String,
    pub total_mb: u64,
    /// Used memory that no listed process owns (a desktop).
    pub baseline_mb: u64,
    /// How long a dead process's memory stays in use, as a driver's teardown takes time.
    pub reclaim_ms: u64,
    pub temperature_c: u32,
    pub utilization_pct: u32,
}

/// The memory one process holds on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    pub pid: u32,
    pub mb: u64,
}

/// One consistent reading of the folder, taken under its lock after reclaiming.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub device: DeviceSpec,
    /// `baseline_mb` plus every allocation, dead processes' included until reclaimed.
    pub used_mb: u64,
    /// `total_mb - used_mb`, or 0 when the device is over-committed.
    pub free_mb: u64,
    /// One entry per `alloc/<pid>` file, sorted by pid.
    pub processes: Vec<Allocation>,
}

/// Why [`SimGpuDir::allocate`] or [`SimGpuDir::resize`] failed.
#[derive(Debug, thiserror::Error)]
pub enum AllocError {
    /// Refused as a CUDA allocation would be; a line was appended to `oom.log`.
    #[error("out of memory: {requested_mb} MB requested, {free_mb} MB free")]
    OutOfMemory { requested_mb: u64, free_mb: u64 },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}
