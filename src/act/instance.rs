//! One running instance of a service, whatever its runtime, and the effects that start,
//! stop and adopt it. The reconciler speaks only to this module, so adding a runtime
//! (Docker) touches this dispatch and nothing in the decision code.

use std::time::Duration;

use crate::act::native::{NativeDriver, NativeError, ProcessHandle, StopReport};
use crate::act::ExitInfo;
use crate::config::{Runtime, ServiceSpec};
use crate::observe::health::{wait_ready, HealthProber, ReadyError};
use crate::status::FailureKind;

/// How many log lines an error message carries.
const LOG_LINES_IN_ERRORS: usize = 10;

#[derive(Debug, Clone)]
pub enum Instance {
    Native(ProcessHandle),
}

impl Instance {
    /// The pid whose process tree belongs to the service (for GPU attribution).
    pub fn root_pid(&self) -> Option<u32> {
        match self {
            Instance::Native(handle) => Some(handle.pid()),
        }
    }

    pub async fn wait_exit(&self) -> ExitInfo {
        match self {
            Instance::Native(handle) => handle.wait_exit().await,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ActError {
    #[error(transparent)]
    Native(#[from] NativeError),
    #[error("{service} is a {kind} service, which this build cannot run")]
    Unsupported { service: String, kind: &'static str },
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

impl ActError {
    /// What kind of failure this is: decides the API's status code (504 on timeout).
    pub fn failure_kind(&self) -> FailureKind {
        match self {
            ActError::NotReady { .. } => FailureKind::Timeout,
            _ => FailureKind::Other,
        }
    }
}

pub struct Effects {
    native: NativeDriver,
    prober: HealthProber,
}

impl Effects {
    pub fn new(native: NativeDriver, prober: HealthProber) -> Self {
        Self { native, prober }
    }

    pub fn prober(&self) -> &HealthProber {
        &self.prober
    }

    /// Finds an instance that is already running (left by an earlier daemon).
    pub fn adopt(&self, spec: &ServiceSpec) -> Option<Instance> {
        match &spec.runtime {
            Runtime::Native(native) => self.native.adopt(&spec.name, native).map(Instance::Native),
            Runtime::Docker(_) => None,
        }
    }

    /// Launches the service; readiness is awaited separately with `wait_ready`.
    pub async fn start(&self, spec: &ServiceSpec) -> Result<Instance, ActError> {
        match &spec.runtime {
            Runtime::Native(native) => Ok(Instance::Native(self.native.spawn(&spec.name, native)?)),
            Runtime::Docker(_) => Err(ActError::Unsupported {
                service: spec.name.to_string(),
                kind: spec.runtime.kind(),
            }),
        }
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
        result.map_err(|error| {
            let service = spec.name.to_string();
            let log = self.last_log_lines(spec).join("\n");
            match error {
                ReadyError::Exited(exit) => ActError::ExitedWhileStarting { service, exit, log },
                ReadyError::TimedOut { after, last_error } => ActError::NotReady {
                    service,
                    after,
                    last_error: last_error
                        .map(|e| e.to_string())
                        .unwrap_or_else(|| "no probe answered yet".to_owned()),
                    log,
                },
            }
        })
    }

    /// Stops the instance and confirms it is gone (the whole process tree).
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
        }
    }

    pub fn last_log_lines(&self, spec: &ServiceSpec) -> Vec<String> {
        self.native.last_log_lines(&spec.name, LOG_LINES_IN_ERRORS)
    }
}
