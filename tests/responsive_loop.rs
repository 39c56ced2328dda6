//! The reconcile loop as a user meets it, through the real binary on the simulated GPU:
//! it hears a crash while another service loads, shuts down gracefully on SIGTERM
//! (callers answered, services left running, the lead handed over at once), says 503
//! naming Redis when Redis comes up late, and leaves an unhealthy service alone while a
//! redis-py lock holds the GPU.

mod common;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use common::api::Api;
use common::lease::{leads, lease_block, redis_with_python, PythonLock, TestRedis};
use common::{mcn_inventory, pid_is_alive, send_signal, Harness, Standin};

fn slow(mut standin: Standin, start_delay_ms: u64) -> Standin {
    standin.start_delay_ms = start_delay_ms;
    standin.start_timeout_ms = 60_000;
    standin
}

/// The service's pid, waiting for it: a start shows `starting` before its process is
/// spawned (on a blocking thread) and attached.
fn pid_of(api: &Api, service: &str) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = api.status();
        if let Some(pid) = status["services"][service]["pids"][0].as_u64() {
            return pid as u32;
        }
        assert!(Instant::now() < deadline, "{service} has no pid: {status}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Now on the clock the daemon stamps its status with (milliseconds since the epoch).
fn now_ms() -> u64 {
    let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    u64::try_from(since_epoch.as_millis()).unwrap()
}

fn daemon_pid(h: &Harness) -> u32 {
    h.daemon.as_ref().expect("a daemon").id()
}

#[test]
fn a_service_killed_during_another_start_shows_within_a_second_and_restarts() {
    let mut h = Harness::new(vec![
        Standin::new("cosyvoice", 4096, 50, "[3]"),
        slow(Standin::new("vidi", 4096, 40, "[2]"), 8000),
    ]);
    let api = h.serve("");
    assert_eq!(api.post("/gpu/prepare-phase/3").code, 200);
    // Vidi loads for 8 s beside CosyVoice.
    assert_eq!(api.post("/gpu/service/vidi/start?wait=false").code, 202);
    api.wait_state("vidi", "starting");
    let pid = pid_of(&api, "cosyvoice");
    let killed_at_ms = now_ms();
    send_signal(pid, "KILL");
    h.wait_until("status shows the crash", |_| {
        api.state("cosyvoice") != "ready"
    });
    // Timed by the daemon (when it marked the service failed), not by this test's
    // polling, which a loaded machine delays.
    let crashed = &api.status()["services"]["cosyvoice"];
    assert_eq!(crashed["state"], "failed", "{crashed}");
    let seen_after_ms = crashed["since_ms"]
        .as_u64()
        .unwrap()
        .saturating_sub(killed_at_ms);
    assert!(
        seen_after_ms < 1000,
        "the daemon saw the kill -9 {seen_after_ms} ms later, while vidi loads for 8 s"
    );
    // Its restart (after a 1 s backoff) does not wait for Vidi's load either.
    h.wait_until("cosyvoice is restarted", |_| {
        api.state("cosyvoice") == "ready"
    });
    assert_eq!(
        api.state("vidi"),
        "starting",
        "restarted while vidi still loads"
    );
    let status = api.status();
    assert_eq!(status["services"]["cosyvoice"]["restarts"], 1, "{status}");
    assert!(
        status["services"]["cosyvoice"]["last_error"].is_null(),
        "{status}"
    );
    h.wait_until("vidi is ready", |_| api.state("vidi") == "ready");
    assert!(h.oom_log().is_empty(), "OOM: {:?}", h.oom_log());
}

#[test]
fn sigterm_answers_waiting_callers_exits_0_and_leaves_services_for_the_next_daemon() {
    let mut services = mcn_inventory();
    services[2] = slow(services[2].clone(), 6000);
    let mut h = Harness::new(services);
    let api = h.serve("");
    let waiting = {
        let api = api.clone();
        std::thread::spawn(move || api.post("/gpu/prepare-phase/2"))
    };
    api.wait_state("vidi", "starting");
    let vidi = pid_of(&api, "vidi");
    let signalled = Instant::now();
    send_signal(daemon_pid(&h), "TERM");
    let answer = waiting.join().unwrap();
    assert_eq!(answer.code, 503, "{}", answer.body);
    let body: Value = answer.json();
    assert_eq!(body["kind"], "shutting_down", "{body}");
    let status = h.daemon.take().unwrap().wait().unwrap();
    assert!(status.success(), "the daemon exits 0 on SIGTERM: {status}");
    assert!(
        signalled.elapsed() < Duration::from_secs(3),
        "shutdown took {:?}",
        signalled.elapsed()
    );
    assert!(h
        .daemon_log()
        .contains("shut down: the lease and the lead are released"));
    assert!(pid_is_alive(vidi), "a daemon shutdown stops no service");

    // The next daemon adopts the start under way instead of starting vidi twice.
    let api = h.serve("");
    h.wait_until("vidi is adopted and ready", |_| {
        api.state("vidi") == "ready"
    });
    assert_eq!(pid_of(&api, "vidi"), vidi);
    assert_eq!(h.instances_of("vidi"), 1);
    assert!(h.daemon_log().contains("adopted a running instance"));
}

#[test]
fn sigterm_hands_the_lead_to_a_standby_at_once() {
    let Some(redis) = TestRedis::start() else {
        return;
    };
    let mut h = Harness::new(mcn_inventory());
    // A 30 s TTL, renewed every 10 s: a standby that waited for the key to expire would
    // take 20 s or more. Handed over, it takes one standby poll (250 ms); the bound
    // leaves room for a loaded 2-core machine, and for this test's own polling.
    h.write_config(&lease_block(&redis, 30_000, 500));
    let (mut leader, standby) = h.leader_and_standby(&redis);
    let signalled = Instant::now();
    let status = leader.terminate();
    assert!(status.success(), "{status}\n{}", leader.log());
    h.wait_until("the standby leads", |_| leads(&redis, standby));
    assert!(
        signalled.elapsed() < Duration::from_secs(5),
        "took over {:?} after SIGTERM",
        signalled.elapsed()
    );
    h.set_desired("phase: 2\n");
    h.wait_converged(&["vidi"]);
}

#[test]
fn a_daemon_started_before_redis_answers_503_naming_redis_then_acts_once_it_is_up() {
    let Some(mut redis) = TestRedis::not_started() else {
        return;
    };
    let mut h = Harness::new(mcn_inventory());
    let api = h.serve_with("", &lease_block(&redis, 2000, 500));
    let refused = api.post("/gpu/prepare-phase/2");
    assert_eq!(
        refused.code, 503,
        "not 423: no other daemon leads\n{}",
        refused.body
    );
    let body: Value = refused.json();
    assert_eq!(body["kind"], "backend_down", "{body}");
    assert_eq!(body["backend"], "redis", "{body}");
    let summary = api.status()["lock"]["summary"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        summary.contains("unreachable"),
        "status says the same: {summary}"
    );

    redis.restart();
    h.wait_until("the daemon leads once Redis answers", |_| {
        api.status()["lock"]["role"] == "leader"
    });
    let done = api.post("/gpu/prepare-phase/2");
    assert_eq!(done.code, 200, "{}", done.body);
}

#[test]
fn an_unhealthy_service_is_left_alone_while_a_python_lock_holds_the_gpu() {
    let Some(redis) = redis_with_python() else {
        return;
    };
    let mut h = Harness::new(vec![Standin::new("vidi", 4096, 40, "[2]")]);
    let api = h.serve_with("", &lease_block(&redis, 2000, 500));
    assert_eq!(api.post("/gpu/prepare-phase/2").code, 200);
    let vidi = pid_of(&api, "vidi");
    let lock = PythonLock::hold(&redis, "gpu_lock", 120);
    // A frozen process answers no health check.
    send_signal(vidi, "STOP");
    h.wait_until("vidi is unhealthy", |_| api.state("vidi") == "unhealthy");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(api.state("vidi"), "unhealthy");
    assert!(
        pid_is_alive(vidi),
        "not stopped while Python holds the lock"
    );
    assert!(
        !h.daemon_log()
            .contains("action begins op=stop service=vidi"),
        "{}",
        h.daemon_log()
    );
    assert_eq!(
        api.status()["lock"]["holder"].as_str(),
        Some(lock.token.as_str())
    );

    lock.release();
    h.wait_until("vidi is stopped and restarted", |_| {
        api.state("vidi") == "ready" && api.status()["services"]["vidi"]["restarts"] == 1
    });
    assert!(!pid_is_alive(vidi), "the frozen instance was stopped");
    assert_ne!(pid_of(&api, "vidi"), vidi);
    assert!(h.oom_log().is_empty(), "OOM: {:?}", h.oom_log());
}

#[test]
fn a_stop_that_fails_backs_off_then_the_service_is_failed() {
    // A daemon running as nobody adopts a service that a root daemon started: the
    // kernel refuses every signal it sends (EPERM), as a real stop can fail.
    let mut h = Harness::new(vec![Standin::new("vidi", 4096, 40, "[2]")]);
    h.start_daemon();
    h.set_desired("phase: 2\n");
    h.wait_converged(&["vidi"]);
    h.kill_daemon();
    let vidi = h.instances_of("vidi");
    assert_eq!(vidi, 1);
    h.set_desired("phase: null\n");
    let opened = std::process::Command::new("chmod")
        .args(["-R", "a+rwX"])
        .arg(h.path(""))
        .status()
        .expect("chmod");
    assert!(opened.success());
    h.daemon_wrapper = [
        "setpriv",
        "--reuid=nobody",
        "--regid=nogroup",
        "--clear-groups",
    ]
    .map(String::from)
    .to_vec();
    let began = Instant::now();
    let api = h.serve("");
    h.wait_until("vidi's stop gave up", |_| {
        let status = api.status();
        let vidi = &status["services"]["vidi"];
        vidi["state"] == "failed"
            && vidi["reason"]
                .as_str()
                .is_some_and(|r| r.contains("stop failed 5 times in a row"))
    });
    let log = h.daemon_log();
    assert_eq!(
        log.matches("action begins op=stop service=vidi").count(),
        5,
        "five tries, no hot loop:\n{log}"
    );
    // 1 + 2 + 4 + 8 s of backoff between the five tries.
    assert!(
        began.elapsed() >= Duration::from_secs(15),
        "{:?}",
        began.elapsed()
    );
    let status = api.status();
    let error = status["services"]["vidi"]["last_error"]
        .as_str()
        .unwrap_or_default();
    assert!(error.contains("cannot signal vidi"), "{status}");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        h.daemon_log()
            .matches("action begins op=stop service=vidi")
            .count(),
        5,
        "no more tries until the desired state changes"
    );
    assert_eq!(h.instances_of("vidi"), 1, "still running");
}
