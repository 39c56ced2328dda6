//! Docker services: containers the daemon starts, adopts and stops by name through the
//! Docker Engine API (bollard).
//!
//! The engine's answers prove little by themselves (a start or stop of a container
//! already in that state answers 304, which reads as success), so every change is
//! confirmed by inspecting the container afterwards. The engine may be down when the
//! daemon starts, or go away later: the driver connects lazily, and again after any
//! failure to reach it, so docker services come back as soon as the engine does, while
//! native services never notice.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bollard::errors::Error as EngineError;
use bollard::query_parameters::{LogsOptions, StopContainerOptionsBuilder};
use bollard::Docker;
use futures_util::StreamExt;

use crate::act::common::{error_chain, StopReport, LOG_LINES_IN_ERRORS};
use crate::act::container::{ContainerHandle, ContainerRun, RunWatch};
use crate::config::{DockerSpec, ServiceName};
use crate::process_exit::ExitInfo;

/// The engine's address when `DOCKER_HOST` names none.
pub const DEFAULT_HOST: &str = "unix:///var/run/docker.sock";
/// How long a quick engine call (version, inspect, logs) may take: a local engine
/// answers in milliseconds, so one that has not answered by then is as good as down, and
/// a hung engine must not hold up the reconciler (and so native services) for longer.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// How long `docker start` may take: runtime hooks (the NVIDIA container toolkit's)
/// make a GPU container's start take seconds.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// bollard's own limit on every request; the driver's limits are shorter, except for a
/// stop, whose limit follows the service's stop timeout.
const TRANSPORT_TIMEOUT: Duration = Duration::from_secs(3600);
/// After `docker stop` returns (or gives up), how long the container may take to show as
/// stopped: only a process stuck in the kernel survives SIGKILL that long.
const CONFIRM_WAIT: Duration = Duration::from_secs(5);
const CONFIRM_POLL: Duration = Duration::from_millis(50);
/// How often a watched container is inspected for its end: an inspect of a local engine
/// costs about a millisecond, and a crash should fail a start within a fraction of a
/// second.
const EXIT_POLL: Duration = Duration::from_millis(200);
/// The exit code Docker reports for a process that SIGKILL ended.
const KILLED: i64 = 128 + libc::SIGKILL as i64;

/// Why a docker service could not be adopted, started or stopped, phrased for the
/// operator. [`DockerError::is_unreachable`] tells a down engine (the API's 503) from
/// the rest.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("the Docker engine at {host} cannot be reached: {detail} (is dockerd running? DOCKER_HOST selects another engine)")]
    Unreachable { host: String, detail: String },
    #[error("cannot use {service}: container {container:?} does not exist; docker create it first (or fix services.{service}.container)")]
    Missing {
        service: ServiceName,
        container: String,
    },
    #[error("docker {operation} {container} ({service}) failed: {detail}")]
    Engine {
        service: ServiceName,
        container: String,
        operation: &'static str,
        detail: String,
    },
    #[error(
        "{service} exited while starting (container {container} {exit} right after docker start); last log lines:\n{log}"
    )]
    ExitedAtStart {
        service: ServiceName,
        container: String,
        exit: ExitInfo,
        log: String,
    },
    #[error("cannot stop {service}: container {container} still runs {:.1}s after docker stop -t {timeout_s} (and the SIGKILL after it): stuck in the kernel, e.g. in the GPU driver?", waited.as_secs_f64())]
    StillRunning {
        service: ServiceName,
        container: String,
        timeout_s: u64,
        waited: Duration,
    },
}

impl DockerError {
    /// The engine could not be asked at all, so nothing is known of the container.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, DockerError::Unreachable { .. })
    }
}

/// How one engine call failed, before it is put in a service's terms.
#[derive(Debug)]
enum CallError {
    /// The engine could not be reached (no socket, refused, broken connection).
    Down(String),
    /// No answer within the call's limit.
    TimedOut(Duration),
    /// The engine answered with an error status.
    Status { code: u16, message: String },
    /// The engine answered something the client could not use.
    Other(String),
}

/// What `docker inspect` says of a container, for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerSummary {
    pub image: String,
    pub state: String,
}

/// Starts, adopts and stops docker services through one engine. Cheap to clone: clones
/// share the connection and the logs of runs that ended.
#[derive(Debug, Clone)]
pub struct DockerDriver {
    host: String,
    client: Arc<Mutex<Option<Docker>>>,
    /// The last log lines of each container's latest run that ended, by name: read by
    /// [`DockerDriver::exit_log`] when the daemon reports an unexpected exit.
    exit_logs: Arc<Mutex<HashMap<String, Vec<String>>>>,
}

impl DockerDriver {
    /// The engine `DOCKER_HOST` names (`unix://`, `tcp://` or `http://`), else the
    /// default socket. Connects at the first call, not here, so that a daemon started
    /// before the engine still runs its native services.
    pub fn from_env() -> Self {
        let host = std::env::var("DOCKER_HOST")
            .ok()
            .filter(|host| !host.is_empty())
            .unwrap_or_else(|| DEFAULT_HOST.to_owned());
        Self::new(host)
    }

    pub fn new(host: impl Into<String>) -> Self {
        Self {
            host: host.into(),
            client: Arc::default(),
            exit_logs: Arc::default(),
        }
    }

    /// The engine address tried, as error messages name it.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Finds the service's container running (left by an earlier daemon, or started by
    /// hand) and takes it over without restarting it. Ok(None) when it is not running;
    /// a missing container is only warned about here, as nothing needs it yet.
    pub async fn adopt(
        &self,
        service: &ServiceName,
        spec: &DockerSpec,
    ) -> Result<Option<ContainerHandle>, DockerError> {
        let container = &spec.container;
        let Some(run) = self.running(service, container).await? else {
            return Ok(None);
        };
        tracing::info!(%service, container, pid = run.pid, "adopted a running container");
        Ok(Some(self.watch(service, container, run)))
    }

    /// Finds the service's container running, as [`DockerDriver::adopt`] would, without
    /// taking it over: nothing watches the handle (its `wait_exit` answers at once).
    /// For `plan`, which only looks.
    pub async fn find(
        &self,
        service: &ServiceName,
        spec: &DockerSpec,
    ) -> Result<Option<ContainerHandle>, DockerError> {
        let container = &spec.container;
        let run = self.running(service, container).await?;
        Ok(run.map(|run| ContainerHandle::new(container, run).0))
    }

    /// The container's current run if it is running; a missing container is warned
    /// about.
    async fn running(
        &self,
        service: &ServiceName,
        container: &str,
    ) -> Result<Option<ContainerRun>, DockerError> {
        match self.inspect(container).await {
            Ok(Some(run)) if run.running => Ok(Some(run)),
            Ok(Some(_)) => Ok(None),
            Ok(None) => {
                tracing::warn!(%service, container, "the container does not exist: docker create it before the service is wanted");
                Ok(None)
            }
            Err(error) => Err(self.service_error(error, service, container, "inspect")),
        }
    }

    /// `docker start` by name, confirmed by inspecting the container: a container that
    /// already runs is taken over as it is; one that exits at once fails the start with
    /// its last log lines. Readiness is awaited separately.
    pub async fn start(
        &self,
        service: &ServiceName,
        spec: &DockerSpec,
    ) -> Result<ContainerHandle, DockerError> {
        let container = &spec.container;
        let before = self.inspect_existing(service, container).await?;
        if before.running {
            tracing::info!(%service, container, pid = before.pid, "the container already runs: taking it over");
            return Ok(self.watch(service, container, before));
        }
        self.call(START_TIMEOUT, |client| async move {
            client.start_container(container, None).await
        })
        .await
        .map_err(|error| self.service_error(error, service, container, "start"))?;
        let after = self.inspect_existing(service, container).await?;
        if after.running {
            tracing::info!(%service, container, pid = after.pid, "started");
            return Ok(self.watch(service, container, after));
        }
        Err(DockerError::ExitedAtStart {
            service: service.clone(),
            container: container.clone(),
            exit: after.exit(),
            log: self
                .last_log_lines(container, LOG_LINES_IN_ERRORS)
                .await
                .join("\n"),
        })
    }

    /// `docker stop` with the service's stop timeout (rounded up to whole seconds, as the
    /// engine counts them), which sends the container's stop signal and SIGKILL after
    /// the timeout; then inspects until the container shows as stopped. A container
    /// removed meanwhile counts as stopped.
    pub async fn stop(
        &self,
        service: &ServiceName,
        handle: &ContainerHandle,
        timeout: Duration,
    ) -> Result<StopReport, DockerError> {
        let started = Instant::now();
        let container = handle.name();
        let seconds = timeout
            .as_millis()
            .div_ceil(1000)
            .clamp(1, i32::MAX as u128) as i32;
        let options = StopContainerOptionsBuilder::new().t(seconds).build();
        let limit = Duration::from_secs(seconds as u64) + CONFIRM_WAIT + CALL_TIMEOUT;
        let id = handle.id();
        let stopped = self
            .call(limit, |client| async move {
                client.stop_container(id, Some(options)).await
            })
            .await;
        match stopped {
            Ok(()) | Err(CallError::Status { code: 404, .. }) => {}
            Err(CallError::TimedOut(after)) => {
                tracing::warn!(%service, container, "docker stop did not answer within {after:?}");
            }
            Err(error) => return Err(self.service_error(error, service, container, "stop")),
        }
        let deadline = Instant::now() + CONFIRM_WAIT;
        let forced = loop {
            match self.inspect(id).await {
                Ok(None) => break false,
                Ok(Some(run)) if run.started_at != handle.started_at() => break false,
                Ok(Some(run)) if !run.running => break run.exit_code == KILLED,
                Ok(Some(_)) if Instant::now() >= deadline => {
                    return Err(DockerError::StillRunning {
                        service: service.clone(),
                        container: container.to_owned(),
                        timeout_s: seconds as u64,
                        waited: started.elapsed(),
                    })
                }
                Ok(Some(_)) => tokio::time::sleep(CONFIRM_POLL).await,
                Err(error) => return Err(self.service_error(error, service, container, "inspect")),
            }
        };
        let report = StopReport {
            forced,
            elapsed: started.elapsed(),
        };
        tracing::info!(%service, container, forced, elapsed_ms = report.elapsed.as_millis() as u64, "stopped");
        Ok(report)
    }

    /// The last `n` lines the container wrote (stdout and stderr), oldest first; empty
    /// when the engine cannot say.
    pub async fn last_log_lines(&self, container: &str, n: usize) -> Vec<String> {
        let options = LogsOptions {
            stdout: true,
            stderr: true,
            tail: n.to_string(),
            ..Default::default()
        };
        let read = self
            .call(CALL_TIMEOUT, |client| async move {
                let mut text = Vec::new();
                let mut stream = client.logs(container, Some(options));
                while let Some(chunk) = stream.next().await {
                    text.extend_from_slice(chunk?.as_ref());
                }
                Ok(text)
            })
            .await;
        match read {
            Ok(text) => String::from_utf8_lossy(&text)
                .lines()
                .map(str::to_owned)
                .collect(),
            Err(error) => {
                tracing::warn!(container, ?error, "cannot read the container's logs");
                Vec::new()
            }
        }
    }

    /// The last log lines of the container's latest run that ended while watched; empty
    /// when none has.
    pub fn exit_log(&self, container: &str) -> Vec<String> {
        lock(&self.exit_logs)
            .get(container)
            .cloned()
            .unwrap_or_default()
    }

    /// A handle on `run`, with a task that inspects the container until the run ends
    /// (must run inside a Tokio runtime). The watch ends with the run, or when no handle
    /// is left, or on [`ContainerHandle::release`].
    fn watch(&self, service: &ServiceName, container: &str, run: ContainerRun) -> ContainerHandle {
        let (handle, run_watch) = ContainerHandle::new(container, run);
        tokio::spawn(watch_run(self.clone(), service.clone(), run_watch));
        handle
    }

    /// A container's image and state (`running`, `exited`...), for `gpu-manager doctor`;
    /// Ok(None) when it does not exist.
    pub async fn describe(
        &self,
        service: &ServiceName,
        container: &str,
    ) -> Result<Option<ContainerSummary>, DockerError> {
        let inspected = self
            .call(CALL_TIMEOUT, |client| async move {
                client.inspect_container(container, None).await
            })
            .await;
        match inspected {
            Ok(response) => Ok(Some(ContainerSummary {
                image: response.config.and_then(|c| c.image).unwrap_or_default(),
                state: response
                    .state
                    .and_then(|s| s.status)
                    .map(|s| s.to_string())
                    .unwrap_or_default(),
            })),
            Err(CallError::Status { code: 404, .. }) => Ok(None),
            Err(error) => Err(self.service_error(error, service, container, "inspect")),
        }
    }

    /// The container's current run, or None when no container has this name or id.
    async fn inspect(&self, container: &str) -> Result<Option<ContainerRun>, CallError> {
        let inspected = self
            .call(CALL_TIMEOUT, |client| async move {
                client.inspect_container(container, None).await
            })
            .await;
        match inspected {
            Ok(response) => Ok(Some(ContainerRun::from_inspect(&response))),
            Err(CallError::Status { code: 404, .. }) => Ok(None),
            Err(error) => Err(error),
        }
    }

    async fn inspect_existing(
        &self,
        service: &ServiceName,
        container: &str,
    ) -> Result<ContainerRun, DockerError> {
        self.inspect(container)
            .await
            .map_err(|error| self.service_error(error, service, container, "inspect"))?
            .ok_or_else(|| DockerError::Missing {
                service: service.clone(),
                container: container.to_owned(),
            })
    }

    /// One engine call within `limit`. A failure to reach the engine drops the
    /// connection, so the next call connects (and negotiates the API version) again.
    async fn call<T, F, Fut>(&self, limit: Duration, request: F) -> Result<T, CallError>
    where
        F: FnOnce(Docker) -> Fut,
        Fut: Future<Output = Result<T, EngineError>>,
    {
        let client = self.client().await?;
        let outcome = match tokio::time::timeout(limit, request(client)).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(error)) => classify(&error),
            Err(_) => CallError::TimedOut(limit),
        };
        if matches!(outcome, CallError::Down(_) | CallError::TimedOut(_)) {
            *lock(&self.client) = None;
        }
        Err(outcome)
    }

    /// The connection, made (and the API version agreed with the engine) on first use.
    async fn client(&self) -> Result<Docker, CallError> {
        if let Some(client) = lock(&self.client).clone() {
            return Ok(client);
        }
        let client = Docker::connect_with_host(&self.host)
            .map_err(|error| CallError::Down(error_chain(&error)))?
            .with_timeout(TRANSPORT_TIMEOUT);
        let client = match tokio::time::timeout(CALL_TIMEOUT, client.negotiate_version()).await {
            Ok(Ok(client)) => client,
            Ok(Err(error)) => return Err(classify(&error)),
            Err(_) => return Err(CallError::TimedOut(CALL_TIMEOUT)),
        };
        *lock(&self.client) = Some(client.clone());
        Ok(client)
    }

    /// Puts a failed call in the service's terms.
    fn service_error(
        &self,
        error: CallError,
        service: &ServiceName,
        container: &str,
        operation: &'static str,
    ) -> DockerError {
        let host = self.host.clone();
        let service = service.clone();
        let container = container.to_owned();
        match error {
            CallError::Down(detail) => DockerError::Unreachable { host, detail },
            CallError::TimedOut(after) => DockerError::Unreachable {
                host,
                detail: format!("no answer to docker {operation} within {after:?}"),
            },
            CallError::Status { code: 404, .. } => DockerError::Missing { service, container },
            CallError::Status { code, message } => DockerError::Engine {
                service,
                container,
                operation,
                detail: format!("{message} (HTTP {code})"),
            },
            CallError::Other(detail) => DockerError::Engine {
                service,
                container,
                operation,
                detail,
            },
        }
    }
}

/// Inspects the container until its run ends, then keeps its last log lines for the
/// failure message and publishes how it ended. An engine that cannot be reached is
/// retried: the container may outlive the engine's absence, and only the engine can say.
async fn watch_run(driver: DockerDriver, service: ServiceName, run: RunWatch) {
    let mut unanswered = false;
    while run.wait(EXIT_POLL).await {
        let info = match driver.inspect(&run.id).await {
            Ok(Some(now)) if now.started_at == run.started_at && now.running => {
                unanswered = false;
                continue;
            }
            Ok(Some(now)) if now.started_at == run.started_at => now.exit(),
            // Restarted since (a restart policy) or removed: this run ended, how is not
            // known.
            Ok(Some(_)) | Ok(None) => ExitInfo::Unknown,
            Err(error) => {
                if !unanswered {
                    let error = driver.service_error(error, &service, &run.name, "inspect");
                    tracing::warn!(%service, container = run.name, %error, "cannot watch the container; retrying");
                }
                unanswered = true;
                continue;
            }
        };
        let lines = driver.last_log_lines(&run.id, LOG_LINES_IN_ERRORS).await;
        lock(&driver.exit_logs).insert(run.name.clone(), lines);
        tracing::info!(%service, container = run.name, "container {info}");
        run.report(info);
        return;
    }
}

/// Sorts bollard's errors: the engine answered (a status), answered nonsense, or could
/// not be reached at all.
fn classify(error: &EngineError) -> CallError {
    match error {
        EngineError::DockerResponseServerError {
            status_code,
            message,
        } => CallError::Status {
            code: *status_code,
            message: message.clone(),
        },
        EngineError::JsonDataError { .. }
        | EngineError::JsonSerdeError { .. }
        | EngineError::APIVersionParseError {}
        | EngineError::DockerStreamError { .. }
        | EngineError::DockerContainerWaitError { .. } => CallError::Other(error_chain(error)),
        _ => CallError::Down(error_chain(error)),
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(raw: &str) -> ServiceName {
        ServiceName::parse(raw).unwrap()
    }

    #[tokio::test]
    async fn a_missing_socket_is_an_unreachable_engine_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let host = format!("unix://{}/docker.sock", dir.path().display());
        let driver = DockerDriver::new(&host);
        let spec = DockerSpec {
            container: "mcn_cosyvoice".into(),
        };
        let error = driver.start(&name("cosyvoice"), &spec).await.unwrap_err();
        assert!(error.is_unreachable(), "{error:?}");
        let message = error.to_string();
        assert!(message.contains(&host), "{message}");
        assert!(message.contains("is dockerd running?"), "{message}");
        let error = driver.adopt(&name("cosyvoice"), &spec).await.unwrap_err();
        assert!(error.is_unreachable(), "{error:?}");
    }

    #[test]
    fn engine_answers_are_sorted_from_transport_failures() {
        let answered = classify(&EngineError::DockerResponseServerError {
            status_code: 404,
            message: "No such container: x".into(),
        });
        assert!(matches!(answered, CallError::Status { code: 404, .. }));
        let down = classify(&EngineError::SocketNotFoundError("/nowhere.sock".into()));
        assert!(matches!(down, CallError::Down(ref d) if d.contains("/nowhere.sock")));
        assert!(matches!(
            classify(&EngineError::RequestTimeoutError),
            CallError::Down(_)
        ));
    }

    #[test]
    fn service_errors_say_what_to_do() {
        let driver = DockerDriver::new("unix:///run/docker.sock");
        let svc = name("cosyvoice");
        let missing = driver.service_error(
            CallError::Status {
                code: 404,
                message: "No such container".into(),
            },
            &svc,
            "mcn_cosyvoice",
            "start",
        );
        let text = missing.to_string();
        assert!(
            text.contains("\"mcn_cosyvoice\"") && text.contains("docker create"),
            "{text}"
        );
        let refused = driver.service_error(
            CallError::Status {
                code: 500,
                message: "OCI runtime create failed".into(),
            },
            &svc,
            "mcn_cosyvoice",
            "start",
        );
        assert_eq!(
            refused.to_string(),
            "docker start mcn_cosyvoice (cosyvoice) failed: OCI runtime create failed (HTTP 500)"
        );
        let slow = driver.service_error(
            CallError::TimedOut(CALL_TIMEOUT),
            &svc,
            "mcn_cosyvoice",
            "inspect",
        );
        assert!(slow.is_unreachable());
        assert!(slow.to_string().contains("unix:///run/docker.sock"));
    }
}
