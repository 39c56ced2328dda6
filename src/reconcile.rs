//! The reconciler: ONE task owns all mutable state; file watches, process exits and
//! health monitors only send it events. Each round it observes, asks the pure planner
//! what to do, and acts under the lease: stops first, confirming through the GPU that the
//! memory came back, then starts, waiting until each is healthy.

mod docker;
mod observe;
mod requests;
mod snapshot;
mod waits;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::AbortHandle;

use crate::act::instance::{ActError, Effects, Instance};
use crate::act::ExitInfo;
use crate::config::{Config, ServiceName, ServiceSpec};
use crate::desired::{self, DesiredState};
use crate::lease::{Leadership, Lease};
use crate::observe::gpu::SharedGpu;
use crate::plan::{self, Action, Op, Plan, Verdict};
use crate::status::{
    now_ms, ActionRecord, DaemonEvent, FailureKind, ServiceState, Status, TransitionStats,
};
use crate::transition::{Change, RoundEnd, TransitionError, TransitionReply, Waiters};

use observe::GpuView;

/// Restarts back off 1 s, 2 s, 4 s... up to this.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// After this many failures in a row a service stays `failed` until the desired state
/// changes.
const MAX_CONSECUTIVE_FAILURES: u32 = 5;
/// Consecutive failed probes before a ready service is declared unhealthy.
const UNHEALTHY_AFTER: u32 = 3;
/// How many past actions status keeps.
const ACTION_HISTORY: usize = 50;

/// What wakes the reconciler.
#[derive(Debug)]
pub enum Event {
    /// The desired-state file may have changed.
    DesiredFileChanged,
    Exited {
        service: ServiceName,
        pid: u32,
        exit: ExitInfo,
    },
    /// A ready service failed its health checks `UNHEALTHY_AFTER` times in a row.
    Unhealthy {
        service: ServiceName,
        pid: u32,
        error: String,
    },
    /// A request from the API.
    Command(Command),
}

/// What the API asks of the reconciler.
#[derive(Debug)]
pub enum Command {
    /// Change the desired state; answered when converged, or at once if `wait` is false.
    Transition {
        change: Change,
        wait: bool,
        reply: TransitionReply,
    },
    /// The plan the daemon would follow for a change, without making it.
    Plan {
        change: Option<Change>,
        reply: oneshot::Sender<Result<Plan, TransitionError>>,
    },
}

/// Where GPU observations come from, as said in logs and status.
pub enum GpuSource {
    Observed {
        gpu: SharedGpu,
        source: &'static str,
    },
    Unavailable {
        reason: String,
    },
}

/// The reconciler's own record of one service.
struct Record {
    name: ServiceName,
    state: ServiceState,
    since_ms: u64,
    instance: Option<Instance>,
    monitor: Option<AbortHandle>,
    last_error: Option<String>,
    reason: Option<String>,
    restarts: u32,
    consecutive_failures: u32,
    retry_at: Option<Instant>,
    observed_mb: Option<u64>,
    gpu_pids: Vec<u32>,
}

impl Record {
    fn new(name: ServiceName) -> Self {
        Self {
            name,
            state: ServiceState::Stopped,
            since_ms: now_ms(),
            instance: None,
            monitor: None,
            last_error: None,
            reason: None,
            restarts: 0,
            consecutive_failures: 0,
            retry_at: None,
            observed_mb: None,
            gpu_pids: Vec::new(),
        }
    }

    fn set_state(&mut self, state: ServiceState) {
        if self.state != state {
            tracing::info!(service = %self.name, from = %self.state, to = %state, "service state");
            self.state = state;
            self.since_ms = now_ms();
        }
    }

    fn stop_monitor(&mut self) {
        if let Some(monitor) = self.monitor.take() {
            monitor.abort();
        }
    }
}

/// Handles for the rest of the daemon: send events, read status.
#[derive(Clone)]
pub struct ReconcilerHandle {
    pub events: mpsc::Sender<Event>,
    pub status: watch::Receiver<Status>,
    /// Every state change and action, for the event stream.
    pub feed: broadcast::Sender<DaemonEvent>,
}

pub struct Reconciler {
    config: Arc<Config>,
    gpu: GpuSource,
    effects: Arc<Effects>,
    lease: Lease,
    desired: Option<DesiredState>,
    desired_error: Option<String>,
    generation: u64,
    converged_generation: u64,
    records: BTreeMap<ServiceName, Record>,
    gpu_view: GpuView,
    history: Vec<ActionRecord>,
    transitions: TransitionStats,
    waiters: Waiters,
    feed: broadcast::Sender<DaemonEvent>,
    events_tx: mpsc::Sender<Event>,
    events_rx: mpsc::Receiver<Event>,
    status_tx: watch::Sender<Status>,
    /// The first round's observation (and adoption, when leading) is done; published as
    /// `Status::first_round_done` for the readiness notification (src/notify.rs).
    first_round_done: bool,
}

impl Reconciler {
    pub fn new(config: Arc<Config>, gpu: GpuSource, effects: Effects, lease: Lease) -> Self {
        let (events_tx, events_rx) = mpsc::channel(256);
        let (status_tx, _) = watch::channel(Status::default());
        let records = config
            .inventory
            .iter()
            .map(|s| (s.name.clone(), Record::new(s.name.clone())))
            .collect();
        let reconciler = Self {
            config,
            gpu,
            effects: Arc::new(effects),
            lease,
            desired: None,
            desired_error: None,
            generation: 0,
            converged_generation: 0,
            records,
            gpu_view: GpuView::default(),
            history: Vec::new(),
            transitions: TransitionStats::default(),
            waiters: Waiters::default(),
            feed: broadcast::channel(1024).0,
            events_tx,
            events_rx,
            status_tx,
            first_round_done: false,
        };
        // The API checks names against the snapshot: it lists every service from the start.
        reconciler.publish();
        reconciler
    }

    pub fn handle(&self) -> ReconcilerHandle {
        ReconcilerHandle {
            events: self.events_tx.clone(),
            status: self.status_tx.subscribe(),
            feed: self.feed.clone(),
        }
    }

    /// Runs until the process ends: adopt what runs, then reconcile on every trigger.
    pub async fn run(mut self) {
        let (file_tx, mut file_rx) = mpsc::channel(1);
        let _watch = match desired::watch(&self.config.desired_state, file_tx) {
            Ok(watch) => Some(watch),
            Err(error) => {
                tracing::error!(%error, "hand edits will only be seen at each resync");
                None
            }
        };
        let forward = self.events_tx.clone();
        tokio::spawn(async move {
            while file_rx.recv().await.is_some() {
                tokio::time::sleep(desired::DEBOUNCE).await;
                while file_rx.try_recv().is_ok() {}
                if forward.send(Event::DesiredFileChanged).await.is_err() {
                    break;
                }
            }
        });

        self.reload_desired();
        let mut resync = tokio::time::interval(self.config.resync);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if self.reconcile().await == Again::Now {
                self.drain_events().await;
                continue;
            }
            tokio::select! {
                event = self.events_rx.recv() => match event {
                    Some(event) => self.handle_event(event).await,
                    None => return,
                },
                _ = resync.tick() => self.reload_desired(),
            }
            self.drain_events().await;
        }
    }

    async fn drain_events(&mut self) {
        while let Ok(event) = self.events_rx.try_recv() {
            self.handle_event(event).await;
        }
    }

    async fn handle_event(&mut self, event: Event) {
        tracing::debug!(?event, "event");
        match event {
            Event::DesiredFileChanged => self.reload_desired(),
            Event::Exited { service, pid, exit } => self.on_exit(&service, pid, exit),
            Event::Unhealthy {
                service,
                pid,
                error,
            } => self.on_unhealthy(&service, pid, error).await,
            Event::Command(command) => self.on_command(command).await,
        }
    }

    /// Loads the desired-state file; a broken one is refused and the last good state
    /// stays in force.
    fn reload_desired(&mut self) {
        match desired::load(&self.config.desired_state, &self.config.inventory) {
            Ok(state) => {
                self.desired_error = None;
                if self.desired.as_ref() != Some(&state) {
                    tracing::info!(phase = ?state.phase, pinned = ?state.pinned, held = ?state.held, "desired state accepted");
                    self.accept_desired(state);
                }
            }
            Err(error) => {
                let message = error.to_string();
                if self.desired_error.as_deref() != Some(message.as_str()) {
                    tracing::warn!(%message, "desired state refused");
                    let _ = self.feed.send(DaemonEvent::DesiredRefused {
                        error: message.clone(),
                    });
                }
                self.desired_error = Some(message);
            }
        }
        self.publish();
    }

    fn accept_desired(&mut self, state: DesiredState) {
        self.generation += 1;
        let _ = self.feed.send(DaemonEvent::DesiredAccepted {
            generation: self.generation,
            phase: state.phase,
            pinned: state.pinned.iter().map(|n| n.to_string()).collect(),
            held: state.held.iter().map(|n| n.to_string()).collect(),
        });
        self.desired = Some(state);
        self.waiters.supersede(self.generation);
        // A new desired state is a new chance for services that had failed.
        for record in self.records.values_mut() {
            record.consecutive_failures = 0;
            record.retry_at = None;
        }
    }

    fn spec(&self, name: &ServiceName) -> &ServiceSpec {
        self.config
            .inventory
            .get(name)
            .expect("records hold inventory services only")
    }

    fn record(&mut self, name: &ServiceName) -> &mut Record {
        self.records
            .get_mut(name)
            .expect("records hold inventory services only")
    }

    /// The plan the daemon would follow now for `desired`, changing nothing: running
    /// instances are found as adoption would find them, but left alone.
    pub async fn dry_run(mut self, desired: &DesiredState) -> Plan {
        for spec in self.config.inventory.iter() {
            if let Ok(Some(instance)) = self.effects.adopt(spec).await {
                let record = self.records.get_mut(&spec.name).expect("inventory service");
                record.instance = Some(instance);
                record.state = ServiceState::Ready;
            }
        }
        let observation = self.observe().await;
        plan::plan(&self.config.inventory, desired, &observation)
    }

    // ---- adoption ----

    /// Adopts services left running by an earlier daemon instead of starting them twice.
    async fn adopt_running(&mut self) {
        let specs: Vec<ServiceSpec> = self.config.inventory.iter().cloned().collect();
        self.adopt_each(specs).await;
    }

    /// Adopts what runs of `specs`; a service whose backend cannot be asked is `unknown`.
    async fn adopt_each(&mut self, specs: Vec<ServiceSpec>) {
        for spec in specs {
            if self.records[&spec.name].instance.is_some() {
                continue;
            }
            let Some(instance) = self.find_running(&spec).await else {
                continue;
            };
            tracing::info!(service = %spec.name, pid = ?instance.root_pid(), "adopted a running instance");
            self.attach(&spec.name, instance.clone(), ServiceState::Starting);
            self.publish();
            match self.effects.wait_ready(&spec, &instance).await {
                Ok(_) => self.mark_ready(&spec.name),
                Err(error) => {
                    let message = error.to_string();
                    // Its stop error, if any, is kept as last_error; the failure below
                    // is what the service is reported with.
                    let _ = self
                        .stop_instance(&spec, "adopted instance is not healthy")
                        .await;
                    self.fail(&spec.name, message);
                }
            }
        }
    }

    // ---- events ----

    fn on_exit(&mut self, service: &ServiceName, pid: u32, exit: ExitInfo) {
        let log = self.effects.last_log_lines(self.spec(service)).join("\n");
        let record = self.record(service);
        let current = record.instance.as_ref().and_then(Instance::root_pid);
        if current != Some(pid) || record.state == ServiceState::Stopping {
            return;
        }
        tracing::warn!(%service, pid, %exit, "service exited unexpectedly");
        record.instance = None;
        record.stop_monitor();
        self.fail(
            service,
            format!("{service} {exit} unexpectedly; last log lines:\n{log}"),
        );
    }

    async fn on_unhealthy(&mut self, service: &ServiceName, pid: u32, error: String) {
        let record = self.record(service);
        if record.instance.as_ref().and_then(Instance::root_pid) != Some(pid) {
            return;
        }
        record.set_state(ServiceState::Unhealthy);
        tracing::warn!(%service, %error, "unhealthy: restarting");
        let spec = self.spec(service).clone();
        let _ = self.stop_instance(&spec, "unhealthy").await;
        self.fail(
            service,
            format!("{service} failed {UNHEALTHY_AFTER} health checks in a row: {error}"),
        );
    }

    /// Records a failure and schedules a restart with exponential backoff, or gives up.
    fn fail(&mut self, service: &ServiceName, message: String) {
        let record = self.record(service);
        record.consecutive_failures += 1;
        record.last_error = Some(message);
        record.set_state(ServiceState::Failed);
        if record.consecutive_failures >= MAX_CONSECUTIVE_FAILURES {
            record.retry_at = None;
            record.reason = Some(format!(
                "failed {} times in a row; change the desired state to try again",
                record.consecutive_failures
            ));
        } else {
            let backoff =
                Duration::from_secs(1 << (record.consecutive_failures - 1)).min(MAX_BACKOFF);
            record.retry_at = Some(Instant::now() + backoff);
            record.reason = Some(format!("restarting in {}s", backoff.as_secs()));
        }
        self.publish();
    }

    /// Publishes, once, that the first observation and adoption are done.
    fn mark_first_round_done(&mut self) {
        if !self.first_round_done {
            self.first_round_done = true;
            self.publish();
        }
    }

    // ---- plan and act ----

    /// One round: observe, plan, act. Says whether another round should follow at once
    /// (after acting, to confirm convergence on fresh observations).
    async fn reconcile(&mut self) -> Again {
        // Only the leader acts. It adopts what runs when it starts leading (at once when
        // alone), and lets go of what it tracked when another daemon takes over.
        let leadership = self.lease.refresh().await;
        if leadership == Leadership::Gained {
            self.adopt_running().await;
        }
        if !leadership.leads() {
            if leadership == Leadership::Lost {
                self.let_go();
            }
            self.observe().await;
            self.mark_first_round_done();
            let refusal = self.standby_refusal();
            self.finish_round(self.generation, RoundEnd::Blocked(refusal));
            return Again::OnNextTrigger;
        }
        self.recheck_unknown().await;
        let observation = self.observe().await;
        self.mark_first_round_done();
        let Some(desired) = self.desired.clone() else {
            self.publish();
            return Again::OnNextTrigger;
        };
        let plan = plan::plan(&self.config.inventory, &desired, &observation);
        self.apply_verdicts(&plan);
        let generation = self.generation;
        if plan.is_empty() {
            self.converged_generation = generation;
            self.finish_round(generation, RoundEnd::Completed);
            return Again::OnNextTrigger;
        }
        // The lease logs and records in status why it cannot be had.
        if let Err(error) = self.lease.acquire().await {
            self.finish_round(generation, RoundEnd::Blocked(error.into()));
            return Again::OnNextTrigger;
        }
        let started = Instant::now();
        let mut failed = false;
        for action in &plan.actions {
            // A lost lease stops the transition after the action in flight.
            if let Err(error) = self.lease.check().await {
                self.lease.release().await;
                self.finish_round(generation, RoundEnd::Blocked(error.into()));
                return Again::OnNextTrigger;
            }
            failed |= !self.execute(action).await;
            self.drain_events().await;
            if self.generation != generation {
                tracing::info!("desired state changed mid-transition: planning again");
                break;
            }
        }
        self.lease.release().await;
        self.transitions
            .observe(started.elapsed().as_millis() as u64);
        // Callers are answered after the next round has observed the result (so the
        // status they read next is fresh), or now if an action failed.
        if failed && self.generation == generation {
            self.finish_round(generation, RoundEnd::Completed);
        } else {
            self.publish();
        }
        Again::Now
    }

    /// Publishes status and answers the callers waiting on `generation`.
    fn finish_round(&mut self, generation: u64, end: RoundEnd) {
        self.publish();
        let services = self
            .records
            .iter()
            .map(|(name, record)| (name.to_string(), record.state))
            .collect();
        self.waiters.finish(generation, &end, &services);
    }

    /// Another daemon leads now: forget the instances this one tracked (they keep
    /// running, and the leader adopts them) so that nothing here acts on them.
    fn let_go(&mut self) {
        for record in self.records.values_mut() {
            record.stop_monitor();
            record.instance = None;
            record.set_state(ServiceState::Stopped);
            record.reason = Some("managed by the leading gpu-manager: this one is standby".into());
        }
    }

    /// Shows plan verdicts on services that are stopped: preempted or refused with why.
    fn apply_verdicts(&mut self, plan: &Plan) {
        for (name, verdict) in &plan.verdicts {
            let record = self
                .records
                .get_mut(name)
                .expect("verdicts cover the inventory");
            if record.instance.is_some() {
                continue;
            }
            match verdict {
                Verdict::Preempted { reason, .. } | Verdict::Refused { reason, .. } => {
                    record.set_state(ServiceState::Preempted);
                    record.reason = Some(reason.clone());
                }
                Verdict::Idle | Verdict::Run if record.state == ServiceState::Preempted => {
                    record.set_state(ServiceState::Stopped);
                    record.reason = None;
                }
                Verdict::Idle if record.state != ServiceState::Unknown => {
                    // Not wanted and not running: an old reason or failure is history.
                    record.set_state(ServiceState::Stopped);
                    record.reason = None;
                }
                _ => {}
            }
        }
    }

    /// Runs one action and records it; returns whether it succeeded.
    async fn execute(&mut self, action: &Action) -> bool {
        let started = Instant::now();
        let spec = self.spec(&action.service).clone();
        tracing::info!(op = %action.op, service = %action.service, reason = %action.reason, "action");
        let _ = self.feed.send(DaemonEvent::ActionStarted {
            generation: self.generation,
            op: action.op.to_string(),
            service: action.service.to_string(),
            reason: action.reason.clone(),
        });
        let outcome = match action.op {
            Op::Stop => self.stop_for_plan(&spec, action).await,
            Op::Start => self.start_for_plan(&spec, action).await,
        };
        let elapsed_ms = started.elapsed().as_millis() as u64;
        let (outcome, failure) = match outcome {
            Ok(detail) => {
                tracing::info!(op = %action.op, service = %action.service, %detail, elapsed_ms, "done");
                (Ok(detail), None)
            }
            Err(failure) => {
                tracing::error!(op = %action.op, service = %action.service, error = %failure.message, "action failed");
                (Err(failure.message), Some(failure.kind))
            }
        };
        let record = ActionRecord {
            op: action.op.to_string(),
            service: action.service.to_string(),
            reason: action.reason.clone(),
            generation: self.generation,
            duration_ms: elapsed_ms,
            outcome,
            failure,
            finished_at_ms: now_ms(),
        };
        self.waiters.record(&record);
        self.history.push(record.clone());
        if self.history.len() > ACTION_HISTORY {
            self.history.remove(0);
        }
        // The action's own state changes are streamed before its end.
        self.publish();
        let _ = self
            .feed
            .send(DaemonEvent::ActionFinished { action: record });
        failure.is_none()
    }

    async fn stop_for_plan(
        &mut self,
        spec: &ServiceSpec,
        action: &Action,
    ) -> Result<String, ActionFailure> {
        let gpu_pids = self.record(&spec.name).gpu_pids.clone();
        let evicted = self.evict_or_stop(spec, &action.reason, &gpu_pids).await?;
        let record = self.record(&spec.name);
        let preempted = action.reason.starts_with("preempted");
        record.set_state(if preempted {
            ServiceState::Preempted
        } else {
            ServiceState::Stopped
        });
        record.reason = Some(action.reason.clone());
        self.wait_pids_gone(spec, &gpu_pids).await?;
        Ok(match evicted {
            Some(detail) => format!("{detail}; {} MB back", action.vram_mb),
            None => format!("stopped; {} MB back", action.vram_mb),
        })
    }

    /// Stops the instance (if any) and clears it from the record.
    async fn stop_instance(&mut self, spec: &ServiceSpec, why: &str) -> Result<(), ActionFailure> {
        let record = self.record(&spec.name);
        let Some(instance) = record.instance.clone() else {
            return Ok(());
        };
        record.stop_monitor();
        record.set_state(ServiceState::Stopping);
        record.reason = Some(why.to_owned());
        self.publish();
        match self.effects.stop(spec, &instance).await {
            Ok(report) => {
                let record = self.record(&spec.name);
                record.instance = None;
                if report.forced {
                    tracing::warn!(service = %spec.name, "did not stop on SIGTERM within its stop timeout: killed");
                }
                Ok(())
            }
            Err(error) => {
                let failure = ActionFailure::from(&error);
                self.record(&spec.name).last_error = Some(failure.message.clone());
                if error.is_backend_down() {
                    self.lose_track(&spec.name);
                }
                Err(failure)
            }
        }
    }

    async fn start_for_plan(
        &mut self,
        spec: &ServiceSpec,
        action: &Action,
    ) -> Result<String, ActionFailure> {
        if let Err(failure) = self.wait_for_room(spec, action.vram_mb).await {
            self.fail(&spec.name, failure.message.clone());
            return Err(failure);
        }
        let instance = match self.effects.start(spec).await {
            Ok(instance) => instance,
            Err(error) => return Err(self.start_failed(&spec.name, &error)),
        };
        let record = self.record(&spec.name);
        // A restart is a start retried after failures; a new desired state resets the
        // count of failures, so a start it asks for is not one.
        if record.consecutive_failures > 0 {
            record.restarts += 1;
        }
        record.reason = Some(action.reason.clone());
        self.attach(&spec.name, instance.clone(), ServiceState::Starting);
        self.publish();
        match self.effects.wait_ready(spec, &instance).await {
            Ok(took) => {
                self.mark_ready(&spec.name);
                Ok(format!("ready after {} ms", took.as_millis()))
            }
            Err(error) => {
                let failure = ActionFailure::from(&error);
                // Nothing is left half-started: a start that failed is stopped.
                let _ = self.stop_instance(spec, "start failed").await;
                self.fail(&spec.name, failure.message.clone());
                Err(failure)
            }
        }
    }

    /// Takes ownership of a running instance: exit watch and state.
    fn attach(&mut self, name: &ServiceName, instance: Instance, state: ServiceState) {
        let events = self.events_tx.clone();
        let service = name.clone();
        let watched = instance.clone();
        tokio::spawn(async move {
            let exit = watched.wait_exit().await;
            if let Some(pid) = watched.root_pid() {
                let _ = events.send(Event::Exited { service, pid, exit }).await;
            }
        });
        let record = self.record(name);
        record.instance = Some(instance);
        record.set_state(state);
    }

    /// A service became ready: reset failures and watch its health.
    fn mark_ready(&mut self, name: &ServiceName) {
        let spec = self.spec(name).clone();
        let interval = self.config.resync;
        let effects = self.effects.clone();
        let events = self.events_tx.clone();
        let record = self.record(name);
        record.consecutive_failures = 0;
        record.retry_at = None;
        record.last_error = None;
        record.set_state(ServiceState::Ready);
        let pid = record.instance.as_ref().and_then(Instance::root_pid);
        if let (Some(check), Some(pid)) = (spec.health.clone(), pid) {
            let task = tokio::spawn(async move {
                let mut failures = 0;
                loop {
                    tokio::time::sleep(interval).await;
                    match effects.prober().probe(&check).await {
                        Ok(()) => failures = 0,
                        Err(error) => {
                            failures += 1;
                            if failures >= UNHEALTHY_AFTER {
                                let error = error.to_string();
                                let _ = events
                                    .send(Event::Unhealthy {
                                        service: spec.name.clone(),
                                        pid,
                                        error,
                                    })
                                    .await;
                                return;
                            }
                        }
                    }
                }
            });
            record.monitor = Some(task.abort_handle());
        }
        self.publish();
    }
}

/// Whether the run loop starts another round at once.
#[derive(Debug, PartialEq, Eq)]
enum Again {
    Now,
    OnNextTrigger,
}

/// Why an action failed, and what kind of failure it was (for the API's status code).
#[derive(Debug)]
struct ActionFailure {
    kind: FailureKind,
    message: String,
}

impl ActionFailure {
    fn timeout(message: String) -> Self {
        Self {
            kind: FailureKind::Timeout,
            message,
        }
    }

    fn other(message: String) -> Self {
        Self {
            kind: FailureKind::Other,
            message,
        }
    }
}

impl From<&ActError> for ActionFailure {
    fn from(error: &ActError) -> Self {
        Self {
            kind: error.failure_kind(),
            message: error.to_string(),
        }
    }
}
