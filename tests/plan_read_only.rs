//! `gpu-manager plan` only looks: it finds a service running by its `match` pattern,
//! as the daemon would adopt it, but creates no state folder, writes no pid file and no
//! desired-state file.

mod common;

use std::process::{Command, Stdio};

use common::{mcn_inventory, standin_binary, Harness};

/// Kills and reaps a stand-in started by hand, even when an assertion fails first.
struct Started(std::process::Child);

impl Drop for Started {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn plan_finds_a_running_service_and_changes_nothing() {
    let h = Harness::new(mcn_inventory());
    let cosyvoice = h.service("cosyvoice").clone();
    let config = std::fs::read_to_string(h.config_path()).unwrap().replace(
        "  cosyvoice:\n    kind: native\n",
        &format!(
            "  cosyvoice:\n    kind: native\n    match: \"--port {}\"\n",
            cosyvoice.port
        ),
    );
    std::fs::write(h.config_path(), config).unwrap();
    std::fs::remove_dir_all(h.path("desired-state")).unwrap();
    let _standin = Started(
        Command::new(standin_binary())
            .args(cosyvoice.args())
            .env("FAKE_NVML_DIR", h.gpu.path())
            .stdin(Stdio::null())
            .spawn()
            .expect("start the stand-in"),
    );
    h.wait_until("the hand-started cosyvoice is ready", |h| {
        h.is_ready("cosyvoice")
    });

    let output = Command::new(env!("CARGO_BIN_EXE_gpu-manager"))
        .args(["plan", "--phase", "2", "--config"])
        .arg(h.config_path())
        .env("FAKE_NVML_DIR", h.gpu.path())
        .output()
        .expect("run gpu-manager plan");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("stop cosyvoice") && stdout.contains("start vidi"),
        "plan found the running cosyvoice:\n{stdout}\n{stderr}"
    );
    assert!(
        !h.path("state").exists(),
        "plan created the state folder (or a pid file in it)"
    );
    assert!(
        !h.path("desired-state").exists(),
        "plan created the desired-state file"
    );
    assert!(h.is_ready("cosyvoice"), "plan left the service alone");
}
