//! The core reconciler end to end: the real daemon binary in watch mode, driven by
//! editing the desired-state file, with native stand-in services allocating on a
//! simulated 24 GB GPU that the daemon reads through the fake libnvidia-ml.

mod common;

use std::time::Duration;

use common::{mcn_inventory, pid_is_alive, Harness, Standin};

#[test]
fn ac1_phases_2_3_4_by_file_never_overrun_vram() {
    let mut h = Harness::new(mcn_inventory());
    h.start_daemon();
    h.run_ac1_by_file(|_, _| {});
}

#[test]
fn ac3_pinning_comfyui_preempts_cosyvoice_after_its_memory_is_free() {
    let mut h = Harness::new(mcn_inventory());
    h.start_daemon();
    h.run_ac3_by_file(|_| {}, |_| {});
}

#[test]
fn a_service_ignoring_sigterm_is_killed_after_its_stop_timeout() {
    let mut stubborn = Standin::new("vidi", 4096, 40, "[2]");
    stubborn.extra_args = vec!["--ignore-sigterm".into()];
    stubborn.stop_timeout_ms = 1000;
    let mut h = Harness::new(vec![stubborn]);
    h.start_daemon();
    h.set_desired("phase: 2\n");
    h.wait_converged(&["vidi"]);
    let pid = *h.allocations().keys().next().expect("vidi allocated");
    h.set_desired("phase: null\n");
    h.wait_converged(&[]);
    h.wait_until("the killed stand-in is gone", |_| !pid_is_alive(pid));
    h.wait_until("the SIGKILL is logged", |h| {
        h.daemon_log().contains("did not stop on SIGTERM")
    });
}

#[test]
fn a_service_that_exits_while_starting_fails_fast_with_its_log() {
    let mut crashing = Standin::new("vidi", 4096, 40, "[2]");
    crashing.start_delay_ms = 60_000;
    crashing.start_timeout_ms = 120_000;
    crashing.extra_args = vec!["--exit-after-ms".into(), "200".into()];
    let mut h = Harness::new(vec![crashing]);
    h.start_daemon();
    h.set_desired("phase: 2\n");
    // CONVERGE (30 s) is far below the 120 s start timeout: only a fast failure passes.
    h.wait_until("the start fails with the process exit", |h| {
        h.daemon_log().contains("exited while starting")
    });
    assert!(
        h.daemon_log().contains("code 3"),
        "the exit code is reported:\n{}",
        h.daemon_log()
    );
}

#[test]
fn a_broken_edit_is_refused_and_the_last_good_state_kept() {
    let mut h = Harness::new(mcn_inventory());
    h.start_daemon();
    h.set_desired("phase: 2\n");
    h.wait_converged(&["vidi"]);
    h.set_desired("phase: [oops\n");
    h.wait_until("the refusal is logged", |h| {
        h.daemon_log().contains("desired state refused")
    });
    h.set_desired("phase: 99\n");
    h.wait_until("an unknown phase is refused too", |h| {
        h.daemon_log().contains("phase 99 is unknown")
    });
    std::thread::sleep(Duration::from_millis(1500));
    assert!(h.is_ready("vidi"), "the last good state stays in force");
    assert_eq!(h.instances_of("vidi"), 1);
    h.set_desired("phase: 3\n");
    h.wait_converged(&["cosyvoice"]);
}

#[test]
fn a_restarted_daemon_adopts_running_services_without_a_second_start() {
    let mut h = Harness::new(mcn_inventory());
    h.start_daemon();
    h.set_desired("phase: 2\n");
    h.wait_converged(&["vidi"]);
    let before = h.allocations();
    h.kill_daemon();
    h.start_daemon();
    h.wait_until("the daemon adopts vidi", |h| {
        h.daemon_log().contains("adopted a running instance")
    });
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(h.instances_of("vidi"), 1, "no second instance");
    assert_eq!(
        h.allocations(),
        before,
        "the same process holds the same memory"
    );
    h.set_desired("phase: 3\n");
    h.wait_converged(&["cosyvoice"]);
    assert!(h.oom_log().is_empty(), "OOM: {:?}", h.oom_log());
}

#[test]
fn without_nvml_the_daemon_budgets_from_declared_sizes() {
    let mut h = Harness::new(mcn_inventory());
    h.gpu_config =
        "{ nvml_library: /nonexistent/libnvidia-ml.so.1, total_mb: 24576, reserve_mb: 512 }".into();
    h.write_config("");
    h.start_daemon();
    h.set_desired("phase: 3\npinned: [comfyui]\n");
    h.wait_converged(&["comfyui"]);
    assert!(h.daemon_log().contains("GPU unavailable"));
    assert!(h.oom_log().is_empty());
}
