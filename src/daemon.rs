//! Assembles a daemon from a config: the GPU source, the effects, the lease and the
//! reconciler. The CLI and the demo both start it through here.

use std::sync::Arc;

use crate::act::docker::DockerDriver;
use crate::act::instance::{CudaParking, Effects};
use crate::act::native::NativeDriver;
use crate::config::{Config, ConfigError};
use crate::desired;
use crate::lease::Lease;
use crate::observe::health::HealthProber;
use crate::observe::open;
use crate::reconcile::{DaemonReconciler, GpuSource, Reconciler};

/// Opens the configured GPU (off the async workers: NVML init can take seconds). A
/// missing NVML is not fatal: the daemon still runs and budgets from declared sizes
/// (`gpu.total_mb`), saying so in logs and status.
pub async fn open_gpu(config: &Config) -> GpuSource {
    let opened = open::open_gpu(&config.gpu).await;
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
pub async fn build(config: Arc<Config>) -> anyhow::Result<DaemonReconciler> {
    build_with(config, DockerDriver::from_env()).await
}

/// Builds the reconciler for a validated config, with docker services going through
/// `docker`. It is not connected yet: an engine that is down leaves docker services
/// `unknown` and native ones untouched. Writes an empty desired-state file if there is
/// none yet, for people to see and edit.
pub async fn build_with(
    config: Arc<Config>,
    docker: DockerDriver,
) -> anyhow::Result<DaemonReconciler> {
    let gpu = open_checked_gpu(&config).await?;
    desired::create_if_missing(&config.desired_state)?;
    let native = NativeDriver::new(&config.state_dir)
        .map_err(|e| anyhow::anyhow!("cannot use state_dir {}: {e}", config.state_dir.display()))?;
    tracing::info!(
        engine = docker.host(),
        "docker services go through this engine"
    );
    let cuda = CudaParking::load_for(&config.inventory, &config.gpu.cuda_library).await;
    let effects = Effects::new(native, docker, prober()?, cuda);
    Ok(Reconciler::new(
        config.clone(),
        gpu,
        effects,
        lease(&config)?,
    ))
}

/// Builds a reconciler for `plan`, which only looks: it creates no state folder and no
/// desired-state file, and its dry run finds running services without adopting them.
pub async fn build_read_only(config: Arc<Config>) -> anyhow::Result<DaemonReconciler> {
    let gpu = open_checked_gpu(&config).await?;
    let native = NativeDriver::read_only(&config.state_dir);
    let cuda = CudaParking::load_for(&config.inventory, &config.gpu.cuda_library).await;
    let effects = Effects::new(native, DockerDriver::from_env(), prober()?, cuda);
    Ok(Reconciler::new(
        config.clone(),
        gpu,
        effects,
        lease(&config)?,
    ))
}

async fn open_checked_gpu(config: &Config) -> Result<GpuSource, ConfigError> {
    let gpu = open_gpu(config).await;
    check_against_gpu(config, &gpu)?;
    Ok(gpu)
}

fn prober() -> anyhow::Result<HealthProber> {
    HealthProber::new()
        .map_err(|e| anyhow::anyhow!("cannot build the HTTP client for health checks: {e}"))
}

fn lease(config: &Config) -> anyhow::Result<Lease> {
    Ok(Lease::from_config(&config.lease)?)
}
