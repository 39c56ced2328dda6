//! Docker services against a real Docker Engine: stand-in services in containers (host
//! pids and network, the simulated GPU folder bind-mounted), driven by the real daemon
//! binary as in `reconcile_native.rs`, or by a daemon inside the test process where a
//! test reads its status. Without an engine these tests skip loudly, or fail under
//! `CI=true`; the unreachable-engine test needs no engine at all.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::docker::{docker, engine_or_skip, InProcessDaemon};
use common::{mcn_inventory, Harness, Standin};
use gpu_manager::act::docker::DockerDriver;
use gpu_manager::status::{ServiceState, Status};

/// The requirements' inventory, with CosyVoice in a container as in production.
fn cosyvoice_in_docker() -> Vec<Standin> {
    mcn_inventory()
        .into_iter()
        .map(|s| {
            if s.name == "cosyvoice" {
                s.in_docker()
            } else {
                s
            }
        })
        .collect()
}

/// A service's state; None before the daemon's first status.
fn state(status: &Status, name: &str) -> Option<ServiceState> {
    status.services.get(name).map(|service| service.state)
}

/// The engine the tests' docker CLI uses, as a socket path.
fn engine_socket() -> PathBuf {
    std::env::var("DOCKER_HOST")
        .ok()
        .and_then(|host| host.strip_prefix("unix://").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("/var/run/docker.sock"))
}

#[test]
fn ac1_phases_2_3_4_with_cosyvoice_in_a_container_never_overrun_vram() {
    if !engine_or_skip("ac1_phases_2_3_4_with_cosyvoice_in_a_container") {
        return;
    }
    let mut h = Harness::new(cosyvoice_in_docker());
    h.create_containers();
    h.start_daemon();
    h.run_ac1_by_file(|h, ready| {
        if ready == "cosyvoice" {
            let pids: Vec<u32> = h.allocations().into_keys().collect();
            assert_eq!(
                pids,
                [h.container_pid("cosyvoice")],
                "the container holds it"
            );
        }
    });
    assert!(
        !h.container_running("cosyvoice"),
        "phase 4 stopped the container"
    );
}

#[test]
fn ac3_starting_comfyui_stops_the_cosyvoice_container_and_waits_for_its_memory() {
    if !engine_or_skip("ac3_starting_comfyui_stops_the_cosyvoice_container") {
        return;
    }
    let mut h = Harness::new(cosyvoice_in_docker());
    h.create_containers();
    h.start_daemon();
    // ComfyUI's memory may only be taken once the container's is reclaimed (300 ms
    // after its process died).
    h.run_ac3_by_file(
        |h| assert!(h.container_running("cosyvoice")),
        |h| assert!(!h.container_running("cosyvoice")),
    );
}

#[test]
fn a_container_running_at_daemon_start_is_adopted_not_restarted() {
    if !engine_or_skip("a_container_running_at_daemon_start_is_adopted_not_restarted") {
        return;
    }
    let mut h = Harness::new(cosyvoice_in_docker());
    h.create_containers();
    let container = h.service("cosyvoice").container().to_owned();
    docker(&["start", &container]).unwrap();
    h.wait_until("the hand-started container is healthy", |h| {
        h.is_ready("cosyvoice")
    });
    let run = h.container_started_at("cosyvoice");
    h.set_desired("phase: 3\n");
    h.start_daemon();
    h.wait_until("the daemon adopts the container", |h| {
        h.daemon_log().contains("adopted a running container")
    });
    // A few resync rounds: a restart or a second start would show by now.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(h.container_started_at("cosyvoice"), run, "not restarted");
    assert_eq!(h.instances_of("cosyvoice"), 1);
    assert!(h.is_ready("cosyvoice"));
    // Adopted means managed: the next phase stops it.
    h.set_desired("phase: 4\n");
    h.wait_converged(&["comfyui"]);
    assert!(!h.container_running("cosyvoice"));
    assert!(h.oom_log().is_empty(), "OOM: {:?}", h.oom_log());
}

#[test]
fn an_unreachable_engine_makes_docker_services_unknown_and_leaves_native_ones_alone() {
    let mut h = Harness::new(vec![
        Standin::new("cosyvoice", 4096, 50, "[3]").in_docker(),
        Standin::new("vidi", 4096, 40, "[2]"),
    ]);
    h.use_simulated_gpu(10_000);
    let host = format!("unix://{}", h.path("no-docker.sock").display());
    let daemon = InProcessDaemon::start(&h, DockerDriver::new(&host));
    let status = daemon.wait_status("cosyvoice is unknown", |s| {
        state(s, "cosyvoice") == Some(ServiceState::Unknown)
    });
    let error = status.services["cosyvoice"].last_error.clone().unwrap();
    assert!(error.contains(&host), "names the engine tried: {error}");
    assert_eq!(state(&status, "vidi"), Some(ServiceState::Stopped));

    h.set_desired("phase: 2\n");
    h.wait_converged(&["vidi"]);

    h.set_desired("phase: 3\n");
    let status = daemon.wait_status("phase 3 settled with cosyvoice held back", |s| {
        s.desired.converged_generation == s.desired.generation
            && state(s, "vidi") == Some(ServiceState::Stopped)
    });
    let cosyvoice = &status.services["cosyvoice"];
    assert_eq!(cosyvoice.state, ServiceState::Unknown);
    assert!(cosyvoice.wanted);
    assert!(
        cosyvoice.last_error.as_deref().unwrap().contains(&host),
        "{cosyvoice:?}"
    );
    assert!(
        status
            .recent_actions
            .iter()
            .all(|a| a.service != "cosyvoice"),
        "no start is tried against a down engine: {:?}",
        status.recent_actions
    );
    assert!(h.is_down("vidi") && h.is_down("cosyvoice"));
}

#[test]
fn a_hung_engine_holds_native_transitions_up_by_seconds_at_most() {
    let mut h = Harness::new(vec![
        Standin::new("cosyvoice", 4096, 50, "[3]").in_docker(),
        Standin::new("vidi", 4096, 40, "[2]"),
    ]);
    h.use_simulated_gpu(10_000);
    // An engine that accepts connections and never answers, as a deadlocked dockerd.
    let socket = h.path("hung-docker.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        while let Ok((connection, _)) = listener.accept() {
            held.push(connection);
        }
    });
    let daemon = InProcessDaemon::start(
        &h,
        DockerDriver::new(format!("unix://{}", socket.display())),
    );
    let status = daemon.wait_status("cosyvoice is unknown", |s| {
        state(s, "cosyvoice") == Some(ServiceState::Unknown)
    });
    let error = status.services["cosyvoice"].last_error.clone().unwrap();
    assert!(error.contains("no answer"), "{error}");
    let asked = Instant::now();
    h.set_desired("phase: 2\n");
    h.wait_converged(&["vidi"]);
    // Each round asks the engine once (3 s at most) before acting; a round under way
    // when the file changed finishes first. Without those limits this takes 10 s or more.
    assert!(
        asked.elapsed() < Duration::from_millis(9500),
        "vidi took {:?}",
        asked.elapsed()
    );
}

#[test]
fn docker_services_come_back_when_the_engine_does() {
    if !engine_or_skip("docker_services_come_back_when_the_engine_does") {
        return;
    }
    let mut h = Harness::new(vec![Standin::new("cosyvoice", 4096, 50, "[3]").in_docker()]);
    h.use_simulated_gpu(10_000);
    h.create_containers();
    h.set_desired("phase: 3\n");
    let socket = h.path("docker.sock");
    let daemon = InProcessDaemon::start(
        &h,
        DockerDriver::new(format!("unix://{}", socket.display())),
    );
    daemon.wait_status("cosyvoice is unknown", |s| {
        state(s, "cosyvoice") == Some(ServiceState::Unknown)
    });
    // The engine "starts": its socket appears where the daemon looks.
    std::os::unix::fs::symlink(engine_socket(), &socket).unwrap();
    let status = daemon.wait_status("cosyvoice is started", |s| {
        state(s, "cosyvoice") == Some(ServiceState::Ready)
    });
    assert_eq!(status.services["cosyvoice"].last_error, None);
    assert!(h.is_ready("cosyvoice") && h.container_running("cosyvoice"));
}

#[test]
fn a_missing_container_fails_its_start_naming_it_and_native_services_carry_on() {
    if !engine_or_skip("a_missing_container_fails_its_start_naming_it") {
        return;
    }
    // No create_containers: the container the config names does not exist.
    let mut h = Harness::new(cosyvoice_in_docker());
    let container = h.service("cosyvoice").container().to_owned();
    h.start_daemon();
    h.set_desired("phase: 3\n");
    h.wait_until("the start fails naming the container", |h| {
        let log = h.daemon_log();
        log.contains(&format!("container {container:?} does not exist"))
            && log.contains("docker create it first")
    });
    h.set_desired("phase: 2\n");
    h.wait_converged(&["vidi"]);
}

#[test]
fn a_container_ignoring_sigterm_is_killed_after_its_stop_timeout() {
    if !engine_or_skip("a_container_ignoring_sigterm_is_killed_after_its_stop_timeout") {
        return;
    }
    let mut stubborn = Standin::new("cosyvoice", 4096, 50, "[3]").in_docker();
    stubborn.extra_args = vec!["--ignore-sigterm".into()];
    stubborn.stop_timeout_ms = 1000;
    let mut h = Harness::new(vec![stubborn]);
    h.create_containers();
    h.start_daemon();
    h.set_desired("phase: 3\n");
    h.wait_converged(&["cosyvoice"]);
    let stopping = Instant::now();
    h.set_desired("phase: null\n");
    h.wait_converged(&[]);
    h.wait_until("the kill is logged", |h| {
        h.daemon_log().contains("did not stop on SIGTERM")
    });
    assert!(stopping.elapsed() >= Duration::from_secs(1), "waited first");
    assert!(!h.container_running("cosyvoice"));
    assert_eq!(h.inspect("cosyvoice", "{{.State.ExitCode}}"), "137");
}

#[test]
fn a_container_that_exits_while_starting_fails_fast_with_its_last_log_lines() {
    if !engine_or_skip("a_container_that_exits_while_starting_fails_fast") {
        return;
    }
    let mut crashing = Standin::new("cosyvoice", 4096, 50, "[3]").in_docker();
    crashing.start_delay_ms = 60_000;
    crashing.start_timeout_ms = 120_000;
    crashing.extra_args = vec!["--exit-after-ms".into(), "300".into()];
    let mut h = Harness::new(vec![crashing]);
    h.create_containers();
    h.start_daemon();
    h.set_desired("phase: 3\n");
    // CONVERGE (30 s) is far below the 120 s start timeout: only a fast failure passes.
    h.wait_until("the start fails with the container's exit", |h| {
        h.daemon_log().contains("exited while starting")
    });
    let log = h.daemon_log();
    assert!(log.contains("code 3"), "the exit code is reported:\n{log}");
    assert!(
        log.contains("crashing as asked by --exit-after-ms"),
        "the container's own last lines are quoted:\n{log}"
    );
}

/// ComfyUI (native, 20 GB) and Ollama (a container, 18 GB model) do not fit together.
fn comfyui_and_ollama(unload_delay_ms: u64) -> Vec<Standin> {
    let mut ollama = Standin::new("ollama", 18432, 10, "[]")
        .ollama("llama3:8b")
        .in_docker();
    ollama.extra_args = vec!["--unload-delay-ms".into(), unload_delay_ms.to_string()];
    vec![Standin::new("comfyui", 20480, 100, "[4]"), ollama]
}

#[test]
fn ollama_parks_by_unloading_its_models_and_resumes_in_the_same_container() {
    if !engine_or_skip("ollama_parks_by_unloading_its_models_and_resumes_in_the_same_container") {
        return;
    }
    let mut h = Harness::new(comfyui_and_ollama(300));
    h.create_containers();
    h.start_daemon();
    h.set_desired("pinned: [ollama]\n");
    h.wait_converged(&["ollama"]);
    let run = h.container_started_at("ollama");
    let ollama_pid = h.container_pid("ollama");
    assert_eq!(
        h.allocations().into_keys().collect::<Vec<_>>(),
        [ollama_pid]
    );

    h.set_desired("phase: 4\npinned: [ollama]\n");
    h.wait_until("comfyui is ready", |h| h.is_ready("comfyui"));
    assert!(h.container_running("ollama"), "the container keeps running");
    assert_eq!(h.container_started_at("ollama"), run, "never restarted");
    assert_eq!(h.allocated_mb(), [20480], "only ComfyUI holds memory");
    assert!(h.oom_log().is_empty(), "OOM: {:?}", h.oom_log());
    let log = h.daemon_log();
    assert!(log.contains("asked Ollama to unload the model"), "{log}");
    assert!(
        log.contains("parked: the GPU shows it down to its residual"),
        "{log}"
    );
    assert!(log.contains("to=parked"), "{log}");

    // Wanted again: the parked container is resumed as it runs, not started anew.
    h.set_desired("pinned: [ollama]\n");
    h.wait_until("comfyui is stopped", |h| h.is_down("comfyui"));
    // A parked Ollama answers its health check too: the daemon's word says it resumed.
    h.wait_until("ollama is resumed", |h| {
        h.daemon_log()
            .contains("action done op=resume service=ollama")
    });
    assert!(h.is_ready("ollama"));
    assert_eq!(h.container_started_at("ollama"), run, "never restarted");
}

#[test]
fn ollama_is_stopped_when_the_gpu_does_not_confirm_the_unload() {
    if !engine_or_skip("ollama_is_stopped_when_the_gpu_does_not_confirm_the_unload") {
        return;
    }
    // The model's memory would only be freed after a minute; the park gives it 1.5 s.
    let mut services = comfyui_and_ollama(60_000);
    services[1].park_timeout_ms = Some(1500);
    let mut h = Harness::new(services);
    h.create_containers();
    h.start_daemon();
    h.set_desired("pinned: [ollama]\n");
    h.wait_converged(&["ollama"]);
    h.set_desired("phase: 4\npinned: [ollama]\n");
    h.wait_converged(&["comfyui"]);
    assert!(!h.container_running("ollama"), "stopped after all");
    assert_eq!(h.allocated_mb(), [20480]);
    assert!(h.oom_log().is_empty(), "OOM: {:?}", h.oom_log());
    let log = h.daemon_log();
    assert!(log.contains("asked Ollama to unload the model"), "{log}");
    assert!(log.contains("park failed: stopping it instead"), "{log}");
}

#[test]
fn status_attributes_a_containers_vram_including_processes_it_execs() {
    if !engine_or_skip("status_attributes_a_containers_vram_including_processes_it_execs") {
        return;
    }
    let mut h = Harness::new(vec![Standin::new("cosyvoice", 4096, 50, "[3]").in_docker()]);
    h.use_simulated_gpu(10_000);
    h.create_containers();
    h.set_desired("phase: 3\n");
    let daemon = InProcessDaemon::start(&h, DockerDriver::from_env());
    daemon.wait_status("cosyvoice ready with its memory", |s| {
        state(s, "cosyvoice") == Some(ServiceState::Ready)
            && s.services.get("cosyvoice").and_then(|c| c.observed_vram_mb) == Some(4096)
    });
    let main_pid = h.container_pid("cosyvoice");
    let folder = h.gpu.path().display().to_string();
    let container = h.service("cosyvoice").container().to_owned();
    docker(&[
        "exec",
        "--detach",
        &container,
        "/gpu-standin",
        "--name",
        "helper",
        "--vram-mb",
        "512",
        "--sim-dir",
        &folder,
    ])
    .unwrap();
    let status = daemon.wait_status("the exec'd process counts for cosyvoice", |s| {
        s.services.get("cosyvoice").and_then(|c| c.observed_vram_mb) == Some(4608)
    });
    assert_eq!(status.services["cosyvoice"].pids, [main_pid]);
    assert_eq!(status.vram.external_mb, 1024, "only the desktop baseline");
    assert_eq!(status.gpu.processes.len(), 2);
    assert!(status
        .gpu
        .processes
        .iter()
        .all(|p| p.service.as_deref() == Some("cosyvoice")));
    // The helper is not in the main process's tree (docker exec runs it under the
    // engine's shim), so only its cgroup could attribute it.
    let helper = status
        .gpu
        .processes
        .iter()
        .find(|p| p.pid != main_pid)
        .unwrap();
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", helper.pid)).unwrap();
    let ppid: u32 = stat
        .rsplit_once(") ")
        .unwrap()
        .1
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert_ne!(ppid, main_pid);
}
