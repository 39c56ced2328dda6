//! Docker fixtures: the stand-in image (built once per test run from the workspace's
//! `gpu-standin` and the shared libraries it links), containers made from it for one
//! test (removed by the harness's Drop, also on panic), and the engine check that skips
//! Docker tests loudly, or fails them under `CI=true`.
//!
//! Containers share the host's pid namespace (their pids are the ones the simulated GPU
//! and NVML report) and network (health URLs on 127.0.0.1 work), and see the simulated
//! GPU folder at the same path as the host.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use gpu_manager::act::docker::DockerDriver;
use gpu_manager::config::Config;
use gpu_manager::daemon;
use gpu_manager::status::Status;
use tokio::sync::watch;

use super::{standin_binary, Harness, Runtime, Standin, CONVERGE};

/// The image's repository; its tag is a hash of its content.
const IMAGE_REPOSITORY: &str = "gpu-manager-test-standin";
/// Labels every test container, for a manual `docker rm -f $(docker ps -aq --filter
/// label=gpu-manager-test)` after an interrupted run.
const LABEL: &str = "gpu-manager-test";

/// Runs the docker CLI: Ok(stdout) on success, Err(stderr) otherwise.
pub fn docker(args: &[&str]) -> Result<String, String> {
    let output = Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run docker: {e}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).trim().to_owned())
    }
}

/// Whether Docker tests can run here. Without a working engine they are skipped with a
/// loud message, except under `CI=true`, where that is a failure.
pub fn engine_or_skip(test: &str) -> bool {
    static ENGINE: OnceLock<Result<(), String>> = OnceLock::new();
    let engine =
        ENGINE.get_or_init(|| docker(&["info", "--format", "{{.ServerVersion}}"]).map(drop));
    match engine {
        Ok(()) => true,
        Err(why) if std::env::var("CI").as_deref() == Ok("true") => panic!(
            "CI=true and no usable Docker engine: {why}\n\
             install docker.io and start dockerd (tests/run.sh starts it when it is installed)"
        ),
        Err(why) => {
            // Straight to stderr: the test harness captures eprintln! of passing tests.
            let _ = writeln!(
                std::io::stderr(),
                "\n!!!!!!!! SKIPPED {test}: no usable Docker engine ({why}).\n\
                 !!!!!!!! Install docker.io and start dockerd (tests/run.sh does); under CI=true this fails.\n"
            );
            false
        }
    }
}

/// A container name no other test (or concurrent run) uses.
fn unique_container(service: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!(
        "gmtest-{}-{}-{service}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    )
}

impl Standin {
    /// This stand-in as a docker service, in a container of its own.
    pub fn in_docker(mut self) -> Self {
        self.runtime = Runtime::Docker {
            container: unique_container(self.name),
        };
        self
    }

    /// Serves Ollama's API with `model` loaded; the config evicts it through that API.
    pub fn ollama(mut self, model: &'static str) -> Self {
        self.ollama_model = Some(model);
        self
    }

    pub fn container(&self) -> &str {
        match &self.runtime {
            Runtime::Docker { container } => container,
            Runtime::Native => panic!("{} is not a docker service", self.name),
        }
    }
}

impl Harness {
    /// `docker create`s the container of every docker stand-in (created, not started).
    pub fn create_containers(&self) {
        let image = standin_image();
        let folder = self.gpu.path().display().to_string();
        let volume = format!("{folder}:{folder}");
        for service in &self.services {
            let Runtime::Docker { container } = &service.runtime else {
                continue;
            };
            let mut args = vec![
                "create",
                "--name",
                container,
                "--label",
                LABEL,
                "--pid",
                "host",
                "--network",
                "host",
                "--volume",
                &volume,
                &image,
                "--sim-dir",
                &folder,
            ];
            let standin_args = service.args();
            args.extend(standin_args.iter().map(String::as_str));
            docker(&args).unwrap_or_else(|e| panic!("docker create {container}: {e}"));
        }
    }

    /// The docker service's container, as `docker inspect --format` shows it.
    pub fn inspect(&self, name: &str, format: &str) -> String {
        let container = self.service(name).container();
        docker(&["inspect", "--format", format, container])
            .unwrap_or_else(|e| panic!("docker inspect {container}: {e}"))
    }

    pub fn container_running(&self, name: &str) -> bool {
        self.inspect(name, "{{.State.Running}}") == "true"
    }

    /// Identifies the container's current run: a restart changes it.
    pub fn container_started_at(&self, name: &str) -> String {
        self.inspect(name, "{{.State.StartedAt}}")
    }

    pub fn container_pid(&self, name: &str) -> u32 {
        self.inspect(name, "{{.State.Pid}}").parse().unwrap()
    }

    /// Points the config's `gpu:` block at the simulated folder directly (no fake NVML,
    /// whose folder is named by a process-wide environment variable), as a daemon inside
    /// the test process needs.
    pub fn use_simulated_gpu(&mut self, reclaim_timeout_ms: u64) {
        self.gpu_config = format!(
            "{{ simulated: {:?}, reserve_mb: 512, reclaim_timeout_ms: {reclaim_timeout_ms} }}",
            self.gpu.path()
        );
        self.write_config("");
    }
}

/// Removes a test container whatever its state; quiet when it is already gone.
pub fn remove_container(container: &str) {
    let _ = docker(&["rm", "--force", "--volumes", container]);
}

/// The stand-in image: the `gpu-standin` binary and the shared libraries it links, at
/// their host paths, in an image imported from that tree. Its tag hashes the content,
/// so a run reuses the image of an earlier run with the same binary.
pub fn standin_image() -> String {
    static IMAGE: OnceLock<String> = OnceLock::new();
    IMAGE.get_or_init(build_standin_image).clone()
}

fn build_standin_image() -> String {
    let binary = standin_binary();
    let mut files = vec![(binary.clone(), PathBuf::from("/gpu-standin"))];
    files.extend(
        shared_libraries(&binary)
            .into_iter()
            .map(|lib| (lib.clone(), lib)),
    );
    let mut hash = Fnv::default();
    for (source, target) in &files {
        hash.write(target.as_os_str().as_encoded_bytes());
        hash.write(&std::fs::read(source).unwrap());
    }
    let image = format!("{IMAGE_REPOSITORY}:{:016x}", hash.0);
    if docker(&["image", "inspect", &image]).is_ok() {
        return image;
    }
    let rootfs = tempfile::tempdir().unwrap();
    for (source, target) in &files {
        let inside = rootfs.path().join(target.strip_prefix("/").unwrap());
        std::fs::create_dir_all(inside.parent().unwrap()).unwrap();
        std::fs::copy(source, &inside).unwrap();
    }
    let mut tar = Command::new("tar")
        .arg("-C")
        .arg(rootfs.path())
        .args(["-c", "."])
        .stdout(Stdio::piped())
        .spawn()
        .expect("tar, to pack the stand-in image");
    let import = Command::new("docker")
        .args([
            "import",
            "--change",
            r#"ENTRYPOINT ["/gpu-standin"]"#,
            "-",
            &image,
        ])
        .stdin(tar.stdout.take().unwrap())
        .output()
        .unwrap();
    assert!(tar.wait().unwrap().success(), "tar failed");
    assert!(
        import.status.success(),
        "docker import {image}: {}",
        String::from_utf8_lossy(&import.stderr)
    );
    image
}

/// The shared libraries `binary` loads, as ldd resolves them (none for a static one).
fn shared_libraries(binary: &Path) -> Vec<PathBuf> {
    let output = Command::new("ldd").arg(binary).output().expect("ldd");
    if !output.status.success() {
        return Vec::new(); // "not a dynamic executable"
    }
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let path = match line.split_once("=>") {
                Some((_, resolved)) => resolved.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// FNV-1a: a content hash stable across runs and toolchains, for the image tag.
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = (self.0 ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// The daemon inside the test process, with the Docker engine the test chooses, so that
/// its status can be read directly. Needs [`Harness::use_simulated_gpu`].
pub struct InProcessDaemon {
    status: watch::Receiver<Status>,
    _runtime: tokio::runtime::Runtime,
}

impl InProcessDaemon {
    pub fn start(harness: &Harness, docker: DockerDriver) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let config = Arc::new(Config::load(&harness.config_path()).expect("config"));
        let reconciler = runtime
            .block_on(daemon::build_with(config, docker))
            .expect("daemon");
        let status = reconciler.handle().status;
        runtime.spawn(reconciler.run(tokio_util::sync::CancellationToken::new()));
        Self {
            status,
            _runtime: runtime,
        }
    }

    /// Waits until the status satisfies `what`, failing with the last status if not.
    pub fn wait_status(&self, description: &str, what: impl Fn(&Status) -> bool) -> Status {
        let deadline = Instant::now() + CONVERGE;
        loop {
            let status = self.status.borrow().clone();
            if what(&status) {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for: {description}\n--- status ---\n{}",
                serde_json::to_string_pretty(&status).unwrap()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}
