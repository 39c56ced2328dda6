//! The reconciler against fake effects and a fake lease, under tokio's paused clock:
//! every wait is virtual, so backoffs of seconds take no time and nothing flakes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::*;
use crate::config::{DrainSpec, HealthCheck, ParkSpec, ServiceSpec};
use crate::lease::{LeaseRole, LockStatus};
use crate::reconcile::effects::DrainProbe;
use crate::status::ServiceState;

// ---- the fakes ----

/// How a fake service behaves.
#[derive(Clone, Default)]
struct Behaviour {
    ready_after: Duration,
    stop_takes: Duration,
    never_ready: bool,
    stop_fails: bool,
    /// The stop's task panics (a bug in a driver): what it did is not known.
    stop_panics: bool,
    park_fails: bool,
    resume_fails: bool,
    /// How long a resume takes (weights back from host RAM).
    wake_takes: Duration,
}

#[derive(Clone, Debug)]
struct FakeInstance {
    pid: u32,
    exit: watch::Receiver<Option<ExitInfo>>,
}

#[derive(Default)]
struct World {
    behaviour: HashMap<String, Behaviour>,
    /// Every effect, in order: "start vidi", "stop vidi"...
    calls: Vec<String>,
    exits: HashMap<u32, watch::Sender<Option<ExitInfo>>>,
    /// Services whose health probe fails.
    sick: Vec<String>,
    /// Services whose drain probe answers busy, until when.
    busy_until: HashMap<String, Instant>,
    /// Instances that have loaded once: a resumed one answers its health check at once.
    loaded: Vec<u32>,
}

#[derive(Clone, Default)]
struct FakeEffects {
    world: Arc<Mutex<World>>,
    pids: Arc<AtomicU32>,
}

impl FakeEffects {
    fn behave(&self, service: &str, behaviour: Behaviour) {
        self.world().behaviour.insert(service.into(), behaviour);
    }

    fn world(&self) -> std::sync::MutexGuard<'_, World> {
        self.world.lock().unwrap()
    }

    fn behaviour(&self, service: &str) -> Behaviour {
        self.world()
            .behaviour
            .get(service)
            .cloned()
            .unwrap_or_default()
    }

    fn calls(&self) -> Vec<String> {
        self.world().calls.clone()
    }

    fn count(&self, call: &str) -> usize {
        self.calls().iter().filter(|c| *c == call).count()
    }

    /// The service has work in flight for `how_long` from now.
    fn busy_for(&self, service: &str, how_long: Duration) {
        self.world()
            .busy_until
            .insert(service.into(), Instant::now() + how_long);
    }

    fn crash(&self, pid: u32) {
        if let Some(exit) = self.world().exits.get(&pid) {
            exit.send_replace(Some(ExitInfo::Code(3)));
        }
    }
}

impl ServiceEffects for FakeEffects {
    type Instance = FakeInstance;

    async fn find_running(&self, _spec: &ServiceSpec) -> Result<Option<FakeInstance>, EffectError> {
        Ok(None)
    }

    async fn look_up(&self, _spec: &ServiceSpec) -> Result<Option<FakeInstance>, EffectError> {
        Ok(None)
    }

    async fn start(&self, spec: &ServiceSpec) -> Result<FakeInstance, EffectError> {
        let pid = 1000 + self.pids.fetch_add(1, Ordering::SeqCst);
        let (tx, exit) = watch::channel(None);
        let mut world = self.world();
        world.calls.push(format!("start {}", spec.name));
        world.exits.insert(pid, tx);
        Ok(FakeInstance { pid, exit })
    }

    async fn wait_ready(
        &self,
        spec: &ServiceSpec,
        instance: &FakeInstance,
    ) -> Result<Duration, EffectError> {
        let behaviour = self.behaviour(spec.name.as_str());
        let mut exit = instance.exit.clone();
        if self.world().loaded.contains(&instance.pid) {
            return Ok(Duration::ZERO);
        }
        let wait = if behaviour.never_ready {
            spec.start_timeout
        } else {
            behaviour.ready_after
        };
        tokio::select! {
            _ = exit.wait_for(Option::is_some) => Err(EffectError::new(
                FailureKind::Other,
                format!("{} exited while starting", spec.name),
            )),
            () = tokio::time::sleep(wait) => if behaviour.never_ready {
                Err(EffectError::new(
                    FailureKind::Timeout,
                    format!("{} did not become ready", spec.name),
                ))
            } else {
                self.world().loaded.push(instance.pid);
                Ok(wait)
            },
        }
    }

    async fn stop(
        &self,
        spec: &ServiceSpec,
        instance: &FakeInstance,
    ) -> Result<StopHow, EffectError> {
        let behaviour = self.behaviour(spec.name.as_str());
        self.world().calls.push(format!("stop {}", spec.name));
        assert!(
            !behaviour.stop_panics,
            "the fake stop of {} panics",
            spec.name
        );
        if behaviour.stop_fails {
            return Err(EffectError::new(
                FailureKind::Other,
                format!("cannot signal {} (pid {}): EPERM", spec.name, instance.pid),
            ));
        }
        tokio::time::sleep(behaviour.stop_takes).await;
        self.crash(instance.pid);
        Ok(StopHow::Graceful)
    }

    async fn park(
        &self,
        spec: &ServiceSpec,
        _park: &ParkSpec,
        gpu_pids: &[u32],
    ) -> Result<String, EffectError> {
        self.world()
            .calls
            .push(format!("park {} {gpu_pids:?}", spec.name));
        match self.behaviour(spec.name.as_str()).park_fails {
            true => Err(EffectError::new(FailureKind::Other, "answered 500")),
            false => Ok("freed".into()),
        }
    }

    async fn resume(
        &self,
        spec: &ServiceSpec,
        _park: &ParkSpec,
        parked_pids: &[u32],
    ) -> Result<String, EffectError> {
        let behaviour = self.behaviour(spec.name.as_str());
        self.world()
            .calls
            .push(format!("resume {} {parked_pids:?}", spec.name));
        tokio::time::sleep(behaviour.wake_takes).await;
        match behaviour.resume_fails {
            true => Err(EffectError::new(FailureKind::Other, "answered 507")),
            false => Ok("awake".into()),
        }
    }

    fn park_unavailable(&self, _spec: &ServiceSpec) -> Option<String> {
        None
    }

    async fn drain_probe(&self, drain: &DrainSpec) -> DrainProbe {
        let world = self.world();
        let busy = world.busy_until.iter().any(|(service, until)| {
            drain.url.contains(service.as_str()) && *until > Instant::now()
        });
        match busy {
            true => DrainProbe::Busy {
                answer: serde_json::json!({"/queue_running": [[1]]}),
            },
            false => DrainProbe::Idle,
        }
    }

    fn let_go(&self, _instance: &FakeInstance) {}

    async fn wait_exit(instance: FakeInstance) -> ExitInfo {
        let mut exit = instance.exit;
        let seen = exit.wait_for(Option::is_some).await.map(|e| *e);
        seen.ok().flatten().unwrap_or(ExitInfo::Unknown)
    }

    async fn probe(&self, check: &HealthCheck) -> Result<(), String> {
        let sick = self
            .world()
            .sick
            .iter()
            .any(|s| check.url.contains(s.as_str()));
        if sick {
            Err("connection refused".into())
        } else {
            Ok(())
        }
    }

    async fn last_log_lines(&self, _spec: &ServiceSpec) -> Vec<String> {
        vec!["the last line".into()]
    }

    fn root_pid(instance: &FakeInstance) -> Option<u32> {
        Some(instance.pid)
    }

    fn container_id(_instance: &FakeInstance) -> Option<String> {
        None
    }
}

/// What a test can change of the fake lease, and see of what the reconciler did.
#[derive(Default)]
struct LeaseState {
    standby: bool,
    /// A redis-py lock held by someone else.
    foreign_holder: Option<String>,
    held: bool,
    lost: bool,
    was_leading: bool,
    acquisitions: u32,
    step_downs: u32,
}

#[derive(Clone, Default)]
struct FakeLease {
    state: Arc<Mutex<LeaseState>>,
}

impl FakeLease {
    fn state(&self) -> std::sync::MutexGuard<'_, LeaseState> {
        self.state.lock().unwrap()
    }
}

impl LeaseBackend for FakeLease {
    async fn refresh(&mut self) -> Leadership {
        let mut state = self.state();
        let leading = !state.standby;
        let change = match (state.was_leading, leading) {
            (false, true) => Leadership::Gained,
            (true, true) => Leadership::Leading,
            (true, false) => Leadership::Lost,
            (false, false) => Leadership::Standby,
        };
        state.was_leading = leading;
        change
    }

    async fn try_acquire(&mut self) -> Result<(), LeaseError> {
        let mut state = self.state();
        if let Some(holder) = state.foreign_holder.clone() {
            return Err(LeaseError::HeldElsewhere {
                key: "gpu_lock".into(),
                holder,
                since_ms: None,
                waited_ms: 60_000,
            });
        }
        state.held = true;
        state.lost = false;
        state.acquisitions += 1;
        Ok(())
    }

    async fn check(&mut self) -> Result<(), LeaseError> {
        if self.state().lost {
            return Err(LeaseError::Lost {
                key: "gpu_lock".into(),
                detail: "taken".into(),
                holder: Some("intruder".into()),
            });
        }
        Ok(())
    }

    async fn release(&mut self) {
        self.state().held = false;
    }

    async fn step_down(&mut self) {
        let mut state = self.state();
        state.held = false;
        state.step_downs += 1;
    }

    fn status(&self) -> LockStatus {
        let state = self.state();
        LockStatus {
            role: if state.standby {
                LeaseRole::Standby
            } else {
                LeaseRole::Leader
            },
            leader: Some(if state.standby { "the other" } else { "me" }.into()),
            reachable: Some(true),
            ..Default::default()
        }
    }
}

// ---- the harness ----

struct Test {
    dir: tempfile::TempDir,
    desired: std::path::PathBuf,
    effects: FakeEffects,
    lease: FakeLease,
    handle: ReconcilerHandle,
    shutdown: CancellationToken,
    run: JoinHandle<()>,
}

/// Three services on a 24 GB budget: a (16 GB, phase 1), b and c (8 GB each, phase 2).
const SERVICES: &str = "
  a: { kind: native, command: x, vram_mb: 16000, priority: 30, phases: [1], health: { url: 'http://a/' }, start_timeout_ms: 120000 }
  b: { kind: native, command: x, vram_mb: 8000, priority: 20, phases: [2], health: { url: 'http://b/' } }
  c: { kind: native, command: x, vram_mb: 8000, priority: 10, phases: [2], health: { url: 'http://c/' } }
";

fn start(effects: FakeEffects, lease: FakeLease) -> Test {
    start_with(SERVICES, effects, lease)
}

/// The config file of a test in `dir`, with `services`.
fn config_text(dir: &std::path::Path, services: &str) -> String {
    format!(
        "gpu: {{ total_mb: 24500, reserve_mb: 500 }}\ndesired_state: {}\nstate_dir: {}\nresync_ms: 500\nshutdown_timeout_ms: 5000\nservices:{services}",
        dir.join("state.yaml").display(),
        dir.join("state").display()
    )
}

fn start_with(services: &str, effects: FakeEffects, lease: FakeLease) -> Test {
    let dir = tempfile::tempdir().unwrap();
    let desired = dir.path().join("state.yaml");
    std::fs::write(&desired, "phase: null\n").unwrap();
    let yaml = config_text(dir.path(), services);
    let path = dir.path().join("c.yaml");
    std::fs::write(&path, &yaml).unwrap();
    let config = Config::parse(&path, &yaml).unwrap();
    let gpu = GpuSource::Unavailable {
        reason: "fake".into(),
    };
    let reconciler = Reconciler::new(Arc::new(config), gpu, effects.clone(), lease.clone());
    let handle = reconciler.handle();
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(reconciler.run(shutdown.clone()));
    Test {
        dir,
        desired,
        effects,
        lease,
        handle,
        shutdown,
        run,
    }
}

impl Test {
    fn state(&self, service: &str) -> ServiceState {
        self.handle.status.borrow().services[service].state
    }

    /// Waits (in virtual time) until `what` holds, failing after a virtual hour.
    async fn until(&self, what: &str, holds: impl Fn(&Self) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(3600);
        while !holds(self) {
            assert!(
                Instant::now() < deadline,
                "never: {what}\ncalls: {:?}\nstatus: {:#?}",
                self.effects.calls(),
                self.handle.status.borrow().services
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn transition(
        &self,
        change: Change,
    ) -> oneshot::Receiver<Result<crate::transition::TransitionReport, TransitionError>> {
        self.transition_forced(change, false).await
    }

    async fn transition_forced(
        &self,
        change: Change,
        force: bool,
    ) -> oneshot::Receiver<Result<crate::transition::TransitionReport, TransitionError>> {
        let (reply, answer) = oneshot::channel();
        self.handle
            .commands
            .send(Command::Transition {
                change,
                wait: true,
                force,
                reply,
            })
            .await
            .unwrap();
        answer
    }

    /// Rewrites the config file with `services` and reloads it.
    async fn reload(&self, services: &str) -> Result<ReloadReport, TransitionError> {
        let path = self.dir.path().join("c.yaml");
        std::fs::write(&path, config_text(self.dir.path(), services)).unwrap();
        let (reply, answer) = oneshot::channel();
        let reload = Command::Reload {
            removed: RemovedServices::Stop,
            trigger: ReloadTrigger::Api,
            reply,
        };
        self.handle.commands.send(reload).await.unwrap();
        answer.await.unwrap()
    }

    async fn phase(
        &self,
        phase: u32,
    ) -> Result<crate::transition::TransitionReport, TransitionError> {
        self.transition(Change::Phase(phase)).await.await.unwrap()
    }
}

// ---- the tests ----

#[tokio::test(start_paused = true)]
async fn independent_actions_run_side_by_side() {
    let effects = FakeEffects::default();
    for service in ["a", "b", "c"] {
        effects.behave(
            service,
            Behaviour {
                ready_after: Duration::from_secs(10),
                stop_takes: Duration::from_secs(3),
                ..Default::default()
            },
        );
    }
    let t = start(effects, FakeLease::default());
    let began = Instant::now();
    t.phase(2).await.unwrap();
    // b and c fit together: one start time, not two.
    assert_between(began.elapsed(), 10_000, 10_100);
    let began = Instant::now();
    let report = t.phase(1).await.unwrap();
    // a needs c's memory (b's stop runs beside): 3 s of stops, then its 10 s start.
    assert_between(began.elapsed(), 13_000, 13_100);
    let mut ops: Vec<String> = report
        .actions
        .iter()
        .map(|a| format!("{} {}", a.op, a.service))
        .collect();
    ops.sort();
    assert_eq!(ops, ["start a", "stop b", "stop c"]);
    let action = |service: &str| {
        report
            .actions
            .iter()
            .find(|a| a.service == service)
            .unwrap()
    };
    assert!(
        action("a").started_at_ms >= action("c").finished_at_ms,
        "a begins after the stop it waits for: {report:?}"
    );
}

fn assert_between(took: Duration, at_least_ms: u64, below_ms: u64) {
    assert!(
        took >= Duration::from_millis(at_least_ms) && took < Duration::from_millis(below_ms),
        "took {took:?}, expected {at_least_ms}..{below_ms} ms"
    );
}

/// Phase 1 asked for, and its service a in a 2-minute start (its stop takes 1 s); the
/// phase's answer is still owed.
async fn a_starting_slowly() -> (
    Test,
    oneshot::Receiver<Result<crate::transition::TransitionReport, TransitionError>>,
) {
    let effects = FakeEffects::default();
    effects.behave(
        "a",
        Behaviour {
            ready_after: Duration::from_secs(120),
            stop_takes: Duration::from_secs(1),
            ..Default::default()
        },
    );
    let t = start(effects, FakeLease::default());
    let first = t.transition(Change::Phase(1)).await;
    t.until("a is starting", |t| t.state("a") == ServiceState::Starting)
        .await;
    (t, first)
}

#[tokio::test(start_paused = true)]
async fn a_newer_state_cancels_a_start_it_no_longer_wants() {
    let (t, first) = a_starting_slowly().await;
    let asked = Instant::now();
    let second = t.phase(2).await.unwrap();
    // Served after a's stop (1 s) and the new starts (0 s): not after a's 2 minutes.
    assert!(
        asked.elapsed() <= Duration::from_millis(1100),
        "{:?}",
        asked.elapsed()
    );
    let superseded = first.await.unwrap().unwrap_err();
    assert!(
        matches!(superseded, TransitionError::Superseded { .. }),
        "{superseded:?}"
    );
    assert_eq!(
        t.effects.count("stop a"),
        1,
        "the half-started a was stopped"
    );
    assert!(second
        .actions
        .iter()
        .any(|a| a.service == "a" && a.failure == Some(FailureKind::Cancelled)));
    assert_eq!(t.state("a"), ServiceState::Stopped);
    assert_eq!(t.state("b"), ServiceState::Ready);
}

#[tokio::test(start_paused = true)]
async fn a_reload_that_removes_a_service_during_its_start_cancels_the_start_and_forgets_it() {
    let (t, first) = a_starting_slowly().await;
    // b takes over phase 1, which the desired state in force names.
    let without_a: String = SERVICES
        .lines()
        .filter(|line| !line.trim_start().starts_with("a:"))
        .map(|line| {
            format!("{line}\n").replace(
                "phases: [2], health: { url: 'http://b/'",
                "phases: [1, 2], health: { url: 'http://b/'",
            )
        })
        .collect();
    let asked = Instant::now();
    let report = t.reload(&without_a).await.unwrap();
    assert_eq!(report.removed, ["a"], "{report:?}");
    assert_eq!(report.generation, 2);
    t.until("a is forgotten", |t| {
        !t.handle.status.borrow().services.contains_key("a")
    })
    .await;
    // Its stop (1 s), not its 2-minute start.
    assert!(
        asked.elapsed() <= Duration::from_millis(1100),
        "{:?}",
        asked.elapsed()
    );
    assert_eq!(
        t.effects.count("stop a"),
        1,
        "the half-started a was stopped"
    );
    let superseded = first.await.unwrap().unwrap_err();
    assert!(
        matches!(superseded, TransitionError::Superseded { .. }),
        "{superseded:?}"
    );
    t.until("b, now of phase 1, is ready", |t| {
        t.state("b") == ServiceState::Ready
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_crash_during_another_start_is_seen_at_once_and_restarted_with_backoff() {
    let effects = FakeEffects::default();
    effects.behave(
        "a",
        Behaviour {
            ready_after: Duration::from_secs(60),
            ..Default::default()
        },
    );
    let t = start(effects, FakeLease::default());
    t.phase(2).await.unwrap();
    let pid = t.handle.status.borrow().services["b"].pids[0];
    // a starts for a minute beside b (pinned: 16 GB fits beside b's 8 GB only).
    std::fs::write(&t.desired, "phase: 2\npinned: [a]\nheld: [c]\n").unwrap();
    t.until("a is starting", |t| t.state("a") == ServiceState::Starting)
        .await;
    let crashed = Instant::now();
    t.effects.crash(pid);
    t.until("b is failed", |t| t.state("b") == ServiceState::Failed)
        .await;
    assert!(crashed.elapsed() < Duration::from_millis(100));
    assert_eq!(t.state("a"), ServiceState::Starting, "a's start goes on");
    t.until("b is restarted", |t| t.state("b") == ServiceState::Ready)
        .await;
    // Restarted after its 1 s backoff, long before a is ready.
    assert!(crashed.elapsed() >= Duration::from_secs(1));
    assert!(crashed.elapsed() < Duration::from_secs(2));
    assert_eq!(t.handle.status.borrow().services["b"].restarts, 1);
    assert_eq!(t.effects.count("start b"), 2);
}

#[tokio::test(start_paused = true)]
async fn a_start_that_keeps_failing_backs_off_then_gives_up() {
    let effects = FakeEffects::default();
    effects.behave(
        "b",
        Behaviour {
            never_ready: true,
            ..Default::default()
        },
    );
    let t = start(effects, FakeLease::default());
    let began = Instant::now();
    let error = t.phase(2).await.unwrap_err();
    assert_eq!(error.http_status(), 504, "{error}");
    t.until("b gave up", |t| {
        let status = t.handle.status.borrow();
        let b = &status.services["b"];
        b.state == ServiceState::Failed
            && b.reason.as_deref().is_some_and(|r| r.contains("5 times"))
    })
    .await;
    assert_eq!(t.effects.count("start b"), 5);
    // Five starts of 120 s each, with 1 + 2 + 4 + 8 s of backoff between them.
    let took = began.elapsed();
    assert!(took >= Duration::from_secs(5 * 120 + 15), "{took:?}");
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert_eq!(
        t.effects.count("start b"),
        5,
        "no more tries until the state changes"
    );
    assert_eq!(t.state("c"), ServiceState::Ready);
}

#[tokio::test(start_paused = true)]
async fn a_stop_that_fails_backs_off_then_is_failed() {
    let effects = FakeEffects::default();
    let t = start(effects, FakeLease::default());
    t.phase(2).await.unwrap();
    t.effects.behave(
        "c",
        Behaviour {
            stop_fails: true,
            ..Default::default()
        },
    );
    let began = Instant::now();
    std::fs::write(&t.desired, "phase: 2\nheld: [c]\n").unwrap();
    t.until("c's stop gave up", |t| {
        let status = t.handle.status.borrow();
        let c = &status.services["c"];
        c.state == ServiceState::Failed
            && c.reason
                .as_deref()
                .is_some_and(|r| r.contains("stop failed 5 times"))
    })
    .await;
    assert_eq!(t.effects.count("stop c"), 5);
    // 1 + 2 + 4 + 8 s between the five tries: no hot loop.
    assert!(
        began.elapsed() >= Duration::from_secs(15),
        "{:?}",
        began.elapsed()
    );
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert_eq!(t.effects.count("stop c"), 5);
    let last_error = t.handle.status.borrow().services["c"].last_error.clone();
    assert!(last_error.is_some_and(|e| e.contains("EPERM")));
}

#[tokio::test(start_paused = true)]
async fn a_stop_that_panics_leaves_the_service_tracked_and_is_tried_again() {
    let effects = FakeEffects::default();
    let t = start(effects, FakeLease::default());
    t.phase(2).await.unwrap();
    let pids = t.handle.status.borrow().services["c"].pids.clone();
    assert!(!pids.is_empty(), "c runs");
    t.effects.behave(
        "c",
        Behaviour {
            stop_panics: true,
            ..Default::default()
        },
    );
    std::fs::write(&t.desired, "phase: 2\nheld: [c]\n").unwrap();
    t.until("c's stop panicked", |t| {
        t.state("c") == ServiceState::Failed && t.effects.count("stop c") == 1
    })
    .await;
    let c = t.handle.status.borrow().services["c"].clone();
    assert_eq!(c.pids, pids, "its process is still tracked, not external");
    assert!(
        c.last_error
            .as_deref()
            .is_some_and(|e| e.contains("panicked")),
        "{c:?}"
    );
    t.effects.behave("c", Behaviour::default());
    t.until("c is stopped on the next try", |t| {
        t.state("c") == ServiceState::Stopped
    })
    .await;
    assert_eq!(t.effects.count("stop c"), 2);
}

#[tokio::test(start_paused = true)]
async fn an_unhealthy_service_is_stopped_under_the_lease_and_restarted() {
    let effects = FakeEffects::default();
    let lease = FakeLease::default();
    let t = start(effects, lease);
    t.phase(2).await.unwrap();
    // A Python job holds the GPU lock: nothing may be stopped meanwhile.
    t.lease.state().foreign_holder = Some("python-job".into());
    t.effects.world().sick.push("http://c/".into());
    t.until("c is unhealthy", |t| {
        t.state("c") == ServiceState::Unhealthy
    })
    .await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(
        t.effects.count("stop c"),
        0,
        "left alone while the lock is held"
    );
    assert_eq!(t.state("c"), ServiceState::Unhealthy);
    t.effects.world().sick.clear();
    t.lease.state().foreign_holder = None;
    t.until("c is restarted", |t| {
        t.state("c") == ServiceState::Ready && t.effects.count("start c") == 2
    })
    .await;
    assert_eq!(t.effects.count("stop c"), 1);
    assert_eq!(
        t.handle.status.borrow().services["c"].restarts,
        1,
        "{:?}\n{:#?}",
        t.effects.calls(),
        t.handle.status.borrow().recent_actions
    );
}

#[tokio::test(start_paused = true)]
async fn a_lost_lease_lets_actions_under_way_finish_and_begins_nothing_new() {
    let effects = FakeEffects::default();
    effects.behave(
        "b",
        Behaviour {
            stop_takes: Duration::from_secs(5),
            ..Default::default()
        },
    );
    effects.behave(
        "c",
        Behaviour {
            stop_takes: Duration::from_secs(5),
            ..Default::default()
        },
    );
    let t = start(effects, FakeLease::default());
    t.phase(2).await.unwrap();
    let pending = t.transition(Change::Phase(1)).await;
    t.until("b and c stop", |t| t.state("b") == ServiceState::Stopping)
        .await;
    t.lease.state().lost = true;
    t.lease.state().foreign_holder = Some("intruder".into());
    let refused = pending.await.unwrap().unwrap_err();
    assert_eq!(refused.http_status(), 423, "{refused}");
    t.until("the stops under way finish", |t| {
        t.state("b") == ServiceState::Stopped && t.state("c") == ServiceState::Stopped
    })
    .await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(
        t.effects.count("start a"),
        0,
        "nothing new without the lease"
    );
    t.lease.state().foreign_holder = None;
    t.until("a starts once the lease is back", |t| {
        t.state("a") == ServiceState::Ready
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_standby_acts_on_nothing_and_answers_423_naming_the_leader() {
    let lease = FakeLease::default();
    lease.state().standby = true;
    let t = start(FakeEffects::default(), lease);
    let refused = t.phase(2).await.unwrap_err();
    assert_eq!(refused.http_status(), 423);
    assert!(refused.to_string().contains("the other"), "{refused}");
    assert!(t.effects.calls().is_empty());
}

#[tokio::test(start_paused = true)]
async fn losing_the_lead_lets_go_without_stopping_anything() {
    let t = start(FakeEffects::default(), FakeLease::default());
    t.phase(2).await.unwrap();
    t.lease.state().standby = true;
    t.until("let go", |t| t.state("b") == ServiceState::Stopped)
        .await;
    assert_eq!(t.effects.count("stop b"), 0, "the new leader adopts them");
    assert_eq!(t.effects.count("stop c"), 0);
}

#[tokio::test(start_paused = true)]
async fn shutdown_answers_callers_leaves_starts_running_and_steps_down() {
    let effects = FakeEffects::default();
    effects.behave(
        "a",
        Behaviour {
            ready_after: Duration::from_secs(120),
            ..Default::default()
        },
    );
    let t = start(effects, FakeLease::default());
    let pending = t.transition(Change::Phase(1)).await;
    t.until("a is starting", |t| t.state("a") == ServiceState::Starting)
        .await;
    let began = Instant::now();
    t.shutdown.cancel();
    let answer = pending.await.unwrap().unwrap_err();
    assert_eq!(answer.http_status(), 503);
    assert!(matches!(answer, TransitionError::ShuttingDown { .. }));
    t.run.await.unwrap();
    assert!(
        began.elapsed() < Duration::from_millis(100),
        "{:?}",
        began.elapsed()
    );
    assert_eq!(
        t.effects.count("stop a"),
        0,
        "a daemon shutdown stops no service"
    );
    assert_eq!(t.lease.state().step_downs, 1);
    // Later requests are refused the same way.
    let (reply, answer) = oneshot::channel();
    let sent = t
        .handle
        .commands
        .send(Command::Transition {
            change: Change::Phase(2),
            wait: true,
            force: false,
            reply,
        })
        .await;
    assert!(sent.is_err() || answer.await.is_err(), "the loop has ended");
}

#[tokio::test(start_paused = true)]
async fn shutdown_waits_for_stops_until_its_deadline() {
    let effects = FakeEffects::default();
    effects.behave(
        "c",
        Behaviour {
            stop_takes: Duration::from_secs(60),
            ..Default::default()
        },
    );
    let t = start(effects, FakeLease::default());
    t.phase(2).await.unwrap();
    std::fs::write(&t.desired, "phase: 2\nheld: [c]\n").unwrap();
    t.until("c is stopping", |t| t.state("c") == ServiceState::Stopping)
        .await;
    let began = Instant::now();
    t.shutdown.cancel();
    t.run.await.unwrap();
    // shutdown_timeout_ms: 5000, then the stop is left where it is.
    assert_between(began.elapsed(), 5_000, 5_100);
    assert_eq!(t.lease.state().step_downs, 1);
}

// ---- draining and parking ----

/// a (16.5 GB, phase 1) and p (8 GB, phase 2), which drains and parks keeping 500 MB:
/// on the 24 GB budget, a needs p parked.
const PARKING: &str = "
  a: { kind: native, command: x, vram_mb: 16500, priority: 30, phases: [1], health: { url: 'http://a/' } }
  p: { kind: native, command: x, vram_mb: 8000, priority: 20, phases: [2], health: { url: 'http://p/' }, park: { kind: http, url: 'http://p/free', residual_mb: 500 }, drain: { url: 'http://p/queue', busy_if: ['/queue_running'], timeout_ms: 2000 } }
";

impl Test {
    fn pid(&self, service: &str) -> Option<u32> {
        self.handle.status.borrow().services[service]
            .pids
            .first()
            .copied()
    }

    fn recent(&self) -> Vec<String> {
        self.handle
            .status
            .borrow()
            .recent_actions
            .iter()
            .map(|a| format!("{} {}", a.op, a.service))
            .collect()
    }
}

#[tokio::test(start_paused = true)]
async fn a_stop_waits_for_work_in_flight_showing_draining() {
    let effects = FakeEffects::default();
    let t = start_with(PARKING, effects.clone(), FakeLease::default());
    t.phase(2).await.unwrap();
    effects.busy_for("p", Duration::from_millis(1500));
    let began = Instant::now();
    let answer = t.transition(Change::Stop(name("p"))).await;
    t.until("p drains", |t| t.state("p") == ServiceState::Draining)
        .await;
    assert_eq!(effects.count("stop p"), 0, "nothing is stopped while busy");
    answer.await.unwrap().unwrap();
    assert_between(began.elapsed(), 1500, 1800);
    assert_eq!(effects.count("stop p"), 1);
    assert_eq!(t.state("p"), ServiceState::Stopped);
}

#[tokio::test(start_paused = true)]
async fn a_drain_that_times_out_answers_busy_and_touches_nothing() {
    let effects = FakeEffects::default();
    let t = start_with(PARKING, effects.clone(), FakeLease::default());
    t.phase(2).await.unwrap();
    let pid = t.pid("p");
    effects.busy_for("p", Duration::from_secs(3600));
    let error = t.phase(1).await.unwrap_err();
    assert_eq!(error.http_status(), 409, "{error}");
    let TransitionError::Busy {
        service, answer, ..
    } = &error
    else {
        panic!("{error:?}");
    };
    assert_eq!(service, "p");
    assert_eq!(answer, &serde_json::json!({"/queue_running": [[1]]}));
    assert!(error.to_string().contains("force=true"), "{error}");
    assert_eq!(t.state("p"), ServiceState::Ready);
    assert_eq!(t.pid("p"), pid);
    assert!(
        !effects
            .calls()
            .iter()
            .any(|c| c.starts_with("park p") || c == "stop p"),
        "{:?}",
        effects.calls()
    );
    // a needs p's memory: it is not started beside the busy service.
    assert_eq!(effects.count("start a"), 0);
}

#[tokio::test(start_paused = true)]
async fn force_skips_the_drain() {
    let effects = FakeEffects::default();
    let t = start_with(PARKING, effects.clone(), FakeLease::default());
    t.phase(2).await.unwrap();
    effects.busy_for("p", Duration::from_secs(3600));
    let began = Instant::now();
    let answer = t.transition_forced(Change::Stop(name("p")), true).await;
    answer.await.unwrap().unwrap();
    assert!(began.elapsed() < Duration::from_millis(100));
    assert_eq!(effects.count("stop p"), 1);
}

#[tokio::test(start_paused = true)]
async fn a_forced_request_ends_a_drain_under_way() {
    let effects = FakeEffects::default();
    let t = start_with(PARKING, effects.clone(), FakeLease::default());
    t.phase(2).await.unwrap();
    effects.busy_for("p", Duration::from_secs(3600));
    let first = t.transition(Change::Phase(1)).await;
    t.until("p drains", |t| t.state("p") == ServiceState::Draining)
        .await;
    let forced = t.transition_forced(Change::Phase(1), true).await;
    forced.await.unwrap().unwrap();
    assert!(first.await.unwrap().is_ok());
    assert_eq!(t.state("p"), ServiceState::Parked);
    assert_eq!(t.state("a"), ServiceState::Ready);
}

#[tokio::test(start_paused = true)]
async fn a_service_parks_and_resumes_as_the_same_instance() {
    let effects = FakeEffects::default();
    effects.behave(
        "p",
        Behaviour {
            ready_after: Duration::from_secs(5),
            wake_takes: Duration::from_millis(300),
            ..Default::default()
        },
    );
    let t = start_with(PARKING, effects.clone(), FakeLease::default());
    t.phase(2).await.unwrap();
    let pid = t.pid("p");
    t.phase(1).await.unwrap();
    assert_eq!(t.state("p"), ServiceState::Parked);
    assert_eq!(t.pid("p"), pid, "parked, not stopped");
    let began = Instant::now();
    let report = t.phase(2).await.unwrap();
    let ops: Vec<String> = report
        .actions
        .iter()
        .map(|a| format!("{} {}", a.op, a.service))
        .collect();
    assert!(ops.contains(&"resume p".to_owned()), "{ops:?}");
    assert_eq!(t.pid("p"), pid, "the same instance");
    assert_eq!(t.state("p"), ServiceState::Ready);
    // The wake time plus the ready check, not a 5 s cold start.
    assert!(
        began.elapsed() < Duration::from_secs(1),
        "{:?}",
        began.elapsed()
    );
    assert_eq!(effects.count("start p"), 1);
    let status = t.handle.status.borrow().services["p"].clone();
    assert!(status.parked_at_ms.is_some() && status.resumed_at_ms.is_some());
    assert_eq!(status.park.as_deref(), Some("http"));
}

#[tokio::test(start_paused = true)]
async fn a_failed_park_falls_back_to_a_stop_and_a_failed_resume_to_a_cold_start() {
    let effects = FakeEffects::default();
    effects.behave(
        "p",
        Behaviour {
            park_fails: true,
            ..Default::default()
        },
    );
    let t = start_with(PARKING, effects.clone(), FakeLease::default());
    t.phase(2).await.unwrap();
    let report = t.phase(1).await.unwrap();
    let park = report.actions.iter().find(|a| a.service == "p").unwrap();
    assert_eq!(park.op, "park");
    let detail = park.outcome.as_ref().unwrap();
    assert!(
        detail.contains("the park failed") && detail.contains("stopped"),
        "{detail}"
    );
    assert_eq!(t.state("p"), ServiceState::Stopped);
    assert_eq!(t.pid("p"), None);

    effects.behave(
        "p",
        Behaviour {
            resume_fails: true,
            ..Default::default()
        },
    );
    t.phase(2).await.unwrap();
    let parked_pid = t.pid("p");
    t.phase(1).await.unwrap();
    assert_eq!(t.state("p"), ServiceState::Parked);
    let report = t.phase(2).await.unwrap();
    let resume = report.actions.iter().find(|a| a.op == "resume").unwrap();
    let detail = resume.outcome.as_ref().unwrap();
    assert!(
        detail.contains("the resume failed") && detail.contains("started cold"),
        "{detail}"
    );
    assert_eq!(t.state("p"), ServiceState::Ready);
    assert_ne!(t.pid("p"), parked_pid, "a new instance");
    assert!(t.recent().contains(&"resume p".to_owned()));
}

fn name(service: &str) -> ServiceName {
    ServiceName::parse(service).unwrap()
}

#[test]
fn a_start_waiting_for_room_looks_again_less_often_the_longer_it_waits() {
    let ms = |n| Duration::from_millis(n);
    assert_eq!(super::room_poll(Duration::ZERO), ms(10), "soon at first");
    assert_eq!(super::room_poll(ms(400)), ms(100));
    assert_eq!(super::room_poll(ms(30_000)), ms(250), "capped");
}

fn claim_for(service: &str, holder: &str) -> Change {
    Change::Claim(crate::desired::Claim {
        service: name(service),
        holder: crate::desired::Holder::parse(holder).unwrap(),
        // Far off: this test runs on the paused clock, the claim's end on the wall's.
        until: crate::utc::UtcTime::now().plus_s(3600),
    })
}

#[tokio::test(start_paused = true)]
async fn claimed_services_are_kept_through_a_phase_and_a_stop_until_forced() {
    let effects = FakeEffects::default();
    let t = start(effects.clone(), FakeLease::default());
    t.phase(2).await.unwrap();
    let report = t.transition(claim_for("c", "job")).await.await.unwrap();
    assert_eq!(report.unwrap().services["c"], ServiceState::Ready);
    t.transition(claim_for("b", "other"))
        .await
        .await
        .unwrap()
        .unwrap();
    let file = std::fs::read_to_string(&t.desired).unwrap();
    assert!(file.contains("holder: job"), "{file}");

    // Phase 1's a needs the memory both claims keep: it is written, a is preempted
    // naming the claims, and the answer is 409.
    let error = t.phase(1).await.unwrap_err();
    assert_eq!(error.http_status(), 409);
    let TransitionError::CannotFit { claims, .. } = &error else {
        panic!("{error:?}");
    };
    assert_eq!(claims.len(), 2, "{error:?}");
    t.until("a preempted", |t| t.state("a") == ServiceState::Preempted)
        .await;
    let reason = t.handle.status.borrow().services["a"].reason.clone();
    assert!(reason.unwrap_or_default().contains("claimed by \"job\""));
    assert_eq!(t.handle.status.borrow().desired.phase, Some(1));
    assert_eq!((effects.count("stop b"), effects.count("stop c")), (0, 0));

    // A stop of a claimed service names the holders; forced, it ends the claims.
    let error = t.transition(Change::Stop(name("c"))).await.await.unwrap();
    let error = error.unwrap_err();
    assert_eq!(error.body()["kind"], "claimed");
    assert_eq!(error.body()["holders"], serde_json::json!(["job"]));
    let forced = t.transition_forced(Change::Stop(name("c")), true).await;
    let report = forced.await.unwrap().unwrap();
    assert_eq!(report.ended_claims.len(), 1);
    assert_eq!(report.services["c"], ServiceState::Stopped);
    t.until("a runs beside claimed b", |t| {
        t.state("a") == ServiceState::Ready
    })
    .await;
    assert_eq!(effects.count("stop b"), 0);

    // A release names the claims there are when the holder has none.
    let release = |holder: &str| Change::Release {
        service: name("b"),
        holder: crate::desired::Holder::parse(holder).unwrap(),
    };
    let error = t
        .transition(release("job"))
        .await
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(error.http_status(), 404);
    assert!(error.to_string().contains("\"other\" until"), "{error}");
    t.transition(release("other")).await.await.unwrap().unwrap();
    t.until("b stops: phase 1 does not list it", |t| {
        t.state("b") == ServiceState::Stopped
    })
    .await;
}
