//! The OpenAPI document (`GET /openapi.json`, `docs/openapi.json`) kept true, and the
//! metrics kept to Prometheus conventions, against the real daemon (`gpu-manager serve`)
//! on the simulated GPU with the four stand-in services:
//! - real answers, errors and events validated against the document's schemas;
//! - schemathesis (PyPI) fuzzing every operation, the POSTs included, so fuzzed phase
//!   changes really run: no 5xx, no answer outside the document, no crash, no hang;
//! - `promtool check metrics` (Debian's `prometheus`) on `GET /metrics`.
//!
//! schemathesis and promtool are skipped loudly when missing, and fail under `CI=true`
//! (tests/run.sh installs them).

mod common;

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde_json::{json, Value};

use common::api::{Api, EventStream, Reply};
use common::lease::require;
use common::{mcn_inventory, Harness, Standin};

fn document() -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/openapi.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("docs/openapi.json"))
        .expect("docs/openapi.json is JSON")
}

/// Validates `instance` against a schema of the document (its `$ref`s resolve inside it).
fn validate(doc: &Value, schema: &Value, instance: &Value, what: &str) {
    let mut root = schema.clone();
    let root_map = root.as_object_mut().expect("a schema object");
    root_map.insert(
        "$schema".into(),
        "https://json-schema.org/draft/2020-12/schema".into(),
    );
    root_map.insert("components".into(), doc["components"].clone());
    let validator = jsonschema::validator_for(&root)
        .unwrap_or_else(|e| panic!("the document's schema for {what} does not compile: {e}"));
    let errors: Vec<String> = validator
        .iter_errors(instance)
        .map(|e| format!("{e} at {}", e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{what} does not match the document: {errors:#?}\n{instance:#}"
    );
}

/// The types of the next `count` events whose type starts with `prefix`, in order, every
/// event read on the way validated against the document.
fn events_of(doc: &Value, events: &mut EventStream, prefix: &str, count: usize) -> Vec<String> {
    let schema = &doc["components"]["schemas"]["DaemonEvent"];
    let mut kinds = Vec::new();
    while kinds.len() < count {
        let event = events.next_event();
        validate(doc, schema, &event, "an event of GET /gpu/events");
        let kind = event["type"].as_str().unwrap();
        if kind.starts_with(prefix) {
            kinds.push(kind.to_owned());
        }
    }
    kinds
}

/// Checks a JSON answer against the document's response for this operation and status.
fn conforms(doc: &Value, method: &str, template: &str, reply: &Reply) -> Value {
    let response = &doc["paths"][template][method]["responses"][reply.code.to_string()];
    let schema = &response["content"]["application/json"]["schema"];
    assert!(
        schema.is_object(),
        "{method} {template} answered {}, which the document does not list: {}",
        reply.code,
        reply.body
    );
    let body = reply.json();
    validate(
        doc,
        schema,
        &body,
        &format!("{method} {template} {}", reply.code),
    );
    body
}

#[test]
fn the_document_is_served_and_covers_every_route() {
    let doc = document();
    assert_eq!(doc["openapi"], "3.1.0");
    let mut paths: Vec<&str> = doc["paths"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    paths.sort_unstable();
    assert_eq!(
        paths,
        [
            "/",
            "/dashboard/app.js",
            "/dashboard/style.css",
            "/gpu/can-fit",
            "/gpu/events",
            "/gpu/history",
            "/gpu/plan",
            "/gpu/prepare-phase/{n}",
            "/gpu/reload",
            "/gpu/service/{name}/claim",
            "/gpu/service/{name}/forget",
            "/gpu/service/{name}/release",
            "/gpu/service/{name}/start",
            "/gpu/service/{name}/stop",
            "/gpu/status",
            "/healthz",
            "/metrics",
            "/openapi.json",
        ]
    );
    // Every schema compiles, with its references.
    for (name, schema) in doc["components"]["schemas"].as_object().unwrap() {
        let mut root = schema.clone();
        root.as_object_mut()
            .unwrap()
            .insert("components".into(), doc["components"].clone());
        jsonschema::validator_for(&root).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    // The change endpoints take the force flag and say what a refusal looks like.
    for path in [
        "/gpu/prepare-phase/{n}",
        "/gpu/service/{name}/start",
        "/gpu/service/{name}/stop",
    ] {
        let operation = &doc["paths"][path]["post"];
        let parameters: Vec<&str> = operation["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        assert!(parameters.contains(&"wait") && parameters.contains(&"force"));
        for code in [
            "200", "202", "400", "401", "404", "409", "423", "503", "504",
        ] {
            assert!(operation["responses"][code].is_object(), "{path} {code}");
        }
    }
    let kinds = &doc["components"]["schemas"]["Error"]["properties"]["kind"]["enum"];
    assert!(kinds.as_array().unwrap().contains(&json!("shutting_down")));

    let mut h = Harness::new(mcn_inventory());
    let api = h.serve("");
    let served = api.get("/openapi.json");
    assert_eq!(served.code, 200);
    assert_eq!(served.json(), doc, "GET /openapi.json is docs/openapi.json");
}

#[test]
fn real_answers_errors_and_events_match_the_document() {
    let doc = document();
    let mut h = Harness::new(mcn_inventory());
    let api = h.serve("");
    let mut events = api.events();

    let phase = "/gpu/prepare-phase/{n}";
    let start = "/gpu/service/{name}/start";
    let stop = "/gpu/service/{name}/stop";
    let report = conforms(&doc, "post", phase, &api.post("/gpu/prepare-phase/2"));
    assert_eq!(report["services"]["vidi"], "ready");
    // The history samples at most once a second: it shows vidi's memory within about that.
    h.wait_until("the history shows vidi's 4096 MB", |_| {
        let history = api.get("/gpu/history");
        conforms(&doc, "get", "/gpu/history", &history)["samples"]
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s["services"]["vidi"] == 4096))
    });
    let status = conforms(&doc, "get", "/gpu/status", &api.get("/gpu/status"));
    assert_eq!(status["vram"]["used_mb"], 1024 + 4096);
    conforms(&doc, "post", phase, &api.post("/gpu/prepare-phase/4"));
    let refused = conforms(&doc, "post", start, &api.post("/gpu/service/ollama/start"));
    assert_eq!(refused["kind"], "cannot_fit", "{refused}");
    for (path, template, code) in [
        ("/gpu/prepare-phase/9", phase, 404),
        ("/gpu/prepare-phase/abc", phase, 400),
        ("/gpu/service/nosuch/start", start, 404),
        ("/gpu/service/nosuch/stop", stop, 404),
        ("/gpu/prepare-phase/3?wait=maybe", phase, 400),
        ("/gpu/prepare-phase/3?force=maybe", phase, 400),
        ("/gpu/prepare-phase/3?wait=false", phase, 202),
    ] {
        let reply = api.post(path);
        assert_eq!(reply.code, code, "{path}: {}", reply.body);
        conforms(&doc, "post", template, &reply);
    }
    api.wait_state("cosyvoice", "ready");
    conforms(&doc, "post", stop, &api.post("/gpu/service/cosyvoice/stop"));
    let forget = "/gpu/service/{name}/forget";
    let forgotten = conforms(&doc, "post", forget, &api.post("/gpu/service/vidi/forget"));
    assert_eq!(
        forgotten["forgotten"]["peak_mb"], 4096,
        "vidi ran: {forgotten}"
    );
    let forgotten = conforms(&doc, "post", forget, &api.post("/gpu/service/vidi/forget"));
    assert_eq!(forgotten["forgotten"], Value::Null, "{forgotten}");
    let unknown = api.post("/gpu/service/nosuch/forget");
    assert_eq!(unknown.code, 404, "{}", unknown.body);
    conforms(&doc, "post", forget, &unknown);

    for (path, template, code) in [
        ("/gpu/plan?phase=4", "/gpu/plan", 200),
        ("/gpu/plan", "/gpu/plan", 200),
        ("/gpu/plan?phase=4&start=vidi", "/gpu/plan", 400),
        ("/gpu/plan?stop=nosuch", "/gpu/plan", 404),
        ("/gpu/history", "/gpu/history", 200),
        ("/gpu/can-fit?mb=4096", "/gpu/can-fit", 200),
        ("/gpu/can-fit?mb=4096&priority=10", "/gpu/can-fit", 200),
        ("/gpu/can-fit?mb=0", "/gpu/can-fit", 400),
        ("/healthz", "/healthz", 200),
    ] {
        let reply = api.get(path);
        assert_eq!(reply.code, code, "{path}: {}", reply.body);
        conforms(&doc, "get", template, &reply);
    }

    // Every event of those transitions, each of its types, matches the document.
    let event_schema = &doc["components"]["schemas"]["DaemonEvent"];
    let mut types = std::collections::BTreeSet::new();
    while !types.contains("action_finished") || types.len() < 4 {
        let event = events.next_event();
        validate(&doc, event_schema, &event, "an event of GET /gpu/events");
        types.insert(event["type"].as_str().unwrap().to_owned());
    }
}

/// Parking and draining answers: a parked service's status fields, park and resume
/// actions, a 409 `busy` with the probe's answer, the busy action in `recent_actions`,
/// and a forced stop.
#[test]
fn parking_and_busy_answers_match_the_document() {
    let doc = document();
    let mut h = Harness::new(vec![
        Standin::new("cosyvoice", 4096, 50, "[3]").parking(512, 2000),
        Standin::new("vidi", 4096, 40, "[2]").parking(512, 2000),
    ]);
    let api = h.serve("");
    let mut events = api.events();
    let phase = "/gpu/prepare-phase/{n}";
    let stop = "/gpu/service/{name}/stop";

    conforms(&doc, "post", phase, &api.post("/gpu/prepare-phase/3"));
    let report = conforms(&doc, "post", phase, &api.post("/gpu/prepare-phase/2"));
    assert_eq!(report["services"]["cosyvoice"], "parked", "{report}");
    let status = conforms(&doc, "get", "/gpu/status", &api.get("/gpu/status"));
    let cosyvoice = &status["services"]["cosyvoice"];
    assert_eq!(cosyvoice["park"], "http", "{cosyvoice}");
    assert_eq!(cosyvoice["residual_mb"], 512, "{cosyvoice}");
    assert!(cosyvoice["parked_at_ms"].as_u64().is_some(), "{cosyvoice}");
    let report = conforms(&doc, "post", phase, &api.post("/gpu/prepare-phase/3"));
    let ops: Vec<&str> = report["actions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["op"].as_str().unwrap())
        .collect();
    assert!(ops.contains(&"resume") && ops.contains(&"park"), "{report}");

    let standin = Api {
        port: h.service("cosyvoice").port,
        token: None,
    };
    assert_eq!(standin.post("/job?ms=60000").code, 202);
    let busy = conforms(&doc, "post", stop, &api.post("/gpu/service/cosyvoice/stop"));
    assert_eq!(busy["kind"], "busy", "{busy}");
    assert!(busy["answer"]["/queue_running"].is_array(), "{busy}");
    let status = conforms(&doc, "get", "/gpu/status", &api.get("/gpu/status"));
    let recorded = status["recent_actions"]
        .as_array()
        .unwrap()
        .iter()
        .any(|a| a["failure"] == "busy" && a["busy"].is_object());
    assert!(recorded, "{status}");
    conforms(
        &doc,
        "post",
        stop,
        &api.post("/gpu/service/cosyvoice/stop?force=true"),
    );

    let event_schema = &doc["components"]["schemas"]["DaemonEvent"];
    let mut ops = std::collections::BTreeSet::new();
    while ops.len() < 4 {
        let event = events.next_event();
        validate(&doc, event_schema, &event, "an event of GET /gpu/events");
        if event["type"] == "action_started" {
            ops.insert(event["op"].as_str().unwrap().to_owned());
        }
    }
}

/// Claims: the claim and release answers and errors, a status with claims, the 409s of
/// a phase and a stop that claims block, and the claim events.
#[test]
fn claim_answers_match_the_document() {
    let doc = document();
    let mut h = Harness::new(mcn_inventory());
    let api = h.serve("");
    let mut events = api.events();
    let claim = "/gpu/service/{name}/claim";
    let release = "/gpu/service/{name}/release";
    let report = conforms(
        &doc,
        "post",
        claim,
        &api.post("/gpu/service/cosyvoice/claim?holder=job&ttl_s=600"),
    );
    assert_eq!(report["services"]["cosyvoice"], "ready", "{report}");
    conforms(
        &doc,
        "post",
        claim,
        &api.post("/gpu/service/cosyvoice/claim?holder=job&ttl_s=900"),
    );
    let status = conforms(&doc, "get", "/gpu/status", &api.get("/gpu/status"));
    assert_eq!(status["desired"]["claims"][0]["holder"], "job", "{status}");
    let blocked = api.post("/gpu/prepare-phase/4");
    assert_eq!(blocked.code, 409, "{}", blocked.body);
    conforms(&doc, "post", "/gpu/prepare-phase/{n}", &blocked);
    let stop = api.post("/gpu/service/cosyvoice/stop");
    assert_eq!(stop.code, 409, "{}", stop.body);
    conforms(&doc, "post", "/gpu/service/{name}/stop", &stop);
    for (path, template, code) in [
        ("/gpu/service/cosyvoice/claim?holder=job", claim, 400),
        ("/gpu/service/nosuch/claim?holder=job&ttl_s=5", claim, 404),
        ("/gpu/service/cosyvoice/release?holder=other", release, 404),
        ("/gpu/service/cosyvoice/release", release, 400),
        ("/gpu/service/cosyvoice/release?holder=job", release, 200),
    ] {
        let reply = api.post(path);
        assert_eq!(reply.code, code, "{path}: {}", reply.body);
        conforms(&doc, "post", template, &reply);
    }
    assert_eq!(
        events_of(&doc, &mut events, "claim_", 3),
        ["claim_taken", "claim_renewed", "claim_ended"]
    );
}

fn junit_report() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts/schemathesis.xml")
}

/// Runs schemathesis against the daemon; returns its output, failing with it.
fn schemathesis(api: &Api, h: &Harness) -> String {
    let config = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/openapi/schemathesis.toml");
    let report = junit_report();
    let workdir = report.parent().unwrap().to_owned();
    std::fs::create_dir_all(&workdir).unwrap();
    let output = Command::new("schemathesis")
        // It keeps a cache (.schemathesis/) in the folder it runs in: not the repository.
        .current_dir(workdir)
        .arg("--config-file")
        .arg(config)
        .arg("--no-color")
        .args(["run", &format!("{}/openapi.json", api.url())])
        .args(["--url", &api.url()])
        // Bounded: a few examples per operation, one request at a time (transitions are
        // serialized anyway), a fixed seed so a failure can be replayed.
        .args(["--max-examples", "8", "--workers", "1", "--seed", "7"])
        .args(["--request-timeout", "60"])
        .args(["--checks", "all"])
        .arg("--report-junit-path")
        .arg(report)
        .output()
        .expect("run schemathesis");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "schemathesis found problems:\n{text}\n--- daemon log (tail) ---\n{}",
        tail(&h.daemon_log(), 60)
    );
    text
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn installed(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn schemathesis_finds_nothing_wrong() {
    if !require(
        installed("schemathesis"),
        "schemathesis",
        "python3 -m pip install schemathesis",
    ) {
        return;
    }
    let mut h = Harness::new(mcn_inventory());
    let api = h.serve("");
    let output = schemathesis(&api, &h);
    println!("{output}");
    let junit = std::fs::read_to_string(junit_report()).expect("schemathesis's JUnit report");
    for operation in [
        "POST /gpu/prepare-phase/{n}",
        "POST /gpu/service/{name}/start",
        "POST /gpu/service/{name}/stop",
        "GET /gpu/status",
        "GET /gpu/history",
        "GET /gpu/plan",
    ] {
        assert!(junit.contains(operation), "{operation} was fuzzed: {junit}");
    }
    // The fuzzed POSTs ran real transitions on the simulated GPU, and none ran out of memory.
    let started = api.status()["transitions"]["count"].as_u64().unwrap();
    assert!(started > 0, "fuzzed phase changes acted: {output}");
    assert!(h.oom_log().is_empty(), "OOM: {:?}", h.oom_log());
}

#[test]
fn promtool_accepts_the_metrics() {
    if !require(
        installed("promtool"),
        "promtool",
        "apt-get install prometheus",
    ) {
        return;
    }
    let mut h = Harness::new(mcn_inventory());
    let api = h.serve("");
    // An action and a refusal, so that every family has samples.
    assert_eq!(api.post("/gpu/prepare-phase/4").code, 200);
    assert_eq!(api.post("/gpu/service/ollama/start").code, 409);
    // The counters agree with the actions status lists (all of them: fewer than it keeps).
    let actions = api.status()["recent_actions"].as_array().unwrap().clone();
    let starts = actions.iter().filter(|a| a["op"] == "start").count();
    let started_ok = actions
        .iter()
        .filter(|a| a["op"] == "start" && a["outcome"]["Ok"].is_string())
        .count();
    assert!(started_ok >= 1, "{actions:?}");
    let metrics = api.get("/metrics");
    assert_eq!(metrics.code, 200);
    for line in [
        "gpu_manager_vram_total_bytes 25769803776".to_owned(),
        "gpu_manager_service_observed_vram_bytes{service=\"comfyui\"} 21474836480".to_owned(),
        format!("gpu_manager_actions_total{{op=\"start\",outcome=\"ok\"}} {started_ok}"),
        format!("gpu_manager_action_duration_seconds_count{{op=\"start\"}} {starts}"),
        "gpu_manager_api_refusals_total{kind=\"cannot_fit\"} 1".to_owned(),
    ] {
        assert!(
            metrics.body.lines().any(|l| l == line),
            "{line:?} in:\n{}",
            metrics.body
        );
    }
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(metrics.body.as_bytes())
        .unwrap();
    let output = promtool.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success() && said.trim().is_empty(),
        "promtool check metrics: {said}\n{}",
        metrics.body
    );
}

#[test]
fn reload_answers_status_and_events_match_the_document() {
    let doc = document();
    let mut h = Harness::new(mcn_inventory());
    let api = h.serve("");
    let mut events = api.events();
    h.services[2].priority = 45;
    h.write_config(&format!("api: {{ listen: \"127.0.0.1:{}\" }}\n", api.port));
    let report = conforms(&doc, "post", "/gpu/reload", &api.post("/gpu/reload"));
    assert_eq!(report["changed"][0]["service"], "vidi", "{report}");
    let good = std::fs::read_to_string(h.config_path()).unwrap();
    std::fs::write(h.config_path(), format!("{good}  broken: [\n")).unwrap();
    let refused = api.post("/gpu/reload");
    assert_eq!(refused.code, 422, "{}", refused.body);
    conforms(&doc, "post", "/gpu/reload", &refused);
    let moved = good.replace(&format!("127.0.0.1:{}", api.port), "127.0.0.1:1");
    std::fs::write(h.config_path(), moved).unwrap();
    let restart = api.post("/gpu/reload");
    assert_eq!(restart.code, 409, "{}", restart.body);
    assert_eq!(restart.json()["keys"][0], "api.listen", "{}", restart.body);
    conforms(&doc, "post", "/gpu/reload", &restart);
    let status = conforms(&doc, "get", "/gpu/status", &api.get("/gpu/status"));
    assert!(status["config"]["error"].is_string(), "{status}");
    let event_schema = &doc["components"]["schemas"]["DaemonEvent"];
    let mut types = std::collections::BTreeSet::new();
    while types.len() < 2 {
        let event = events.next_event();
        validate(&doc, event_schema, &event, "an event of GET /gpu/events");
        let kind = event["type"].as_str().unwrap();
        if kind.starts_with("config_") {
            types.insert(kind.to_owned());
        }
    }
    assert_eq!(
        types.into_iter().collect::<Vec<_>>(),
        ["config_refused", "config_reloaded"]
    );
}

/// A proxied service's status (`proxy`, idle, then demanded with its end), the start its
/// demand caused, and the demand events (docs/ARCHITECTURE.md, "The demand proxy").
#[test]
fn proxy_status_and_demand_events_match_the_document() {
    let doc = document();
    let listen = common::free_port();
    let mut ollama = Standin::new("ollama", 18432, 10, "[]");
    ollama.config_extra =
        format!("    proxy: {{ listen: \"127.0.0.1:{listen}\", idle_ms: 1500 }}\n");
    let mut h = Harness::new(vec![ollama]);
    let api = h.serve("");
    let mut events = api.events();
    let status = conforms(&doc, "get", "/gpu/status", &api.get("/gpu/status"));
    let proxy = &status["services"]["ollama"]["proxy"];
    assert_eq!(proxy["demanded"], false, "{proxy}");
    assert_eq!(proxy["demanded_until_ms"], Value::Null, "{proxy}");

    // Through the proxy: it waits while ollama starts.
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", listen)).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    write!(
        stream,
        "GET /state HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut stream, &mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    h.wait_until("the demand's end in the status", |_| {
        let status = conforms(&doc, "get", "/gpu/status", &api.get("/gpu/status"));
        status["services"]["ollama"]["proxy"]["demanded_until_ms"].is_u64()
    });
    let status = conforms(&doc, "get", "/gpu/status", &api.get("/gpu/status"));
    assert_eq!(status["services"]["ollama"]["proxy"]["demanded"], true);
    assert!(
        status["recent_actions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["op"] == "start" && a["cause"]["kind"] == "demanded"),
        "{status}"
    );
    assert_eq!(
        events_of(&doc, &mut events, "demand_", 2),
        ["demand_started", "demand_ended"]
    );
}
