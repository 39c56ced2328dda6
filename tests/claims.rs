//! Claims end to end (docs/ARCHITECTURE.md, "Claims"): the real daemon on the simulated
//! 24 GB GPU with the requirements' stand-ins. A claimed service keeps running through a
//! phase that needs its memory; what it keeps out starts by itself once the claim ends;
//! a claim outlives a daemon killed with SIGKILL.

mod common;

use serde_json::Value;

use common::api::{Api, Reply};
use common::{mcn_inventory, Harness};

fn serve() -> (Harness, Api) {
    let mut h = Harness::new(mcn_inventory());
    let api = h.serve("");
    (h, api)
}

fn code(reply: &Reply, expected: u16) -> Value {
    assert_eq!(reply.code, expected, "{}", reply.body);
    reply.json()
}

fn pid(api: &Api, service: &str) -> u64 {
    api.status()["services"][service]["pids"][0]
        .as_u64()
        .unwrap_or_else(|| panic!("{service} has a pid: {}", api.status()))
}

fn claims(api: &Api) -> Vec<(String, String)> {
    let status = api.status();
    let list = status["desired"]["claims"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    list.iter()
        .map(|c| {
            let field = |k: &str| c[k].as_str().unwrap_or_default().to_owned();
            (field("service"), field("holder"))
        })
        .collect()
}

#[test]
fn a_claim_keeps_its_service_through_phase_4_and_comfyui_starts_by_itself_after_it_ends() {
    let (h, api) = serve();
    code(&api.post("/gpu/prepare-phase/3"), 200);
    let before = pid(&api, "cosyvoice");
    let report = code(
        &api.post("/gpu/service/cosyvoice/claim?holder=tts-batch&ttl_s=3"),
        200,
    );
    assert_eq!(report["services"]["cosyvoice"], "ready", "{report}");
    let service = &api.status()["services"]["cosyvoice"];
    assert_eq!(service["claims"][0]["holder"], "tts-batch", "{service}");
    assert!(service["claims"][0]["seconds_left"].as_u64() <= Some(4));

    let refused = code(&api.post("/gpu/prepare-phase/4"), 409);
    assert_eq!(refused["kind"], "cannot_fit", "{refused}");
    assert_eq!(refused["claims"][0]["holder"], "tts-batch", "{refused}");
    assert_eq!(api.state("comfyui"), "preempted");
    let reason = api.status()["services"]["comfyui"]["reason"].clone();
    assert!(
        reason
            .as_str()
            .is_some_and(|r| r.contains("claimed by \"tts-batch\"")),
        "{reason}"
    );
    assert_eq!(pid(&api, "cosyvoice"), before, "cosyvoice untouched");
    assert!(h.is_ready("cosyvoice"));

    // No other request: the claim's end wakes the daemon, which follows phase 4.
    api.wait_state("comfyui", "ready");
    assert!(h.is_down("cosyvoice"));
    assert!(claims(&api).is_empty(), "{:?}", claims(&api));
    assert!(h.oom_log().is_empty(), "OOM: {:?}", h.oom_log());
}

#[test]
fn claims_are_checked_refused_when_they_cannot_fit_and_survive_a_kill() {
    let (mut h, api) = serve();
    for (query, kind) in [
        ("holder=me", "bad_request"),
        ("holder=me&ttl_s=0", "bad_request"),
        ("holder=me&ttl_s=86401", "bad_request"),
        ("ttl_s=60", "bad_request"),
    ] {
        let body = code(&api.post(&format!("/gpu/service/vidi/claim?{query}")), 400);
        assert_eq!(body["kind"], kind, "{query}: {body}");
    }
    code(
        &api.post("/gpu/service/comfyui/claim?holder=render&ttl_s=600"),
        200,
    );
    // ollama (18432 MB) cannot fit beside claimed comfyui (20480 MB): nothing changes.
    let file_before = std::fs::read_to_string(h.path("desired-state/state.yaml")).unwrap();
    let body = code(
        &api.post("/gpu/service/ollama/claim?holder=chat&ttl_s=600"),
        409,
    );
    assert_eq!(body["kind"], "cannot_fit", "{body}");
    let file_after = std::fs::read_to_string(h.path("desired-state/state.yaml")).unwrap();
    assert_eq!(file_before, file_after, "a refused claim writes nothing");

    let stop = code(&api.post("/gpu/service/comfyui/stop"), 409);
    assert_eq!(stop["kind"], "claimed");
    assert_eq!(stop["holders"][0], "render");
    let missing = code(&api.post("/gpu/service/comfyui/release?holder=other"), 404);
    assert_eq!(missing["kind"], "no_such_claim");
    assert_eq!(missing["claims"][0]["holder"], "render", "{missing}");

    code(
        &api.post("/gpu/service/comfyui/claim?holder=short&ttl_s=1"),
        200,
    );
    let comfyui = pid(&api, "comfyui");
    h.kill_daemon();
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let api = h.serve("");
    assert_eq!(
        claims(&api),
        [("comfyui".to_owned(), "render".to_owned())],
        "the long claim survives, the expired one is gone"
    );
    api.wait_state("comfyui", "ready");
    assert_eq!(pid(&api, "comfyui"), comfyui, "adopted, not restarted");
    let forced = code(&api.post("/gpu/service/comfyui/stop?force=true"), 200);
    assert_eq!(forced["ended_claims"][0]["holder"], "render", "{forced}");
    assert!(claims(&api).is_empty());
}

#[test]
fn the_cli_claims_shows_and_releases() {
    let (h, api) = serve();
    let url = api.url();
    let cli = |args: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_gpu-manager"))
            .args(args)
            .args(["--url", &url])
            .env("NO_COLOR", "1")
            .output()
            .expect("run gpu-manager");
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (
            output.status.code(),
            text(&output.stdout),
            text(&output.stderr),
        )
    };
    let (code, out, err) = cli(&["claim", "vidi", "--ttl", "30m", "--holder", "me"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("start vidi"), "the claim starts it: {out}");
    assert!(h.is_ready("vidi"));
    let seconds_left = api.status()["services"]["vidi"]["claims"][0]["seconds_left"].clone();
    assert!(
        seconds_left
            .as_u64()
            .is_some_and(|s| (1790..=1800).contains(&s)),
        "30m: {seconds_left}"
    );
    let (_, out, _) = cli(&["status"]);
    assert!(out.contains("CLAIM vidi by \"me\", 29m"), "{out}");

    let (code, _, err) = cli(&["claim", "vidi", "--ttl", "2days", "--holder", "me"]);
    assert_eq!(code, Some(2), "clap refuses a ttl over a day: {err}");
    assert!(err.contains("a day"), "{err}");

    let (code, out, err) = cli(&["release", "vidi", "--holder", "someone-else"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        err.contains("404") && err.contains("\"me\""),
        "names the claims there are: {err}"
    );
    let (code, out, err) = cli(&["release", "vidi", "--holder", "me"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(claims(&api).is_empty(), "{:?}", claims(&api));
}
