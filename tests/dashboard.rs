//! The dashboard (`GET /`) in a real browser: the real daemon (`gpu-manager serve`) on the
//! simulated GPU with the four stand-in services, and headless Chromium (Debian's
//! `chromium` and `chromium-driver`) driven by selenium from
//! `tests/browser/dashboard.py`, which holds the checks. Screenshots land in
//! `target/test-artifacts/dashboard*/`. Skipped loudly without the browser, failed
//! under `CI=true` (tests/run.sh installs it).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use common::api::Api;
use common::lease::require;
use common::{mcn_inventory, Harness};

fn succeeds(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn browser_or_skip() -> bool {
    require(
        succeeds("chromium", &["--version"]) && succeeds("chromedriver", &["--version"]),
        "chromium and chromedriver",
        "apt-get install chromium chromium-driver",
    ) && require(
        succeeds("python3", &["-c", "import selenium"]),
        "the Python selenium module",
        "python3 -m pip install selenium",
    )
}

fn artifacts(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("target/test-artifacts")
        .join(name)
}

/// Runs the browser script against `api`, restarting the daemon when it asks (to see the
/// page reconnect); fails with its output and the daemon's log.
fn run_browser(h: &mut Harness, api: &Api, artifacts_name: &str, extra: &[String]) {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/browser/dashboard.py");
    let mut command = Command::new("python3");
    command
        .arg(script)
        .arg("--url")
        .arg(api.url())
        .arg("--artifacts")
        .arg(artifacts(artifacts_name))
        .arg("--config")
        .arg(h.config_path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(token) = &api.token {
        command.arg("--token").arg(token);
    }
    command.args(extra);
    let mut browser = command.spawn().expect("run python3");
    let mut answer = browser.stdin.take().unwrap();
    let mut said = String::new();
    for line in BufReader::new(browser.stdout.take().unwrap()).lines() {
        let line = line.expect("the script's output");
        println!("{line}");
        if line == "RESTART-DAEMON" {
            h.kill_daemon();
            h.start_daemon_with(&["serve"]);
            h.wait_until("the restarted API answers /healthz", |_| {
                common::http_get(api.port, "/healthz").is_some_and(|(code, _)| code == 200)
            });
            writeln!(answer, "restarted").unwrap();
        }
        said.push_str(&line);
        said.push('\n');
    }
    let output = browser.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the browser checks failed:\n{said}\n{stderr}\n--- daemon log ---\n{}",
        h.daemon_log()
    );
    assert!(said.contains("PASS"), "the script checked something");
}

#[test]
fn the_dashboard_shows_changes_live_and_drives_the_daemon() {
    if !browser_or_skip() {
        return;
    }
    let mut h = Harness::new(mcn_inventory());
    let api = h.serve("");
    run_browser(&mut h, &api, "dashboard", &[]);
    assert!(h.oom_log().is_empty(), "OOM: {:?}", h.oom_log());
}

#[test]
fn the_dashboard_asks_for_the_token_when_one_is_configured() {
    if !browser_or_skip() {
        return;
    }
    let mut h = Harness::new(mcn_inventory());
    let token_file = h.path("token");
    std::fs::write(&token_file, "dashboard-s3cret\n").unwrap();
    let mut api = h.serve(&format!(", token_file: {token_file:?}"));
    api.token = Some("dashboard-s3cret".into());
    run_browser(&mut h, &api, "dashboard-token", &[]);
}

#[test]
fn the_dashboard_shows_parked_and_draining_services_and_their_residual() {
    if !browser_or_skip() {
        return;
    }
    let services = mcn_inventory()
        .into_iter()
        .map(|s| match s.name {
            "cosyvoice" | "vidi" => s.parking(512, 10_000),
            _ => s,
        })
        .collect();
    let mut h = Harness::new(services);
    let api = h.serve("");
    let cosyvoice = format!("http://127.0.0.1:{}", h.service("cosyvoice").port);
    run_browser(
        &mut h,
        &api,
        "dashboard-parking",
        &["--parking".into(), cosyvoice],
    );
    assert!(h.oom_log().is_empty(), "OOM: {:?}", h.oom_log());
}

#[test]
fn the_dashboard_shows_a_proxied_service_traffic_and_its_demand_counting_down() {
    if !browser_or_skip() {
        return;
    }
    let listen = common::free_port();
    let services = mcn_inventory()
        .into_iter()
        .map(|mut s| {
            if s.name == "ollama" {
                // A slow start, so that the page sees the first request waiting for it.
                s.start_delay_ms = 4000;
                s.config_extra.push_str(&format!(
                    "    proxy: {{ listen: \"127.0.0.1:{listen}\", idle_ms: 120000 }}\n"
                ));
            }
            s
        })
        .collect();
    let mut h = Harness::new(services);
    let api = h.serve("");
    run_browser(
        &mut h,
        &api,
        "dashboard-proxy",
        &["--proxy".into(), format!("http://127.0.0.1:{listen}")],
    );
    let proxy = &api.status()["services"]["ollama"]["proxy"];
    assert_eq!(proxy["demanded"], true, "{proxy}");
    assert!(h.oom_log().is_empty(), "OOM: {:?}", h.oom_log());
}
