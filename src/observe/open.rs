//! Opening the configured GPU backend. Loading and initialising NVML can take seconds on
//! a real driver, so it runs on a blocking thread, never on an async worker.

use std::sync::Arc;

use crate::config::GpuConfig;

use super::gpu::{GpuError, SharedGpu};
use super::nvml::NvmlGpu;
use super::simulated::SimulatedGpu;

/// The GPU the config names (a simulated folder, or NVML), with its source for logs and
/// status ("simulated", "nvml").
pub async fn open_gpu(config: &GpuConfig) -> Result<(SharedGpu, &'static str), GpuError> {
    let (simulated, library, index) = (
        config.simulated.clone(),
        config.nvml_library.clone(),
        config.index,
    );
    let opened = tokio::task::spawn_blocking(move || match simulated {
        Some(dir) => SimulatedGpu::open(dir).map(|gpu| (Arc::new(gpu) as SharedGpu, "simulated")),
        None => {
            NvmlGpu::open(library.as_deref(), index).map(|gpu| (Arc::new(gpu) as SharedGpu, "nvml"))
        }
    })
    .await;
    match opened {
        Ok(result) => result,
        Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
        Err(error) => Err(GpuError::Call {
            call: "open",
            detail: error.to_string(),
        }),
    }
}
