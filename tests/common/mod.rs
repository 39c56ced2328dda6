//! The integration-test harness: a simulated GPU folder, stand-in services with the
//! requirements' sizes, a config, and the real `gpu-manager` binary reading the GPU
//! through the fake libnvidia-ml (so the real nvml-wrapper path runs).
#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod api;
pub mod docker;
pub mod process_stats;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use sim_gpu::{DeviceSpec, SimGpuDir};

pub mod lease;
mod redis_server;

/// Generous: these machines are small and shared.
pub const CONVERGE: Duration = Duration::from_secs(30);

pub fn target_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_gpu-manager"))
        .parent()
        .expect("binary folder")
        .to_owned()
}

/// A file that the workspace build leaves beside the daemon's binary: cargo test builds
/// only the crate under test, not the other members' binaries and cdylibs.
pub fn built(file: &str) -> PathBuf {
    let path = target_dir().join(file);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace` first",
        path.display()
    );
    path
}

pub fn standin_binary() -> PathBuf {
    built("gpu-standin")
}

pub fn fake_nvml_library() -> PathBuf {
    built("libnvidia_ml.so")
}

/// Where a stand-in runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Runtime {
    /// A native service: the daemon runs the stand-in binary itself.
    Native,
    /// A docker service: the stand-in in this container (see `docker.rs`).
    Docker { container: String },
}

/// One stand-in service of the inventory.
#[derive(Clone, Debug)]
pub struct Standin {
    pub name: &'static str,
    /// What the stand-in allocates at start.
    pub vram_mb: u64,
    /// The config's `vram_mb` when it is not what the stand-in takes (a wrong guess).
    pub declared_vram_mb: Option<u64>,
    pub priority: i64,
    pub phases: &'static str,
    pub start_delay_ms: u64,
    pub stop_delay_ms: u64,
    pub extra_args: Vec<String>,
    pub stop_timeout_ms: u64,
    pub start_timeout_ms: u64,
    pub port: u16,
    pub runtime: Runtime,
    /// Speaks Ollama's API with this model loaded, and is parked through it
    /// (`park: {kind: ollama}`, with `park_timeout_ms` when set).
    pub ollama_model: Option<&'static str>,
    pub park_timeout_ms: Option<u64>,
    /// A native service run by `sh -c` with this script, in which `STANDIN` stands for
    /// the stand-in's own command line (e.g. `noisy-loop & exec STANDIN`).
    pub shell_script: Option<String>,
    /// More lines of the service's config block (e.g. `    log: journald\n`).
    pub config_extra: String,
}

impl Standin {
    pub fn new(name: &'static str, vram_mb: u64, priority: i64, phases: &'static str) -> Self {
        Self {
            name,
            vram_mb,
            declared_vram_mb: None,
            priority,
            phases,
            start_delay_ms: 300,
            stop_delay_ms: 100,
            extra_args: Vec::new(),
            stop_timeout_ms: 5000,
            start_timeout_ms: 15000,
            port: free_port(),
            runtime: Runtime::Native,
            ollama_model: None,
            park_timeout_ms: None,
            shell_script: None,
            config_extra: String::new(),
        }
    }

    /// Parks over HTTP (`park: {kind: http}`): the stand-in's `/park` and `/resume`,
    /// keeping `residual_mb`, a resume taking `wake_ms`.
    pub fn parking_over_http(mut self, residual_mb: u64, wake_ms: u64) -> Self {
        let base = format!("http://127.0.0.1:{}", self.port);
        self.extra_args.extend([
            "--residual-mb".into(),
            residual_mb.to_string(),
            "--wake-ms".into(),
            wake_ms.to_string(),
        ]);
        self.config_extra.push_str(&format!(
            "    park: {{ kind: http, url: \"{base}/park\", resume_url: \"{base}/resume\", residual_mb: {residual_mb}, timeout_ms: 3000 }}\n"
        ));
        self
    }

    /// Parks over HTTP (300 ms wake) keeping `residual_mb`, and drains on its
    /// ComfyUI-shaped `/queue` for at most `drain_ms`.
    pub fn parking(self, residual_mb: u64, drain_ms: u64) -> Self {
        let mut standin = self.parking_over_http(residual_mb, 300);
        let base = format!("http://127.0.0.1:{}", standin.port);
        standin.config_extra.push_str(&format!(
            "    drain: {{ url: \"{base}/queue\", busy_if: [\"/queue_running\", \"/queue_pending\"], timeout_ms: {drain_ms} }}\n"
        ));
        standin
    }

    /// The stand-in's arguments after the program; the simulated GPU folder is given
    /// apart (an environment variable for native services, an argument in containers).
    pub fn args(&self) -> Vec<String> {
        let mut args = vec![
            "--name".into(),
            self.name.into(),
            "--vram-mb".into(),
            self.vram_mb.to_string(),
            "--port".into(),
            self.port.to_string(),
            "--start-delay-ms".into(),
            self.start_delay_ms.to_string(),
            "--stop-delay-ms".into(),
            self.stop_delay_ms.to_string(),
        ];
        if let Some(model) = self.ollama_model {
            args.extend(["--ollama".into(), model.into()]);
        }
        args.extend(self.extra_args.iter().cloned());
        args
    }
}

/// The requirements' inventory: ComfyUI 20 GB p100 phase 4, CosyVoice 4 GB p50 phase 3,
/// Vidi 4 GB p40 phase 2, Ollama 18 GB p10 no phase.
pub fn mcn_inventory() -> Vec<Standin> {
    vec![
        Standin::new("comfyui", 20480, 100, "[4]"),
        Standin::new("cosyvoice", 4096, 50, "[3]"),
        Standin::new("vidi", 4096, 40, "[2]"),
        Standin::new("ollama", 18432, 10, "[]"),
    ]
}

/// A port nothing listens on, for a stand-in to bind later. Taken below the kernel's
/// ephemeral range (from 32768), so that no outgoing connection holds it meanwhile, and
/// never handed out twice by this process, so that parallel tests do not share one.
/// Each process starts at its own place in the range, as test binaries of other runs
/// may be picking too.
pub fn free_port() -> u16 {
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(7919) % SPAN;
    for _ in 0..SPAN {
        let port = (FIRST + (start + NEXT.fetch_add(1, Ordering::SeqCst)) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {FIRST}..{}", FIRST + SPAN);
}

pub struct Harness {
    pub dir: tempfile::TempDir,
    pub gpu: SimGpuDir,
    pub services: Vec<Standin>,
    pub daemon: Option<Child>,
    /// The config's `gpu:` block.
    pub gpu_config: String,
    /// Environment variables the daemon is started with (e.g. `DOCKER_HOST`).
    pub daemon_env: Vec<(String, String)>,
    /// A command the daemon is started through (e.g. `setpriv` to run it as another
    /// user); empty: started directly.
    pub daemon_wrapper: Vec<String>,
    /// The config's `resync_ms`: 500 unless a test wants the daemon's own pace.
    pub resync_ms: u64,
}

impl Harness {
    /// A 24 GB simulated GPU with a 1 GB desktop baseline and 300 ms reclaim.
    pub fn new(services: Vec<Standin>) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let gpu = SimGpuDir::create(
            dir.path().join("gpu"),
            &DeviceSpec {
                name: "Simulated RTX 4090".into(),
                total_mb: 24576,
                baseline_mb: 1024,
                reclaim_ms: 300,
                temperature_c: 50,
                utilization_pct: 7,
            },
        )
        .expect("simulated GPU");
        let harness = Self {
            dir,
            gpu,
            services,
            daemon: None,
            gpu_config: format!(
                "{{ nvml_library: {:?}, reserve_mb: 512, reclaim_timeout_ms: 10000 }}",
                fake_nvml_library()
            ),
            daemon_env: Vec::new(),
            daemon_wrapper: Vec::new(),
            resync_ms: 500,
        };
        harness.write_config("");
        harness.set_desired("phase: null\n");
        harness
    }

    pub fn path(&self, relative: &str) -> PathBuf {
        self.dir.path().join(relative)
    }

    pub fn config_path(&self) -> PathBuf {
        self.path("gpu-manager.yaml")
    }

    /// Writes the config; `extra` is appended at the top level (e.g. an `api:` block).
    pub fn write_config(&self, extra: &str) {
        let standin = standin_binary();
        let mut text = format!(
            "gpu: {}\n\
             desired_state: desired-state/state.yaml\n\
             state_dir: state\n\
             resync_ms: {}\n{extra}\nservices:\n",
            self.gpu_config, self.resync_ms
        );
        for s in &self.services {
            let runtime = match &s.runtime {
                Runtime::Native => {
                    let mut argv = vec![standin.display().to_string()];
                    argv.extend(s.args());
                    let command = match &s.shell_script {
                        Some(script) => format!("{:?}", script.replace("STANDIN", &argv.join(" "))),
                        None => format!("{argv:?}"),
                    };
                    format!(
                        "    kind: native\n    command: {command}\n    env: {{ FAKE_NVML_DIR: {:?} }}\n{}",
                        self.gpu.path(),
                        s.config_extra
                    )
                }
                Runtime::Docker { container } => {
                    let mut lines = format!("    kind: docker\n    container: {container}\n");
                    if s.ollama_model.is_some() {
                        let timeout = s
                            .park_timeout_ms
                            .map(|ms| format!(", timeout_ms: {ms}"))
                            .unwrap_or_default();
                        lines.push_str(&format!(
                            "    park: {{ kind: ollama, url: \"http://127.0.0.1:{}\"{timeout} }}\n",
                            s.port
                        ));
                    }
                    lines + &s.config_extra
                }
            };
            text.push_str(&format!(
                "  {}:\n{runtime}    vram_mb: {}\n    priority: {}\n    phases: {}\n    health: {{ url: \"http://127.0.0.1:{}/health\", timeout_ms: 1000 }}\n    start_timeout_ms: {}\n    stop_timeout_ms: {}\n",
                s.name, s.declared_vram_mb.unwrap_or(s.vram_mb), s.priority, s.phases, s.port, s.start_timeout_ms, s.stop_timeout_ms
            ));
        }
        std::fs::write(self.config_path(), text).expect("write config");
    }

    /// Replaces the desired-state file the way an editor would (write + rename).
    pub fn set_desired(&self, yaml: &str) {
        let path = self.path("desired-state/state.yaml");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let temp = self.path("desired-state/.edit.swp");
        std::fs::write(&temp, yaml).unwrap();
        std::fs::rename(&temp, &path).unwrap();
    }

    pub fn start_daemon(&mut self) {
        self.start_daemon_with(&["watch"]);
    }

    pub fn start_daemon_with(&mut self, subcommand: &[&str]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path("daemon.log"))
            .expect("daemon log");
        let binary = env!("CARGO_BIN_EXE_gpu-manager");
        let mut command = match self.daemon_wrapper.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(binary);
                command
            }
            None => Command::new(binary),
        };
        let child = command
            .args(subcommand)
            .arg("--config")
            .arg(self.config_path())
            .env("FAKE_NVML_DIR", self.gpu.path())
            .env("RUST_LOG", "info,gpu_manager=debug")
            .envs(self.daemon_env.iter().cloned())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start gpu-manager");
        self.daemon = Some(child);
    }

    /// Kills the daemon without warning (SIGKILL), as a crash would.
    pub fn kill_daemon(&mut self) {
        if let Some(mut child) = self.daemon.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.path("daemon.log")).unwrap_or_default()
    }

    pub fn service(&self, name: &str) -> &Standin {
        self.services
            .iter()
            .find(|s| s.name == name)
            .expect("service in the inventory")
    }

    /// True when the stand-in's health URL answers 200.
    pub fn is_ready(&self, name: &str) -> bool {
        http_get(self.service(name).port, "/health").map(|(code, _)| code) == Some(200)
    }

    /// True when nothing listens on the stand-in's port.
    pub fn is_down(&self, name: &str) -> bool {
        TcpStream::connect(("127.0.0.1", self.service(name).port)).is_err()
    }

    /// Live allocations on the simulated GPU: pid -> MB.
    pub fn allocations(&self) -> BTreeMap<u32, u64> {
        self.gpu
            .snapshot()
            .expect("GPU snapshot")
            .processes
            .iter()
            .map(|a| (a.pid, a.mb))
            .collect()
    }

    /// The MB each live allocation holds, ordered by pid.
    pub fn allocated_mb(&self) -> Vec<u64> {
        self.allocations().into_values().collect()
    }

    pub fn oom_log(&self) -> Vec<String> {
        self.gpu.oom_log().expect("oom.log")
    }

    /// Waits for `what` to hold, failing with the daemon's log if it does not.
    pub fn wait_until(&self, description: &str, what: impl Fn(&Self) -> bool) {
        let deadline = Instant::now() + CONVERGE;
        while Instant::now() < deadline {
            if what(self) {
                return;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!(
            "timed out waiting for: {description}\n--- daemon log ---\n{}",
            self.daemon_log()
        );
    }

    /// Waits until exactly `ready` are ready and every other service is down.
    pub fn wait_converged(&self, ready: &[&str]) {
        let names: Vec<&str> = self.services.iter().map(|s| s.name).collect();
        self.wait_until(&format!("exactly {ready:?} ready"), |h| {
            names.iter().all(|n| {
                if ready.contains(n) {
                    h.is_ready(n)
                } else {
                    h.is_down(n)
                }
            })
        });
    }

    /// The requirements' AC-1 by file: phase 2 -> 3 -> 4, each step converging on its
    /// one service, which alone holds VRAM, with no OOM. `after_step(h, ready)` adds a
    /// caller's checks after each step.
    pub fn run_ac1_by_file(&self, after_step: impl Fn(&Self, &str)) {
        for (phase, ready, mb) in [
            (2, "vidi", 4096),
            (3, "cosyvoice", 4096),
            (4, "comfyui", 20480),
        ] {
            self.set_desired(&format!("phase: {phase}\n"));
            self.wait_converged(&[ready]);
            // The stop and the start run side by side when both fit: the stopped
            // service's memory may still be in the driver's teardown for a moment.
            self.wait_until(
                &format!("only {ready} holds VRAM after phase {phase}"),
                |h| h.allocations().into_values().eq([mb]),
            );
            assert!(self.oom_log().is_empty(), "OOM: {:?}", self.oom_log());
            after_step(self, ready);
        }
    }

    /// The requirements' AC-3 by file: CosyVoice runs (phase 3), then ComfyUI is pinned:
    /// CosyVoice is preempted and ComfyUI alone holds VRAM, with no OOM (the stand-in
    /// allocates at start, so starting before CosyVoice's memory was reclaimed would
    /// have been refused and logged). `after_phase_3` and `after_pin` add a caller's checks.
    pub fn run_ac3_by_file(&self, after_phase_3: impl Fn(&Self), after_pin: impl Fn(&Self)) {
        self.set_desired("phase: 3\n");
        self.wait_converged(&["cosyvoice"]);
        after_phase_3(self);
        self.set_desired("phase: 3\npinned: [comfyui]\n");
        self.wait_converged(&["comfyui"]);
        after_pin(self);
        assert_eq!(self.allocated_mb(), [20480]);
        assert!(self.oom_log().is_empty(), "OOM: {:?}", self.oom_log());
        assert!(
            self.daemon_log().contains("preempted"),
            "the stop says why:\n{}",
            self.daemon_log()
        );
    }

    /// Counts processes whose command line runs this stand-in (to detect double starts).
    pub fn instances_of(&self, name: &str) -> usize {
        let needle = format!("--name\0{name}\0");
        std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok())
            .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
            .filter(|cmd| {
                let text = String::from_utf8_lossy(cmd);
                text.contains(&needle) && text.contains(&self.service(name).port.to_string())
            })
            .count()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.kill_daemon();
        // Stop every stand-in this test started, whatever state the test left.
        for service in &self.services {
            if let Runtime::Docker { container } = &service.runtime {
                docker::remove_container(container);
            }
            kill_standin(service.port);
        }
    }
}

/// Kills the stand-in serving `port` (SIGKILL), wherever a test left it.
pub fn kill_standin(port: u16) {
    let _ = Command::new("pkill")
        .args(["-KILL", "-f", &format!("gpu-standin.*--port {port}")])
        .status();
}

/// A minimal HTTP GET on 127.0.0.1: (status code, body).
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let code = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((code, body))
}

/// `kill -SIGNAL pid` (TERM, KILL, STOP, CONT...).
pub fn send_signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} {pid} failed");
}

pub fn pid_is_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                s.rsplit_once(") ")
                    .map(|(_, r)| r.starts_with('Z'))
                    .unwrap_or(false)
            })
            .unwrap_or(true)
}
