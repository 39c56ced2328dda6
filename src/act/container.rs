//! A docker service's container as the daemon holds it: one run of one container (a
//! restart is another run), and the channel through which the driver's watch reports
//! when that run ends. Engine calls live in `docker.rs`, which builds these.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bollard::models::ContainerInspectResponse;
use tokio::sync::{watch, Notify};

use crate::process_exit::ExitInfo;

/// What an inspect says of a container's current (or last) run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ContainerRun {
    pub id: String,
    pub running: bool,
    /// The host pid of its main process; 0 when it does not run.
    pub pid: u32,
    /// When this run started: with the id, names the run, as a restart changes it.
    pub started_at: String,
    pub exit_code: i64,
}

impl ContainerRun {
    pub fn from_inspect(response: &ContainerInspectResponse) -> Self {
        let state = response.state.as_ref();
        Self {
            id: response.id.clone().unwrap_or_default(),
            running: state.and_then(|s| s.running).unwrap_or(false),
            pid: state
                .and_then(|s| s.pid)
                .and_then(|pid| u32::try_from(pid).ok())
                .unwrap_or(0),
            started_at: state.and_then(|s| s.started_at.clone()).unwrap_or_default(),
            exit_code: state.and_then(|s| s.exit_code).unwrap_or(0),
        }
    }

    /// How the run ended, from its exit code.
    pub fn exit(&self) -> ExitInfo {
        exit_info(self.exit_code)
    }
}

/// Docker reports a process that a signal ended as exit code 128 + the signal.
pub fn exit_info(code: i64) -> ExitInfo {
    match code {
        129..=192 => ExitInfo::Signal((code - 128) as i32),
        _ => ExitInfo::Code(i32::try_from(code).unwrap_or(i32::MAX)),
    }
}

/// A run of a service's container, watched for its end. Clones share the watch.
#[derive(Debug, Clone)]
pub struct ContainerHandle {
    name: String,
    id: String,
    pid: u32,
    started_at: String,
    exit: watch::Receiver<Option<ExitInfo>>,
    watcher: Arc<Watcher>,
}

/// Lets the daemon stop watching a container it leaves running.
#[derive(Debug, Default)]
struct Watcher {
    released: AtomicBool,
    stop: Notify,
}

impl ContainerHandle {
    /// A handle on `run` of the container `name`, and the end of the channel through
    /// which a watch reports how the run ended. Dropping the [`RunWatch`] unwatched
    /// makes [`ContainerHandle::wait_exit`] answer [`ExitInfo::Unknown`] at once.
    pub(crate) fn new(name: &str, run: ContainerRun) -> (Self, RunWatch) {
        let (exit_tx, exit_rx) = watch::channel(None);
        let handle = Self {
            name: name.to_owned(),
            id: run.id,
            pid: run.pid,
            started_at: run.started_at,
            exit: exit_rx,
            watcher: Arc::default(),
        };
        let run_watch = RunWatch {
            name: handle.name.clone(),
            id: handle.id.clone(),
            started_at: handle.started_at.clone(),
            watcher: handle.watcher.clone(),
            exit: exit_tx,
        };
        (handle, run_watch)
    }

    /// The container's name, as the config gives it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The container's full id, as its processes' cgroups name it.
    pub fn id(&self) -> &str {
        &self.id
    }

    pub(crate) fn started_at(&self) -> &str {
        &self.started_at
    }

    /// The host pid of the container's main process, whose process tree belongs to the
    /// service; None once the handle is released.
    pub fn root_pid(&self) -> Option<u32> {
        (!self.watcher.released.load(Ordering::SeqCst)).then_some(self.pid)
    }

    /// Waits until this run has ended. Cancel-safe. A released handle answers
    /// [`ExitInfo::Unknown`] at once: the daemon no longer follows the container.
    pub async fn wait_exit(&self) -> ExitInfo {
        let mut exit = self.exit.clone();
        let seen = exit.wait_for(Option::is_some).await.map(|info| *info);
        seen.ok().flatten().unwrap_or(ExitInfo::Unknown)
    }

    /// Lets the container run on without the daemon: its watch ends and the handle no
    /// longer names a process (a parked Ollama keeps running, holding no memory).
    pub fn release(&self) {
        self.watcher.released.store(true, Ordering::SeqCst);
        self.watcher.stop.notify_one();
    }
}

/// The watching side of a [`ContainerHandle`]: which run to follow, and where to report
/// its end.
pub(crate) struct RunWatch {
    pub name: String,
    pub id: String,
    pub started_at: String,
    watcher: Arc<Watcher>,
    exit: watch::Sender<Option<ExitInfo>>,
}

impl RunWatch {
    /// Sleeps `period`; false when the watch should end instead: no handle is left, or
    /// the daemon released the container.
    pub async fn wait(&self, period: Duration) -> bool {
        tokio::select! {
            () = self.exit.closed() => false,
            () = self.watcher.stop.notified() => false,
            () = tokio::time::sleep(period) => true,
        }
    }

    /// Reports how the run ended to every handle.
    pub fn report(self, info: ExitInfo) {
        self.exit.send_replace(Some(info));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_above_128_are_signals() {
        assert_eq!(exit_info(0), ExitInfo::Code(0));
        assert_eq!(exit_info(3), ExitInfo::Code(3));
        assert_eq!(exit_info(137), ExitInfo::Signal(9));
        assert_eq!(exit_info(143), ExitInfo::Signal(15));
        assert_eq!(exit_info(128), ExitInfo::Code(128));
        assert_eq!(exit_info(255), ExitInfo::Code(255));
    }

    #[test]
    fn a_run_is_read_from_an_inspect_answer() {
        let response: ContainerInspectResponse = serde_json::from_value(serde_json::json!({
            "Id": "4f1c",
            "State": { "Running": false, "Pid": 0, "ExitCode": 3, "StartedAt": "2026-01-01T00:00:00Z" }
        }))
        .unwrap();
        let run = ContainerRun::from_inspect(&response);
        assert_eq!(
            run,
            ContainerRun {
                id: "4f1c".into(),
                running: false,
                pid: 0,
                started_at: "2026-01-01T00:00:00Z".into(),
                exit_code: 3,
            }
        );
        assert_eq!(run.exit(), ExitInfo::Code(3));
    }
}
