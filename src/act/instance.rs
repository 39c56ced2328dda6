//! One running instance of a service, whatever its runtime, and the effects that start,
//! stop and adopt it. The reconciler speaks only to this module, so a runtime's details
//! (process groups, containers) stay out of the decision code.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::act::common::{blocking, StopReport, LOG_LINES_IN_ERRORS};
use crate::act::container::ContainerHandle;
use crate::act::cuda_checkpoint::{CheckpointError, CudaCheckpoint};
use crate::act::docker::{DockerDriver, DockerError};
use crate::act::drain::{self, DrainProbe};
use crate::act::native::{NativeDriver, NativeError, ProcessHandle};
use crate::act::ollama::{unload_ollama_models, OllamaError};
use crate::act::park::{self, ParkRequestError};
use crate::config::{
    DrainSpec, Inventory, NativeSpec, ParkMethod, ParkSpec, Runtime, ServiceName, ServiceSpec,
};
use crate::observe::health::{wait_ready, HealthProber, ReadyError};
use crate::process_exit::ExitInfo;

#[derive(Debug, Clone)]
pub enum Instance {
    Native(ProcessHandle),
    Docker(ContainerHandle),
}

impl Instance {
    /// The pid whose process tree belongs to the service (for GPU attribution).
    pub fn root_pid(&self) -> Option<u32> {
        match self {
            Instance::Native(handle) => Some(handle.pid()),
            Instance::Docker(handle) => handle.root_pid(),
        }
    }

    /// The container whose processes belong to the service, found by their cgroup even
    /// when they do not descend from its main process (`docker exec`).
    pub fn container_id(&self) -> Option<&str> {
        match self {
            Instance::Native(_) => None,
            Instance::Docker(handle) => Some(handle.id()),
        }
    }

    pub async fn wait_exit(&self) -> ExitInfo {
        match self {
            Instance::Native(handle) => handle.wait_exit().await,
            Instance::Docker(handle) => handle.wait_exit().await,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ActError {
    #[error(transparent)]
    Native(#[from] NativeError),
    #[error(transparent)]
    Docker(#[from] DockerError),
    #[error(transparent)]
    Ollama(#[from] OllamaError),
    #[error(transparent)]
    ParkRequest(#[from] ParkRequestError),
    #[error("{0}")]
    Checkpoint(String),
    #[error("{service} exited while starting ({exit}); last log lines:\n{log}")]
    ExitedWhileStarting {
        service: String,
        exit: ExitInfo,
        log: String,
    },
    #[error(
        "{service} did not become ready within {after:?} ({last_error}); last log lines:\n{log}"
    )]
    NotReady {
        service: String,
        after: Duration,
        last_error: String,
        log: String,
    },
}

/// What kind of failure an [`ActError`] is, for the caller to decide how to answer (the
/// API maps it to a status code); the act layer knows nothing of the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActErrorKind {
    /// The service did not become ready within its start timeout.
    NotReady,
    /// The backend the service runs on (the Docker engine) cannot be reached.
    BackendDown,
    Other,
}

impl ActError {
    /// What kind of failure this is; the reconciler maps it to the API's status code.
    pub fn kind(&self) -> ActErrorKind {
        match self {
            ActError::NotReady { .. } => ActErrorKind::NotReady,
            _ if self.is_backend_down() => ActErrorKind::BackendDown,
            _ => ActErrorKind::Other,
        }
    }

    /// The backend the service runs on (the Docker engine) cannot be reached, so nothing
    /// is known of the service (the API answers 503 for it; the error names the engine
    /// address tried).
    pub fn is_backend_down(&self) -> bool {
        matches!(self, ActError::Docker(error) if error.is_unreachable())
    }
}

pub struct Effects {
    native: NativeDriver,
    docker: DockerDriver,
    prober: HealthProber,
    cuda: CudaParking,
}

/// The CUDA driver's checkpoint API, for services that park through it: loaded once at
/// start, or why it cannot be (then they are stopped instead of parked).
#[derive(Clone)]
pub enum CudaParking {
    NotUsed,
    Loaded(Arc<CudaCheckpoint>),
    Unavailable(String),
}

impl CudaParking {
    /// Loads `library` if a service of the inventory parks with `kind: cuda-checkpoint`.
    pub async fn load_for(inventory: &Inventory, library: &Path) -> Self {
        let used = inventory
            .iter()
            .any(|s| s.park.as_ref().map(|p| &p.method) == Some(&ParkMethod::CudaCheckpoint));
        if !used {
            return CudaParking::NotUsed;
        }
        let library = library.to_owned();
        match blocking(move || CudaCheckpoint::load(&library)).await {
            Ok(api) => {
                tracing::info!(driver = ?api.driver_version(), "cuda-checkpoint parking is available");
                CudaParking::Loaded(Arc::new(api))
            }
            Err(error) => {
                tracing::warn!(%error, "cuda-checkpoint parking is unavailable: those services are stopped instead");
                CudaParking::Unavailable(error.to_string())
            }
        }
    }
}

impl Effects {
    pub fn new(
        native: NativeDriver,
        docker: DockerDriver,
        prober: HealthProber,
        cuda: CudaParking,
    ) -> Self {
        Self {
            native,
            docker,
            prober,
            cuda,
        }
    }

    /// Why the service cannot park as configured, if it cannot.
    pub fn park_unavailable(&self, spec: &ServiceSpec) -> Option<String> {
        let cuda = spec.park.as_ref()?.method == ParkMethod::CudaCheckpoint;
        match (&self.cuda, cuda) {
            (CudaParking::Unavailable(reason), true) => Some(reason.clone()),
            _ => None,
        }
    }

    /// Runs `call` on each pid through the checkpoint API, on the blocking pool.
    async fn each_pid(
        &self,
        pids: &[u32],
        call: impl Fn(&CudaCheckpoint, u32) -> Result<(), CheckpointError> + Send + Sync + 'static,
    ) -> Result<String, ActError> {
        let api = match &self.cuda {
            CudaParking::Loaded(api) => api.clone(),
            CudaParking::Unavailable(reason) => {
                return Err(ActError::Checkpoint(format!(
                    "cuda-checkpoint is unavailable: {reason}"
                )))
            }
            CudaParking::NotUsed => {
                return Err(ActError::Checkpoint(
                    "cuda-checkpoint was not loaded".to_owned(),
                ))
            }
        };
        if pids.is_empty() {
            return Err(ActError::Checkpoint(
                "no process of the service holds GPU memory: nothing to checkpoint".to_owned(),
            ));
        }
        let pids = pids.to_vec();
        let listed = format!("{pids:?}");
        blocking(move || pids.iter().try_for_each(|pid| call(&api, *pid)))
            .await
            .map_err(|error| ActError::Checkpoint(error.to_string()))?;
        Ok(listed)
    }

    pub fn prober(&self) -> &HealthProber {
        &self.prober
    }

    /// Finds an instance that is already running (left by an earlier daemon, or a
    /// container started by hand) and takes it over: a pid file records it, a task
    /// watches for its exit. Fails only when the backend cannot be asked.
    pub async fn adopt(&self, spec: &ServiceSpec) -> Result<Option<Instance>, ActError> {
        match &spec.runtime {
            Runtime::Native(native) => Ok(self
                .off_worker(&spec.name, native, NativeDriver::adopt)
                .await
                .map(Instance::Native)),
            Runtime::Docker(docker) => Ok(self
                .docker
                .adopt(&spec.name, docker)
                .await?
                .map(Instance::Docker)),
        }
    }

    /// Finds an instance that is already running, as [`Effects::adopt`] would, changing
    /// nothing: no pid file is written or removed, no task watches it (its `wait_exit`
    /// answers at once), a container is only inspected. For dry runs (`plan`).
    pub async fn look_up(&self, spec: &ServiceSpec) -> Result<Option<Instance>, ActError> {
        match &spec.runtime {
            Runtime::Native(native) => Ok(self
                .off_worker(&spec.name, native, NativeDriver::find)
                .await
                .map(Instance::Native)),
            Runtime::Docker(docker) => Ok(self
                .docker
                .find(&spec.name, docker)
                .await?
                .map(Instance::Docker)),
        }
    }

    /// Launches the service; readiness is awaited separately with `wait_ready`.
    pub async fn start(&self, spec: &ServiceSpec) -> Result<Instance, ActError> {
        match &spec.runtime {
            Runtime::Native(native) => Ok(Instance::Native(
                self.off_worker(&spec.name, native, NativeDriver::spawn)
                    .await?,
            )),
            Runtime::Docker(docker) => Ok(Instance::Docker(
                self.docker.start(&spec.name, docker).await?,
            )),
        }
    }

    /// Runs a native driver call on a blocking thread: they read /proc, open logs and
    /// fsync pid files, which must not hold up an async worker. The thread is inside the
    /// runtime, so the call may spawn tasks (a child's reaper, an adopted process's
    /// watch).
    async fn off_worker<T: Send + 'static>(
        &self,
        name: &ServiceName,
        spec: &NativeSpec,
        call: fn(&NativeDriver, &ServiceName, &NativeSpec) -> T,
    ) -> T {
        let (driver, name, spec) = (self.native.clone(), name.clone(), spec.clone());
        blocking(move || call(&driver, &name, &spec)).await
    }

    /// Waits until the health endpoint answers 2xx, failing at once if it exits.
    pub async fn wait_ready(
        &self,
        spec: &ServiceSpec,
        instance: &Instance,
    ) -> Result<Duration, ActError> {
        let result = wait_ready(
            &self.prober,
            spec.health.as_ref(),
            spec.start_timeout,
            instance.wait_exit(),
        )
        .await;
        let error = match result {
            Ok(took) => return Ok(took),
            Err(error) => error,
        };
        let service = spec.name.to_string();
        let log = self.current_log_lines(spec).await.join("\n");
        Err(match error {
            ReadyError::Exited(exit) => ActError::ExitedWhileStarting { service, exit, log },
            ReadyError::TimedOut { after, last_error } => ActError::NotReady {
                service,
                after,
                last_error: last_error
                    .map(|e| e.to_string())
                    .unwrap_or_else(|| "no probe answered yet".to_owned()),
                log,
            },
        })
    }

    /// Stops the instance and confirms it is gone (the whole process tree, or the
    /// container).
    pub async fn stop(
        &self,
        spec: &ServiceSpec,
        instance: &Instance,
    ) -> Result<StopReport, ActError> {
        match instance {
            Instance::Native(handle) => Ok(self
                .native
                .stop(&spec.name, handle, spec.stop_timeout)
                .await?),
            Instance::Docker(handle) => Ok(self
                .docker
                .stop(&spec.name, handle, spec.stop_timeout)
                .await?),
        }
    }

    /// Asks the service to give its GPU memory back while it keeps running; says what it
    /// did. `gpu_pids` are the service's processes on the GPU (cuda-checkpoint acts on
    /// each). The memory is only free once the GPU says so.
    pub async fn park(
        &self,
        spec: &ServiceSpec,
        park: &ParkSpec,
        gpu_pids: &[u32],
    ) -> Result<String, ActError> {
        match &park.method {
            ParkMethod::Http { park: request, .. } => {
                let answer = park::send(self.prober.client(), request, park.timeout).await?;
                Ok(format!(
                    "{} {} answered {answer:?}",
                    request.method, request.url
                ))
            }
            ParkMethod::Ollama { url } => {
                let models =
                    unload_ollama_models(self.prober.client(), &spec.name, url, park.timeout)
                        .await?;
                Ok(if models.is_empty() {
                    "no model was loaded".to_owned()
                } else {
                    format!("unloaded {}", models.join(", "))
                })
            }
            ParkMethod::CudaCheckpoint => {
                let timeout = park.timeout;
                let pids = self
                    .each_pid(gpu_pids, move |api, pid| api.checkpoint(pid, timeout))
                    .await?;
                Ok(format!("checkpointed pids {pids} to host memory"))
            }
        }
    }

    /// Brings a parked service's memory back; says what it did. `parked_pids` are the
    /// processes the park acted on. The caller has made sure its full footprint is free.
    pub async fn resume(
        &self,
        spec: &ServiceSpec,
        park: &ParkSpec,
        parked_pids: &[u32],
    ) -> Result<String, ActError> {
        match &park.method {
            ParkMethod::Http {
                resume: Some(request),
                ..
            } => {
                let answer = park::send(self.prober.client(), request, park.timeout).await?;
                Ok(format!(
                    "{} {} answered {answer:?}",
                    request.method, request.url
                ))
            }
            ParkMethod::Http { resume: None, .. } => {
                Ok("no resume request: it reloads on first use".to_owned())
            }
            ParkMethod::Ollama { .. } => Ok("Ollama loads its models on first use".to_owned()),
            ParkMethod::CudaCheckpoint => {
                let pids = self
                    .each_pid(parked_pids, |api, pid| api.restore(pid))
                    .await
                    .map_err(|error| ActError::Checkpoint(format!("{}: {error}", spec.name)))?;
                Ok(format!("restored pids {pids} from host memory"))
            }
        }
    }

    /// One probe of the service's drain URL.
    pub async fn drain_probe(&self, spec: &DrainSpec) -> DrainProbe {
        drain::probe(self.prober.client(), spec).await
    }

    /// The last log lines of the service's latest run that ended: its log file (read on
    /// a blocking thread), or what its container wrote before it exited.
    pub async fn last_log_lines(&self, spec: &ServiceSpec) -> Vec<String> {
        match &spec.runtime {
            Runtime::Native(_) => {
                let (driver, name) = (self.native.clone(), spec.name.clone());
                blocking(move || driver.last_log_lines(&name, LOG_LINES_IN_ERRORS)).await
            }
            Runtime::Docker(docker) => self.docker.exit_log(&docker.container),
        }
    }

    /// The last log lines the service wrote, asking the engine for a container's.
    async fn current_log_lines(&self, spec: &ServiceSpec) -> Vec<String> {
        match &spec.runtime {
            Runtime::Native(_) => self.last_log_lines(spec).await,
            Runtime::Docker(docker) => {
                self.docker
                    .last_log_lines(&docker.container, LOG_LINES_IN_ERRORS)
                    .await
            }
        }
    }
}
