//! What the reconciler asks of the world, as a trait (docs/ARCHITECTURE.md, "Effects"):
//! the real one goes through the native and Docker drivers; the unit tests use a fake
//! that records calls, under tokio's paused clock.

use std::fmt;
use std::future::Future;
use std::time::Duration;

pub use crate::act::drain::DrainProbe;
use crate::act::instance::{ActError, ActErrorKind, Effects, Instance};
use crate::act::ExitInfo;
use crate::config::{DrainSpec, HealthCheck, ParkSpec, ServiceSpec};
use crate::status::FailureKind;

/// An effect that failed, classified for the reconciler's decisions and the API's code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct EffectError {
    pub kind: FailureKind,
    pub message: String,
}

impl EffectError {
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    /// The backend (the Docker engine) cannot be reached: nothing is known of the
    /// service, which is not the service's failure.
    pub fn is_backend_down(&self) -> bool {
        self.kind == FailureKind::BackendDown
    }
}

impl From<ActError> for EffectError {
    fn from(error: ActError) -> Self {
        Self::new(failure_kind(error.kind()), error.to_string())
    }
}

/// How an effect's failure shows in the API: 504 on a start timeout, 503 when the
/// backend is down.
fn failure_kind(kind: ActErrorKind) -> FailureKind {
    match kind {
        ActErrorKind::NotReady => FailureKind::Timeout,
        ActErrorKind::BackendDown => FailureKind::BackendDown,
        ActErrorKind::Other => FailureKind::Other,
    }
}

/// How a stop went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopHow {
    /// It ended on SIGTERM (or `docker stop`) within its stop timeout.
    Graceful,
    /// It had to be killed.
    Killed,
}

/// Starting, stopping and watching services. Every method may take as long as the
/// service does; the reconciler runs them in action tasks, never in its loop.
pub trait ServiceEffects: Send + Sync + 'static {
    type Instance: Clone + Send + Sync + fmt::Debug + 'static;

    /// An instance already running (left by an earlier daemon), if any. Fails only when
    /// the backend cannot be asked.
    fn find_running(
        &self,
        spec: &ServiceSpec,
    ) -> impl Future<Output = Result<Option<Self::Instance>, EffectError>> + Send;

    /// What `find_running` would find, changing nothing: no pid file written, nothing
    /// watched (the instance's exit is never reported). For dry runs (`plan`).
    fn look_up(
        &self,
        spec: &ServiceSpec,
    ) -> impl Future<Output = Result<Option<Self::Instance>, EffectError>> + Send;

    /// Launches the service; readiness is awaited with `wait_ready`.
    fn start(
        &self,
        spec: &ServiceSpec,
    ) -> impl Future<Output = Result<Self::Instance, EffectError>> + Send;

    /// Until the health endpoint answers 2xx; fails at once if the instance exits.
    fn wait_ready(
        &self,
        spec: &ServiceSpec,
        instance: &Self::Instance,
    ) -> impl Future<Output = Result<Duration, EffectError>> + Send;

    /// Stops the instance and confirms it is gone (the whole tree, or the container).
    fn stop(
        &self,
        spec: &ServiceSpec,
        instance: &Self::Instance,
    ) -> impl Future<Output = Result<StopHow, EffectError>> + Send;

    /// Asks a running service to give its GPU memory back while it keeps running; says
    /// what it did. `gpu_pids`: its processes on the GPU now. The memory is only given
    /// back once the GPU shows it.
    fn park(
        &self,
        spec: &ServiceSpec,
        park: &ParkSpec,
        gpu_pids: &[u32],
    ) -> impl Future<Output = Result<String, EffectError>> + Send;

    /// Brings a parked service's memory back; says what it did. `parked_pids`: the
    /// processes its park acted on. Called only with its full footprint free.
    fn resume(
        &self,
        spec: &ServiceSpec,
        park: &ParkSpec,
        parked_pids: &[u32],
    ) -> impl Future<Output = Result<String, EffectError>> + Send;

    /// Why the service cannot park as configured (the driver lacks the checkpoint API),
    /// if it cannot: it is stopped instead, and status says why.
    fn park_unavailable(&self, spec: &ServiceSpec) -> Option<String>;

    /// One probe of whether the service has work in flight.
    fn drain_probe(&self, drain: &DrainSpec) -> impl Future<Output = DrainProbe> + Send;

    /// Lets an instance run on untracked (another daemon leads, or its backend cannot
    /// say whether it still runs).
    fn let_go(&self, instance: &Self::Instance);

    /// Resolves when the instance ends.
    fn wait_exit(instance: Self::Instance) -> impl Future<Output = ExitInfo> + Send + 'static;

    /// One health probe.
    fn probe(&self, check: &HealthCheck) -> impl Future<Output = Result<(), String>> + Send;

    /// The last lines the service's latest run wrote, for error messages.
    fn last_log_lines(&self, spec: &ServiceSpec) -> impl Future<Output = Vec<String>> + Send;

    /// The pid whose process tree belongs to the service (for GPU attribution).
    fn root_pid(instance: &Self::Instance) -> Option<u32>;

    /// The container whose cgroup holds the service's processes, if any.
    fn container_id(instance: &Self::Instance) -> Option<String>;
}

impl ServiceEffects for Effects {
    type Instance = Instance;

    async fn find_running(&self, spec: &ServiceSpec) -> Result<Option<Instance>, EffectError> {
        Ok(self.adopt(spec).await?)
    }

    async fn look_up(&self, spec: &ServiceSpec) -> Result<Option<Instance>, EffectError> {
        Ok(Effects::look_up(self, spec).await?)
    }

    async fn start(&self, spec: &ServiceSpec) -> Result<Instance, EffectError> {
        Ok(Effects::start(self, spec).await?)
    }

    async fn wait_ready(
        &self,
        spec: &ServiceSpec,
        instance: &Instance,
    ) -> Result<Duration, EffectError> {
        Ok(Effects::wait_ready(self, spec, instance).await?)
    }

    async fn stop(&self, spec: &ServiceSpec, instance: &Instance) -> Result<StopHow, EffectError> {
        let report = Effects::stop(self, spec, instance).await?;
        Ok(if report.forced {
            StopHow::Killed
        } else {
            StopHow::Graceful
        })
    }

    async fn park(
        &self,
        spec: &ServiceSpec,
        park: &ParkSpec,
        gpu_pids: &[u32],
    ) -> Result<String, EffectError> {
        Ok(Effects::park(self, spec, park, gpu_pids).await?)
    }

    async fn resume(
        &self,
        spec: &ServiceSpec,
        park: &ParkSpec,
        parked_pids: &[u32],
    ) -> Result<String, EffectError> {
        Ok(Effects::resume(self, spec, park, parked_pids).await?)
    }

    fn park_unavailable(&self, spec: &ServiceSpec) -> Option<String> {
        Effects::park_unavailable(self, spec)
    }

    async fn drain_probe(&self, drain: &DrainSpec) -> DrainProbe {
        Effects::drain_probe(self, drain).await
    }

    fn let_go(&self, instance: &Instance) {
        if let Instance::Docker(handle) = instance {
            handle.release();
        }
    }

    async fn wait_exit(instance: Instance) -> ExitInfo {
        instance.wait_exit().await
    }

    async fn probe(&self, check: &HealthCheck) -> Result<(), String> {
        self.prober().probe(check).await.map_err(|e| e.to_string())
    }

    async fn last_log_lines(&self, spec: &ServiceSpec) -> Vec<String> {
        Effects::last_log_lines(self, spec).await
    }

    fn root_pid(instance: &Instance) -> Option<u32> {
        instance.root_pid()
    }

    fn container_id(instance: &Instance) -> Option<String> {
        instance.container_id().map(str::to_owned)
    }
}
