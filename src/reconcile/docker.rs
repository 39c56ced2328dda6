//! The reconciler's Docker parts. A service whose engine cannot be reached is `unknown`:
//! its starts are held back (the start gate says why) and it is asked about again every
//! round, while native services carry on. A service that can give its memory back while
//! running (`evict: ollama`) is asked to before a planned stop, and stays running when
//! the GPU confirms the memory free: the planner then sees it stopped, and a later start
//! only takes the container over and waits for its health check.

use crate::act::instance::{ActError, Instance};
use crate::config::{DockerSpec, Runtime, ServiceName, ServiceSpec};
use crate::status::ServiceState;

use super::{ActionFailure, Reconciler};

impl Reconciler {
    /// Asks the service's backend whether it runs. When the backend cannot be asked,
    /// the service becomes `unknown`, with the error that names the engine tried.
    pub(super) async fn find_running(&mut self, spec: &ServiceSpec) -> Option<Instance> {
        match self.effects.adopt(spec).await {
            Ok(found) => {
                let record = self.record(&spec.name);
                if record.state == ServiceState::Unknown {
                    tracing::info!(service = %spec.name, "its backend answers again");
                    record.set_state(ServiceState::Stopped);
                    record.last_error = None;
                    record.reason = None;
                }
                found
            }
            Err(error) => {
                let message = error.to_string();
                let record = self.record(&spec.name);
                if record.last_error.as_deref() != Some(message.as_str()) {
                    tracing::warn!(service = %spec.name, error = %message, "cannot tell whether it runs");
                }
                if error.is_backend_down() {
                    record.set_state(ServiceState::Unknown);
                }
                record.last_error = Some(message);
                None
            }
        }
    }

    /// Asks again about the services whose backend could not be reached: once it
    /// answers, a running container is adopted and a stopped one can be planned again.
    /// While the first one asked about stays unknown, the others are left for the next
    /// round: they would wait on the same engine, and a hung engine must not hold up
    /// the round.
    pub(super) async fn recheck_unknown(&mut self) {
        let unknown: Vec<ServiceSpec> = self
            .config
            .inventory
            .iter()
            .filter(|spec| {
                let record = &self.records[&spec.name];
                record.state == ServiceState::Unknown && record.instance.is_none()
            })
            .cloned()
            .collect();
        for spec in unknown {
            let name = spec.name.clone();
            self.adopt_each(vec![spec]).await;
            self.publish();
            if self.records[&name].state == ServiceState::Unknown {
                break;
            }
        }
    }

    /// A start that failed. An engine that cannot be reached leaves the service
    /// `unknown` (held back until the engine answers; not a failure of the service);
    /// anything else is a failure, retried with backoff.
    pub(super) fn start_failed(&mut self, name: &ServiceName, error: &ActError) -> ActionFailure {
        let failure = ActionFailure::from(error);
        if error.is_backend_down() {
            let record = self.record(name);
            record.last_error = Some(failure.message.clone());
            record.set_state(ServiceState::Unknown);
            self.publish();
        } else {
            self.fail(name, failure.message.clone());
        }
        failure
    }

    /// A stop that could not reach the engine: whether the container still runs is not
    /// known, so the service is `unknown` and its instance let go; the next round asks
    /// again and adopts the container if it still runs.
    pub(super) fn lose_track(&mut self, name: &ServiceName) {
        let record = self.record(name);
        if let Some(Instance::Docker(handle)) = record.instance.take() {
            handle.release();
        }
        record.set_state(ServiceState::Unknown);
    }

    /// Frees a planned stop's memory. A service that can give it back while running
    /// (`evict: ollama`) is asked to and left running once the GPU shows the memory
    /// free; otherwise, or when that fails, it is stopped. Returns what the eviction did,
    /// when it did it.
    pub(super) async fn evict_or_stop(
        &mut self,
        spec: &ServiceSpec,
        why: &str,
        gpu_pids: &[u32],
    ) -> Result<Option<String>, ActionFailure> {
        if let Some(detail) = self.evict(spec, why, gpu_pids).await {
            return Ok(Some(detail));
        }
        self.stop_instance(spec, why).await.map(|()| None)
    }

    async fn evict(&mut self, spec: &ServiceSpec, why: &str, gpu_pids: &[u32]) -> Option<String> {
        let Runtime::Docker(DockerSpec {
            container,
            evict: Some(eviction),
        }) = &spec.runtime
        else {
            return None;
        };
        let record = self.record(&spec.name);
        let Some(Instance::Docker(handle)) = record.instance.clone() else {
            return None;
        };
        record.stop_monitor();
        record.set_state(ServiceState::Stopping);
        record.reason = Some(why.to_owned());
        self.publish();
        let outcome = match self.effects.evict(spec, eviction).await {
            Ok(models) => self
                .wait_pids_gone(spec, gpu_pids)
                .await
                .map(|()| models)
                .map_err(|failure| failure.message),
            Err(error) => Err(error.to_string()),
        };
        match outcome {
            Ok(models) => {
                handle.release();
                self.record(&spec.name).instance = None;
                let unloaded = if models.is_empty() {
                    "no model was loaded".to_owned()
                } else {
                    format!("unloaded {}", models.join(", "))
                };
                tracing::info!(service = %spec.name, container, ?models, "evicted: the GPU shows its memory free; the container keeps running");
                Some(format!("{unloaded}; container {container} left running"))
            }
            Err(message) => {
                tracing::warn!(service = %spec.name, error = %message, "eviction failed: stopping the container instead");
                self.record(&spec.name).last_error = Some(format!(
                    "eviction failed, so the container was stopped: {message}"
                ));
                None
            }
        }
    }
}
