//! Observation for the reconciler: one GPU sample with every process attributed to a
//! service, external, or reclaiming, and the planner's view built from it.

use std::collections::HashMap;
use std::time::Instant;

use crate::config::ServiceName;
use crate::observe::gpu::{GpuSample, SharedGpu};
use crate::observe::owners::Owners;
use crate::observe::process::ProcessTable;
use crate::plan::{Budget, Observation, Presence, ServiceView, StartGate};
use crate::status::ServiceState;

use super::{GpuSource, Reconciler};

/// The GPU as last observed, with every process attributed.
#[derive(Default)]
pub(super) struct GpuView {
    pub(super) sample: Option<GpuSample>,
    pub(super) error: Option<String>,
    pub(super) owners: HashMap<u32, ServiceName>,
    pub(super) external_mb: u64,
    pub(super) reclaiming_mb: u64,
}

impl Reconciler {
    pub(super) async fn observe(&mut self) -> Observation {
        let mut owners = Owners::default();
        for (name, record) in &self.records {
            if let Some(instance) = &record.instance {
                owners.claim(name.clone(), instance.root_pid(), instance.container_id());
            }
        }
        self.gpu_view = match &self.gpu {
            GpuSource::Observed { gpu, .. } => observe_gpu(gpu.clone(), owners).await,
            GpuSource::Unavailable { reason } => GpuView {
                error: Some(reason.clone()),
                ..Default::default()
            },
        };
        for record in self.records.values_mut() {
            record.observed_mb = None;
            record.gpu_pids.clear();
        }
        if let Some(sample) = &self.gpu_view.sample {
            for process in &sample.processes {
                if let Some(owner) = self.gpu_view.owners.get(&process.pid) {
                    let record = self.records.get_mut(owner).expect("owner is a service");
                    *record.observed_mb.get_or_insert(0) += process.used_mb;
                    record.gpu_pids.push(process.pid);
                }
            }
        }
        let budget = self.budget();
        let now = Instant::now();
        let services = self
            .records
            .iter()
            .map(|(name, record)| {
                let presence = if record.instance.is_some() {
                    Presence::Running
                } else {
                    Presence::Stopped
                };
                let gate = match (record.state, record.retry_at) {
                    (ServiceState::Failed, Some(at)) if at > now => StartGate::Closed {
                        reason: record.reason.clone().unwrap_or_default(),
                    },
                    (ServiceState::Failed, None) => StartGate::Closed {
                        reason: record.reason.clone().unwrap_or_default(),
                    },
                    (ServiceState::Unknown, _) => StartGate::Closed {
                        reason: record.last_error.clone().unwrap_or_default(),
                    },
                    _ => StartGate::Open,
                };
                let view = ServiceView {
                    presence,
                    observed_mb: record.observed_mb,
                    gate,
                };
                (name.clone(), view)
            })
            .collect();
        Observation { budget, services }
    }

    pub(super) fn budget(&self) -> Budget {
        let reserve_mb = self.config.gpu.reserve_mb;
        match &self.gpu_view.sample {
            Some(sample) => Budget {
                total_mb: sample.total_mb,
                reserve_mb,
                external_mb: self.gpu_view.external_mb,
            },
            None => Budget {
                total_mb: self.config.gpu.total_mb.unwrap_or(0),
                reserve_mb,
                external_mb: 0,
            },
        }
    }
}

pub(super) async fn sample_gpu(gpu: SharedGpu) -> Result<GpuSample, String> {
    tokio::task::spawn_blocking(move || gpu.sample())
        .await
        .map_err(|e| format!("GPU observation panicked: {e}"))?
        .map_err(|e| e.to_string())
}

/// One GPU observation with every process attributed to a service, external, or
/// reclaiming (its process has exited; the driver has not freed its memory yet).
async fn observe_gpu(gpu: SharedGpu, owners: Owners<ServiceName>) -> GpuView {
    let result = tokio::task::spawn_blocking(move || {
        let sample = gpu.sample().map_err(|e| e.to_string())?;
        let table = ProcessTable::read().map_err(|e| format!("cannot read /proc: {e}"))?;
        Ok::<_, String>((sample, table))
    })
    .await
    .map_err(|e| format!("GPU observation panicked: {e}"))
    .and_then(|r| r);
    let (sample, table) = match result {
        Ok(pair) => pair,
        Err(error) => {
            return GpuView {
                error: Some(error),
                ..Default::default()
            }
        }
    };
    let mut view = GpuView::default();
    let mut listed_mb = 0;
    for process in &sample.processes {
        listed_mb += process.used_mb;
        if let Some(owner) = owners.owner_of(&table, process.pid) {
            view.owners.insert(process.pid, owner.clone());
        } else if table.get(process.pid).is_some_and(|p| !p.zombie) {
            view.external_mb += process.used_mb;
        } else {
            view.reclaiming_mb += process.used_mb;
        }
    }
    // Memory no listed process holds (a desktop, the driver) is external too.
    view.external_mb += sample.used_mb.saturating_sub(listed_mb);
    view.sample = Some(sample);
    view
}

pub(super) fn process_name(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|c| c.trim().to_owned())
        .unwrap_or_else(|_| "exited".to_owned())
}
