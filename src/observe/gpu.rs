//! The GPU as the daemon sees it, behind one trait: NVML on a real (or fake) driver, or
//! the simulated GPU folder for the demo.

use std::sync::Arc;

use serde::Serialize;

/// One compute process on the GPU and the memory it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct GpuProcess {
    pub pid: u32,
    pub used_mb: u64,
}

/// One full observation of the GPU.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GpuSample {
    pub name: String,
    pub total_mb: u64,
    pub used_mb: u64,
    pub free_mb: u64,
    pub temperature_c: Option<u32>,
    pub utilization_pct: Option<u32>,
    pub processes: Vec<GpuProcess>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum GpuError {
    #[error("NVML library could not be loaded ({library}): {detail}; install the NVIDIA driver or set gpu.nvml_library")]
    LibraryMissing { library: String, detail: String },
    #[error("NVML call {call} failed: {detail}")]
    Call { call: &'static str, detail: String },
    #[error("GPU index {index} does not exist ({count} GPUs found); set gpu.index")]
    NoSuchDevice { index: u32, count: u32 },
    #[error("simulated GPU folder {path}: {detail}")]
    Simulated { path: String, detail: String },
}

/// A source of GPU observations. Calls block (NVML does): the reconciler runs them on a
/// blocking thread.
pub trait Gpu: Send + Sync + 'static {
    /// A short description for logs and status, e.g. "NVML (libnvidia-ml.so.1)".
    fn describe(&self) -> String;
    fn sample(&self) -> Result<GpuSample, GpuError>;
}

pub type SharedGpu = Arc<dyn Gpu>;
