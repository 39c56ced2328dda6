//! Parking and draining through the real binary, with gpu-standin services on a
//! simulated 24 GB GPU (docs/ARCHITECTURE.md, "Parking and draining").

mod common;

use std::time::{Duration, Instant};

use common::api::{op_service, Api};
use common::{Harness, Standin};
use serde_json::Value;

/// What a parked stand-in keeps.
const RESIDUAL_MB: u64 = 512;

/// ComfyUI (20 GB, phase 4), and CosyVoice (phase 3) and Vidi (phase 2), 4 GB each,
/// which park.
fn pipeline(comfyui_mb: u64, residual_mb: u64) -> Vec<Standin> {
    vec![
        Standin::new("comfyui", comfyui_mb, 100, "[4]"),
        Standin::new("cosyvoice", 4096, 50, "[3]").parking(residual_mb, 3000),
        Standin::new("vidi", 4096, 40, "[2]").parking(residual_mb, 3000),
    ]
}

fn phase(api: &Api, n: u32) -> Value {
    let reply = api.post(&format!("/gpu/prepare-phase/{n}"));
    assert_eq!(reply.code, 200, "phase {n}: {}", reply.body);
    reply.json()
}

fn pid(api: &Api, service: &str) -> Option<u64> {
    api.status()["services"][service]["pids"][0].as_u64()
}

/// "op service" of each action a transition report lists.
fn ops(report: &Value) -> Vec<String> {
    report["actions"]
        .as_array()
        .unwrap()
        .iter()
        .map(op_service)
        .collect()
}

/// The action a transition report lists for `service`.
fn action_of(report: &Value, service: &str) -> Value {
    report["actions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["service"] == service)
        .unwrap_or_else(|| panic!("no action for {service}: {report}"))
        .clone()
}

/// The stand-in's own view: its allocation, jobs, whether it is parked.
fn standin_state(h: &Harness, service: &str) -> Value {
    let (code, body) = common::http_get(h.service(service).port, "/state").expect("stand-in");
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn post_to_standin(h: &Harness, service: &str, path: &str) -> Value {
    let standin = Api {
        port: h.service(service).port,
        token: None,
    };
    let reply = standin.post(path);
    assert!(reply.code < 300, "{path}: {} {}", reply.code, reply.body);
    reply.json()
}

#[test]
fn parked_services_resume_as_the_same_process_and_stay_beside_a_large_start() {
    let mut h = Harness::new(pipeline(20480, RESIDUAL_MB));
    let api = h.serve("");
    phase(&api, 2);
    let vidi = pid(&api, "vidi").expect("vidi runs");

    let report = phase(&api, 3);
    assert!(ops(&report).contains(&"park vidi".to_owned()), "{report}");
    assert_eq!(api.state("vidi"), "parked");
    assert_eq!(pid(&api, "vidi"), Some(vidi), "parked, not stopped");
    assert_eq!(h.allocations()[&(vidi as u32)], RESIDUAL_MB);
    let status = api.status();
    assert_eq!(status["services"]["vidi"]["residual_mb"], RESIDUAL_MB);
    assert!(status["services"]["vidi"]["parked_at_ms"]
        .as_u64()
        .is_some());

    // 20480 + 2 x 512 fit the 23040 MB budget: both stay parked beside ComfyUI.
    phase(&api, 4);
    assert_eq!(api.state("cosyvoice"), "parked");
    assert_eq!(api.state("vidi"), "parked");
    assert_eq!(api.state("comfyui"), "ready");
    let mut held = h.allocated_mb();
    held.sort();
    assert_eq!(held, [RESIDUAL_MB, RESIDUAL_MB, 20480]);

    let began = Instant::now();
    let report = phase(&api, 2);
    let took = began.elapsed();
    assert!(ops(&report).contains(&"resume vidi".to_owned()), "{report}");
    assert_eq!(pid(&api, "vidi"), Some(vidi), "resumed, not restarted");
    assert_eq!(h.allocations()[&(vidi as u32)], 4096);
    assert_eq!(standin_state(&h, "vidi")["parked"], false);
    assert!(api.status()["services"]["vidi"]["resumed_at_ms"]
        .as_u64()
        .is_some());
    assert!(h.oom_log().is_empty(), "OOM: {:?}", h.oom_log());
    assert!(took < Duration::from_secs(5), "took {took:?}");
}

#[test]
fn parked_services_are_stopped_first_when_room_is_needed() {
    // 22000 + 768 fit the 23040 MB budget, 22000 + 2 x 768 do not: of the parked
    // CosyVoice and the running Vidi, the one already parked gives way (stops of
    // parked services come before parks of running ones).
    let mut h = Harness::new(pipeline(22000, 768));
    let api = h.serve("");
    phase(&api, 3);
    phase(&api, 2);
    assert_eq!(api.state("cosyvoice"), "parked");
    let report = phase(&api, 4);
    let done = ops(&report);
    assert!(done.contains(&"stop cosyvoice".to_owned()), "{report}");
    assert!(done.contains(&"park vidi".to_owned()), "{report}");
    assert_eq!(api.state("cosyvoice"), "stopped");
    assert_eq!(api.state("vidi"), "parked");
    assert_eq!(api.state("comfyui"), "ready");
    assert!(h.oom_log().is_empty(), "OOM: {:?}", h.oom_log());
}

#[test]
fn a_park_that_frees_nothing_falls_back_to_a_stop() {
    let mut services = pipeline(20480, RESIDUAL_MB);
    // ComfyUI's /free with nothing asked of it frees nothing.
    services[2].config_extra = services[2].config_extra.replace(
        "residual_mb",
        "body: '{\"unload_models\": false}', residual_mb",
    );
    services[2].config_extra = services[2]
        .config_extra
        .replace("timeout_ms: 3000 }", "timeout_ms: 1000 }");
    let mut h = Harness::new(services);
    let api = h.serve("");
    phase(&api, 2);
    let report = phase(&api, 3);
    let park = action_of(&report, "vidi");
    assert_eq!(park["op"], "park", "{report}");
    let detail = park["outcome"]["Ok"].as_str().unwrap_or_default();
    assert!(
        detail.contains("did not free its memory") && detail.contains("stopped"),
        "{park}"
    );
    assert_eq!(api.state("vidi"), "stopped");
    assert!(h.is_down("vidi"));
    assert!(h.daemon_log().contains("park failed: stopping it instead"));
}

#[test]
fn a_stop_waits_for_the_job_a_drain_timeout_is_409_busy_and_force_stops() {
    let mut h = Harness::new(pipeline(20480, RESIDUAL_MB));
    let api = h.serve("");
    phase(&api, 3);

    // Waited: the job ends, then the service stops, and nothing is lost.
    post_to_standin(&h, "cosyvoice", "/job?ms=1500");
    let began = Instant::now();
    let stopper = {
        let api = api.clone();
        std::thread::spawn(move || api.post("/gpu/service/cosyvoice/stop"))
    };
    api.wait_state("cosyvoice", "draining");
    let reply = stopper.join().unwrap();
    assert_eq!(reply.code, 200, "{}", reply.body);
    assert!(began.elapsed() >= Duration::from_millis(1400));
    assert_eq!(api.state("cosyvoice"), "stopped");
    assert!(h.gpu.lost_log().unwrap().is_empty());

    // Refused: still busy after the 3 s drain timeout; the service is untouched.
    assert_eq!(api.post("/gpu/service/cosyvoice/start").code, 200);
    let cosyvoice = pid(&api, "cosyvoice");
    post_to_standin(&h, "cosyvoice", "/job?ms=60000");
    let reply = api.post("/gpu/service/cosyvoice/stop");
    assert_eq!(reply.code, 409, "{}", reply.body);
    let body = reply.json();
    assert_eq!(body["kind"], "busy", "{body}");
    assert_eq!(body["service"], "cosyvoice", "{body}");
    assert!(body["answer"]["/queue_running"].is_array(), "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("force=true"),
        "{body}"
    );
    assert_eq!(api.state("cosyvoice"), "ready");
    assert_eq!(pid(&api, "cosyvoice"), cosyvoice);
    assert_eq!(standin_state(&h, "cosyvoice")["jobs_running"], 1);

    // Forced: stopped at once, and the stand-in records the job it lost.
    let began = Instant::now();
    let reply = api.post("/gpu/service/cosyvoice/stop?force=true");
    assert_eq!(reply.code, 200, "{}", reply.body);
    assert!(began.elapsed() < Duration::from_secs(3));
    assert_eq!(api.state("cosyvoice"), "stopped");
    let lost = h.gpu.lost_log().unwrap();
    assert_eq!(lost.len(), 1, "{lost:?}");
    assert!(lost[0].contains("cosyvoice"), "{lost:?}");
}

/// Vidi parks with `kind: cuda-checkpoint` through the fake CUDA driver `library`.
fn checkpointing(library: &str) -> Harness {
    let mut services = pipeline(20480, RESIDUAL_MB);
    services[2].config_extra = "    park: { kind: cuda-checkpoint, residual_mb: 0 }\n".into();
    let mut h = Harness::new(services);
    let library = common::built(library);
    h.gpu_config = h.gpu_config.replace(
        "reserve_mb: 512",
        &format!("reserve_mb: 512, cuda_library: {library:?}"),
    );
    h
}

#[test]
fn cuda_checkpoint_moves_the_memory_to_host_and_back_for_the_same_process() {
    let mut h = checkpointing("libcuda.so");
    let api = h.serve("");
    phase(&api, 2);
    let vidi = pid(&api, "vidi").expect("vidi runs") as u32;
    let report = phase(&api, 3);
    assert!(ops(&report).contains(&"park vidi".to_owned()), "{report}");
    assert_eq!(api.state("vidi"), "parked");
    assert!(
        !h.allocations().contains_key(&vidi),
        "no VRAM while checkpointed"
    );
    assert_eq!(h.gpu.host_mb(vidi).unwrap(), Some(4096));

    let report = phase(&api, 2);
    assert!(ops(&report).contains(&"resume vidi".to_owned()), "{report}");
    assert_eq!(pid(&api, "vidi"), Some(vidi as u64));
    assert_eq!(h.allocations()[&vidi], 4096);
    assert_eq!(h.gpu.host_mb(vidi).unwrap(), None);
    assert!(h.oom_log().is_empty(), "OOM: {:?}", h.oom_log());
}

#[test]
fn without_the_checkpoint_api_the_service_is_stopped_and_status_says_why() {
    let mut h = checkpointing("libcuda_r550.so");
    let api = h.serve("");
    phase(&api, 2);
    let park_error = api.status()["services"]["vidi"]["park_error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(park_error.contains("570"), "{park_error}");
    let report = phase(&api, 3);
    let park = action_of(&report, "vidi");
    let detail = park["outcome"]["Ok"].as_str().unwrap_or_default();
    assert!(
        detail.contains("unavailable") && detail.contains("stopped"),
        "{park}"
    );
    assert_eq!(api.state("vidi"), "stopped");
}

#[test]
fn a_restarted_daemon_adopts_a_parked_service_as_parked_and_resumes_it() {
    let mut h = checkpointing("libcuda.so");
    let api = h.serve("");
    phase(&api, 2);
    let vidi = pid(&api, "vidi").expect("vidi runs") as u32;
    phase(&api, 3);
    assert_eq!(api.state("vidi"), "parked");

    // Checkpointed, it answers its health check like a running one: only the record
    // in state_dir tells the next daemon that it must be restored.
    h.kill_daemon();
    let api = h.serve("");
    api.wait_state("vidi", "parked");
    assert_eq!(pid(&api, "vidi"), Some(vidi as u64));
    assert!(!h.allocations().contains_key(&vidi));
    let report = phase(&api, 2);
    assert!(ops(&report).contains(&"resume vidi".to_owned()), "{report}");
    assert_eq!(pid(&api, "vidi"), Some(vidi as u64));
    assert_eq!(h.allocations()[&vidi], 4096);
}
