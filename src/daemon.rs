//! Assembles a daemon from a config: the GPU source, the effects, the lease and the
//! reconciler. The CLI and the demo both start it through here.

use std::sync::Arc;

use crate::act::docker::DockerDriver;
use crate::act::instance::Effects;
use crate::act::native::NativeDriver;
use crate::config::{Config, ConfigError};
use crate::lease::Lease;
use crate::observe::gpu::Gpu;
use crate::observe::health::HealthProber;
use crate::observe::nvml::NvmlGpu;
use crate::observe::simulated::SimulatedGpu;
use crate::reconcile::{DaemonReconciler, GpuSource, Reconciler};

/// Opens the configured GPU. A missing NVML is not fatal: the daemon still runs and
/// budgets from declared sizes (`gpu.total_mb`), saying so in logs and status.
pub fn open_gpu(config: &Config) -> GpuSource {
    let opened = match &config.gpu.simulated {
        Some(dir) => {
            SimulatedGpu::open(dir).map(|gpu| (Arc::new(gpu) as Arc<dyn Gpu>, "simulated"))
        }
        None => NvmlGpu::open(config.gpu.nvml_library.as_deref(), config.gpu.index)
            .map(|gpu| (Arc::new(gpu) as Arc<dyn Gpu>, "nvml")),
    };
    match opened {
        Ok((gpu, source)) => {
            tracing::info!(gpu = %gpu.describe(), "observing the GPU");
            GpuSource::Observed { gpu, source }
        }
        Err(error) => {
            let fallback = match config.gpu.total_mb {
                Some(total) => format!("budgeting from declared vram_mb against gpu.total_mb = {total} MB"),
                None => "and gpu.total_mb is not set, so nothing can be started: set gpu.total_mb to budget from declared vram_mb alone".to_owned(),
            };
            let reason = format!("{error}; {fallback}");
            tracing::warn!(%reason, "GPU unavailable");
            GpuSource::Unavailable { reason }
        }
    }
}

/// The contract's "no vram_mb above the GPU" rule, checked when the GPU can be read.
pub fn check_against_gpu(config: &Config, gpu: &GpuSource) -> Result<(), ConfigError> {
    match gpu {
        GpuSource::Observed { gpu, .. } => match gpu.sample() {
            Ok(sample) => config.check_fits_gpu(sample.total_mb),
            Err(_) => Ok(()),
        },
        GpuSource::Unavailable { .. } => match config.gpu.total_mb {
            Some(total) => config.check_fits_gpu(total),
            None => Ok(()),
        },
    }
}

/// Builds the reconciler for a validated config, with the Docker engine `DOCKER_HOST`
/// names (or the default socket).
pub fn build(config: Arc<Config>) -> anyhow::Result<DaemonReconciler> {
    build_with(config, DockerDriver::from_env())
}

/// Builds the reconciler for a validated config, with docker services going through
/// `docker`. It is not connected yet: an engine that is down leaves docker services
/// `unknown` and native ones untouched.
pub fn build_with(config: Arc<Config>, docker: DockerDriver) -> anyhow::Result<DaemonReconciler> {
    let gpu = open_gpu(&config);
    check_against_gpu(&config, &gpu)?;
    let native = NativeDriver::new(&config.state_dir)
        .map_err(|e| anyhow::anyhow!("cannot use state_dir {}: {e}", config.state_dir.display()))?;
    let prober = HealthProber::new()
        .map_err(|e| anyhow::anyhow!("cannot build the HTTP client for health checks: {e}"))?;
    tracing::info!(
        engine = docker.host(),
        "docker services go through this engine"
    );
    let effects = Effects::new(native, docker, prober);
    let lease = Lease::from_config(&config.lease)?;
    Ok(Reconciler::new(config, gpu, effects, lease))
}
