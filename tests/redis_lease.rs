//! The Redis lease end to end: the real daemon binary against a real redis-server
//! (started on a free port by each test) and real redis-py, the client the pipeline's
//! Python consumers lock the GPU with. Without redis-server or redis-py these tests are
//! skipped loudly, or fail under CI=true.

mod common;

use std::time::{Duration, Instant};

use common::lease::{
    del, eventually, get, gpu_manager_holder, leads, lease_block, python_redis_installed,
    python_try_lock, redis_with_python, require, set, PythonLock, TestRedis,
};
use common::{mcn_inventory, Harness, Standin};

/// A vidi stand-in whose start (and so the transition) takes `start_delay_ms`.
fn slow_vidi(start_delay_ms: u64) -> Standin {
    let mut vidi = Standin::new("vidi", 4096, 40, "[2]");
    vidi.start_delay_ms = start_delay_ms;
    vidi.start_timeout_ms = 60_000;
    vidi
}

#[test]
fn a_python_lock_blocks_transitions_until_it_is_released() {
    let Some(redis) = redis_with_python() else {
        return;
    };
    let mut h = Harness::new(mcn_inventory());
    h.write_config(&lease_block(&redis, 5000, 500));
    let python = PythonLock::hold(&redis, "gpu_lock", 120);
    h.start_daemon();
    h.set_desired("phase: 2\n");
    h.wait_until("the daemon names the Python holder", |h| {
        h.daemon_log()
            .contains(&format!("held by {}", python.token))
    });
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        h.is_down("vidi") && h.allocations().is_empty(),
        "nothing starts while Python holds the GPU lock"
    );
    python.release();
    h.wait_converged(&["vidi"]);
    h.wait_until("the lease is released after the transition", |_| {
        get(&redis, "gpu_lock").is_none()
    });
}

#[test]
fn python_cannot_lock_the_gpu_during_a_transition_renewed_past_its_ttl() {
    let Some(redis) = redis_with_python() else {
        return;
    };
    let mut h = Harness::new(vec![slow_vidi(10_000)]);
    h.write_config(&lease_block(&redis, 2000, 500));
    h.start_daemon();
    h.set_desired("phase: 2\n");
    h.wait_until("the transition holds the lease", |_| {
        gpu_manager_holder(&redis, "gpu_lock").is_some()
    });
    let token = get(&redis, "gpu_lock");
    assert!(
        !python_try_lock(&redis, "gpu_lock"),
        "redis-py must not get the GPU while a transition runs"
    );
    // More than two TTLs into the 10 s start: only renewals keep the key.
    std::thread::sleep(Duration::from_millis(4500));
    assert_eq!(
        get(&redis, "gpu_lock"),
        token,
        "the same holder, renewed rather than expired"
    );
    assert!(!python_try_lock(&redis, "gpu_lock"));
    h.wait_converged(&["vidi"]);
    h.wait_until("the lease is released after the transition", |_| {
        get(&redis, "gpu_lock").is_none()
    });
    assert!(
        python_try_lock(&redis, "gpu_lock"),
        "between transitions the GPU lock is Python's to take"
    );
    assert!(!h.daemon_log().contains("GPU lease lost"));
}

#[test]
fn a_daemon_killed_holding_the_lease_leaves_a_key_that_expires_by_itself() {
    let Some(redis) = redis_with_python() else {
        return;
    };
    let mut h = Harness::new(vec![slow_vidi(12_000)]);
    h.write_config(&lease_block(&redis, 3000, 500));
    h.start_daemon();
    h.set_desired("phase: 2\n");
    h.wait_until("the transition holds the lease", |_| {
        gpu_manager_holder(&redis, "gpu_lock").is_some()
    });
    let token = get(&redis, "gpu_lock");
    h.kill_daemon();
    assert_eq!(
        get(&redis, "gpu_lock"),
        token,
        "the key outlives its killed holder"
    );
    h.wait_until("the key expires after its TTL, with no DEL", |_| {
        get(&redis, "gpu_lock").is_none()
    });
    assert!(python_try_lock(&redis, "gpu_lock"));
    // A new daemon takes the lease and adopts what the killed one was starting.
    h.start_daemon();
    h.wait_converged(&["vidi"]);
    assert_eq!(h.instances_of("vidi"), 1, "adopted, not started twice");
}

#[test]
fn a_lease_lost_mid_transition_stops_further_actions() {
    let Some(redis) = TestRedis::start() else {
        return;
    };
    // Each needs half the GPU, so cosyvoice's start must wait for vidi's stop.
    let mut vidi = Standin::new("vidi", 12288, 40, "[2]");
    vidi.stop_delay_ms = 3000;
    let cosyvoice = Standin::new("cosyvoice", 12288, 50, "[3]");
    let mut h = Harness::new(vec![vidi, cosyvoice]);
    h.write_config(&lease_block(&redis, 2000, 500));
    h.start_daemon();
    h.set_desired("phase: 2\n");
    h.wait_converged(&["vidi"]);
    // Ready as the daemon sees it too, so that phase 3 stops vidi rather than cancel
    // its start.
    h.wait_until("the daemon has vidi ready", |h| {
        h.daemon_log()
            .contains("service state service=vidi from=starting to=ready")
    });
    h.set_desired("phase: 3\n");
    // The stop of vidi is in flight (3 s) when someone else takes the key.
    h.wait_until("the stop of vidi runs", |h| {
        h.daemon_log()
            .contains("action begins op=stop service=vidi")
    });
    set(&redis, "gpu_lock", "intruder", 120_000);
    h.wait_until("the loss is reported", |h| {
        h.daemon_log().contains("GPU lease lost")
    });
    h.wait_until("the stop in flight finishes", |h| h.is_down("vidi"));
    std::thread::sleep(Duration::from_millis(2000));
    assert!(
        h.is_down("cosyvoice"),
        "no new action once the lease is lost"
    );
    assert_eq!(
        get(&redis, "gpu_lock").as_deref(),
        Some("intruder"),
        "a key the daemon no longer holds is never deleted"
    );
    h.wait_until("later rounds wait for the new holder", |h| {
        h.daemon_log().contains("held by intruder")
    });
    del(&redis, "gpu_lock");
    h.wait_converged(&["cosyvoice"]);
    assert!(h.oom_log().is_empty(), "OOM: {:?}", h.oom_log());
}

#[test]
fn redis_down_refuses_transitions_and_they_resume_when_it_returns() {
    let Some(mut redis) = TestRedis::start() else {
        return;
    };
    let mut h = Harness::new(mcn_inventory());
    h.write_config(&lease_block(&redis, 2000, 500));
    h.start_daemon();
    h.set_desired("phase: 2\n");
    h.wait_converged(&["vidi"]);
    redis.stop();
    h.wait_until("the outage is reported", |h| {
        h.daemon_log().contains("Redis is unreachable")
    });
    h.set_desired("phase: 3\n");
    h.wait_until("the transition is refused, saying why", |h| {
        h.daemon_log()
            .contains("the lease backend is unreachable: Redis at redis://127.0.0.1:")
    });
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        h.is_ready("vidi") && h.is_down("cosyvoice"),
        "nothing changes while Redis is down"
    );
    redis.restart();
    h.wait_converged(&["cosyvoice"]);
    h.wait_until("the recovery is reported", |h| {
        h.daemon_log().contains("Redis answers again")
    });
    assert!(h.oom_log().is_empty(), "OOM: {:?}", h.oom_log());
}

#[test]
fn of_two_daemons_one_acts_and_the_standby_takes_over_after_kill_9() {
    let Some(redis) = TestRedis::start() else {
        return;
    };
    let mut h = Harness::new(mcn_inventory());
    h.write_config(&lease_block(&redis, 2000, 500));
    let (mut leader, standby_pid) = h.leader_and_standby(&redis);
    let leads = |pid: u32| leads(&redis, pid);
    h.set_desired("phase: 2\n");
    eventually(
        "the leader starts vidi",
        || h.is_ready("vidi"),
        || leader.log(),
    );
    assert_eq!(h.instances_of("vidi"), 1);
    assert!(leader.log().contains("action begins op=start service=vidi"));
    assert!(
        !h.daemon_log().contains("action begins"),
        "the standby never acts:\n{}",
        h.daemon_log()
    );

    leader.kill();
    let killed_at = Instant::now();
    h.wait_until("the standby takes over", |_| leads(standby_pid));
    assert!(
        killed_at.elapsed() < Duration::from_secs(15),
        "took over in {:?}, expected about one TTL (2 s)",
        killed_at.elapsed()
    );
    h.wait_until("it adopts what the dead leader started", |h| {
        h.daemon_log().contains("adopted a running instance")
    });
    h.set_desired("phase: 3\n");
    h.wait_converged(&["cosyvoice"]);
    assert!(h.oom_log().is_empty(), "OOM: {:?}", h.oom_log());
}

/// A daemon started before its Redis, with the default TTL (its own retries while Redis
/// is down are 3 s apart), once it has found Redis unreachable.
fn serve_before_redis(h: &mut Harness, redis: &TestRedis) -> common::api::Api {
    let api = h.serve_with("", &lease_block(redis, 30_000, 500));
    h.wait_until("the daemon finds Redis unreachable", |_| {
        api.status()["lock"]["reachable"] == false
    });
    api
}

#[test]
fn the_first_transition_after_a_late_redis_answers_is_served() {
    let Some(mut redis) = TestRedis::not_started() else {
        return;
    };
    let mut h = Harness::new(mcn_inventory());
    let api = serve_before_redis(&mut h, &redis);
    redis.restart();
    let served = api.post("/gpu/prepare-phase/2");
    assert_eq!(served.code, 200, "not 503: Redis answers\n{}", served.body);
    assert!(h.is_ready("vidi"));
    assert_eq!(api.status()["lock"]["reachable"], true);
}

#[test]
fn the_first_transition_after_a_late_redis_answers_names_a_python_holder() {
    if !require(
        python_redis_installed(),
        "the Python redis module (redis-py)",
        "python3 -m pip install redis",
    ) {
        return;
    }
    let Some(mut redis) = TestRedis::not_started() else {
        return;
    };
    let mut h = Harness::new(mcn_inventory());
    let api = serve_before_redis(&mut h, &redis);
    redis.restart();
    let python = PythonLock::hold(&redis, "gpu_lock", 120);
    let refused = api.post("/gpu/prepare-phase/2");
    assert_eq!(
        refused.code, 423,
        "not 503: Redis answers\n{}",
        refused.body
    );
    assert_eq!(refused.json()["holder"], python.token.as_str());
    assert!(
        h.is_down("vidi"),
        "nothing starts while Python holds the lock"
    );
}
