//! The demand proxy end to end (docs/ARCHITECTURE.md, "The demand proxy"): the real
//! daemon on the simulated 24 GB GPU, stand-ins behind proxies, and real clients (raw
//! HTTP here; the official ollama and openai packages and websockets through
//! tests/proxy/clients.py).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use common::api::Api;
use common::{free_port, Harness, Standin};

/// `standin` behind a proxy on `listen`, with more proxy keys (`, idle_ms: 1000`).
fn proxied(mut standin: Standin, listen: u16, keys: &str) -> Standin {
    standin.config_extra.push_str(&format!(
        "    proxy: {{ listen: \"127.0.0.1:{listen}\"{keys} }}\n"
    ));
    standin
}

/// An answer read to the end: status code, head, body as sent (chunked framing kept).
struct Answer {
    code: u16,
    head: String,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.eq_ignore_ascii_case(name).then_some(value.trim())
        })
    }

    fn json(&self) -> Value {
        let start = self.body.find('{').unwrap_or(0);
        let end = self.body.rfind('}').map_or(self.body.len(), |e| e + 1);
        serde_json::from_str(&self.body[start..end])
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

fn get(port: u16, path: &str) -> Answer {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to the proxy");
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).expect("read the answer");
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {text:?}"));
    Answer {
        code,
        head: head.to_owned(),
        body: body.to_owned(),
    }
}

fn starts_of(api: &Api, service: &str) -> Vec<Value> {
    let status = api.status();
    let actions = status["recent_actions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    actions
        .into_iter()
        .filter(|a| a["op"] == "start" && a["service"] == service)
        .collect()
}

fn pid(api: &Api, service: &str) -> u64 {
    api.status()["services"][service]["pids"][0]
        .as_u64()
        .unwrap_or_else(|| panic!("{service} has a pid: {}", api.status()))
}

#[test]
fn fifty_requests_to_a_stopped_service_make_one_start_and_are_all_answered() {
    let listen = free_port();
    let ollama = proxied(Standin::new("ollama", 18432, 10, "[]"), listen, "");
    let mut h = Harness::new(vec![ollama]);
    let api = h.serve("");
    assert_eq!(api.state("ollama"), "stopped");
    let service = &api.status()["services"]["ollama"];
    assert_eq!(service["proxy"]["listen"], format!("127.0.0.1:{listen}"));
    assert_eq!(service["proxy"]["demanded"], false, "{service}");

    let answers: Vec<Answer> = std::thread::scope(|scope| {
        let asks: Vec<_> = (0..50)
            .map(|_| scope.spawn(move || get(listen, "/state")))
            .collect();
        asks.into_iter().map(|a| a.join().unwrap()).collect()
    });
    let codes: Vec<u16> = answers.iter().map(|a| a.code).collect();
    assert!(codes.iter().all(|c| *c == 200), "{codes:?}");
    assert!(answers[0].body.contains("vram_mb"), "{}", answers[0].body);

    let starts = starts_of(&api, "ollama");
    assert_eq!(starts.len(), 1, "one start: {starts:?}");
    assert_eq!(starts[0]["cause"]["kind"], "demanded", "{}", starts[0]);
    // The counts in status follow the proxy's within its refresh (a tenth of a second).
    let status = api.wait_status("the proxy's counts back to zero", |status| {
        let proxy = &status["services"]["ollama"]["proxy"];
        proxy["in_flight"] == 0 && proxy["waiting"] == 0
    });
    let proxy = &status["services"]["ollama"]["proxy"];
    assert_eq!(proxy["demanded"], true, "{proxy}");
    assert!(proxy["last_request_ms"].as_u64().is_some(), "{proxy}");
    assert!(h.oom_log().is_empty(), "OOM: {:?}", h.oom_log());
}

#[test]
fn an_idle_service_parks_after_idle_ms_and_the_next_request_resumes_it() {
    let listen = free_port();
    let vidi = proxied(
        Standin::new("vidi", 4096, 40, "[]").parking_over_http(512, 100),
        listen,
        ", idle_ms: 1500",
    );
    let mut h = Harness::new(vec![vidi]);
    let api = h.serve("");
    assert_eq!(get(listen, "/state").code, 200);
    let started = pid(&api, "vidi");
    api.wait_state("vidi", "parked");
    let proxy = api.status()["services"]["vidi"]["proxy"].clone();
    assert_eq!(proxy["demanded"], false, "{proxy}");

    // Parked, not stopped: the next request resumes the same process.
    let again = get(listen, "/state");
    assert_eq!(again.code, 200, "{}", again.body);
    assert_eq!(again.json()["parked"], false, "{}", again.body);
    assert_eq!(pid(&api, "vidi"), started);
    assert_eq!(starts_of(&api, "vidi").len(), 1);
}

#[test]
fn a_demand_that_cannot_fit_beside_a_higher_phase_gets_503_with_retry_after() {
    let listen = free_port();
    let services = vec![
        Standin::new("comfyui", 20480, 100, "[4]"),
        proxied(
            Standin::new("ollama", 18432, 10, "[]"),
            listen,
            ", max_wait_ms: 1500",
        ),
    ];
    let mut h = Harness::new(services);
    let api = h.serve("");
    assert_eq!(api.post("/gpu/prepare-phase/4").code, 200);
    let comfyui = pid(&api, "comfyui");

    let asked = Instant::now();
    let refused = get(listen, "/state");
    assert_eq!(refused.code, 503, "{}", refused.body);
    assert!(
        asked.elapsed() >= Duration::from_millis(1400),
        "waited max_wait_ms"
    );
    assert!(refused.header("retry-after").is_some(), "{}", refused.head);
    let body = refused.json();
    assert_eq!(body["kind"], "cannot_fit", "{body}");
    assert_eq!(body["holders"][0]["service"], "comfyui", "{body}");
    assert_eq!(pid(&api, "comfyui"), comfyui, "the phase is untouched");
    assert_eq!(api.state("ollama"), "preempted");
    assert!(h.oom_log().is_empty(), "OOM: {:?}", h.oom_log());
}

#[test]
fn a_held_service_is_refused_at_once_and_a_dead_upstream_is_a_502() {
    let (held_listen, broken_listen, nowhere) = (free_port(), free_port(), free_port());
    let services = vec![
        proxied(Standin::new("vidi", 4096, 40, "[]"), held_listen, ""),
        proxied(
            Standin::new("cosyvoice", 4096, 50, "[]"),
            broken_listen,
            &format!(", upstream: \"http://127.0.0.1:{nowhere}\""),
        ),
    ];
    let mut h = Harness::new(services);
    let api = h.serve("");
    // A stop holds it stopped.
    assert_eq!(api.post("/gpu/service/vidi/stop").code, 200);

    let asked = Instant::now();
    let held = get(held_listen, "/state");
    assert_eq!(held.code, 503, "{}", held.body);
    assert!(asked.elapsed() < Duration::from_secs(5), "at once");
    assert_eq!(held.json()["kind"], "held", "{}", held.body);
    assert!(held.json()["error"].as_str().unwrap().contains("start"));
    assert_eq!(api.state("vidi"), "stopped");

    let broken = get(broken_listen, "/state");
    assert_eq!(broken.code, 502, "{}", broken.body);
    let body = broken.json();
    assert_eq!(body["service"], "cosyvoice", "{body}");
    assert_eq!(api.state("cosyvoice"), "ready", "started by the request");
}

#[test]
fn a_phase_change_waits_for_a_streaming_request_and_cuts_nothing() {
    let (listen, comfyui_listen) = (free_port(), free_port());
    let services = vec![
        proxied(
            Standin::new("comfyui", 20480, 100, "[4]"),
            comfyui_listen,
            "",
        ),
        proxied(Standin::new("cosyvoice", 4096, 50, "[3]"), listen, ""),
    ];
    let mut h = Harness::new(services);
    let api = h.serve("");
    assert_eq!(api.post("/gpu/prepare-phase/3").code, 200);

    let reader = stream_under_way(listen);
    let cosyvoice = pid(&api, "cosyvoice");

    // Phase 4 needs CosyVoice's memory: it drains until the stream has ended.
    let phase = std::thread::spawn({
        let api = api.clone();
        move || api.post("/gpu/prepare-phase/4")
    });
    api.wait_state("cosyvoice", "draining");
    let proxy = api.status()["services"]["cosyvoice"]["proxy"].clone();
    assert_eq!(proxy["in_flight"], 1, "{proxy}");
    // A request for the phase's service meanwhile waits for the swap, and is served.
    let new_request = std::thread::spawn(move || (get(comfyui_listen, "/state"), Instant::now()));
    assert_stream_ends_whole(reader);
    let stream_ended = Instant::now();
    let (answer, answered) = new_request.join().unwrap();
    assert_eq!(answer.code, 200, "{}", answer.body);
    assert!(answered >= stream_ended, "served only after the swap");
    assert_eq!(phase.join().unwrap().code, 200);
    assert_eq!(api.state("comfyui"), "ready");
    assert!(!common::pid_is_alive(cosyvoice as u32));
    assert_nothing_lost(&h);
}

/// A stream of ten lines, 300 ms apart (in flight for about 3 s), read to its first line.
fn stream_under_way(listen: u16) -> BufReader<TcpStream> {
    let mut stream = TcpStream::connect(("127.0.0.1", listen)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(
        stream,
        "GET /stream?chunks=10&ms=300 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reader = BufReader::new(stream);
    let mut first = String::new();
    while !first.contains("chunk 1 of 10") {
        first.clear();
        reader
            .read_line(&mut first)
            .expect("the first line streams");
    }
    reader
}

fn assert_stream_ends_whole(mut reader: BufReader<TcpStream>) {
    let mut rest = String::new();
    reader.read_to_string(&mut rest).expect("the stream ends");
    assert!(rest.contains("chunk 10 of 10"), "cut: {rest}");
}

/// No allocation refused (OOM), no stand-in killed during a job.
fn assert_nothing_lost(h: &Harness) {
    assert!(h.oom_log().is_empty(), "OOM: {:?}", h.oom_log());
    let lost = std::fs::read_to_string(h.gpu.path().join("lost.log")).unwrap_or_default();
    assert!(lost.is_empty(), "{lost}");
}

#[test]
fn the_ollama_openai_and_websocket_clients_start_their_services_through_the_proxy() {
    let (ollama_listen, openai_listen, ws_listen) = (free_port(), free_port(), free_port());
    let mut ollama = proxied(Standin::new("ollama", 8192, 10, "[]"), ollama_listen, "");
    ollama.ollama_model = Some("llama3");
    let streaming = |standin: Standin| {
        let mut standin = standin;
        standin
            .extra_args
            .extend(["--tokens", "6", "--token-ms", "80"].map(String::from));
        standin
    };
    let services = vec![
        streaming(ollama),
        streaming(proxied(
            Standin::new("vidi", 4096, 40, "[]"),
            openai_listen,
            "",
        )),
        proxied(Standin::new("cosyvoice", 4096, 50, "[]"), ws_listen, ""),
    ];
    let mut h = Harness::new(services);
    let api = h.serve("");
    for service in ["ollama", "vidi", "cosyvoice"] {
        assert_eq!(api.state(service), "stopped");
    }
    let output = Command::new(python())
        .arg("tests/proxy/clients.py")
        .args(["--ollama-url", &format!("http://127.0.0.1:{ollama_listen}")])
        .args(["--openai-url", &format!("http://127.0.0.1:{openai_listen}")])
        .args(["--ws-url", &format!("ws://127.0.0.1:{ws_listen}/ws")])
        .args(["--model", "llama3", "--tokens", "6", "--token-ms", "80"])
        .output()
        .expect("run tests/proxy/clients.py");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{said}");
    for service in ["ollama", "vidi", "cosyvoice"] {
        assert_eq!(starts_of(&api, service).len(), 1, "{service}: {said}");
    }
    assert!(h.oom_log().is_empty(), "OOM: {:?}", h.oom_log());
}

/// The Python with the ollama, openai and websockets packages: tests/run.sh installs
/// them in the client's virtualenv.
fn python() -> String {
    let venv = common::target_dir().join("../python-client/bin/python");
    match venv.exists() {
        true => venv.display().to_string(),
        false => "python3".to_owned(),
    }
}

#[test]
fn a_restarted_daemon_keeps_a_service_used_through_its_proxy_for_idle_ms() {
    let listen = free_port();
    let vidi = proxied(
        Standin::new("vidi", 4096, 40, "[]"),
        listen,
        ", idle_ms: 4000",
    );
    let mut h = Harness::new(vec![vidi]);
    let api = h.serve("");
    assert_eq!(get(listen, "/state").code, 200);
    let used = pid(&api, "vidi");
    h.kill_daemon();
    let api = h.serve("");
    api.wait_state("vidi", "ready");
    assert_eq!(pid(&api, "vidi"), used, "adopted, not stopped");
    let proxy = api.status()["services"]["vidi"]["proxy"].clone();
    assert_eq!(proxy["demanded"], true, "{proxy}");
    // Nothing else wants it: it stops once its idle time from the restart is over.
    api.wait_state("vidi", "stopped");
}
