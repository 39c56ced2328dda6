//! Reloading the config end to end (docs/ARCHITECTURE.md, "Reloading the config"): the
//! real daemon on the simulated 24 GB GPU with three stand-ins that fit together. What
//! did not change keeps its pid; a launch change restarts that service only, drained
//! first; a broken config is refused whole; a removed service is stopped, or left
//! running with keep_removed; SIGHUP follows systemd's reload protocol.

mod common;

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use serde_json::Value;

use common::api::{Api, Reply};
use common::{free_port, Harness, Standin};

fn three() -> Vec<Standin> {
    vec![
        Standin::new("alpha", 4096, 50, "[3]"),
        // Drains on its (empty) queue before any stop.
        Standin::new("beta", 4096, 40, "[3]").parking(1024, 2000),
        Standin::new("gamma", 4096, 30, "[3]"),
    ]
}

fn serve(services: Vec<Standin>) -> (Harness, Api) {
    let mut h = Harness::new(services);
    let api = h.serve("");
    code(&api.post("/gpu/prepare-phase/3"), 200);
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

fn pids(api: &Api) -> Vec<u64> {
    ["alpha", "beta", "gamma"]
        .iter()
        .map(|s| pid(api, s))
        .collect()
}

/// Rewrites the config as the harness's services say, keeping the API where it is.
fn rewrite(h: &Harness, api: &Api) {
    h.write_config(&format!("api: {{ listen: \"127.0.0.1:{}\" }}\n", api.port));
}

fn names(list: &Value) -> Vec<String> {
    list.as_array()
        .unwrap_or_else(|| panic!("a list: {list}"))
        .iter()
        .map(|v| {
            v.as_str()
                .or_else(|| v["service"].as_str())
                .unwrap_or_default()
                .to_owned()
        })
        .collect()
}

#[test]
fn a_reload_of_a_priority_a_health_timeout_and_a_new_service_restarts_nothing() {
    let (mut h, api) = serve(three());
    let before = pids(&api);
    h.services[0].priority = 60;
    h.services.push(Standin::new("delta", 2048, 20, "[]"));
    rewrite(&h, &api);
    // gamma's health check gets a longer timeout.
    let config = std::fs::read_to_string(h.config_path()).unwrap();
    let gamma = format!("{}/health\", timeout_ms: 1000", h.service("gamma").port);
    let longer = format!("{}/health\", timeout_ms: 2500", h.service("gamma").port);
    std::fs::write(h.config_path(), config.replace(&gamma, &longer)).unwrap();

    let report = code(&api.post("/gpu/reload"), 200);
    assert_eq!(names(&report["added"]), ["delta"], "{report}");
    assert_eq!(names(&report["changed"]), ["alpha", "gamma"], "{report}");
    assert!(names(&report["restarted"]).is_empty(), "{report}");
    assert_eq!(report["generation"], 2, "{report}");

    let status = api.status();
    assert_eq!(status["services"]["alpha"]["priority"], 60, "{status}");
    assert_eq!(status["config"]["generation"], 2, "{status}");
    assert_eq!(status["config"]["error"], Value::Null, "{status}");
    assert_eq!(
        status["config"]["sha256"].as_str().map(str::len),
        Some(64),
        "{status}"
    );
    // Nothing restarted meanwhile, and the new service is managed.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(pids(&api), before);
    assert_eq!(api.state("delta"), "stopped");
    code(&api.post("/gpu/service/delta/start"), 200);
    assert!(h.is_ready("delta"));
    assert_eq!(pids(&api), before);
}

#[test]
fn a_command_change_restarts_that_service_only_drained_first() {
    let (mut h, api) = serve(three());
    let before = pids(&api);
    let mut events = api.events();
    h.services[1].start_delay_ms = 350;
    rewrite(&h, &api);

    let report = code(&api.post("/gpu/reload"), 200);
    assert_eq!(names(&report["restarted"]), ["beta"], "{report}");
    assert_eq!(report["restarted"][0]["keys"][0], "command", "{report}");

    let mut seen = Vec::new();
    loop {
        let event = events.next_event();
        if event["type"] == "state_changed" && event["service"] == "beta" {
            seen.push(event["to"].as_str().unwrap_or_default().to_owned());
        }
        if event["type"] == "action_started" && event["service"] == "beta" {
            seen.push(format!("{} {}", event["op"], event["cause"]["kind"]));
        }
        if seen.last().is_some_and(|s| s == "ready") {
            break;
        }
    }
    assert_eq!(
        seen[..3],
        [
            "\"stop\" \"config_changed\"".to_owned(),
            "draining".to_owned(),
            "stopping".to_owned()
        ],
        "{seen:?}"
    );
    assert!(seen.contains(&"\"start\" \"phase\"".to_owned()), "{seen:?}");
    let after = pids(&api);
    assert_ne!(after[1], before[1], "beta restarted");
    assert_eq!(
        (after[0], after[2]),
        (before[0], before[2]),
        "the others not"
    );
    assert!(h.oom_log().is_empty(), "OOM: {:?}", h.oom_log());
}

#[test]
fn a_syntax_error_or_an_unknown_key_is_refused_and_the_old_config_stays() {
    let (h, api) = serve(three());
    let good = std::fs::read_to_string(h.config_path()).unwrap();
    let path = h.config_path().display().to_string();

    std::fs::write(h.config_path(), format!("{good}  broken: [unclosed\n")).unwrap();
    let refused = code(&api.post("/gpu/reload"), 422);
    assert_eq!(refused["kind"], "invalid_config", "{refused}");
    let error = refused["error"].as_str().unwrap_or_default().to_owned();
    assert!(error.starts_with(&format!("{path}:")), "{error}");
    let place: Vec<&str> = error[path.len() + 1..].splitn(3, ':').collect();
    assert!(
        place[0].parse::<u32>().is_ok() && place[1].parse::<u32>().is_ok(),
        "file:line:col: {error}"
    );

    let unknown = good.replacen("    priority: 40\n", "    priorty: 40\n", 1);
    std::fs::write(h.config_path(), unknown).unwrap();
    let refused = code(&api.post("/gpu/reload"), 422);
    let error = refused["error"].as_str().unwrap_or_default();
    assert!(error.starts_with(&format!("{path}:")), "{error}");
    assert!(error.contains("priorty"), "{error}");
    let status = api.status();
    assert_eq!(status["config"]["generation"], 1, "{status}");
    assert!(
        status["config"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("priorty")),
        "{status}"
    );

    // The old config is in force: a phase change behaves as before.
    code(&api.post("/gpu/prepare-phase/4"), 404);
    code(&api.post("/gpu/prepare-phase/3"), 200);
    assert_eq!(api.state("beta"), "ready");
    std::fs::write(h.config_path(), good).unwrap();
    let report = code(&api.post("/gpu/reload"), 200);
    assert_eq!(report["generation"], 1, "nothing changed: {report}");
    assert_eq!(api.status()["config"]["error"], Value::Null);
}

#[test]
fn a_removed_service_is_stopped_and_with_keep_removed_left_running_unmanaged() {
    let (mut h, api) = serve(three());
    let all = h.services.clone();
    h.services.retain(|s| s.name != "gamma");
    rewrite(&h, &api);
    let report = code(&api.post("/gpu/reload"), 200);
    assert_eq!(names(&report["removed"]), ["gamma"], "{report}");
    h.services = all.clone();
    h.wait_until("gamma stopped", |h| h.is_down("gamma"));
    api_wait(&api, "gamma is gone from status", |s| {
        s["services"].get("gamma").is_none()
    });

    let beta = pid(&api, "beta");
    h.services.retain(|s| s.name == "alpha");
    rewrite(&h, &api);
    let report = code(&api.post("/gpu/reload?keep_removed=true"), 200);
    h.services = all;
    assert_eq!(names(&report["kept_removed"]), ["beta"], "{report}");
    assert!(names(&report["removed"]).is_empty(), "{report}");
    let status = api.status();
    assert!(status["services"].get("beta").is_none(), "{status}");
    std::thread::sleep(Duration::from_millis(1000));
    assert!(h.is_ready("beta"), "beta keeps running");
    assert!(std::path::Path::new(&format!("/proc/{beta}")).exists());
    assert!(h.is_ready("alpha"));
}

/// GET `path` on 127.0.0.1:`port` (a proxy); None when nothing listens there.
fn get_on(port: u16, path: &str) -> Option<Reply> {
    Api { port, token: None }.try_request("GET", path, None)
}

#[test]
fn a_proxy_moved_or_retuned_by_a_reload_serves_at_once_and_its_service_keeps_running() {
    let (first, second) = (free_port(), free_port());
    let mut services = three();
    services[0].config_extra = format!("    proxy: {{ listen: \"127.0.0.1:{first}\" }}\n");
    let (mut h, api) = serve(services);
    let before = pids(&api);
    assert_eq!(get_on(first, "/state").map(|r| r.code), Some(200));

    // Another port and a shorter idle time: applied live, the old port closes.
    h.services[0].config_extra =
        format!("    proxy: {{ listen: \"127.0.0.1:{second}\", idle_ms: 5000 }}\n");
    rewrite(&h, &api);
    let report = code(&api.post("/gpu/reload"), 200);
    assert_eq!(names(&report["changed"]), ["alpha"], "{report}");
    assert_eq!(report["changed"][0]["keys"], serde_json::json!(["proxy"]));
    assert!(names(&report["restarted"]).is_empty(), "{report}");
    let status = api.status();
    assert_eq!(
        status["services"]["alpha"]["proxy"]["listen"],
        format!("127.0.0.1:{second}"),
        "{status}"
    );
    api_wait(&api, "the new port to serve", |_| {
        get_on(second, "/state").is_some_and(|r| r.code == 200)
    });
    api_wait(&api, "the old port to close", |_| {
        get_on(first, "/state").is_none()
    });

    // A port another program holds: refused whole, the proxy stays where it is.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port();
    h.services[0].config_extra = format!("    proxy: {{ listen: \"127.0.0.1:{taken_port}\" }}\n");
    rewrite(&h, &api);
    let refused = code(&api.post("/gpu/reload"), 409);
    assert_eq!(refused["kind"], "listen_failed", "{refused}");
    let error = refused["error"].as_str().unwrap();
    assert!(
        error.starts_with(&format!(
            "services.alpha.proxy.listen 127.0.0.1:{taken_port} cannot be bound"
        )),
        "{error}"
    );
    let status = api.status();
    assert_eq!(status["config"]["generation"], 2, "{status}");
    assert_eq!(status["config"]["error"], error, "{status}");
    assert_eq!(get_on(second, "/state").map(|r| r.code), Some(200));

    // The proxy removed: nothing listens, and no service was restarted through it all.
    h.services[0].config_extra.clear();
    rewrite(&h, &api);
    code(&api.post("/gpu/reload"), 200);
    api_wait(&api, "the proxy to close", |_| {
        get_on(second, "/state").is_none()
    });
    assert_eq!(api.status()["services"]["alpha"]["proxy"], Value::Null);
    assert_eq!(pids(&api), before);
    drop(taken);
}

#[test]
fn sighup_follows_systemds_reload_protocol_on_a_real_notify_socket() {
    let mut h = Harness::new(three());
    let socket_path = h.path("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).expect("bind the notify socket");
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    h.daemon_env
        .push(("NOTIFY_SOCKET".into(), socket_path.display().to_string()));
    let api = h.serve("");
    let next = || {
        let mut buffer = [0u8; 4096];
        let n = socket.recv(&mut buffer).expect("a notification in time");
        String::from_utf8_lossy(&buffer[..n]).into_owned()
    };
    let until = |what: &str| loop {
        let message = next();
        if message.lines().any(|l| l == what) {
            return message;
        }
    };
    until("READY=1");

    h.services[0].priority = 55;
    rewrite(&h, &api);
    let pid = h.daemon.as_ref().expect("the daemon").id();
    let status = std::process::Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let reloading = until("RELOADING=1");
    let usec = reloading
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .and_then(|v| v.parse::<u64>().ok());
    assert!(usec.is_some_and(|u| u > 0), "{reloading}");
    until("READY=1");
    let status = api.status();
    assert_eq!(status["config"]["generation"], 2, "{status}");
    assert_eq!(status["services"]["alpha"]["priority"], 55, "{status}");
    assert!(h.daemon.as_mut().unwrap().try_wait().unwrap().is_none());
}

fn api_wait(api: &Api, description: &str, what: impl Fn(&Value) -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let status = api.status();
        if what(&status) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for: {description}: {status}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
