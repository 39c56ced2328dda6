//! The state machine row by row (docs/ARCHITECTURE.md, "A service's life"): each test
//! brings a record to one state and checks where each event takes it, and what the loop
//! is told to do. No runtime, no fakes: an instance is its pid.

use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::machine::legal;
use super::*;
use crate::plan::Verdict;
use crate::reconcile::effects::EffectError;
use crate::reconcile::tasks::Outcome;
use crate::status::FailureKind;

type Pid = u32;

const PID: Pid = 4242;

fn record() -> Record<Pid> {
    let mut spec = crate::plan::tests::spec("vidi", 4096, 40, vec![2]);
    spec.park = Some(crate::plan::tests::parks_with(512));
    Record::new(spec)
}

fn flight(op: Op, cause: Cause) -> InFlight {
    InFlight {
        op,
        cause,
        generation: 1,
        started: Instant::now(),
        started_at_ms: 0,
        supersede: CancellationToken::new(),
        abandon: CancellationToken::new(),
        superseded: false,
    }
}

fn began(op: Op, cause: Cause, drains: bool) -> Event<Pid> {
    Event::Began {
        flight: flight(op, cause),
        reason: format!("{op} for a test"),
        drains,
    }
}

fn failed(kind: FailureKind) -> EffectError {
    EffectError::new(kind, format!("{kind:?} for a test"))
}

fn started() -> Event<Pid> {
    Event::Finished(Outcome::Started {
        instance: PID,
        took: Duration::from_millis(5),
        fell_back: None,
    })
}

fn stopped() -> Event<Pid> {
    Event::Finished(Outcome::Stopped {
        detail: "stopped".into(),
        reclaim: Ok(()),
    })
}

/// A record that went through `events`, each of them legal.
fn after(events: Vec<Event<Pid>>) -> Record<Pid> {
    let mut record = record();
    for event in events {
        record.apply(event);
    }
    record
}

fn starting() -> Record<Pid> {
    after(vec![
        began(Op::Start, Cause::Pinned, false),
        Event::Spawned { instance: PID },
    ])
}

fn ready() -> Record<Pid> {
    let mut record = starting();
    record.apply(started());
    record
}

fn parked() -> Record<Pid> {
    let mut record = ready();
    record.apply(began(Op::Park, Cause::NotWanted, false));
    record.apply(Event::Finished(Outcome::Parked {
        detail: "parked".into(),
        pids: vec![PID],
        residual_mb: 600,
    }));
    record
}

#[test]
fn from_stopped() {
    let mut record = record();
    let applied = record.apply(began(Op::Start, Cause::Pinned, false));
    assert_eq!(record.state(), ServiceState::Starting);
    assert!(applied.ended.is_none() && applied.follow_ups.is_empty());
    assert!(record.starting());

    let mut record = self::record();
    record.apply(Event::Verdict(Verdict::Preempted {
        reason: "comfyui needs the room".into(),
        shortfall_mb: 100,
        claims: Vec::new(),
    }));
    assert_eq!(record.state(), ServiceState::Preempted);
    assert_eq!(record.reason(), Some("comfyui needs the room"));

    let mut record = self::record();
    record.apply(Event::LookupFailed(failed(FailureKind::BackendDown)));
    assert_eq!(record.state(), ServiceState::Unknown);
    assert_eq!(record.last_error(), Some("BackendDown for a test"));

    let mut record = self::record();
    let applied = record.apply(Event::Adopted {
        instance: PID,
        parked: Some(vec![PID, PID + 1]),
    });
    assert_eq!(record.state(), ServiceState::Parked);
    assert_eq!(record.parked_pids(), Some(&[PID, PID + 1][..]));
    assert_eq!(applied.follow_ups, [FollowUp::WatchExit(PID)]);

    let mut record = self::record();
    record.apply(Event::RoomTimedOut {
        message: "no room".into(),
    });
    assert_eq!(record.state(), ServiceState::Failed);
    assert!(
        record.gate_closed(Instant::now()),
        "a backoff closes the gate"
    );
}

#[test]
fn from_starting() {
    let mut record = starting();
    assert_eq!(
        record.instance(),
        Some(&PID),
        "the spawned instance is tracked"
    );
    let applied = record.apply(started());
    assert_eq!(record.state(), ServiceState::Ready);
    assert_eq!(
        applied.follow_ups,
        [FollowUp::WatchHealth, FollowUp::ForgetParked]
    );
    let ended = applied.ended.expect("the start ended");
    assert_eq!(ended.outcome, Ok("ready after 5 ms".to_owned()));

    let mut record = starting();
    let applied = record.apply(Event::Finished(Outcome::StartFailed {
        error: failed(FailureKind::Timeout),
        left_running: None,
    }));
    assert_eq!(record.state(), ServiceState::Failed);
    assert_eq!(record.instance(), None);
    assert_eq!(applied.ended.unwrap().failure, Some(FailureKind::Timeout));

    let mut record = starting();
    record.apply(Event::Finished(Outcome::StartFailed {
        error: failed(FailureKind::Timeout),
        left_running: Some(PID),
    }));
    assert_eq!(record.state(), ServiceState::Unhealthy);
    assert_eq!(
        record.instance(),
        Some(&PID),
        "stopped later, under the lease"
    );

    let mut record = starting();
    record.apply(Event::Finished(Outcome::StartFailed {
        error: failed(FailureKind::BackendDown),
        left_running: None,
    }));
    assert_eq!(record.state(), ServiceState::Unknown);

    let mut record = starting();
    record.apply(Event::Superseded {
        reason: "not wanted".into(),
    });
    assert_eq!(record.state(), ServiceState::Stopping);
    let flight = record.in_flight().unwrap();
    assert!(flight.superseded && flight.supersede.is_cancelled());
    assert!(!record.starting());
    record.apply(Event::Finished(Outcome::Cancelled {
        detail: "stopped before ready".into(),
        reclaim: Ok(()),
    }));
    assert_eq!(record.state(), ServiceState::Stopped);
    assert_eq!(record.instance(), None);
}

#[test]
fn a_panicked_start_keeps_what_it_spawned_tracked() {
    let mut record = starting();
    let applied = record.apply(Event::Panicked {
        error: "boom".into(),
    });
    assert_eq!(record.instance(), Some(&PID), "its exit is still watched");
    assert_eq!(record.state(), ServiceState::Unhealthy, "to be stopped");
    assert!(matches!(record.condition(), Condition::Unhealthy { .. }));
    let ended = applied.ended.unwrap();
    assert_eq!(ended.outcome, Err("the start panicked: boom".to_owned()));

    let mut record = after(vec![began(Op::Start, Cause::Pinned, false)]);
    record.apply(Event::Panicked {
        error: "boom".into(),
    });
    assert_eq!(record.state(), ServiceState::Failed, "nothing was spawned");
}

#[test]
fn a_panicked_stop_or_park_keeps_the_instance_and_tries_again() {
    for op in [Op::Stop, Op::Park] {
        let mut record = ready();
        record.apply(began(op, Cause::NotWanted, false));
        record.apply(Event::Panicked {
            error: "boom".into(),
        });
        assert_eq!(record.instance(), Some(&PID), "{op}: still tracked");
        assert_eq!(record.state(), ServiceState::Failed, "{op}");
        assert!(record.in_flight().is_none());
        assert!(record.gate_closed(Instant::now()), "{op}: after a backoff");
    }
}

#[test]
fn from_ready() {
    let mut record = ready();
    record.apply(began(Op::Stop, Cause::NotWanted, true));
    assert_eq!(record.state(), ServiceState::Draining);

    let mut record = ready();
    record.apply(began(Op::Stop, Cause::NotWanted, false));
    assert_eq!(record.state(), ServiceState::Stopping);

    let mut record = ready();
    let applied = record.apply(Event::Exited {
        exit: "exited with status 1".into(),
        log: "Traceback".into(),
    });
    assert_eq!(record.state(), ServiceState::Failed);
    assert_eq!(record.instance(), None);
    assert!(applied.follow_ups.is_empty());
    assert!(record.last_error().unwrap().contains("Traceback"));

    let mut record = ready();
    record.apply(Event::Unhealthy {
        message: "3 failed probes".into(),
    });
    assert_eq!(record.state(), ServiceState::Unhealthy);

    let mut record = ready();
    record.apply(Event::LetGo);
    assert_eq!(record.state(), ServiceState::Stopped);
    assert_eq!(record.instance(), None, "the leader adopts it");
}

#[test]
fn from_draining() {
    let draining = || {
        let mut record = ready();
        record.apply(began(Op::Park, Cause::NotWanted, true));
        record
    };
    let mut record = draining();
    record.apply(Event::Drained);
    assert_eq!(record.state(), ServiceState::Stopping);

    let mut record = draining();
    let applied = record.apply(Event::Finished(Outcome::Busy {
        answer: serde_json::json!({"queue_running": 1}),
        waited: Duration::from_secs(3),
    }));
    assert_eq!(record.state(), ServiceState::Ready);
    assert!(record.busy() && record.gate_closed(Instant::now()));
    assert!(applied.follow_ups.contains(&FollowUp::WatchHealth));
    let ended = applied.ended.unwrap();
    assert_eq!(ended.failure, Some(FailureKind::Busy));
    assert!(ended.busy.is_some());

    let mut record = draining();
    record.apply(Event::Finished(Outcome::Kept));
    assert_eq!(record.state(), ServiceState::Ready);

    let mut record = draining();
    let applied = record.apply(Event::Finished(Outcome::Parked {
        detail: "parked".into(),
        pids: vec![PID],
        residual_mb: 600,
    }));
    assert_eq!(record.state(), ServiceState::Parked);
    assert_eq!(
        applied.follow_ups,
        [
            FollowUp::RememberParked { pids: vec![PID] },
            FollowUp::ObserveResidual { mb: 600 },
        ]
    );
}

#[test]
fn from_stopping() {
    let stopping = |cause| {
        let mut record = ready();
        record.apply(began(Op::Stop, cause, false));
        record
    };
    let mut record = stopping(Cause::Preempted);
    record.apply(stopped());
    assert_eq!(record.state(), ServiceState::Preempted);

    let mut record = stopping(Cause::NotWanted);
    let applied = record.apply(stopped());
    assert_eq!(record.state(), ServiceState::Stopped);
    assert_eq!(applied.follow_ups, [FollowUp::ForgetParked]);

    let mut record = stopping(Cause::NotWanted);
    record.apply(Event::Finished(Outcome::StopFailed {
        error: failed(FailureKind::Timeout),
    }));
    assert_eq!(record.state(), ServiceState::Failed);
    assert_eq!(record.instance(), Some(&PID), "it may still run");

    let mut record = stopping(Cause::NotWanted);
    let applied = record.apply(Event::Finished(Outcome::StopFailed {
        error: failed(FailureKind::BackendDown),
    }));
    assert_eq!(record.state(), ServiceState::Unknown);
    assert_eq!(record.instance(), None);
    assert!(applied.follow_ups.contains(&FollowUp::LetGo(PID)));
}

#[test]
fn from_parked() {
    let mut record = parked();
    assert_eq!(record.state(), ServiceState::Parked);
    record.apply(began(Op::Resume, Cause::Pinned, false));
    assert_eq!(record.state(), ServiceState::Starting);
    assert_eq!(record.parked_pids(), None);

    let mut record = parked();
    let applied = record.apply(Event::Exited {
        exit: "killed by signal 9".into(),
        log: String::new(),
    });
    assert_eq!(record.state(), ServiceState::Stopped, "nothing to restart");
    assert_eq!(applied.follow_ups, [FollowUp::ForgetParked]);

    let mut record = parked();
    record.apply(began(Op::Stop, Cause::Preempted, false));
    assert_eq!(record.state(), ServiceState::Stopping);

    let mut record = parked();
    record.apply(Event::RoomTimedOut {
        message: "no room to resume".into(),
    });
    assert_eq!(record.state(), ServiceState::Failed);
    assert!(record.parked_pids().is_some(), "still parked");
}

#[test]
fn from_unhealthy() {
    let mut record = ready();
    record.apply(Event::Unhealthy {
        message: "3 failed probes".into(),
    });
    record.apply(began(Op::Stop, Cause::Unhealthy, false));
    assert_eq!(record.state(), ServiceState::Stopping);
    record.apply(stopped());
    assert_eq!(
        record.state(),
        ServiceState::Failed,
        "restarted with backoff"
    );
    assert_eq!(record.reason(), Some("start failed; trying again in 1s"));
}

#[test]
fn from_failed() {
    let mut record = record();
    for _ in 0..MAX_CONSECUTIVE_FAILURES {
        record.apply(Event::RoomTimedOut {
            message: "no room".into(),
        });
    }
    assert_eq!(record.retry_at(), None, "closed for good");
    assert!(record
        .reason()
        .unwrap()
        .contains("change the desired state"));
    record.forgive();
    record.apply(began(Op::Start, Cause::Pinned, false));
    assert_eq!(record.state(), ServiceState::Starting);
    assert_eq!(record.restarts(), 0, "a forgiven start is not a restart");

    let mut record = self::record();
    record.apply(Event::RoomTimedOut {
        message: "no room".into(),
    });
    record.apply(began(Op::Start, Cause::Pinned, false));
    assert_eq!(record.restarts(), 1);
}

#[test]
fn from_unknown_and_preempted() {
    let mut record = record();
    record.apply(Event::LookupFailed(failed(FailureKind::BackendDown)));
    record.apply(Event::Verdict(Verdict::Idle));
    assert_eq!(
        record.state(),
        ServiceState::Unknown,
        "nothing is known yet"
    );
    record.apply(Event::BackendAnswered);
    assert_eq!(record.state(), ServiceState::Stopped);
    assert_eq!(record.last_error(), None);

    let mut record = self::record();
    record.apply(Event::Verdict(Verdict::Refused {
        reason: "too big".into(),
        shortfall_mb: 1,
    }));
    record.apply(Event::Verdict(Verdict::Idle));
    assert_eq!(record.state(), ServiceState::Stopped);
    assert_eq!(record.reason(), None);
}

#[test]
fn a_drain_of_a_service_wanted_again_is_called_off() {
    let mut record = ready();
    record.apply(began(Op::Stop, Cause::NotWanted, true));
    record.apply(Event::Verdict(wanted_by("phase 2")));
    let flight = record.in_flight().unwrap();
    assert!(flight.supersede.is_cancelled());
}

fn wanted_by(why: &str) -> Verdict {
    Verdict::Run {
        reason: format!("wanted by {why}"),
    }
}

#[test]
fn a_running_service_says_why_it_is_wanted_now() {
    let mut record = ready();
    record.apply(Event::Verdict(wanted_by("phase 2")));
    assert_eq!(record.reason(), Some("wanted by phase 2"));
    // Phase 3 no longer wants it; a request through its proxy keeps it.
    record.apply(Event::Verdict(Verdict::Run {
        reason: "demanded: a request came through its proxy".into(),
    }));
    assert_eq!(
        record.reason(),
        Some("demanded: a request came through its proxy")
    );
    assert_eq!(record.state(), ServiceState::Ready);
}

#[test]
fn events_about_no_action_or_another_instance_change_nothing() {
    let mut record = ready();
    for event in [
        Event::Finished(Outcome::Kept),
        Event::Panicked {
            error: "late".into(),
        },
        Event::Drained,
        Event::Spawned { instance: PID + 1 },
    ] {
        let applied = record.apply(event);
        assert!(applied.ended.is_none());
        assert_eq!(record.state(), ServiceState::Ready);
        assert_eq!(record.instance(), Some(&PID));
    }
}

#[test]
fn the_table_refuses_moves_no_event_makes() {
    use ServiceState::*;
    assert!(!legal(Stopped, Ready), "a start is reported before ready");
    assert!(!legal(Parked, Ready), "a resume goes through starting");
    assert!(!legal(Ready, Starting));
    assert!(!legal(Unknown, Ready));
    for state in [Ready, Parked, Failed, Draining, Unknown] {
        assert!(legal(state, Stopped), "{state}: a standby lets go");
    }
}

#[cfg(debug_assertions)]
#[test]
#[should_panic(expected = "ready -> starting is not a legal move")]
fn an_illegal_move_is_caught() {
    let mut record = ready();
    record.apply(began(Op::Start, Cause::Pinned, false));
}

#[test]
fn backoff_doubles_and_is_capped() {
    let seconds: Vec<u64> = (1..=8).map(|n| backoff(n).as_secs()).collect();
    assert_eq!(seconds, [1, 2, 4, 8, 16, 32, 60, 60]);
    assert_eq!(backoff(u32::MAX), MAX_BACKOFF);
}

fn launching(command: &str) -> crate::config::Runtime {
    let mut spec = record().spec;
    if let crate::config::Runtime::Native(native) = &mut spec.runtime {
        native.command = crate::config::CommandLine::Shell(command.into());
    }
    spec.runtime
}

fn relaunch(command: &str) -> Event<Pid> {
    let mut spec = record().spec;
    spec.runtime = launching(command);
    spec.priority = 45;
    Event::Reconfigured(Box::new(Reconfigure::Relaunch {
        spec,
        keys: vec!["command", "priority"],
    }))
}

#[test]
fn a_stopped_service_takes_a_new_launch_at_once() {
    let mut record = record();
    record.apply(relaunch("vidi --fast"));
    assert_eq!(record.spec.priority, 45);
    assert_eq!(record.outdated_keys(), None);
    assert_eq!(record.spec.runtime, launching("vidi --fast"));
}

#[test]
fn a_running_service_keeps_its_launch_until_its_stop_ends() {
    let before = record().spec.runtime;
    let mut record = after(vec![began(Op::Start, Cause::Pinned, false), started()]);
    let applied = record.apply(relaunch("vidi --fast"));
    // Live fields at once, and its health watched again; the launch waits.
    assert_eq!(record.spec.priority, 45);
    assert_eq!(record.spec.runtime, before);
    assert_eq!(record.outdated_keys(), Some(&["command", "priority"][..]));
    assert_eq!(applied.follow_ups, vec![FollowUp::WatchHealth]);
    record.apply(began(Op::Stop, Cause::ConfigChanged, true));
    assert_eq!(record.state(), ServiceState::Draining);
    assert_eq!(record.spec.runtime, before, "the stop stops the old launch");
    record.apply(stopped());
    assert_eq!(record.state(), ServiceState::Stopped);
    assert_eq!(record.outdated_keys(), None);
    assert_eq!(record.spec.runtime, launching("vidi --fast"));
}

#[test]
fn a_live_change_to_a_service_awaiting_its_restart_keeps_it_outdated() {
    let mut record = after(vec![began(Op::Start, Cause::Pinned, false), started()]);
    record.apply(relaunch("vidi --fast"));
    let mut spec = self::record().spec;
    spec.runtime = launching("vidi --fast");
    spec.priority = 50;
    record.apply(Event::Reconfigured(Box::new(Reconfigure::Live(spec))));
    assert_eq!(record.spec.priority, 50);
    assert_eq!(record.outdated_keys(), Some(&["command", "priority"][..]));
}
