//! Service logs are bounded and never hold a service up: the real daemon
//! (`gpu-manager serve`) with native stand-ins that write far past `log.max_mb`, time
//! out with their last lines quoted, and keep writing across a daemon crash.

mod common;

use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use common::{Harness, Standin};

const MB: u64 = 1024 * 1024;

fn log_files(h: &Harness, service: &str) -> Vec<(String, u64)> {
    let mut files: Vec<(String, u64)> = fs::read_dir(h.path("state/logs"))
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            name.starts_with(&format!("{service}.log"))
                .then(|| (name, e.metadata().unwrap().len()))
        })
        .collect();
    files.sort();
    files
}

fn log_path(h: &Harness, service: &str) -> PathBuf {
    h.path(&format!("state/logs/{service}.log"))
}

#[test]
fn logs_past_max_mb_are_rotated_and_capped_and_the_504_still_quotes_the_last_lines() {
    // 5 MB of output before the stand-in starts (and never becomes ready in time).
    let mut chatty = Standin::new("vidi", 4096, 40, "[2]");
    chatty.shell_script = Some(
        "yes 'a chatty line of model loading progress' | head -c 5000000; exec STANDIN".into(),
    );
    chatty.config_extra = "    log: { max_mb: 1, keep: 2 }\n".into();
    chatty.start_delay_ms = 60_000;
    chatty.start_timeout_ms = 8000;
    let mut h = Harness::new(vec![chatty]);
    let api = h.serve("");

    let reply = api.post("/gpu/prepare-phase/2");
    assert_eq!(reply.code, 504, "{}", reply.body);
    let message = reply.json()["error"].as_str().unwrap().to_owned();
    assert!(
        message.contains("gpu-standin[vidi]") && message.contains("allocated 4096 MB"),
        "the stand-in's own last lines, from the current log: {message}"
    );

    // Held stopped: no retry adds output while the files are read.
    assert_eq!(api.post("/gpu/service/vidi/stop").code, 200);
    let files = log_files(&h, "vidi");
    let names: Vec<&str> = files.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names, ["vidi.log", "vidi.log.1", "vidi.log.2"], "{files:?}");
    assert!(
        files.iter().all(|(_, size)| *size <= MB),
        "each capped at max_mb: {files:?}"
    );
    let rotated = fs::read_to_string(h.path("state/logs/vidi.log.1")).unwrap();
    assert!(
        rotated
            .lines()
            .all(|l| l == "a chatty line of model loading progress"),
        "whole lines only"
    );
}

#[test]
fn a_daemon_crash_does_not_cut_the_services_output() {
    let mut ticker = Standin::new("vidi", 4096, 40, "[2]");
    ticker.shell_script = Some("(while echo tick; do sleep 0.05; done) & exec STANDIN".into());
    let mut h = Harness::new(vec![ticker]);
    let api = h.serve("");
    assert_eq!(api.post("/gpu/prepare-phase/2").code, 200);
    let ticks = |h: &Harness| {
        fs::read_to_string(log_path(h, "vidi"))
            .unwrap_or_default()
            .matches("tick")
            .count()
    };

    h.kill_daemon();
    let at_crash = ticks(&h);
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        ticks(&h) > at_crash + 5,
        "the loop kept writing without the daemon: no SIGPIPE, no full pipe"
    );
    assert!(h.is_ready("vidi"));

    let api = h.serve("");
    api.wait_state("vidi", "ready");
    assert!(h.daemon_log().contains("adopted"), "{}", h.daemon_log());
    let after_restart = ticks(&h);
    h.wait_until("more ticks after the restart", |h| {
        ticks(h) > after_restart + 5
    });
}
