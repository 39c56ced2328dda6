//! The desired-state file through the real binary: a deleted file keeps the last good
//! state in force (and status says the file is missing), a first start writes an empty
//! file to edit, and a bare file name in a config run from its own folder is written
//! where it should be, with the API answering 200.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::api::Api;
use common::{http_get, mcn_inventory, Harness};

const DESIRED: &str = "desired-state/state.yaml";

#[test]
fn a_deleted_file_keeps_services_running_until_a_new_file_comes() {
    let mut h = Harness::new(mcn_inventory());
    let api = h.serve("");
    h.set_desired("phase: 3\n");
    h.wait_converged(&["cosyvoice"]);
    let cosyvoice_pid = api.status()["services"]["cosyvoice"]["pids"][0].clone();

    std::fs::remove_file(h.path(DESIRED)).unwrap();
    h.wait_until("status says the desired-state file is missing", |_| {
        api.status()["desired"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("missing"))
    });
    // Several resync rounds (500 ms each) with the file gone.
    std::thread::sleep(Duration::from_millis(1500));
    let status = api.status();
    assert_eq!(
        status["services"]["cosyvoice"]["state"], "ready",
        "{status}"
    );
    assert_eq!(status["services"]["cosyvoice"]["pids"][0], cosyvoice_pid);
    assert_eq!(status["desired"]["phase"], 3, "the last good state stays");
    assert!(h.is_ready("cosyvoice"));
    assert!(
        h.daemon_log().contains("is missing"),
        "the log says so:\n{}",
        h.daemon_log()
    );

    h.set_desired("phase: 2\n");
    h.wait_converged(&["vidi"]);
    let status = api.status();
    assert!(status["desired"]["error"].is_null(), "{status}");
    assert_eq!(status["desired"]["phase"], 2);
}

#[test]
fn the_first_start_writes_an_empty_file_to_edit() {
    let mut h = Harness::new(mcn_inventory());
    std::fs::remove_dir_all(h.path("desired-state")).unwrap();
    let api = h.serve("");
    let text = std::fs::read_to_string(h.path(DESIRED)).expect("the daemon wrote the file");
    assert!(text.contains("phase: null"), "{text}");
    let status = api.status();
    assert!(status["desired"]["error"].is_null(), "{status}");
    assert!(status["desired"]["phase"].is_null(), "{status}");
    // It is the file the daemon follows: an edit of it is applied.
    h.set_desired("phase: 2\n");
    h.wait_converged(&["vidi"]);
}

#[test]
fn a_bare_desired_state_name_in_a_config_run_from_its_folder_is_written_there() {
    let mut h = Harness::new(mcn_inventory());
    let port = common::free_port();
    h.write_config(&format!("api: {{ listen: \"127.0.0.1:{port}\" }}"));
    let config = std::fs::read_to_string(h.config_path()).unwrap();
    let config = config.replace(
        "desired_state: desired-state/state.yaml",
        "desired_state: state.yaml",
    );
    std::fs::write(h.config_path(), config).unwrap();
    let log = std::fs::File::create(h.path("daemon.log")).unwrap();
    let daemon = Command::new(env!("CARGO_BIN_EXE_gpu-manager"))
        .args(["serve", "--config", "gpu-manager.yaml"])
        .current_dir(h.dir.path())
        .env("FAKE_NVML_DIR", h.gpu.path())
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start gpu-manager");
    h.daemon = Some(daemon);
    h.wait_until("the API answers /healthz", |_| {
        http_get(port, "/healthz").is_some_and(|(code, _)| code == 200)
    });
    let api = Api { port, token: None };

    let reply = api.post("/gpu/prepare-phase/2");
    assert_eq!(reply.code, 200, "{}", reply.body);
    let written = std::fs::read_to_string(h.path("state.yaml")).unwrap();
    assert!(written.contains("phase: 2"), "{written}");
    assert!(h.is_ready("vidi"));
    // state_dir: state, relative too, holds the pid file.
    assert!(h.path("state/pids/vidi.pid").exists());
}
