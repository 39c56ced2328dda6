//! Observation for the reconciler: one GPU sample with every process attributed to a
//! service, external, or reclaiming, and the planner's view built from it and from the
//! actions under way. GPU and /proc reads run on the blocking pool, never on the async
//! workers.

use std::collections::HashMap;
use tokio::time::Instant;

use crate::config::ServiceName;
use crate::footprints::Footprint;
use crate::lease::LeaseBackend;
use crate::observe::gpu::{GpuSample, SharedGpu};
use crate::observe::owners::Owners;
use crate::observe::process::{self, ProcessTable};
use crate::plan::{Budget, Launch, Observation, Op, Presence, ServiceView, StartGate};
use crate::status::ServiceState;

use super::effects::ServiceEffects;
use super::records::Record;
use super::{GpuSource, Reconciler};

/// The GPU as last observed, with every process attributed to its owner.
pub(super) struct GpuView<T = ServiceName> {
    pub(super) sample: Option<GpuSample>,
    pub(super) error: Option<String>,
    pub(super) owners: HashMap<u32, T>,
    pub(super) external_mb: u64,
    pub(super) reclaiming_mb: u64,
}

impl<T> Default for GpuView<T> {
    fn default() -> Self {
        Self {
            sample: None,
            error: None,
            owners: HashMap::new(),
            external_mb: 0,
            reclaiming_mb: 0,
        }
    }
}

impl<E: ServiceEffects, L: LeaseBackend> Reconciler<E, L> {
    pub(super) async fn observe(&mut self) -> Observation {
        let mut owners = Owners::default();
        for record in self.records.iter() {
            if let Some(instance) = record.instance() {
                owners.claim(
                    record.name().clone(),
                    E::root_pid(instance),
                    E::container_id(instance).as_deref(),
                );
            }
        }
        self.gpu_view = match &self.gpu {
            GpuSource::Observed { gpu, .. } => observe_gpu(gpu.clone(), owners).await,
            GpuSource::Unavailable { reason } => GpuView {
                error: Some(reason.clone()),
                ..Default::default()
            },
        };
        let mut observed: HashMap<ServiceName, u64> = HashMap::new();
        if let Some(sample) = &self.gpu_view.sample {
            for process in &sample.processes {
                if let Some(owner) = self.gpu_view.owners.get(&process.pid) {
                    *observed.entry(owner.clone()).or_insert(0) += process.used_mb;
                }
            }
        }
        for record in self.records.iter_mut() {
            record.observed_mb = observed.get(record.name()).copied();
        }
        self.learn_peaks();
        let now = Instant::now();
        let services = self
            .records
            .iter()
            .map(|record| {
                let learned = self.footprints.get(record.name());
                (record.name().clone(), view_of(record, now, learned))
            })
            .collect();
        Observation {
            budget: self.budget(),
            services,
            demanded: self.demand.names(),
        }
    }

    pub(super) fn budget(&self) -> Budget {
        let reserve_mb = self.config.gpu.reserve_mb;
        match &self.gpu_view.sample {
            // A start's process may allocate before the loop has heard that it was
            // spawned, and so before its memory can be attributed: memory that no
            // service claims, up to what the starts under way have yet to show, is
            // theirs, already budgeted, not external (counted twice, it would preempt
            // the very services being started).
            Some(sample) => Budget {
                total_mb: sample.total_mb,
                reserve_mb,
                external_mb: self.gpu_view.external_mb.saturating_sub(self.promised_mb()),
            },
            None => Budget {
                total_mb: self.config.gpu.total_mb.unwrap_or(0),
                reserve_mb,
                external_mb: 0,
            },
        }
    }

    /// What the starts under way have yet to allocate, as far as the GPU shows: each is
    /// budgeted at its declared size or its learned peak.
    fn promised_mb(&self) -> u64 {
        self.records
            .iter()
            .filter(|r| r.starting())
            .map(|r| {
                self.footprints
                    .budget_mb(&r.spec)
                    .saturating_sub(r.observed_mb.unwrap_or(0))
            })
            .sum()
    }

    /// What the GPU shows free for new starts: free memory, less the reserve and what
    /// the starts under way have yet to allocate. None without an observed GPU.
    pub(super) fn gpu_room_mb(&self) -> Option<u64> {
        let sample = self.gpu_view.sample.as_ref()?;
        Some(
            sample
                .free_mb
                .saturating_sub(self.config.gpu.reserve_mb)
                .saturating_sub(self.promised_mb()),
        )
    }
}

/// The planner's view of one service: where it stands, and whether it may be acted on.
fn view_of<I>(record: &Record<I>, now: Instant, learned: Option<&Footprint>) -> ServiceView {
    let presence = match (record.in_flight(), record.instance()) {
        (Some(flight), _) if flight.superseded => Presence::Stopping,
        (Some(flight), _) => match flight.op {
            Op::Start | Op::Resume => Presence::Starting,
            Op::Park => Presence::Parking,
            Op::Stop => Presence::Stopping,
        },
        (None, Some(_)) if record.parked_pids().is_some() => Presence::Parked,
        (None, Some(_)) => Presence::Running,
        (None, None) => Presence::Stopped,
    };
    let gate = if record.state() == ServiceState::Unknown {
        StartGate::Closed {
            reason: record.last_error().map(str::to_owned).unwrap_or_default(),
        }
    } else if record.gate_closed(now) {
        StartGate::Closed {
            reason: record.reason().map(str::to_owned).unwrap_or_default(),
        }
    } else {
        StartGate::Open
    };
    ServiceView {
        presence,
        observed_mb: record.observed_mb,
        learned_mb: learned.and_then(|f| f.peak_mb),
        learned_residual_mb: learned.and_then(|f| f.residual_mb),
        gate,
        condition: record.condition().clone(),
        launch: match record.outdated_keys() {
            Some(keys) => Launch::Outdated {
                keys: keys.to_vec(),
            },
            None => Launch::Current,
        },
    }
}

pub(super) async fn sample_gpu(gpu: SharedGpu) -> Result<GpuSample, String> {
    tokio::task::spawn_blocking(move || gpu.sample())
        .await
        .map_err(|e| format!("GPU observation panicked: {e}"))?
        .map_err(|e| e.to_string())
}

/// The GPU processes of one instance (its process tree, or its container's cgroup).
pub(super) async fn gpu_pids_of(
    gpu: SharedGpu,
    root_pid: Option<u32>,
    container_id: Option<String>,
) -> Vec<u32> {
    let mut owners = Owners::default();
    owners.claim((), root_pid, container_id.as_deref());
    let view = observe_gpu(gpu, owners).await;
    view.owners.into_keys().collect()
}

/// One GPU observation with every process attributed to an owner, external, or
/// reclaiming (its process has exited; the driver has not freed its memory yet).
async fn observe_gpu<T: Clone + Send + 'static>(gpu: SharedGpu, owners: Owners<T>) -> GpuView<T> {
    let result = tokio::task::spawn_blocking(move || {
        let sample = gpu.sample().map_err(|e| e.to_string())?;
        let table = ProcessTable::ancestry_of(sample.processes.iter().map(|p| p.pid));
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
        Ok::<_, String>(view)
    })
    .await
    .map_err(|e| format!("GPU observation panicked: {e}"))
    .and_then(|r| r);
    result.unwrap_or_else(|error| GpuView {
        error: Some(error),
        ..Default::default()
    })
}

pub(super) fn process_name(pid: u32) -> String {
    process::command_name(pid).unwrap_or_else(|| "exited".to_owned())
}
