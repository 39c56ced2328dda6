//! The GPU waits around actions: a stop is done when the GPU no longer lists the
//! service's processes, and a start waits until the GPU shows room for it. Trust the
//! GPU, not the bookkeeping.

use std::time::{Duration, Instant};

use crate::config::ServiceSpec;

use super::observe::{process_name, sample_gpu};
use super::{ActionFailure, GpuSource, Reconciler};

/// How often reclaim and room waits re-read the GPU: an observation costs well under a
/// millisecond, and every poll interval adds to the transition's latency.
const RECLAIM_POLL: Duration = Duration::from_millis(10);

impl Reconciler {
    /// Trusts the GPU, not the bookkeeping: a stop is done when the GPU no longer lists
    /// the service's processes. Skipped when it held no GPU memory.
    pub(super) async fn wait_pids_gone(
        &mut self,
        spec: &ServiceSpec,
        pids: &[u32],
    ) -> Result<(), ActionFailure> {
        let GpuSource::Observed { gpu, .. } = &self.gpu else {
            return Ok(());
        };
        if pids.is_empty() {
            return Ok(());
        }
        let gpu = gpu.clone();
        let deadline = Instant::now() + self.config.gpu.reclaim_timeout;
        loop {
            let sample = sample_gpu(gpu.clone())
                .await
                .map_err(ActionFailure::other)?;
            let left: Vec<_> = sample
                .processes
                .iter()
                .filter(|p| pids.contains(&p.pid))
                .collect();
            if left.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let holders: Vec<String> = left
                    .iter()
                    .map(|p| format!("pid {} ({}) {} MB", p.pid, process_name(p.pid), p.used_mb))
                    .collect();
                return Err(ActionFailure::timeout(format!(
                    "the GPU still lists the memory of {} {:?} after it was asked to free it: {}",
                    spec.name,
                    self.config.gpu.reclaim_timeout,
                    holders.join(", ")
                )));
            }
            tokio::time::sleep(RECLAIM_POLL).await;
        }
    }

    /// Before a start: waits until the GPU shows enough free memory (a stop's memory
    /// may still be in the driver's teardown), naming who holds it on timeout.
    pub(super) async fn wait_for_room(
        &mut self,
        spec: &ServiceSpec,
        need_mb: u64,
    ) -> Result<(), ActionFailure> {
        let GpuSource::Observed { gpu, .. } = &self.gpu else {
            return Ok(());
        };
        let gpu = gpu.clone();
        let reserve = self.config.gpu.reserve_mb;
        let deadline = Instant::now() + self.config.gpu.reclaim_timeout;
        loop {
            let sample = sample_gpu(gpu.clone())
                .await
                .map_err(ActionFailure::other)?;
            let room = sample.free_mb.saturating_sub(reserve);
            if room >= need_mb {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let holders: Vec<String> = sample
                    .processes
                    .iter()
                    .map(|p| {
                        let owner = self
                            .gpu_view
                            .owners
                            .get(&p.pid)
                            .map(|s| s.to_string())
                            .unwrap_or_else(|| "external".to_owned());
                        format!(
                            "pid {} ({}, {owner}) {} MB",
                            p.pid,
                            process_name(p.pid),
                            p.used_mb
                        )
                    })
                    .collect();
                return Err(ActionFailure::timeout(format!(
                    "cannot start {}: it needs {need_mb} MB but only {room} MB is free after {:?} ({} MB reserve); held by: {}",
                    spec.name,
                    self.config.gpu.reclaim_timeout,
                    reserve,
                    if holders.is_empty() { "no listed process".to_owned() } else { holders.join(", ") }
                )));
            }
            tokio::time::sleep(RECLAIM_POLL).await;
        }
    }
}
