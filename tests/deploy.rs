//! Deploying on a GPU host, end to end with the real binary on simulated GPUs:
//! `GET /gpu/can-fit` and `gpu-manager can-fit`; systemd's readiness protocol received
//! on a socket the test creates; and the one-daemon-per-GPU recipe (docs/scaling.md):
//! two daemons on two GPUs, services placed by `CUDA_VISIBLE_DEVICES`, a lease key each.

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::{Child, Command, Stdio};

use serde_json::Value;
use sim_gpu::{DeviceSpec, SimGpuDir};

use common::api::Api;
use common::lease::{eventually, redis_with_python, PythonLock};
use common::{free_port, http_get, kill_standin, mcn_inventory, standin_binary, Harness, Standin};

fn cli(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_gpu-manager"))
        .args(args)
        .output()
        .expect("run gpu-manager");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn can_fit_answers_from_the_budget_and_names_what_a_start_would_preempt() {
    let mut h = Harness::new(mcn_inventory());
    let api = h.serve("");
    assert_eq!(api.post("/gpu/prepare-phase/3").code, 200);
    // 24576 MB - 512 reserve - 1024 desktop = 23040 budget; CosyVoice holds 4096.
    let fits = api.get("/gpu/can-fit?mb=18944");
    assert_eq!(fits.code, 200, "{}", fits.body);
    let fits = fits.json();
    assert_eq!(fits["fits"], true, "{fits}");
    assert_eq!(fits["budget_mb"], 23040);
    assert_eq!(fits["free_mb"], 18944);
    assert_eq!(fits["would_preempt"], serde_json::json!([]));

    let comfy = api.get("/gpu/can-fit?mb=20480&priority=100").json();
    assert_eq!(comfy["fits"], false, "{comfy}");
    assert_eq!(comfy["would_preempt"], serde_json::json!(["cosyvoice"]));
    let low = api.get("/gpu/can-fit?mb=20480&priority=10").json();
    assert_eq!(low["would_preempt"], serde_json::json!([]), "{low}");
    assert!(
        low["reason"].as_str().unwrap().contains("cosyvoice"),
        "{low}"
    );

    for bad in [
        "/gpu/can-fit",
        "/gpu/can-fit?mb=abc",
        "/gpu/can-fit?mb=-1",
        "/gpu/can-fit?mb=1&priority=x",
    ] {
        let reply = api.get(bad);
        assert_eq!(reply.code, 400, "{bad}: {}", reply.body);
        let body = reply.json();
        assert_eq!(body["kind"], "bad_request", "{bad}: {body}");
        assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()));
    }

    let url = api.url();
    let (code, out, err) = cli(&["can-fit", "4096", "--url", &url]);
    assert_eq!(code, 0, "fits: {out}{err}");
    assert!(out.starts_with("4096 MB fits"), "{out}");
    let (code, out, err) = cli(&["can-fit", "20480", "--priority", "100", "--url", &url]);
    assert_eq!(code, 1, "does not fit: {out}{err}");
    assert!(out.contains("would preempt: cosyvoice"), "{out}");
    let (code, out, _) = cli(&["can-fit", "20480", "--json", "--url", &url]);
    assert_eq!(code, 1);
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["mb"], 20480);
    // Nothing changed: CosyVoice still runs.
    assert_eq!(api.state("cosyvoice"), "ready");
}

/// Receives the next notification, failing after `CONVERGE`.
fn notification(socket: &UnixDatagram) -> String {
    socket.set_read_timeout(Some(common::CONVERGE)).unwrap();
    let mut buffer = [0u8; 4096];
    let n = socket
        .recv(&mut buffer)
        .expect("a notification from the daemon in time");
    String::from_utf8_lossy(&buffer[..n]).into_owned()
}

#[test]
fn systemd_is_told_ready_after_adoption_then_stopping() {
    let mut h = Harness::new(mcn_inventory());
    let api = h.serve("");
    assert_eq!(api.post("/gpu/prepare-phase/2").code, 200);
    let vidi_pid = api.status()["services"]["vidi"]["pids"][0].clone();
    h.kill_daemon();

    let socket_path = h.path("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    h.daemon_env
        .push(("NOTIFY_SOCKET".into(), socket_path.display().to_string()));
    h.start_daemon_with(&["serve"]);
    let ready = notification(&socket);
    assert!(
        ready.starts_with("READY=1\nSTATUS=phase 2; "),
        "the first message is READY=1 with a status line: {ready:?}"
    );
    // Ready means adopted: the running Vidi is the same process (being checked, or
    // checked, ready), not a second start.
    let status = api.status();
    assert_eq!(status["first_round_done"], true);
    let vidi = &status["services"]["vidi"];
    assert!(
        vidi["state"] == "starting" || vidi["state"] == "ready",
        "{status}"
    );
    assert_eq!(vidi["pids"][0], vidi_pid);
    assert_eq!(h.instances_of("vidi"), 1);

    assert_eq!(api.post("/gpu/prepare-phase/3").code, 200);
    let mut lines = Vec::new();
    while !lines
        .iter()
        .any(|l: &String| l.contains("phase 3; 1/4 services ready"))
    {
        lines.push(notification(&socket));
    }
    assert!(lines.iter().all(|l| l.starts_with("STATUS=")), "{lines:?}");

    let pid = h.daemon.as_ref().unwrap().id() as i32;
    // SAFETY: kill(2) on the daemon this test started; SIGTERM is what systemctl stop sends.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let stopping = loop {
        let message = notification(&socket);
        if !message.starts_with("STATUS=phase") {
            break message;
        }
    };
    assert!(stopping.starts_with("STOPPING=1"), "{stopping:?}");
}

#[test]
fn without_notify_socket_nothing_is_sent_and_the_daemon_runs() {
    let mut h = Harness::new(vec![Standin::new("vidi", 4096, 40, "[2]")]);
    let api = h.serve("");
    eventually(
        "the first round is done",
        || api.status()["first_round_done"] == true,
        || h.daemon_log(),
    );
    assert!(!h.daemon_log().contains("systemd"), "{}", h.daemon_log());
}

/// A simulated 24 GB GPU with nothing on it (no desktop), at `path`.
fn empty_gpu(path: &std::path::Path) -> SimGpuDir {
    let device = DeviceSpec {
        name: "Simulated RTX 4090".into(),
        total_mb: 24576,
        baseline_mb: 0,
        reclaim_ms: 100,
        temperature_c: 40,
        utilization_pct: 0,
    };
    SimGpuDir::create(path, &device).expect("simulated GPU")
}

/// One daemon of the per-GPU recipe: its own GPU (a simulated folder), API port,
/// state_dir, desired-state file and lease key, and one service started with
/// `CUDA_VISIBLE_DEVICES` naming its GPU.
struct GpuDaemon {
    api: Api,
    child: Child,
    service_port: u16,
}

impl Drop for GpuDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        kill_standin(self.service_port);
    }
}

/// Starts the daemon for GPU `index` of the machine `root` (whose GPUs are the folders
/// `root/gpus/N`). Its service runs where `CUDA_VISIBLE_DEVICES` says: the stand-in
/// allocates on `gpus/$CUDA_VISIBLE_DEVICES`, as CUDA would on the GPU that env names.
fn start_gpu_daemon(root: &std::path::Path, index: u32, redis_url: &str) -> GpuDaemon {
    let dir = root.join(format!("gpu{index}"));
    std::fs::create_dir_all(dir.join("desired-state")).unwrap();
    std::fs::write(dir.join("desired-state/state.yaml"), "phase: 1\n").unwrap();
    let (api_port, service_port) = (free_port(), free_port());
    let command = format!(
        "exec {} --sim-dir {}/gpus/$CUDA_VISIBLE_DEVICES --name llm --vram-mb 20000 --port {service_port} --start-delay-ms 100",
        standin_binary().display(),
        root.display()
    );
    let config = format!(
        "api: {{ listen: \"127.0.0.1:{api_port}\" }}\n\
         gpu: {{ index: {index}, simulated: {:?}, reserve_mb: 512 }}\n\
         lease: {{ redis_url: {redis_url:?}, key: gpu_lock_gpu{index}, wait_ms: 200 }}\n\
         desired_state: desired-state/state.yaml\n\
         state_dir: state\n\
         resync_ms: 500\n\
         services:\n  llm:\n    kind: native\n    command: {command:?}\n    env: {{ CUDA_VISIBLE_DEVICES: \"{index}\" }}\n    vram_mb: 20000\n    priority: 10\n    phases: [1]\n    health: {{ url: \"http://127.0.0.1:{service_port}/health\" }}\n",
        root.join(format!("gpus/{index}"))
    );
    std::fs::write(dir.join("gpu-manager.yaml"), config).unwrap();
    let log = std::fs::File::create(dir.join("daemon.log")).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_gpu-manager"))
        .args(["serve", "--config"])
        .arg(dir.join("gpu-manager.yaml"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start gpu-manager");
    GpuDaemon {
        api: Api {
            port: api_port,
            token: None,
        },
        child,
        service_port,
    }
}

#[test]
fn one_daemon_per_gpu_places_services_by_cuda_visible_devices() {
    let Some(redis) = redis_with_python() else {
        return;
    };
    let root = tempfile::tempdir().unwrap();
    let gpus: Vec<SimGpuDir> = (0..2)
        .map(|index| empty_gpu(&root.path().join(format!("gpus/{index}"))))
        .collect();
    // A Python consumer holds GPU 0's lease: only daemon 0 must wait for it.
    let lock = PythonLock::hold(&redis, "gpu_lock_gpu0", 60);
    let daemons: Vec<GpuDaemon> = (0..2)
        .map(|index| start_gpu_daemon(root.path(), index, &redis.url()))
        .collect();
    let log = |index: usize| {
        std::fs::read_to_string(root.path().join(format!("gpu{index}/daemon.log")))
            .unwrap_or_default()
    };
    let allocated = |index: usize| -> Vec<u64> {
        gpus[index]
            .snapshot()
            .unwrap()
            .processes
            .iter()
            .map(|a| a.mb)
            .collect()
    };

    eventually(
        "GPU 1's service is ready on GPU 1",
        || http_get(daemons[1].service_port, "/health").is_some_and(|(code, _)| code == 200),
        || log(1),
    );
    assert_eq!(allocated(1), [20000]);
    assert!(allocated(0).is_empty(), "GPU 0 waits for its lease");
    assert_eq!(daemons[0].api.state("llm"), "stopped");
    assert!(
        daemons[0].api.status()["lock"]["holder"]
            .as_str()
            .is_some_and(|h| h == lock.token),
        "daemon 0 names the Python holder of its key"
    );

    lock.release();
    eventually(
        "GPU 0's service is ready on GPU 0",
        || http_get(daemons[0].service_port, "/health").is_some_and(|(code, _)| code == 200),
        || log(0),
    );
    // 40000 MB in all: only possible because each service went to its own 24 GB GPU.
    assert_eq!(allocated(0), [20000]);
    assert_eq!(allocated(1), [20000]);
    for (index, gpu) in gpus.iter().enumerate() {
        assert!(gpu.oom_log().unwrap().is_empty(), "GPU {index} OOM");
        let api = &daemons[index].api;
        api.wait_state("llm", "ready");
        // Each daemon sees its own GPU only (its next observation, once the service runs).
        eventually(
            &format!("daemon {index} sees 20000 MB used on its GPU"),
            || api.status()["vram"]["used_mb"] == 20000,
            || api.status().to_string(),
        );
        assert_eq!(api.status()["lock"]["key"], format!("gpu_lock_gpu{index}"));
    }
}

/// `gpu-manager doctor --json` on a config: (exit code, check -> [(status, detail, fix)]).
fn doctor(config: &std::path::Path, env: &[(&str, &str)]) -> (i32, Vec<Value>) {
    let output = Command::new(env!("CARGO_BIN_EXE_gpu-manager"))
        .args(["doctor", "--json", "--config"])
        .arg(config)
        .envs(env.iter().copied())
        .output()
        .expect("run gpu-manager doctor");
    let report: Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "doctor --json is not JSON ({e}): {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    });
    assert_eq!(report["ok"], output.status.success(), "{report}");
    let checks = report["checks"].as_array().unwrap().clone();
    (output.status.code().unwrap_or(-1), checks)
}

/// The findings of one check, as (status, detail) pairs.
fn findings(checks: &[Value], check: &str) -> Vec<(String, String)> {
    checks
        .iter()
        .filter(|c| c["check"] == check)
        .map(|c| {
            if c["status"] != "PASS" {
                assert!(
                    c["fix"].as_str().is_some_and(|f| !f.is_empty()),
                    "a {} says what to do: {c}",
                    c["status"]
                );
            }
            (
                c["status"].as_str().unwrap().to_owned(),
                c["detail"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[test]
fn doctor_passes_a_healthy_host_and_only_warns_without_redis() {
    let h = Harness::new(mcn_inventory());
    let (code, checks) = doctor(
        &h.config_path(),
        &[("FAKE_NVML_DIR", h.gpu.path().to_str().unwrap())],
    );
    assert_eq!(code, 0, "{checks:#?}");
    let gpu = findings(&checks, "gpu");
    assert_eq!(gpu.len(), 1);
    assert_eq!(gpu[0].0, "PASS");
    assert!(
        gpu[0].1.contains("driver")
            && gpu[0].1.contains("Simulated RTX 4090")
            && gpu[0].1.contains("24576 MB total"),
        "{gpu:?}"
    );
    for check in [
        "config",
        "command",
        "port",
        "api",
        "phases",
        "state_dir",
        "desired",
    ] {
        let found = findings(&checks, check);
        assert!(!found.is_empty(), "{check} was checked");
        assert!(
            found.iter().all(|(status, _)| status == "PASS"),
            "{check}: {found:?}"
        );
    }
    assert_eq!(findings(&checks, "command").len(), 4);
    assert_eq!(findings(&checks, "phases").len(), 3);
    assert_eq!(findings(&checks, "redis")[0].0, "WARN");
    assert_eq!(
        findings(&checks, "docker")[0].0,
        "PASS",
        "no docker services"
    );
}

#[test]
fn doctor_fails_each_broken_thing_and_says_how_to_fix_it() {
    let dir = tempfile::tempdir().unwrap();
    let gpu = empty_gpu(&dir.path().join("gpu"));
    // Ports held by this test: a foreign process to the daemon.
    let api_taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let health_taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port_of = |l: &std::net::TcpListener| l.local_addr().unwrap().port();
    std::fs::write(dir.path().join("state"), "a file where a folder should be").unwrap();
    let config = format!(
        "api: {{ listen: \"127.0.0.1:{}\" }}\n\
         gpu: {{ simulated: {:?}, reserve_mb: 512 }}\n\
         lease: {{ redis_url: \"redis://127.0.0.1:{}\" }}\n\
         state_dir: state\n\
         services:\n\
         \x20 big:\n    kind: native\n    command: [\"no-such-program-for-doctor\"]\n    vram_mb: 20000\n    priority: 30\n    phases: [2]\n\
         \x20 vidi:\n    kind: native\n    command: [\"true\"]\n    workdir: /nonexistent/vidi\n    vram_mb: 4096\n    priority: 40\n    phases: [2]\n    health: {{ url: \"http://127.0.0.1:{}/health\" }}\n\
         \x20 tts:\n    kind: docker\n    container: doctor-missing-{}\n    vram_mb: 1024\n    priority: 50\n    phases: [3]\n",
        port_of(&api_taken),
        gpu.path(),
        free_port(),
        port_of(&health_taken),
        std::process::id()
    );
    let path = dir.path().join("gpu-manager.yaml");
    std::fs::write(&path, config).unwrap();
    let no_engine = format!("unix://{}/no-docker.sock", dir.path().display());
    let (code, checks) = doctor(&path, &[("DOCKER_HOST", no_engine.as_str())]);
    assert_eq!(code, 1, "{checks:#?}");

    let failed = |check: &str, needle: &str| {
        let found = findings(&checks, check);
        assert!(
            found
                .iter()
                .any(|(status, detail)| status == "FAIL" && detail.contains(needle)),
            "{check} should FAIL with {needle:?}: {found:?}"
        );
    };
    let me = format!("pid {}", std::process::id());
    failed("command", "no-such-program-for-doctor");
    failed("command", "/nonexistent/vidi does not exist");
    failed("docker", "no-docker.sock");
    failed("port", &format!("port {} of", port_of(&health_taken)));
    failed("port", &me);
    failed("api", &me);
    failed("redis", "unreachable");
    failed(
        "phases",
        "phase 2: vidi 4096 MB + big 20000 MB = 24096 MB of a 24064 MB budget",
    );
    failed("state_dir", "is not a folder");
    assert_eq!(
        findings(&checks, "phases").len(),
        2,
        "phase 3 fits: {checks:#?}"
    );
}

#[test]
fn doctor_points_at_the_offending_key_of_an_invalid_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "services:\n  a:\n    kind: native\n    vram_mb: lots\n    command: \"true\"\n",
    )
    .unwrap();
    let (code, checks) = doctor(&path, &[]);
    assert_eq!(code, 1);
    let config = findings(&checks, "config");
    assert_eq!(config.len(), 1, "nothing else is checked: {checks:#?}");
    assert!(
        config[0]
            .1
            .contains("bad.yaml:4:5: services.a.vram_mb: invalid type"),
        "{config:?}"
    );
    let (code, _, err) = cli(&["validate", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("bad.yaml:4:5: services.a.vram_mb"), "{err}");
}

#[test]
fn doctor_names_who_holds_the_lease_key() {
    let Some(redis) = redis_with_python() else {
        return;
    };
    let h = Harness::new(mcn_inventory());
    h.write_config(&common::lease::lease_block(&redis, 5000, 500));
    let fake = [("FAKE_NVML_DIR", h.gpu.path().to_str().unwrap())];
    let (code, checks) = doctor(&h.config_path(), &fake);
    assert_eq!(code, 0, "{checks:#?}");
    assert_eq!(findings(&checks, "redis")[0].0, "PASS");
    assert!(findings(&checks, "redis")[0].1.contains("gpu_lock is free"));

    let lock = PythonLock::hold(&redis, "gpu_lock", 30);
    let (_, checks) = doctor(&h.config_path(), &fake);
    let redis_finding = &findings(&checks, "redis")[0];
    assert!(
        redis_finding.1.contains(&format!("held by {}", lock.token)),
        "{redis_finding:?}"
    );
    lock.release();
}

/// With services that park and drain: the CUDA checkpoint API is checked (through the
/// fake libcuda), a running service's drain probe and park requests answer (PASS, and a
/// `busy_if` pointer its answer lacks is a WARN), and a stopped service's are a WARN, never
/// a FAIL.
#[test]
fn doctor_checks_the_cuda_checkpoint_api_drain_probes_and_park_urls() {
    let drain = |port: u16, pointers: &str| {
        format!("    drain: {{ url: \"http://127.0.0.1:{port}/queue\", busy_if: [{pointers}] }}\n")
    };
    let mut cosyvoice = Standin::new("cosyvoice", 4096, 50, "[3]");
    let base = format!("http://127.0.0.1:{}", cosyvoice.port);
    cosyvoice.config_extra = format!(
        "    park: {{ kind: http, url: \"{base}/park\", resume_url: \"{base}/resume\" }}\n{}",
        drain(cosyvoice.port, "\"/queue_running\", \"/no_such_queue\"")
    );
    let mut vidi = Standin::new("vidi", 4096, 40, "[2]");
    vidi.config_extra = format!(
        "    park: {{ kind: cuda-checkpoint }}\n{}",
        drain(vidi.port, "\"/queue_running\"")
    );
    let mut h = Harness::new(vec![cosyvoice, vidi]);
    h.gpu_config = h.gpu_config.replace(
        "reserve_mb: 512",
        &format!(
            "reserve_mb: 512, cuda_library: {:?}",
            common::built("libcuda.so")
        ),
    );
    h.write_config("");
    let port = h.service("cosyvoice").port;
    let mut running = Command::new(standin_binary())
        .args(h.service("cosyvoice").args())
        .env("FAKE_NVML_DIR", h.gpu.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the cosyvoice stand-in");
    eventually(
        "the cosyvoice stand-in answers",
        || http_get(port, "/health").is_some_and(|(code, _)| code == 200),
        || "no answer".into(),
    );

    let (_, checks) = doctor(
        &h.config_path(),
        &[("FAKE_NVML_DIR", h.gpu.path().to_str().unwrap())],
    );
    kill_standin(port);
    let _ = running.wait();

    let cuda = findings(&checks, "cuda");
    assert_eq!(cuda.len(), 1, "{checks:#?}");
    assert_eq!(cuda[0].0, "PASS", "{cuda:?}");
    assert!(cuda[0].1.contains("checkpoint API present"), "{cuda:?}");

    let drains = findings(&checks, "drain");
    let of = |list: &[(String, String)], service: &str| -> Vec<(String, String)> {
        list.iter()
            .filter(|(_, detail)| detail.starts_with(&format!("{service}:")))
            .cloned()
            .collect()
    };
    let cosyvoice_drain = of(&drains, "cosyvoice");
    assert_eq!(cosyvoice_drain.len(), 1, "{drains:?}");
    assert_eq!(cosyvoice_drain[0].0, "WARN", "{drains:?}");
    assert!(
        cosyvoice_drain[0].1.contains("/no_such_queue")
            && !cosyvoice_drain[0].1.contains("/queue_running"),
        "{drains:?}"
    );
    let vidi_drain = of(&drains, "vidi");
    assert_eq!(vidi_drain.len(), 1, "{drains:?}");
    assert_eq!(vidi_drain[0].0, "WARN", "not running: {drains:?}");

    let parks = findings(&checks, "park");
    assert_eq!(parks.len(), 2, "park.url and park.resume_url: {parks:?}");
    assert!(
        parks.iter().all(|(status, detail)| status == "PASS"
            && detail.starts_with("cosyvoice:")
            && detail.contains("takes connections")),
        "{parks:?}"
    );
}

/// `proxy:` keys (docs/ARCHITECTURE.md, "The demand proxy"): a listen address another
/// process holds is a FAIL naming the key, the address, the OS error and the holder; an
/// upstream that is the proxy's own address in a form the config check cannot see (an
/// IPv4-mapped IPv6 address) is a FAIL; with the daemon running, the listen addresses it
/// holds itself pass.
#[test]
fn doctor_checks_that_each_proxy_listen_can_be_bound_and_its_upstream_is_elsewhere() {
    let proxied = |name, vram_mb, priority, phases, keys: String| {
        let mut standin = Standin::new(name, vram_mb, priority, phases);
        standin
            .config_extra
            .push_str(&format!("    proxy: {{ {keys} }}\n"));
        standin
    };
    // A port this test holds: a foreign process to the daemon.
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = holder.local_addr().unwrap().port();
    let (free, looped) = (free_port(), free_port());
    let h = Harness::new(vec![
        proxied(
            "ollama",
            18432,
            10,
            "[]",
            format!("listen: \"127.0.0.1:{taken}\""),
        ),
        proxied(
            "vidi",
            4096,
            40,
            "[2]",
            format!("listen: \"127.0.0.1:{free}\""),
        ),
        proxied(
            "cosyvoice",
            4096,
            50,
            "[3]",
            format!(
                "listen: \"127.0.0.1:{looped}\", upstream: \"http://[::ffff:127.0.0.1]:{looped}\""
            ),
        ),
    ]);
    h.write_config(&format!("api: {{ listen: \"127.0.0.1:{}\" }}", free_port()));
    let fake = [("FAKE_NVML_DIR", h.gpu.path().to_str().unwrap())];
    let (code, checks) = doctor(&h.config_path(), &fake);
    assert_eq!(code, 1, "{checks:#?}");
    let proxy = findings(&checks, "proxy");
    let about = |service: &str| -> Vec<(String, String)> {
        proxy
            .iter()
            .filter(|(_, detail)| detail.starts_with(&format!("{service}: ")))
            .cloned()
            .collect()
    };
    let ollama = about("ollama");
    assert!(
        ollama.iter().any(|(status, detail)| status == "FAIL"
            && detail.contains(&format!(
                "services.ollama.proxy.listen 127.0.0.1:{taken} cannot be bound: "
            ))
            && detail.contains("in use")
            && detail.contains(&format!("pid {}", std::process::id()))),
        "{ollama:?}"
    );
    let vidi = about("vidi");
    assert_eq!(vidi.len(), 2, "its upstream and its listen: {vidi:?}");
    assert!(vidi.iter().all(|(status, _)| status == "PASS"), "{vidi:?}");
    assert!(
        vidi.iter().any(|(_, detail)| detail
            == &format!("vidi: services.vidi.proxy.listen 127.0.0.1:{free} can be bound")),
        "{vidi:?}"
    );
    let cosyvoice = about("cosyvoice");
    assert!(
        cosyvoice.iter().any(|(status, detail)| status == "FAIL"
            && detail.contains(&format!(
                "the proxy's own listen address 127.0.0.1:{looped}"
            ))),
        "{cosyvoice:?}"
    );

    drop(holder);

    // The daemon runs and holds its proxy's listen address: that is no failure.
    let listen = free_port();
    let mut h = Harness::new(vec![proxied(
        "vidi",
        4096,
        40,
        "[2]",
        format!("listen: \"127.0.0.1:{listen}\""),
    )]);
    let _api = h.serve("");
    let fake = [("FAKE_NVML_DIR", h.gpu.path().to_str().unwrap())];
    let (_, checks) = doctor(&h.config_path(), &fake);
    let proxy = findings(&checks, "proxy");
    assert!(
        proxy.iter().all(|(status, _)| status == "PASS"),
        "{proxy:?}"
    );
    assert!(
        proxy.iter().any(|(_, detail)| detail.contains(&format!(
            "services.vidi.proxy.listen 127.0.0.1:{listen} is held by the running daemon"
        ))),
        "{proxy:?}"
    );
}
