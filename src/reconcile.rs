//! The reconciler (docs/ARCHITECTURE.md, "The loop"): ONE task owns all mutable state
//! and only decides. It wakes on events (API commands, desired-state edits, process
//! exits, failed health checks, finished actions, timers), observes, asks the pure
//! planner what should be true, and begins what the schedule allows as action tasks
//! under the lease. It never awaits an action, so it hears a change of mind, a crash or
//! a shutdown while a 2-minute model load runs.

mod backend;
mod demanded;
mod effects;
mod learned;
mod observe;
mod parked;
mod records;
mod reload;
mod requests;
mod snapshot;
mod tasks;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::{Id, JoinError, JoinSet};
use tokio::time::{sleep_until, Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::act::instance::Effects;
use crate::act::ExitInfo;
use crate::clock::now_ms;
use crate::config::{Config, ServiceName, ServiceSpec};
use crate::demand::Demand;
use crate::desired::{self, claims, ClaimEnd, DesiredState};
use crate::footprints::{Footprints, Forgotten};
use crate::lease::{Leadership, Lease, LeaseBackend, LeaseError};
use crate::observe::gpu::SharedGpu;
use crate::plan::{self, Action, Cause, Op, Plan};
use crate::reload::{ConfigStatus, ReloadReport, ReloadTrigger, RemovedServices};
use crate::schedule::{self, Wait};
use crate::status::{ActionRecord, DaemonEvent, FailureKind, Status, TransitionStats};
use crate::traffic::TrafficBoard;
use crate::transition::{RoundEnd, TransitionError, TransitionReply, Waiters};
use crate::utc::UtcTime;

pub use crate::transition::Change;
pub use effects::{EffectError, ServiceEffects, StopHow};

use observe::GpuView;
use records::{ActionEnd, Event, FollowUp, InFlight, Records, RoomWait};
use tasks::{Finished, Outcome, TaskContext};

/// The reconciler the daemon runs: real drivers, the configured lease.
pub type DaemonReconciler = Reconciler<Effects, Lease>;

/// Consecutive failed probes before a ready service is declared unhealthy.
const UNHEALTHY_AFTER: u32 = 3;
/// How many past actions status keeps.
const ACTION_HISTORY: usize = 50;
/// How often a start waiting for the GPU to show its room looks again: soon at first (a
/// driver tearing down an exited process takes milliseconds), then less often, since
/// each look is a round (a GPU sample and a scan of /proc).
const ROOM_POLL_FIRST: Duration = Duration::from_millis(10);
const ROOM_POLL_MAX: Duration = Duration::from_millis(250);

/// The pause before the next look of a start that has waited `waited` for its room: a
/// quarter of the wait so far, within [`ROOM_POLL_FIRST`, `ROOM_POLL_MAX`].
fn room_poll(waited: Duration) -> Duration {
    (waited / 4).clamp(ROOM_POLL_FIRST, ROOM_POLL_MAX)
}
/// How often a transition waiting for the lease tries again, within `lease.wait_ms`
/// (redis-py's default sleep).
const LEASE_POLL: Duration = Duration::from_millis(100);

/// How often, at most, the proxy's counts moving republishes the status between rounds:
/// fresh enough for a person watching, never once per request under load.
const TRAFFIC_REFRESH: Duration = Duration::from_millis(100);

/// What the API asks of the reconciler.
#[derive(Debug)]
pub enum Command {
    /// Change the desired state; answered when converged, or at once if `wait` is false.
    /// `force`: skip draining (`?force=true`): work in flight may be lost.
    Transition {
        change: Change,
        wait: bool,
        force: bool,
        reply: TransitionReply,
    },
    /// The plan the daemon would follow for a change, without making it.
    Plan {
        change: Option<Change>,
        reply: oneshot::Sender<Result<Plan, TransitionError>>,
    },
    /// Reset what was learned of a service's footprint; answered once the file is saved.
    Forget {
        service: ServiceName,
        reply: oneshot::Sender<Result<Forgotten, TransitionError>>,
    },
    /// A request came for a proxied service (docs/ARCHITECTURE.md, "The demand proxy"):
    /// it is demanded from now until its traffic has been idle for `idle_ms`.
    Demand { service: ServiceName },
    /// Re-read the config file and apply what changed (docs/ARCHITECTURE.md,
    /// "Reloading the config"); answered once the difference is in force.
    Reload {
        removed: RemovedServices,
        trigger: ReloadTrigger,
        reply: oneshot::Sender<Result<ReloadReport, TransitionError>>,
    },
}

/// Whether the loop re-reads the config file when it changes (`serve --watch-config`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigWatch {
    Off,
    On,
}

/// What else wakes the loop: the file watch, exit watchers, health monitors, and action
/// tasks saying they have spawned an instance.
#[derive(Debug)]
pub(crate) enum Wake<I> {
    DesiredFileChanged,
    /// The config file changed, with `--watch-config`.
    ConfigFileChanged,
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
    Spawned {
        service: ServiceName,
        instance: I,
    },
    /// A stop or park that began `draining` found no work in flight (any more): it
    /// goes on.
    Drained {
        service: ServiceName,
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

impl GpuSource {
    fn gpu(&self) -> Option<SharedGpu> {
        match self {
            GpuSource::Observed { gpu, .. } => Some(gpu.clone()),
            GpuSource::Unavailable { .. } => None,
        }
    }
}

/// Handles for the rest of the daemon: send commands, read status.
#[derive(Clone)]
pub struct ReconcilerHandle {
    pub commands: mpsc::Sender<Command>,
    pub status: watch::Receiver<Status>,
    /// Every state change and action, for the event stream.
    pub feed: broadcast::Sender<DaemonEvent>,
    /// What the demand proxy sees of each service's requests: it writes, the loop reads.
    pub traffic: TrafficBoard,
    /// The config in force: a reload sends the new one (the demand proxy follows it).
    pub config: watch::Receiver<Arc<Config>>,
}

/// Whether the daemon is shutting down, and until when it waits for actions.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Lifecycle {
    Running,
    ShuttingDown { deadline: Instant },
}

pub struct Reconciler<E: ServiceEffects, L: LeaseBackend> {
    config: Arc<Config>,
    /// `config`, for the handles (see `ReconcilerHandle::config`).
    config_tx: watch::Sender<Arc<Config>>,
    /// Where the config in force came from, and how the last reload went.
    config_status: ConfigStatus,
    config_watch: ConfigWatch,
    gpu: GpuSource,
    effects: Arc<E>,
    lease: L,
    lease_held: bool,
    desired: Option<DesiredState>,
    desired_error: Option<String>,
    /// The services the proxy sees used (src/demand.rs), and its counts.
    demand: Demand,
    traffic: TrafficBoard,
    generation: u64,
    converged_generation: u64,
    records: Records<E::Instance>,
    /// What each service was seen to take (src/footprints.rs), and the write of its
    /// file under way, if any.
    footprints: Footprints,
    footprints_write: Option<learned::FootprintsWrite>,
    /// Which services are parked, on disk for the next daemon.
    parked_notes: parked::ParkedNotes,
    gpu_view: GpuView,
    history: Vec<ActionRecord>,
    transitions: TransitionStats,
    /// When the transition now under way took the lease.
    transition_started: Option<Instant>,
    waiters: Waiters,
    feed: broadcast::Sender<DaemonEvent>,
    wake_tx: mpsc::Sender<Wake<E::Instance>>,
    wake_rx: mpsc::Receiver<Wake<E::Instance>>,
    commands_tx: mpsc::Sender<Command>,
    commands_rx: mpsc::Receiver<Command>,
    status_tx: watch::Sender<Status>,
    actions: JoinSet<Finished<E::Instance>>,
    action_ids: HashMap<Id, ServiceName>,
    /// Cancelled at shutdown's deadline: every task stops where it is.
    abandon: CancellationToken,
    /// Cancelled by a forced transition: drains under way (and begun for the same
    /// desired state) end at once. A new desired state gets a fresh one.
    skip_drain: CancellationToken,
    /// Something changed since the last round.
    dirty: bool,
    /// A timer for the next round: a backoff ending, a start waiting for room.
    next_wake: Option<Instant>,
    lifecycle: Lifecycle,
    /// A round (observation, and adoption when leading) has ended: published as
    /// `Status::first_round_done`, systemd's readiness (src/notify.rs).
    first_round_done: bool,
}

impl<E: ServiceEffects, L: LeaseBackend> Reconciler<E, L> {
    pub fn new(config: Arc<Config>, gpu: GpuSource, effects: E, lease: L) -> Self {
        let (wake_tx, wake_rx) = mpsc::channel(256);
        let (commands_tx, commands_rx) = mpsc::channel(64);
        let (status_tx, _) = watch::channel(Status::default());
        let records = Records::new(&config.inventory);
        let footprints = Footprints::load_or_empty(&config.state_dir, &config.inventory);
        let parked_notes = parked::ParkedNotes::new(config.state_dir.clone());
        let config_status = ConfigStatus::at_start(&config.path, now_ms());
        let mut reconciler = Self {
            config_tx: watch::Sender::new(config.clone()),
            config,
            config_status,
            config_watch: ConfigWatch::Off,
            gpu,
            effects: Arc::new(effects),
            lease,
            lease_held: false,
            desired: None,
            desired_error: None,
            demand: Demand::default(),
            traffic: TrafficBoard::default(),
            generation: 0,
            converged_generation: 0,
            records,
            footprints,
            footprints_write: None,
            parked_notes,
            gpu_view: GpuView::default(),
            history: Vec::new(),
            transitions: TransitionStats::default(),
            transition_started: None,
            waiters: Waiters::default(),
            feed: broadcast::channel(1024).0,
            wake_tx,
            wake_rx,
            commands_tx,
            commands_rx,
            status_tx,
            actions: JoinSet::new(),
            action_ids: HashMap::new(),
            abandon: CancellationToken::new(),
            skip_drain: CancellationToken::new(),
            dirty: true,
            next_wake: None,
            lifecycle: Lifecycle::Running,
            first_round_done: false,
        };
        // The API checks names against the snapshot: it lists every service from the
        // start, with the desired state already read.
        reconciler.reload_desired();
        reconciler.publish();
        reconciler
    }

    /// Re-reads the config file whenever it changes, after a debounce.
    pub fn watching_config(mut self, watch: ConfigWatch) -> Self {
        self.config_watch = watch;
        self
    }

    pub fn handle(&self) -> ReconcilerHandle {
        ReconcilerHandle {
            commands: self.commands_tx.clone(),
            status: self.status_tx.subscribe(),
            feed: self.feed.clone(),
            traffic: self.traffic.clone(),
            config: self.config_tx.subscribe(),
        }
    }

    /// Runs until `shutdown` is cancelled and the shutdown is done (docs/ARCHITECTURE.md,
    /// "Shutdown"): new transitions are refused, starts under way are left running at a
    /// safe point, stops get until `shutdown_timeout_ms`, then the lease and the lead
    /// are released. GPU services keep running: the next daemon adopts them.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let _watch = self.watch_desired_file();
        let _config_watch = match self.config_watch {
            ConfigWatch::On => {
                self.watch_file(&self.config.path.clone(), || Wake::ConfigFileChanged)
            }
            ConfigWatch::Off => None,
        };
        let mut resync = tokio::time::interval(self.config.resync);
        resync.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let traffic_moved = self.traffic.moved();
        let mut traffic_refresh = tokio::time::interval(TRAFFIC_REFRESH);
        traffic_refresh.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut traffic_unpublished = false;
        loop {
            if resync.period() != self.config.resync {
                // A reload changed `resync_ms`.
                resync = tokio::time::interval(self.config.resync);
                resync.set_missed_tick_behavior(MissedTickBehavior::Delay);
            }
            if let Lifecycle::ShuttingDown { .. } = self.lifecycle {
                if self.actions.is_empty() {
                    break;
                }
            } else if self.dirty {
                self.round().await;
            }
            let timer = self.next_wake;
            let deadline = match self.lifecycle {
                Lifecycle::ShuttingDown { deadline } => Some(deadline),
                Lifecycle::Running => None,
            };
            tokio::select! {
                biased;
                () = shutdown.cancelled(), if self.lifecycle == Lifecycle::Running => {
                    self.begin_shutdown();
                }
                () = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    tracing::warn!(left = self.actions.len(), "shutdown deadline: leaving the actions still under way where they are");
                    self.abandon.cancel();
                    self.actions.abort_all();
                    while let Some(joined) = self.actions.join_next_with_id().await {
                        self.on_finished(joined);
                    }
                }
                // Before finished actions: a task's word that it spawned an instance is
                // sent before the task ends, and must be heard first.
                Some(wake) = self.wake_rx.recv() => self.on_wake(wake).await,
                Some(joined) = self.actions.join_next_with_id(), if !self.actions.is_empty() => {
                    self.on_finished(joined);
                }
                Some(command) = self.commands_rx.recv() => self.on_command(command).await,
                _ = resync.tick() => {
                    self.reload_desired();
                    self.dirty = true;
                }
                () = sleep_until(timer.unwrap_or_else(Instant::now)), if timer.is_some() => {
                    self.next_wake = None;
                    self.dirty = true;
                }
                // The proxy's counts only need a new snapshot, not a round.
                () = traffic_moved.notified(), if !traffic_unpublished => {
                    traffic_unpublished = true;
                }
                _ = traffic_refresh.tick(), if traffic_unpublished => {
                    traffic_unpublished = false;
                    self.publish();
                }
            }
        }
        self.finish_shutdown().await;
    }

    /// The plan the daemon would follow now for `desired`, changing nothing: running
    /// instances are found as adoption would find them, but left alone.
    pub async fn dry_run(mut self, desired: &DesiredState) -> Plan {
        let specs: Vec<_> = self.records.iter().map(|r| r.spec.clone()).collect();
        for spec in specs {
            if let Ok(Some(instance)) = self.effects.look_up(&spec).await {
                // Nothing runs its follow-ups: a dry run watches nothing.
                if let Some(record) = self.records.get_mut(&spec.name) {
                    record.apply(Event::Adopted {
                        instance,
                        parked: None,
                    });
                }
            }
        }
        let observation = self.observe().await;
        plan::plan(&self.config.inventory, desired, &observation)
    }

    // ---- the desired state ----

    /// Watches the desired-state file's folder; edits wake the loop after a debounce.
    fn watch_desired_file(&self) -> Option<desired::FileWatch> {
        let watch = self.watch_file(&self.config.desired_state.clone(), || {
            Wake::DesiredFileChanged
        });
        if watch.is_none() {
            tracing::error!("hand edits of the desired state will only be seen at each resync");
        }
        watch
    }

    /// Watches `path`'s folder: each edit of it sends `wake` (a copy of it) after a
    /// debounce.
    fn watch_file(
        &self,
        path: &std::path::Path,
        wake: fn() -> Wake<E::Instance>,
    ) -> Option<desired::FileWatch> {
        let (file_tx, mut file_rx) = mpsc::channel(1);
        let watch = match desired::watch(path, file_tx) {
            Ok(watch) => watch,
            Err(error) => {
                tracing::error!(%error, path = %path.display(), "cannot watch the file");
                return None;
            }
        };
        let forward = self.wake_tx.clone();
        tokio::spawn(async move {
            while file_rx.recv().await.is_some() {
                tokio::time::sleep(desired::DEBOUNCE).await;
                while file_rx.try_recv().is_ok() {}
                if forward.send(wake()).await.is_err() {
                    break;
                }
            }
        });
        Some(watch)
    }

    /// Loads the desired-state file; a broken (or missing) one is refused and the last
    /// good state stays in force.
    fn reload_desired(&mut self) {
        let now = UtcTime::now();
        self.expire_claims_at(now);
        match desired::load_at(&self.config.desired_state, &self.config.inventory, now) {
            Ok(state) => {
                self.desired_error = None;
                if self.desired.as_ref() != Some(&state) {
                    tracing::info!(phase = ?state.phase, pinned = ?state.pinned, held = ?state.held, claims = ?state.claims, "desired state accepted");
                    self.accept_desired(state, ClaimEnd::Released);
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
        // The round this sets off publishes the result.
        self.dirty = true;
    }

    /// Makes `state` the desired state; a claim it drops ended `why` (or expired).
    fn accept_desired(&mut self, state: DesiredState, why: ClaimEnd) {
        let before = self
            .desired
            .as_ref()
            .map(|d| d.claims.as_slice())
            .unwrap_or(&[]);
        let claim_changes = claims::changes(before, &state.claims, UtcTime::now(), why);
        for change in claim_changes {
            let _ = self.feed.send(DaemonEvent::of_claim(change));
        }
        self.generation += 1;
        let _ = self.feed.send(DaemonEvent::DesiredAccepted {
            generation: self.generation,
            phase: state.phase,
            pinned: state.pinned.iter().map(|n| n.to_string()).collect(),
            held: state.held.iter().map(|n| n.to_string()).collect(),
        });
        self.desired = Some(state);
        if self.skip_drain.is_cancelled() {
            self.skip_drain = CancellationToken::new();
        }
        self.waiters.supersede(self.generation);
        // A new desired state is a new chance for services that had failed.
        for record in self.records.iter_mut() {
            record.forgive();
        }
        self.dirty = true;
    }

    /// Drops the claims whose time ran out from the state in force. Not a new desired
    /// state (no new generation): what was wanted before the claim is wanted again.
    fn expire_claims(&mut self) {
        self.expire_claims_at(UtcTime::now());
    }

    fn expire_claims_at(&mut self, now: UtcTime) {
        let Some(desired) = self.desired.as_mut() else {
            return;
        };
        for claim in desired.prune_expired(now) {
            tracing::info!(%claim, "claim expired");
            let change = claims::ClaimChange::Ended {
                claim,
                why: ClaimEnd::Expired,
            };
            let _ = self.feed.send(DaemonEvent::of_claim(change));
            self.dirty = true;
        }
    }

    // ---- events ----

    async fn on_wake(&mut self, wake: Wake<E::Instance>) {
        tracing::debug!(?wake, "wake");
        self.dirty = true;
        match wake {
            Wake::DesiredFileChanged => self.reload_desired(),
            Wake::ConfigFileChanged => {
                // Refusals are in the log, status and the event stream.
                let _ = self
                    .reload_config(RemovedServices::Stop, ReloadTrigger::FileWatch)
                    .await;
            }
            Wake::Exited { service, pid, exit } => self.on_exit(&service, pid, exit).await,
            Wake::Unhealthy {
                service,
                pid,
                error,
            } => self.on_unhealthy(&service, pid, error),
            Wake::Spawned { service, instance } => {
                self.apply(&service, Event::Spawned { instance });
                self.publish();
            }
            Wake::Drained { service } => {
                self.apply(&service, Event::Drained);
                self.publish();
            }
        }
    }

    /// The pid a record tracks now.
    fn tracked_pid(&self, service: &ServiceName) -> Option<u32> {
        self.records.get(service)?.instance().and_then(E::root_pid)
    }

    /// A service died on its own. An action under way for it (a start waiting for it to
    /// be ready, a stop) hears of it itself; otherwise the death is a failure, and its
    /// restart is planned like any other start, with backoff.
    async fn on_exit(&mut self, service: &ServiceName, pid: u32, exit: ExitInfo) {
        let busy = self
            .records
            .get(service)
            .is_some_and(|r| r.in_flight().is_some());
        if busy || self.tracked_pid(service) != Some(pid) {
            return;
        }
        let Some(spec) = self.records.get(service).map(|r| r.spec.clone()) else {
            return;
        };
        let log = self.effects.last_log_lines(&spec).await.join("\n");
        tracing::debug!(%service, pid, "its tracked process exited");
        let exit = exit.to_string();
        self.apply(service, Event::Exited { exit, log });
        self.publish();
    }

    /// A ready service stopped answering its health checks: it is stopped (planned, so
    /// under the lease and in budget) and then restarted with backoff.
    fn on_unhealthy(&mut self, service: &ServiceName, pid: u32, error: String) {
        if self.tracked_pid(service) != Some(pid) {
            return;
        }
        tracing::warn!(%service, %error, "unhealthy: it will be stopped and restarted");
        let message = format!("{service} failed {UNHEALTHY_AFTER} health checks in a row: {error}");
        self.apply(service, Event::Unhealthy { message });
        self.publish();
    }

    // ---- one round: observe, plan, begin ----

    async fn round(&mut self) {
        self.expire_claims();
        self.dirty = false;
        self.next_wake = None;
        // Only the leader acts. It adopts what runs when it starts leading (at once when
        // alone), and lets go of what it tracked when another daemon takes over.
        let leadership = self.lease.refresh().await;
        match leadership {
            Leadership::Gained => {
                self.adopt_running().await;
                self.demand_what_runs();
            }
            Leadership::Lost => self.let_go(),
            Leadership::Leading | Leadership::Standby => {}
        }
        if !leadership.leads() {
            self.observe().await;
            let refusal = self.standby_refusal();
            self.finish_waiters(RoundEnd::Blocked(refusal));
            self.settle();
            return;
        }
        self.recheck_unknown().await;
        self.review_demand();
        let observation = self.observe().await;
        let Some(desired) = self.desired.clone() else {
            self.settle();
            return;
        };
        let mut plan = plan::plan(&self.config.inventory, &desired, &observation);
        plan.actions.extend(self.removal_stops());
        self.apply_verdicts(&plan);
        if plan.is_empty() {
            if self.actions.is_empty() {
                self.converged().await;
            }
            self.settle();
            return;
        }
        if self.take_lease().await {
            let launch = schedule::launch(&plan, self.gpu_room_mb());
            for action in launch.begin {
                self.begin(action);
            }
            self.watch_room_waits(&launch.waiting);
        }
        self.settle();
    }

    /// The end of every round: timers for backoffs, and a fresh snapshot.
    fn settle(&mut self) {
        self.first_round_done = true;
        let now = Instant::now();
        let retries = self
            .records
            .iter()
            .filter_map(|r| r.retry_at().filter(|at| *at > now));
        if let Some(at) = retries.min() {
            self.wake_at(at);
        }
        // The earliest claim's end: what it kept out starts by itself then.
        if let Some(until) = self.desired.as_ref().and_then(DesiredState::next_expiry) {
            let left = until.epoch_ms().saturating_sub(now_ms());
            self.wake_at(now + Duration::from_millis(left));
        }
        if let Some(end) = self.demand.next_end() {
            self.wake_at(end);
        }
        self.save_footprints();
        self.publish();
    }

    fn wake_at(&mut self, at: Instant) {
        self.next_wake = Some(self.next_wake.map_or(at, |t| t.min(at)));
    }

    /// What runs is what is wanted, with nothing under way: answer the callers, let the
    /// lease go.
    async fn converged(&mut self) {
        self.converged_generation = self.generation;
        if let Some(started) = self.transition_started.take() {
            self.transitions
                .observe(started.elapsed().as_millis() as u64);
            crate::memory::give_back_freed();
        }
        self.release_lease().await;
        if !self.waiters.is_empty() {
            // Callers read status right after their answer: publish it first.
            self.publish();
            self.finish_waiters(RoundEnd::Completed);
        }
    }

    async fn release_lease(&mut self) {
        if self.lease_held {
            self.lease.release().await;
            self.lease_held = false;
        }
    }

    fn finish_waiters(&mut self, end: RoundEnd) {
        let services = self
            .records
            .iter()
            .map(|r| (r.name().to_string(), r.state()))
            .collect();
        self.waiters.finish(self.generation, &end, &services);
    }

    /// Holds the transition lock before anything begins, and confirms it is still held
    /// before more begins. Never waits: within `lease.wait_ms` the loop tries again every
    /// `LEASE_POLL`; after it, waiting callers are answered (423, or 503 when Redis is
    /// down) and the loop tries again at each resync.
    async fn take_lease(&mut self) -> bool {
        let error = if self.lease_held {
            match self.lease.check().await {
                Ok(()) => return true,
                Err(error) => {
                    // Actions under way finish; nothing new begins.
                    self.lease.release().await;
                    self.lease_held = false;
                    error
                }
            }
        } else {
            match self.lease.try_acquire().await {
                Ok(()) => {
                    self.lease_held = true;
                    self.transition_started.get_or_insert_with(Instant::now);
                    return true;
                }
                Err(error) => error,
            }
        };
        let keep_waiting = match &error {
            LeaseError::HeldElsewhere { waited_ms, .. } => {
                Duration::from_millis(*waited_ms) < self.config.lease.wait
            }
            _ => false,
        };
        if keep_waiting {
            self.wake_at(Instant::now() + LEASE_POLL);
        } else {
            self.finish_waiters(RoundEnd::Blocked(error.into()));
        }
        false
    }

    /// Shows plan verdicts on services that are stopped: preempted or refused with why.
    fn apply_verdicts(&mut self, plan: &Plan) {
        for (name, verdict) in &plan.verdicts {
            self.apply(name, Event::Verdict(verdict.clone()));
        }
    }

    /// Starts waiting for the GPU to show their room fail after the reclaim timeout,
    /// naming who holds the memory; until then the loop looks again, less often the
    /// longer the wait ([`room_poll`]).
    fn watch_room_waits(&mut self, waiting: &[(Action, Wait)]) {
        let now = Instant::now();
        let timeout = self.config.gpu.reclaim_timeout;
        let mut timed_out = Vec::new();
        let mut next_look: Option<Duration> = None;
        for record in self.records.iter_mut() {
            let room = waiting.iter().find_map(|(action, wait)| match wait {
                Wait::GpuRoom { need_mb, room_mb } if action.service == *record.name() => {
                    Some((*need_mb, *room_mb))
                }
                _ => None,
            });
            let waited = match (room, &record.room_wait) {
                (None, _) => {
                    record.room_wait = None;
                    continue;
                }
                (Some(_), None) => {
                    record.room_wait = Some(RoomWait { since: now });
                    Duration::ZERO
                }
                (Some(room), Some(wait)) if now.duration_since(wait.since) >= timeout => {
                    timed_out.push((record.name().clone(), room));
                    continue;
                }
                (Some(_), Some(wait)) => now.duration_since(wait.since),
            };
            let pause = room_poll(waited);
            next_look = Some(next_look.map_or(pause, |p| p.min(pause)));
        }
        if let Some(pause) = next_look {
            self.wake_at(now + pause);
        }
        for (name, (need_mb, room_mb)) in timed_out {
            let message = self.no_room_message(&name, need_mb, room_mb);
            self.apply(
                &name,
                Event::RoomTimedOut {
                    message: message.clone(),
                },
            );
            self.record_action(ActionRecord {
                op: Op::Start.to_string(),
                service: name.to_string(),
                reason: "waiting for the GPU to show its room".to_owned(),
                cause: None,
                generation: self.generation,
                duration_ms: timeout.as_millis() as u64,
                outcome: Err(message),
                failure: Some(FailureKind::Timeout),
                started_at_ms: now_ms().saturating_sub(timeout.as_millis() as u64),
                finished_at_ms: now_ms(),
                busy: None,
            });
        }
    }

    fn no_room_message(&self, name: &ServiceName, need_mb: u64, room_mb: u64) -> String {
        let holders: Vec<String> = self
            .gpu_view
            .sample
            .iter()
            .flat_map(|s| &s.processes)
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
                    observe::process_name(p.pid),
                    p.used_mb
                )
            })
            .collect();
        format!(
            "cannot start {name}: it needs {need_mb} MB but only {room_mb} MB is free after {:?} ({} MB reserve); held by: {}",
            self.config.gpu.reclaim_timeout,
            self.config.gpu.reserve_mb,
            if holders.is_empty() { "no listed process".to_owned() } else { holders.join(", ") }
        )
    }

    // ---- actions ----

    /// Begins one action as a task; a stop of a service whose start is under way
    /// cancels that start instead.
    fn begin(&mut self, action: Action) {
        let generation = self.generation;
        let Some(record) = self.records.get(&action.service) else {
            return;
        };
        let bringing_up = |f: &InFlight| matches!(f.op, Op::Start | Op::Resume);
        if action.op.frees() && record.in_flight().is_some_and(bringing_up) {
            tracing::info!(service = %action.service, reason = %action.reason, "superseded: cancelling its start");
            let reason = action.reason.clone();
            self.apply(&action.service, Event::Superseded { reason });
            return;
        }
        let instance = record.instance().cloned();
        let parked_pids = record.parked_pids().map(<[u32]>::to_vec);
        let park = record.spec.park.clone();
        let context = self.task_context(record.spec.clone());
        let (supersede, abandon) = (context.supersede.clone(), context.abandon.clone());
        match (action.op, instance, park) {
            (Op::Stop, Some(instance), _) => {
                self.spawn_task(&action.service, tasks::stop(context, instance));
            }
            (Op::Park, Some(instance), Some(park)) => {
                self.spawn_task(&action.service, tasks::park(context, instance, park));
            }
            (Op::Resume, Some(instance), Some(park)) => {
                let pids = parked_pids.unwrap_or_default();
                self.spawn_task(
                    &action.service,
                    tasks::resume(context, instance, park, pids),
                );
            }
            (Op::Stop | Op::Park | Op::Resume, _, _) => return,
            (Op::Start, _, _) => self.spawn_task(&action.service, tasks::start(context)),
        }
        self.mark_in_flight(&action, generation, supersede, abandon);
    }

    /// What an action task gets at launch, with tokens of its own.
    fn task_context(&self, spec: ServiceSpec) -> TaskContext<E> {
        let traffic = spec
            .proxy
            .is_some()
            .then(|| self.traffic.of(&spec.name).subscribe());
        TaskContext {
            effects: self.effects.clone(),
            spec,
            gpu: self.gpu.gpu(),
            reclaim_timeout: self.config.gpu.reclaim_timeout,
            wake: self.wake_tx.clone(),
            supersede: CancellationToken::new(),
            abandon: self.abandon.child_token(),
            skip_drain: self.skip_drain.clone(),
            traffic,
        }
    }

    fn spawn_task(
        &mut self,
        service: &ServiceName,
        task: impl std::future::Future<Output = Outcome<E::Instance>> + Send + 'static,
    ) {
        let name = service.clone();
        let handle = self.actions.spawn(async move {
            Finished {
                service: name,
                outcome: task.await,
            }
        });
        self.action_ids.insert(handle.id(), service.clone());
    }

    fn mark_in_flight(
        &mut self,
        action: &Action,
        generation: u64,
        supersede: CancellationToken,
        abandon: CancellationToken,
    ) {
        let Some(record) = self.records.get(&action.service) else {
            return;
        };
        // A stop or park waits for the work in flight to end, unless told not to.
        let drains = action.op.frees()
            && record.spec.drain_timeout().is_some()
            && !self.skip_drain.is_cancelled();
        let started_at_ms = now_ms();
        let flight = InFlight {
            op: action.op,
            cause: action.cause,
            generation,
            started: Instant::now(),
            started_at_ms,
            supersede,
            abandon,
            superseded: false,
        };
        let reason = action.reason.clone();
        self.apply(
            &action.service,
            Event::Began {
                flight,
                reason,
                drains,
            },
        );
        tracing::info!(op = %action.op, service = %action.service, reason = %action.reason, after = ?action.after, "action begins");
        let _ = self.feed.send(DaemonEvent::ActionStarted {
            generation,
            op: action.op.to_string(),
            service: action.service.to_string(),
            reason: action.reason.clone(),
            cause: Some(action.cause),
            started_at_ms: Some(started_at_ms),
        });
        self.publish();
    }

    /// An action task ended: its record takes the outcome, the loop runs what follows
    /// and keeps the action.
    fn on_finished(&mut self, joined: Result<(Id, Finished<E::Instance>), JoinError>) {
        self.dirty = true;
        let (service, event) = match joined {
            Ok((id, finished)) => {
                self.action_ids.remove(&id);
                (finished.service, Event::Finished(finished.outcome))
            }
            Err(error) => {
                let Some(service) = self.action_ids.remove(&error.id()) else {
                    return;
                };
                let event = if error.is_cancelled() {
                    Event::Finished(Outcome::Abandoned)
                } else {
                    tracing::error!(%service, %error, "an action task panicked");
                    Event::Panicked {
                        error: error.to_string(),
                    }
                };
                (service, event)
            }
        };
        let ended = self.apply(&service, event);
        if let Some(ended) = ended {
            self.keep_action(&service, ended);
        }
        self.forget_left();
    }

    /// Tells a service's record what happened and runs the follow-ups; the end of its
    /// action, if the event ended one.
    fn apply(&mut self, service: &ServiceName, event: Event<E::Instance>) -> Option<ActionEnd> {
        let applied = self.records.get_mut(service)?.apply(event);
        for follow_up in applied.follow_ups {
            self.follow_up(service, follow_up);
        }
        applied.ended
    }

    fn follow_up(&mut self, service: &ServiceName, follow_up: FollowUp<E::Instance>) {
        match follow_up {
            FollowUp::WatchExit(instance) => self.watch_exit(service, instance),
            FollowUp::WatchHealth => self.watch_health(service),
            FollowUp::RememberParked { pids } => {
                let root_pid = self.tracked_pid(service);
                self.parked_notes
                    .remember(service, parked::ParkedMarker { root_pid, pids });
            }
            FollowUp::ForgetParked => self.parked_notes.forget(service),
            FollowUp::ObserveResidual { mb } => {
                self.footprints.observe_residual(service, mb);
            }
            FollowUp::LetGo(instance) => self.effects.let_go(&instance),
        }
    }

    /// Logs a finished action and keeps it for status and the waiting callers.
    fn keep_action(&mut self, service: &ServiceName, ended: ActionEnd) {
        let ActionEnd {
            flight,
            outcome,
            failure,
            busy,
        } = ended;
        let elapsed = flight.started.elapsed();
        match &outcome {
            Ok(detail) => {
                tracing::info!(op = %flight.op, %service, %detail, elapsed_ms = elapsed.as_millis() as u64, "action done")
            }
            Err(error) => {
                tracing::warn!(op = %flight.op, %service, %error, elapsed_ms = elapsed.as_millis() as u64, "action did not complete")
            }
        }
        let reason = self
            .records
            .get(service)
            .and_then(|r| r.reason())
            .unwrap_or_default()
            .to_owned();
        self.record_action(ActionRecord {
            op: flight.op.to_string(),
            service: service.to_string(),
            reason,
            cause: Some(flight.cause),
            generation: flight.generation,
            duration_ms: elapsed.as_millis() as u64,
            outcome,
            failure,
            started_at_ms: flight.started_at_ms,
            finished_at_ms: now_ms(),
            busy,
        });
    }

    /// Keeps a finished action for status, the waiting callers and the event stream.
    fn record_action(&mut self, record: ActionRecord) {
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
    }

    /// Watches an instance the record now tracks: its exit wakes the loop.
    fn watch_exit(&self, name: &ServiceName, instance: E::Instance) {
        let wake = self.wake_tx.clone();
        let service = name.clone();
        let pid = E::root_pid(&instance);
        let exited = E::wait_exit(instance);
        tokio::spawn(async move {
            let exit = exited.await;
            if let Some(pid) = pid {
                let _ = wake.send(Wake::Exited { service, pid, exit }).await;
            }
        });
    }

    /// Probes a running service's health every resync; `UNHEALTHY_AFTER` failures in a
    /// row wake the loop. Parked services are not watched.
    fn watch_health(&mut self, name: &ServiceName) {
        let interval = self.config.resync;
        let effects = self.effects.clone();
        let wake = self.wake_tx.clone();
        let Some(record) = self.records.get_mut(name) else {
            return;
        };
        if record.parked_pids().is_some() {
            return;
        }
        let pid = record.instance().and_then(E::root_pid);
        let service = name.clone();
        if let (Some(check), Some(pid)) = (record.spec.health.clone(), pid) {
            let task = tokio::spawn(async move {
                let mut failures = 0;
                loop {
                    tokio::time::sleep(interval).await;
                    match effects.probe(&check).await {
                        Ok(()) => failures = 0,
                        Err(error) => {
                            failures += 1;
                            if failures >= UNHEALTHY_AFTER {
                                let _ = wake
                                    .send(Wake::Unhealthy {
                                        service,
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
            record.watched_by(task.abort_handle());
        }
    }

    // ---- adoption ----

    /// Adopts services left running by an earlier daemon instead of starting them
    /// twice; each is checked ready in a task of its own.
    async fn adopt_running(&mut self) {
        let names: Vec<ServiceName> = self.records.iter().map(|r| r.name().clone()).collect();
        self.adopt_each(&names).await;
    }

    /// Adopts what runs of `names`; a service whose backend cannot be asked is `unknown`.
    async fn adopt_each(&mut self, names: &[ServiceName]) {
        for name in names {
            let Some(record) = self.records.get(name) else {
                continue;
            };
            if record.instance().is_some() || record.in_flight().is_some() {
                continue;
            }
            let spec = record.spec.clone();
            let Some(instance) = self.find_running(&spec).await else {
                continue;
            };
            let root_pid = E::root_pid(&instance);
            tracing::info!(service = %name, pid = ?root_pid, "adopted a running instance");
            // Parked by an earlier daemon: it is resumed when wanted, not trusted.
            let parked = parked::recall(&self.config.state_dir, name, root_pid).map(|m| m.pids);
            let was_parked = parked.is_some();
            self.apply(
                name,
                Event::Adopted {
                    instance: instance.clone(),
                    parked,
                },
            );
            if was_parked {
                tracing::info!(service = %name, "it was parked: adopted as parked");
                continue;
            }
            let context = self.task_context(spec);
            let (supersede, abandon) = (context.supersede.clone(), context.abandon.clone());
            self.spawn_task(name, tasks::verify_adopted(context, instance));
            let action = Action {
                op: Op::Start,
                service: name.clone(),
                vram_mb: 0,
                cause: Cause::Adopted,
                reason: "adopted: left running by an earlier daemon".to_owned(),
                after: Vec::new(),
            };
            let generation = self.generation;
            self.mark_in_flight(&action, generation, supersede, abandon);
        }
    }

    /// Another daemon leads now: forget the instances this one tracked (they keep
    /// running, and the leader adopts them) so that nothing here acts on them.
    fn let_go(&mut self) {
        self.abandon.cancel();
        self.abandon = CancellationToken::new();
        for record in self.records.iter_mut() {
            record.apply(Event::LetGo);
        }
        self.lease_held = false;
    }

    // ---- shutdown ----

    fn begin_shutdown(&mut self) {
        let timeout = self.config.shutdown_timeout;
        tracing::info!(
            actions = self.actions.len(),
            ?timeout,
            "shutting down: new transitions are refused; GPU services keep running and are adopted by the next daemon"
        );
        self.lifecycle = Lifecycle::ShuttingDown {
            deadline: Instant::now() + timeout,
        };
        self.waiters.fail_all(TransitionError::shutting_down());
        // Starts are left running at a safe point (their pid files are on disk); stops
        // get until the deadline to finish.
        for record in self.records.iter_mut() {
            if let Some(flight) = record.in_flight().filter(|f| f.op == Op::Start) {
                flight.abandon.cancel();
            }
        }
        self.publish();
    }

    async fn finish_shutdown(&mut self) {
        for record in self.records.iter_mut() {
            record.stop_monitor();
        }
        self.waiters.fail_all(TransitionError::shutting_down());
        if let Err(error) = self.flush_footprints().await {
            tracing::warn!(%error, "learned footprints not saved at shutdown");
        }
        self.parked_notes.flush().await;
        self.lease.step_down().await;
        self.lease_held = false;
        self.publish();
        tracing::info!("shut down: the lease and the lead are released");
    }

    fn shutting_down(&self) -> bool {
        self.lifecycle != Lifecycle::Running
    }
}
