//! Learned footprints end to end: the real daemon (`gpu-manager serve`) on a simulated
//! 16 GB GPU, a native stand-in declared at 4096 MB in the daemon's config that really
//! takes 9000 MB, beside a service of 8000 MB. Once it has run, its peak is learned,
//! survives a daemon restart, and keeps the phase that would put both side by side from
//! starting it; `gpu-manager forget` resets it, through the daemon or in the file.

mod common;

use std::process::Output;
use std::time::Duration;

use serde_json::Value;

use common::api::Api;
use common::{Harness, Standin};
use sim_gpu::DeviceSpec;

/// `big` 8000 MB (priority 100) and `vidi` declared 4096 MB but taking 9000 MB
/// (priority 40), both in phase 2, on 16384 MB with a 512 MB reserve: 15872 MB usable,
/// so 8000 + 4096 fits and 8000 + 9000 does not.
fn sixteen_gb() -> Harness {
    let mut vidi = Standin::new("vidi", 9000, 40, "[2]");
    vidi.declared_vram_mb = Some(4096);
    // It allocates at once, then takes this long to answer its health check.
    vidi.start_delay_ms = 1500;
    let h = Harness::new(vec![Standin::new("big", 8000, 100, "[2]"), vidi]);
    sim_gpu::SimGpuDir::create(
        h.gpu.path(),
        &DeviceSpec {
            name: "Simulated 16 GB".into(),
            total_mb: 16384,
            baseline_mb: 0,
            reclaim_ms: 300,
            temperature_c: 50,
            utilization_pct: 0,
        },
    )
    .expect("a 16 GB simulated GPU");
    h
}

fn gpu_manager(h: &Harness, args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_gpu-manager"))
        .args(args)
        .arg("--config")
        .arg(h.config_path())
        .env("FAKE_NVML_DIR", h.gpu.path())
        .output()
        .expect("run gpu-manager")
}

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn vidi(api: &Api) -> Value {
    api.status()["services"]["vidi"].clone()
}

/// The plan's verdicts and start actions for phase 2.
fn plan_phase_2(api: &Api) -> Value {
    let reply = api.get("/gpu/plan?phase=2");
    assert_eq!(reply.code, 200, "{}", reply.body);
    reply.json()["plan"].clone()
}

fn starts(plan: &Value) -> Vec<String> {
    plan["actions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["op"] == "start")
        .map(|a| format!("{} {}", a["service"].as_str().unwrap(), a["vram_mb"]))
        .collect()
}

#[test]
fn a_learned_peak_survives_a_restart_and_keeps_an_over_budget_service_from_starting() {
    let mut h = sixteen_gb();
    let api = h.serve("");

    // Before anything is learned, phase 2 is planned with vidi at its declared 4096 MB.
    assert_eq!(starts(&plan_phase_2(&api)), ["big 8000", "vidi 4096"]);
    assert_eq!(vidi(&api)["learned_peak_mb"], Value::Null);

    // It runs once, alone: the GPU shows 9000 MB, which is learned once it is ready
    // (not while it starts: a start's memory is still coming), with a warning.
    let reply = api.post("/gpu/service/vidi/start?wait=false");
    assert_eq!(reply.code, 202, "{}", reply.body);
    h.wait_until("vidi starting, holding its 9000 MB", |_| {
        let vidi = vidi(&api);
        let seen = vidi["state"] == "starting" && vidi["observed_vram_mb"] == 9000;
        assert!(
            !seen || vidi["learned_peak_mb"].is_null(),
            "learned while starting: {vidi}"
        );
        seen
    });
    h.wait_until("vidi's 9000 MB learned", |_| {
        vidi(&api)["learned_peak_mb"] == 9000
    });
    let warning = vidi(&api)["footprint_warning"].as_str().unwrap().to_owned();
    assert!(
        warning.contains("9000 MB") && warning.contains("4096 MB"),
        "{warning}"
    );
    let file = h.path("state/footprints.json");
    let saved = |_: &Harness| {
        std::fs::read_to_string(&file).is_ok_and(|text| text.contains("\"peak_mb\": 9000"))
    };
    h.wait_until("the file holds vidi's 9000 MB", saved);
    // Rounds that learn nothing new write nothing: three resyncs (500 ms) later, the
    // file is the one written then.
    let written = std::fs::metadata(&file).unwrap().modified().unwrap();
    std::thread::sleep(Duration::from_millis(1600));
    assert_eq!(vidi(&api)["state"], "ready");
    let again = std::fs::metadata(&file).unwrap().modified().unwrap();
    assert_eq!(again, written, "no write without a new figure");
    let reply = api.post("/gpu/service/vidi/stop");
    assert_eq!(reply.code, 200, "{}", reply.body);
    let warned = h.daemon_log().matches("was seen using 9000 MB").count();
    assert_eq!(warned, 1, "warned once per new peak:\n{}", h.daemon_log());

    // A new daemon knows it.
    h.kill_daemon();
    let api = h.serve("");
    assert_eq!(
        vidi(&api)["learned_peak_mb"],
        9000,
        "learned before the restart"
    );
    assert_eq!(vidi(&api)["declared_vram_mb"], 4096);

    // The phase that would put it beside big does not start it: planned, it is
    // preempted at its learned figure; asked for, the phase is refused.
    let plan = plan_phase_2(&api);
    assert_eq!(starts(&plan), ["big 8000"]);
    let verdict = &plan["verdicts"]["vidi"];
    assert_eq!(verdict["verdict"], "preempted", "{verdict}");
    let reply = api.post("/gpu/prepare-phase/2");
    assert_eq!(reply.code, 409, "{}", reply.body);
    let refusal = reply.json();
    assert_eq!(refusal["kind"], "cannot_fit", "{refusal}");
    let reason = refusal["reason"].as_str().unwrap();
    assert!(
        reason.contains("needs 9000 MB (its learned peak; declared vram_mb 4096 MB)"),
        "{reason}"
    );
    assert!(h.is_down("vidi"), "vidi was not started");
    assert!(h.oom_log().is_empty(), "OOM: {:?}", h.oom_log());
    let can_fit = api.get("/gpu/can-fit?mb=9000").json();
    assert_eq!(can_fit["fits"], true, "nothing runs: {can_fit}");

    // `plan` and `doctor` show the learned figure too.
    let plan_text = stdout(&gpu_manager(&h, &["plan", "--phase", "2"]));
    assert!(
        plan_text.contains("vidi: declared 4096 MB, learned peak 9000 MB"),
        "{plan_text}"
    );
    let doctor = String::from_utf8_lossy(&gpu_manager(&h, &["doctor"]).stdout).into_owned();
    assert!(
        doctor.contains("vidi 9000 MB (learned peak; declared 4096 MB)"),
        "{doctor}"
    );

    // `forget` with the daemon down edits the file, and says so.
    h.kill_daemon();
    let forgot = stdout(&gpu_manager(&h, &["forget", "vidi"]));
    assert!(forgot.contains("does not answer"), "{forgot}");
    assert!(forgot.contains("learned peak 9000 MB"), "{forgot}");
    let api = h.serve("");
    assert_eq!(vidi(&api)["learned_peak_mb"], Value::Null, "forgotten");
    assert_eq!(vidi(&api)["footprint_warning"], Value::Null);
    assert_eq!(starts(&plan_phase_2(&api)), ["big 8000", "vidi 4096"]);

    // Through the running daemon: what it learns again is forgotten in memory and file
    // (once it is stopped: while it runs, the next observation would learn it again).
    let reply = api.post("/gpu/service/vidi/start");
    assert_eq!(reply.code, 200, "{}", reply.body);
    h.wait_until("vidi's 9000 MB learned again", |_| {
        vidi(&api)["learned_peak_mb"] == 9000
    });
    let reply = api.post("/gpu/service/vidi/stop");
    assert_eq!(reply.code, 200, "{}", reply.body);
    let forgot = stdout(&gpu_manager(&h, &["forget", "vidi"]));
    assert!(
        forgot.contains("the daemon forgot its learned peak"),
        "{forgot}"
    );
    assert_eq!(vidi(&api)["learned_peak_mb"], Value::Null);
    let file = std::fs::read_to_string(h.path("state/footprints.json")).expect("the file");
    assert!(!file.contains("9000"), "{file}");
    let unknown = gpu_manager(&h, &["forget", "nosuch"]);
    assert_eq!(unknown.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("known services are big, vidi"));
}
