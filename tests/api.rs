//! The HTTP API and the client commands end to end: the real daemon (`gpu-manager serve`)
//! on a free 127.0.0.1 port, native stand-in services allocating on a simulated 24 GB GPU
//! that the daemon reads through the fake libnvidia-ml. The calls are the requirements'
//! curl lines (AC-1, AC-2, AC-3), every error status, and the client commands.

mod common;

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::api::{op_service, Api, Reply};
use common::{free_port, mcn_inventory, Harness, Standin, CONVERGE};

const STATES: [&str; 8] = [
    "stopped",
    "starting",
    "ready",
    "unhealthy",
    "stopping",
    "preempted",
    "failed",
    "unknown",
];

fn serve(services: Vec<Standin>) -> (Harness, Api) {
    let mut h = Harness::new(services);
    let api = h.serve("");
    (h, api)
}

/// Asserts a 200 and returns the transition report.
fn ok(reply: Reply) -> Value {
    assert_eq!(reply.code, 200, "expected 200, got: {}", reply.body);
    reply.json()
}

/// Asserts the status code and that the body is the contract's JSON error.
fn refused(reply: Reply, code: u16) -> Value {
    assert_eq!(reply.code, code, "expected {code}, got: {}", reply.body);
    let body = reply.json();
    assert!(
        body["error"].as_str().is_some_and(|e| !e.is_empty()),
        "an error message: {body}"
    );
    assert!(
        body["kind"].as_str().is_some_and(|k| !k.is_empty()),
        "a kind to branch on: {body}"
    );
    body
}

/// A report's actions as "op service", in order, each asserted successful.
fn ops(report: &Value) -> Vec<String> {
    report["actions"]
        .as_array()
        .expect("actions")
        .iter()
        .map(|action| {
            assert!(
                action["outcome"]["Ok"].is_string(),
                "action failed: {action}"
            );
            assert!(action["duration_ms"].is_u64(), "a duration: {action}");
            op_service(action)
        })
        .collect()
}

fn desired_file(h: &Harness) -> String {
    std::fs::read_to_string(h.path("desired-state/state.yaml")).expect("desired state")
}

fn assert_no_oom(h: &Harness) {
    assert!(h.oom_log().is_empty(), "OOM: {:?}", h.oom_log());
}

#[test]
fn ac1_phases_2_3_4_answer_after_convergence_without_oom() {
    let (h, api) = serve(mcn_inventory());
    for (phase, ready, expected) in [
        (2, "vidi", vec!["start vidi"]),
        (3, "cosyvoice", vec!["start cosyvoice", "stop vidi"]),
        (4, "comfyui", vec!["stop cosyvoice", "start comfyui"]),
    ] {
        let report = ok(api.post(&format!("/gpu/prepare-phase/{phase}")));
        // Phase 3's stop and start fit side by side and run together (their order is
        // the order they finish in); phase 4's start waits for the stop's memory.
        let mut done = ops(&report);
        if phase == 3 {
            done.sort();
        }
        assert_eq!(done, expected, "phase {phase}: {report}");
        assert_eq!(report["services"][ready], "ready", "{report}");
        // Answered after convergence: the service answers its health URL now, and the
        // others are already down.
        assert!(
            h.is_ready(ready),
            "{ready} is ready when phase {phase} answers"
        );
        for other in ["comfyui", "cosyvoice", "vidi", "ollama"] {
            if other != ready {
                assert!(h.is_down(other), "{other} is down after phase {phase}");
            }
        }
        assert_eq!(api.state(ready), "ready");
        assert_eq!(api.status()["desired"]["phase"], phase);
        assert_no_oom(&h);
    }
    let again = ok(api.post("/gpu/prepare-phase/4"));
    assert!(ops(&again).is_empty(), "already converged: {again}");
    assert_eq!(again["services"]["comfyui"], "ready");
}

#[test]
fn ac2_status_has_the_requirements_shape_and_service_detail() {
    let (_h, api) = serve(mcn_inventory());
    ok(api.post("/gpu/prepare-phase/2"));
    let status = api.status();
    let vram = &status["vram"];
    let (total, used, free) = (
        vram["total_mb"].as_u64().expect("total_mb"),
        vram["used_mb"].as_u64().expect("used_mb"),
        vram["free_mb"].as_u64().expect("free_mb"),
    );
    assert_eq!(total, 24576);
    assert_eq!(used, 1024 + 4096, "the desktop baseline and vidi");
    assert_eq!(free, total - used);
    let services = status["services"].as_object().expect("services");
    let mut names: Vec<&str> = services.keys().map(String::as_str).collect();
    names.sort_unstable();
    assert_eq!(names, ["comfyui", "cosyvoice", "ollama", "vidi"]);
    for (name, service) in services {
        let state = service["state"].as_str().expect("state is a string");
        assert!(STATES.contains(&state), "{name}: {state}");
    }
    assert_eq!(status["services"]["vidi"]["state"], "ready");
    assert_eq!(status["services"]["vidi"]["observed_vram_mb"], 4096);
    assert_eq!(status["services"]["vidi"]["declared_vram_mb"], 4096);
    assert_eq!(status["services"]["comfyui"]["state"], "stopped");
    let lock = status["lock"].as_object().expect("lock");
    assert!(lock.contains_key("holder"), "lock.holder: {status}");
    assert!(status["snapshot_age_ms"].is_u64(), "{status}");
}

#[test]
fn ac3_starting_comfyui_stops_cosyvoice_before_starting_it() {
    let (h, api) = serve(mcn_inventory());
    ok(api.post("/gpu/prepare-phase/3"));
    assert!(h.is_ready("cosyvoice"));
    let report = ok(api.post("/gpu/service/comfyui/start"));
    assert_eq!(ops(&report), ["stop cosyvoice", "start comfyui"]);
    let stop_reason = report["actions"][0]["reason"].as_str().unwrap();
    assert!(stop_reason.starts_with("preempted"), "{stop_reason}");
    assert_eq!(report["services"]["comfyui"], "ready");
    assert_eq!(report["services"]["cosyvoice"], "preempted");
    assert!(h.is_ready("comfyui") && h.is_down("cosyvoice"));
    assert_eq!(
        h.allocations().into_values().collect::<Vec<_>>(),
        [20480],
        "only comfyui holds memory"
    );
    // ComfyUI allocates at start: had it started before CosyVoice's memory was
    // reclaimed, the simulated GPU would have refused it and logged an OOM.
    assert_no_oom(&h);
}

#[test]
fn unknown_services_and_phases_are_404_listing_the_known_ones() {
    let (h, api) = serve(mcn_inventory());
    let before = desired_file(&h);
    let generation = api.status()["desired"]["generation"].clone();

    let body = refused(api.post("/gpu/service/nosuch/start"), 404);
    assert_eq!(body["kind"], "unknown_service");
    assert_eq!(
        body["known"],
        json!(["comfyui", "cosyvoice", "ollama", "vidi"])
    );
    assert!(body["error"]
        .as_str()
        .unwrap()
        .contains("comfyui, cosyvoice"));

    let body = refused(api.post("/gpu/prepare-phase/9"), 404);
    assert_eq!(body["kind"], "unknown_phase");
    assert_eq!(body["known"], json!([2, 3, 4]));

    for path in [
        "/gpu/service/Bad.Name/stop",
        "/gpu/service/..%2Fetc/start",
        "/gpu/plan?start=Bad.Name",
    ] {
        let body = refused(
            if path.starts_with("/gpu/plan") {
                api.get(path)
            } else {
                api.post(path)
            },
            404,
        );
        assert_eq!(body["kind"], "unknown_service", "{path}: {body}");
    }
    refused(api.get("/gpu/nothing-here"), 404);

    assert_eq!(desired_file(&h), before, "nothing was written");
    assert_eq!(api.status()["desired"]["generation"], generation);
}

#[test]
fn malformed_input_is_400() {
    let (h, api) = serve(mcn_inventory());
    let before = desired_file(&h);
    let body = refused(api.post("/gpu/prepare-phase/abc"), 400);
    assert_eq!(body["kind"], "bad_request");
    assert!(body["error"].as_str().unwrap().contains("abc"), "{body}");
    refused(api.post("/gpu/prepare-phase/2?wait=maybe"), 400);
    refused(api.get("/gpu/plan?phase=2&start=vidi"), 400);
    refused(api.get("/gpu/plan?phase=-1"), 400);
    assert_eq!(desired_file(&h), before, "nothing was written");
}

#[test]
fn a_start_that_cannot_fit_is_409_with_the_shortfall_and_who_holds_it() {
    let (h, api) = serve(mcn_inventory());
    ok(api.post("/gpu/prepare-phase/4"));
    let before = desired_file(&h);
    let body = refused(api.post("/gpu/service/ollama/start"), 409);
    assert_eq!(body["kind"], "cannot_fit");
    assert_eq!(body["service"], "ollama");
    // 24576 total - 512 reserve - 1024 desktop - 20480 comfyui = 2560 left; ollama: 18432.
    assert_eq!(body["shortfall_mb"], 18432 - 2560);
    let message = body["error"].as_str().unwrap();
    assert!(
        message.contains("comfyui 20480 MB"),
        "names the holder: {message}"
    );
    assert_eq!(desired_file(&h), before, "ollama was not pinned");
    assert!(h.is_ready("comfyui") && h.is_down("ollama"));
    assert_no_oom(&h);
}

#[test]
fn a_start_that_times_out_is_504_with_its_log_and_leaves_nothing_running() {
    let mut slow = Standin::new("vidi", 4096, 40, "[2]");
    slow.start_delay_ms = 60_000;
    slow.start_timeout_ms = 1500;
    let (h, api) = serve(vec![slow]);
    let body = refused(api.post("/gpu/prepare-phase/2"), 504);
    assert_eq!(body["kind"], "timed_out");
    assert_eq!(body["service"], "vidi");
    let message = body["error"].as_str().unwrap();
    assert!(message.contains("last log lines"), "{message}");
    assert!(
        message.contains("gpu-standin[vidi]") && message.contains("allocated 4096 MB"),
        "the stand-in's own log lines: {message}"
    );
    // The failed start was stopped before the answer (a retry waits at least 1 s).
    assert_eq!(h.instances_of("vidi"), 0, "nothing left running");
    assert!(h.is_down("vidi"));
    // Holding it stopped ends the retries; its memory comes back.
    ok(api.post("/gpu/service/vidi/stop"));
    h.wait_until("vidi's memory is reclaimed", |h| h.allocations().is_empty());
    assert_eq!(h.instances_of("vidi"), 0);
}

#[test]
fn posts_need_the_bearer_token_when_one_is_configured() {
    let mut h = Harness::new(mcn_inventory());
    std::fs::write(h.path("token"), "s3cret-t0ken\n").unwrap();
    let api = h.serve(", token_file: token");
    for header in [
        None,
        Some("Bearer wrong"),
        Some("s3cret-t0ken"),
        Some("Bearer s3cret-t0ke"),
    ] {
        let body = refused(api.post_authorized("/gpu/prepare-phase/2", header), 401);
        assert!(body["error"].as_str().unwrap().contains("Bearer"), "{body}");
        assert_eq!(body["kind"], "unauthorized", "{body}");
    }
    assert!(
        h.is_down("vidi"),
        "no unauthorized request changed anything"
    );
    assert_eq!(api.get("/gpu/status").code, 200, "reads need no token");
    let report = ok(api.post_authorized("/gpu/prepare-phase/2", Some("Bearer s3cret-t0ken")));
    assert_eq!(ops(&report), ["start vidi"]);
    let learned = |api: &Api| api.status()["services"]["vidi"]["learned_peak_mb"].clone();
    h.wait_until("vidi's peak learned", |_| learned(&api) == 4096);
    refused(api.post_authorized("/gpu/service/vidi/forget", None), 401);
    assert_eq!(
        learned(&api),
        4096,
        "an unauthorized forget changed nothing"
    );
    let forgotten =
        ok(api.post_authorized("/gpu/service/vidi/forget", Some("Bearer s3cret-t0ken")));
    assert_eq!(forgotten["forgotten"]["peak_mb"], 4096, "{forgotten}");
    assert!(
        !h.daemon_log().contains("s3cret-t0ken"),
        "the token is never logged"
    );
}

#[test]
fn wait_false_answers_202_with_a_generation_to_poll() {
    let (h, api) = serve(mcn_inventory());
    let reply = api.post("/gpu/prepare-phase/2?wait=false");
    assert_eq!(reply.code, 202, "{}", reply.body);
    let body = reply.json();
    assert_eq!(body["accepted_only"], true);
    let generation = body["generation"].as_u64().expect("a generation");
    let deadline = Instant::now() + CONVERGE;
    loop {
        let status = api.status();
        if status["desired"]["converged_generation"].as_u64() >= Some(generation) {
            assert_eq!(status["services"]["vidi"]["state"], "ready", "{status}");
            break;
        }
        assert!(Instant::now() < deadline, "never converged: {status}");
        std::thread::sleep(Duration::from_millis(25));
    }
    assert!(h.is_ready("vidi"));
}

#[test]
fn a_later_phase_request_supersedes_an_earlier_one() {
    let mut services = mcn_inventory();
    // Phase 2's start takes 4 s, so the second request surely arrives mid-transition.
    services[2].start_delay_ms = 4000;
    let (h, api) = serve(services);
    let first = {
        let api = api.clone();
        std::thread::spawn(move || api.post("/gpu/prepare-phase/2"))
    };
    api.wait_state("vidi", "starting");
    let asked = std::time::Instant::now();
    let second = api.post("/gpu/prepare-phase/3");
    let served_after = asked.elapsed();
    let first = refused(first.join().unwrap(), 409);
    assert_eq!(first["kind"], "superseded", "{first}");
    let superseded = first["generation"].as_u64().unwrap();
    assert_eq!(first["by"].as_u64(), Some(superseded + 1));

    let second = ok(second);
    assert_eq!(second["generation"].as_u64(), Some(superseded + 1));
    // Vidi's start is cancelled at once (stopped, its memory reclaimed) and CosyVoice,
    // which fits beside it, starts meanwhile: phase 3 does not wait out Vidi's 4 s.
    let actions = second["actions"].as_array().expect("actions");
    let cancelled: Vec<&Value> = actions
        .iter()
        .filter(|a| a["failure"] == "cancelled")
        .collect();
    assert_eq!(cancelled.len(), 1, "{second}");
    assert_eq!(
        (&cancelled[0]["op"], &cancelled[0]["service"]),
        (&json!("start"), &json!("vidi"))
    );
    let done: Vec<&Value> = actions
        .iter()
        .filter(|a| a["failure"] != "cancelled")
        .collect();
    assert_eq!(done.len(), 1, "{second}");
    assert_eq!(done[0]["service"], "cosyvoice", "{second}");
    assert!(
        served_after < std::time::Duration::from_millis(3000),
        "phase 3 took {served_after:?}: it waited for the superseded start"
    );
    assert!(h.is_ready("cosyvoice") && h.is_down("vidi"));
    assert_no_oom(&h);
}

/// An event reduced to the words the order test compares.
fn describe(event: &Value) -> String {
    let text = |v: &Value| v.as_str().unwrap_or("?").to_owned();
    match event["type"].as_str() {
        Some("desired_accepted") => format!("accepted phase {}", event["phase"]),
        Some("action_started") => {
            format!("started {} {}", text(&event["op"]), text(&event["service"]))
        }
        Some("action_finished") => {
            let action = &event["action"];
            assert!(action["outcome"]["Ok"].is_string(), "{action}");
            format!(
                "finished {} {}",
                text(&action["op"]),
                text(&action["service"])
            )
        }
        Some("state_changed") => format!(
            "{} {} -> {}",
            text(&event["service"]),
            text(&event["from"]),
            text(&event["to"])
        ),
        _ => format!("other {event}"),
    }
}

#[test]
fn the_event_stream_delivers_a_transition_in_order() {
    let (_h, api) = serve(mcn_inventory());
    ok(api.post("/gpu/prepare-phase/2"));
    let mut events = api.events();
    assert_eq!(api.post("/gpu/prepare-phase/3?wait=false").code, 202);
    let mut seen = Vec::new();
    let finished = |seen: &[String]| {
        ["finished stop vidi", "finished start cosyvoice"]
            .iter()
            .all(|f| seen.iter().any(|s| s == f))
    };
    while !finished(&seen) {
        seen.push(describe(&events.next_event()));
        assert!(seen.len() < 50, "too many events: {seen:#?}");
    }
    assert_eq!(seen[0], "accepted phase 3", "{seen:#?}");
    // The stop and the start run side by side (both fit): each action's own events come
    // in order, its state changes before its end.
    let at = |event: &str| {
        seen.iter()
            .position(|s| s == event)
            .unwrap_or_else(|| panic!("no {event:?} in {seen:#?}"))
    };
    for order in [
        [
            "started stop vidi",
            "vidi ready -> stopping",
            "vidi stopping -> stopped",
            "finished stop vidi",
        ],
        [
            "started start cosyvoice",
            "cosyvoice stopped -> starting",
            "cosyvoice starting -> ready",
            "finished start cosyvoice",
        ],
    ] {
        let positions: Vec<usize> = order.iter().map(|e| at(e)).collect();
        assert!(
            positions.windows(2).all(|w| w[0] < w[1]),
            "{order:?} out of order in {seen:#?}"
        );
    }
}

#[test]
fn metrics_expose_vram_and_service_states() {
    let (_h, api) = serve(mcn_inventory());
    ok(api.post("/gpu/prepare-phase/2"));
    let reply = api.get("/metrics");
    assert_eq!(reply.code, 200);
    for line in [
        "# TYPE gpu_manager_vram_total_bytes gauge",
        "gpu_manager_vram_total_bytes 25769803776",
        "gpu_manager_vram_used_bytes 5368709120",
        "# TYPE gpu_manager_service_state gauge",
        "gpu_manager_service_state{service=\"vidi\",state=\"ready\"} 1",
        "gpu_manager_service_state{service=\"comfyui\",state=\"stopped\"} 1",
        "gpu_manager_service_observed_vram_bytes{service=\"vidi\"} 4294967296",
        "gpu_manager_transition_duration_seconds_count 1",
    ] {
        assert!(
            reply.body.lines().any(|l| l == line),
            "{line:?} missing from:\n{}",
            reply.body
        );
    }
}

#[test]
fn plan_lists_the_actions_and_changes_nothing() {
    let (h, api) = serve(mcn_inventory());
    ok(api.post("/gpu/prepare-phase/3"));
    let before = desired_file(&h);
    let generation = api.status()["desired"]["generation"].clone();

    let reply = api.get("/gpu/plan?phase=4");
    assert_eq!(reply.code, 200, "{}", reply.body);
    let body = reply.json();
    let planned: Vec<String> = body["plan"]["actions"]
        .as_array()
        .expect("plan.actions")
        .iter()
        .map(op_service)
        .collect();
    assert_eq!(planned, ["stop cosyvoice", "start comfyui"]);
    let text = body["text"].as_str().expect("a readable plan");
    assert!(
        text.contains("comfyui") && text.contains("cosyvoice"),
        "{text}"
    );

    // Ollama (18 GB) fits beside CosyVoice (4 GB): nothing to stop.
    let body = api.get("/gpu/plan?start=ollama").json();
    assert_eq!(body["plan"]["actions"][0]["service"], "ollama", "{body}");
    assert_eq!(body["plan"]["actions"].as_array().map(Vec::len), Some(1));

    assert_eq!(desired_file(&h), before);
    let status = api.status();
    assert_eq!(status["desired"]["generation"], generation);
    assert_eq!(status["services"]["cosyvoice"]["state"], "ready");
    assert!(h.is_ready("cosyvoice") && h.is_down("comfyui") && h.is_down("ollama"));
}

// ---- client commands ----

fn cli(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gpu-manager"))
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .expect("run gpu-manager")
}

fn text(output: &Output) -> (i32, String, String) {
    (
        output.status.code().expect("an exit code"),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn client_commands_show_progress_status_and_exit_codes() {
    let (h, api) = serve(mcn_inventory());
    let url = api.url();

    let (code, out, err) = text(&cli(&["phase", "2", "--url", &url]));
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("start vidi"), "live progress: {out}");
    assert!(
        out.contains("vidi: starting -> ready"),
        "state changes: {out}"
    );
    assert!(h.is_ready("vidi"));

    let config = h.config_path();
    let (code, out, _) = text(&cli(&["status", "--config", config.to_str().unwrap()]));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("5120/24576 MB"), "a VRAM bar: {out}");
    let vidi = out
        .lines()
        .find(|l| l.contains("vidi"))
        .expect("a vidi line");
    assert!(vidi.contains("ready") && vidi.contains("4096"), "{vidi}");

    let (code, out, _) = text(&cli(&["status", "--json", "--url", &url]));
    assert_eq!(code, 0);
    let status: Value = serde_json::from_str(&out).expect("--json prints JSON");
    assert_eq!(status["vram"]["total_mb"], 24576);

    let (code, out, _) = text(&cli(&["phase", "4", "--url", &url, "--json"]));
    assert_eq!(code, 0, "{out}");
    let report: Value = serde_json::from_str(&out).expect("--json prints the report");
    assert_eq!(ops(&report), ["stop vidi", "start comfyui"]);

    let (code, out, err) = text(&cli(&["start", "ollama", "--url", &url]));
    assert_eq!(code, 1, "a refused transition: {out}{err}");
    assert!(err.contains("409") && err.contains("cannot fit"), "{err}");

    let (code, _, err) = text(&cli(&["stop", "nosuch", "--url", &url]));
    assert_eq!(code, 1);
    assert!(err.contains("known services are comfyui"), "{err}");

    let (code, out, err) = text(&cli(&["stop", "comfyui", "--url", &url]));
    assert_eq!(code, 0, "{out}{err}");
    assert!(h.is_down("comfyui"));

    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let (code, _, err) = text(&cli(&["status", "--url", &nowhere]));
    assert_eq!(code, 2, "unreachable: {err}");
    assert!(
        err.contains(&nowhere) && err.contains("gpu-manager serve"),
        "{err}"
    );
    let (code, _, _) = text(&cli(&["phase", "3", "--url", &nowhere]));
    assert_eq!(code, 2);
    assert_no_oom(&h);
}

/// `stop NAME` without `--force` waits out the drain timeout and exits 1 naming the busy
/// service and its probe's answer; with `--force` (`?force=true`) it stops at once.
#[test]
fn the_cli_names_a_busy_service_and_force_skips_draining() {
    let mut vidi = Standin::new("vidi", 4096, 40, "[2]");
    vidi.config_extra = format!(
        "    drain: {{ url: \"http://127.0.0.1:{}/queue\", busy_if: [\"/queue_running\", \"/queue_pending\"], timeout_ms: 2000 }}\n",
        vidi.port
    );
    let (h, api) = serve(vec![vidi]);
    let url = api.url();
    ok(api.post("/gpu/prepare-phase/2"));
    let standin = Api {
        port: h.service("vidi").port,
        token: None,
    };
    let job = standin.post("/job?ms=60000");
    assert!(job.code < 300, "{}", job.body);
    let pid = api.status()["services"]["vidi"]["pids"][0].clone();

    let (code, out, err) = text(&cli(&["stop", "vidi", "--url", &url]));
    assert_eq!(code, 1, "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        err.contains("HTTP 409") && err.contains("vidi is busy"),
        "{err}"
    );
    assert!(
        err.contains("its drain probe answered") && err.contains("/queue_running"),
        "{err}"
    );
    assert!(
        err.contains("retry later") && err.contains("--force"),
        "{err}"
    );
    // Untouched: the same process, ready or draining again as the daemon retries.
    let state = api.state("vidi");
    assert!(state == "ready" || state == "draining", "{state}");
    assert_eq!(api.status()["services"]["vidi"]["pids"][0], pid);
    assert!(h.gpu.lost_log().unwrap().is_empty());

    // The job runs for a minute: only a stop that skips draining ends before it.
    let (code, out, err) = text(&cli(&["stop", "vidi", "--force", "--url", &url]));
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert!(h.is_down("vidi"));
    let lost = h.gpu.lost_log().unwrap();
    assert!(lost.len() == 1 && lost[0].contains("vidi"), "{lost:?}");
}

#[test]
fn a_transition_while_python_holds_the_gpu_lock_is_423_naming_the_holder() {
    let Some(redis) = common::lease::redis_with_python() else {
        return;
    };
    let mut h = Harness::new(mcn_inventory());
    let api = h.serve_with("", &common::lease::lease_block(&redis, 5000, 300));
    let python = common::lease::PythonLock::hold(&redis, "gpu_lock", 120);
    let refused = api.post("/gpu/prepare-phase/2");
    assert_eq!(refused.code, 423, "{}", refused.body);
    let body = refused.json();
    assert_eq!(body["kind"], "lease_held");
    assert_eq!(body["holder"], python.token.as_str(), "{body}");
    assert!(
        h.is_down("vidi"),
        "nothing started while Python held the lock"
    );
    python.release();
    let done = api.post("/gpu/prepare-phase/2");
    assert_eq!(done.code, 200, "{}", done.body);
    assert!(h.is_ready("vidi"));
}

#[test]
fn a_transition_while_redis_is_down_is_503() {
    let Some(mut redis) = common::lease::redis_with_python() else {
        return;
    };
    let mut h = Harness::new(mcn_inventory());
    let api = h.serve_with("", &common::lease::lease_block(&redis, 5000, 300));
    redis.stop();
    let refused = api.post("/gpu/prepare-phase/2");
    assert_eq!(refused.code, 503, "{}", refused.body);
    assert_eq!(refused.json()["kind"], "backend_down");
    assert!(h.is_down("vidi"));
}

#[test]
fn a_start_that_needs_an_unreachable_docker_engine_is_503_naming_it() {
    let mut h = Harness::new(vec![
        Standin::new("cosyvoice", 4096, 50, "[3]").in_docker(),
        Standin::new("vidi", 4096, 40, "[2]"),
    ]);
    let socket = h.path("no-docker.sock");
    h.daemon_env
        .push(("DOCKER_HOST".into(), format!("unix://{}", socket.display())));
    let api = h.serve("");
    api.wait_state("cosyvoice", "unknown");
    let refused = api.post("/gpu/service/cosyvoice/start");
    assert_eq!(refused.code, 503, "{}", refused.body);
    let body = refused.json();
    assert_eq!(body["kind"], "backend_down");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains(&socket.display().to_string())),
        "names the engine tried: {body}"
    );
    let native = api.post("/gpu/prepare-phase/2");
    assert_eq!(
        native.code, 200,
        "native services are unaffected: {}",
        native.body
    );
}

#[test]
fn a_service_that_crashes_is_restarted_and_counted_but_a_requested_start_is_not_a_restart() {
    let mut crashing = Standin::new("vidi", 4096, 40, "[2]");
    crashing.start_delay_ms = 100;
    crashing.extra_args = vec!["--exit-after-ms".into(), "3000".into()];
    let mut h = Harness::new(vec![crashing, Standin::new("cosyvoice", 4096, 50, "[3]")]);
    let api = h.serve("");
    let report = api.post("/gpu/prepare-phase/2");
    assert_eq!(report.code, 200, "{}", report.body);
    h.wait_until("vidi crashed and was restarted", |_| {
        api.status()["services"]["vidi"]["restarts"].as_u64() >= Some(1)
    });
    let vidi = &api.status()["services"]["vidi"];
    assert!(
        vidi["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("code 3")),
        "the crash is reported: {vidi}"
    );
    // Phase 3 stops vidi (no more crashes or restarts); phase 2 then asks for a start.
    let report = api.post("/gpu/prepare-phase/3");
    assert_eq!(report.code, 200, "{}", report.body);
    let after_crashes = api.status()["services"]["vidi"]["restarts"].as_u64();
    let report = api.post("/gpu/prepare-phase/2");
    assert_eq!(report.code, 200, "{}", report.body);
    assert_eq!(
        api.status()["services"]["vidi"]["restarts"].as_u64(),
        after_crashes,
        "a start the desired state asked for is not a restart"
    );
}
