//! `gpu-manager doctor --config F`: why would a first start fail here? Each check of the
//! host against the config ends PASS, WARN or FAIL, and every WARN and FAIL says what to
//! do. Nothing is started, stopped or written outside a probe file in `state_dir`.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::act::cuda_checkpoint::{cuda_release, CudaCheckpoint};
use crate::act::docker::DockerDriver;
use crate::act::native::recorded_pid;
use crate::api::Auth;
use crate::config::{Config, DrainSpec, ParkMethod, ProxySpec, Runtime, ServiceSpec};
use crate::daemon;
use crate::footprints::Footprints;
use crate::observe::process::ProcessTable;
use crate::plan::Budget;
use crate::reconcile::GpuSource;

/// How long a network probe (Redis, the API) may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Outcome {
    Pass,
    Warn,
    Fail,
}

/// One check's result.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub check: String,
    pub status: Outcome,
    pub detail: String,
    /// What to do, for a WARN or a FAIL.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    /// Nothing failed: the daemon should start.
    pub ok: bool,
    pub checks: Vec<Finding>,
}

impl Report {
    fn add(&mut self, check: &str, status: Outcome, detail: String, fix: Option<String>) {
        self.push(Finding {
            check: check.to_owned(),
            status,
            detail,
            fix,
        });
    }

    fn push(&mut self, finding: Finding) {
        self.checks.push(finding);
        self.ok = !self.checks.iter().any(|f| f.status == Outcome::Fail);
    }

    fn pass(&mut self, check: &str, detail: String) {
        self.add(check, Outcome::Pass, detail, None);
    }

    fn warn(&mut self, check: &str, detail: String, fix: String) {
        self.add(check, Outcome::Warn, detail, Some(fix));
    }

    fn fail(&mut self, check: &str, detail: String, fix: String) {
        self.add(check, Outcome::Fail, detail, Some(fix));
    }

    fn count(&self, status: Outcome) -> usize {
        self.checks.iter().filter(|f| f.status == status).count()
    }

    /// One line per check, the fix indented under it, and a closing count.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for finding in &self.checks {
            let status = serde_json::to_value(finding.status)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            out.push_str(&format!(
                "{status:<5} {:<10} {}\n",
                finding.check, finding.detail
            ));
            if let Some(fix) = &finding.fix {
                out.push_str(&format!("{:16}fix: {fix}\n", ""));
            }
        }
        out.push_str(&format!(
            "{} passed, {} warning(s), {} failed\n",
            self.count(Outcome::Pass),
            self.count(Outcome::Warn),
            self.count(Outcome::Fail)
        ));
        out
    }
}

/// Runs every check against the config at `path`.
pub async fn run(path: &Path) -> Report {
    let mut report = Report {
        ok: true,
        ..Default::default()
    };
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(error) => {
            report.fail(
                "config",
                error.to_string(),
                "fix the key named above, then run doctor again (the other checks need a valid config)".into(),
            );
            return report;
        }
    };
    report.pass(
        "config",
        format!(
            "{}: valid, {} services, phases {}",
            config.path.display(),
            config.inventory.len(),
            config
                .inventory
                .phases()
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    let gpu_total = check_gpu(&mut report, &config).await;
    let running_containers = check_docker(&mut report, &config).await;
    check_native(&mut report, &config);
    check_health_ports(&mut report, &config, &running_containers);
    check_parking(&mut report, &config).await;
    check_redis(&mut report, &config).await;
    check_api(&mut report, &config).await;
    check_proxies(&mut report, &config).await;
    check_phases_fit(&mut report, &config, gpu_total);
    check_writable(&mut report, "state_dir", &config.state_dir);
    if let Some(folder) = config.desired_state.parent() {
        check_writable(&mut report, "desired", folder);
    }
    report
}

/// NVML (or the simulated GPU): its driver, name and size. Returns the GPU's total MB
/// when known (observed, or `gpu.total_mb`).
async fn check_gpu(report: &mut Report, config: &Config) -> Option<u64> {
    let source = daemon::open_gpu(config).await;
    let total = match &source {
        GpuSource::Observed { gpu, .. } => {
            let gpu = gpu.clone();
            let described = gpu.describe();
            match tokio::task::spawn_blocking(move || gpu.sample()).await {
                Ok(Ok(sample)) => {
                    report.pass(
                        "gpu",
                        format!(
                            "{described}: {}, {} MB total, {} MB used",
                            sample.name, sample.total_mb, sample.used_mb
                        ),
                    );
                    Some(sample.total_mb)
                }
                Ok(Err(error)) => {
                    report.fail(
                        "gpu",
                        format!("{described} loads but cannot be read: {error}"),
                        "check the driver with nvidia-smi; a driver/library version mismatch needs a reboot after a driver upgrade".into(),
                    );
                    None
                }
                Err(error) => {
                    report.fail(
                        "gpu",
                        format!("observing the GPU panicked: {error}"),
                        "report this bug".into(),
                    );
                    None
                }
            }
        }
        GpuSource::Unavailable { reason } => match config.gpu.total_mb {
            Some(total) => {
                report.warn(
                    "gpu",
                    reason.clone(),
                    "install the NVIDIA driver (nvidia-smi must work) or set gpu.nvml_library; until then the daemon cannot see external GPU memory".into(),
                );
                Some(total)
            }
            None => {
                report.fail(
                    "gpu",
                    reason.clone(),
                    "install the NVIDIA driver (nvidia-smi must work), set gpu.nvml_library, or set gpu.total_mb to budget from declared sizes".into(),
                );
                None
            }
        },
    };
    if let Err(error) = daemon::check_against_gpu(config, &source) {
        report.fail(
            "gpu",
            error.to_string(),
            "lower that vram_mb or gpu.reserve_mb".into(),
        );
    }
    total
}

/// What parking and draining need (docs/ARCHITECTURE.md, "Parking and draining"): the
/// CUDA checkpoint API when a service parks with it, and each service's drain probe and
/// park requests reachable. A service that is not running cannot answer, so those are
/// warnings: the daemon reaches them once it runs.
async fn check_parking(report: &mut Report, config: &Config) {
    let checkpoints = config.inventory.iter().any(|spec| {
        matches!(
            spec.park.as_ref().map(|p| &p.method),
            Some(ParkMethod::CudaCheckpoint)
        )
    });
    if checkpoints {
        let library = config.gpu.cuda_library.clone();
        match tokio::task::spawn_blocking(move || check_cuda_checkpoint(&library)).await {
            Ok(finding) => report.push(finding),
            Err(error) => report.warn(
                "cuda",
                format!("the check of {} did not finish: {error}", config.gpu.cuda_library.display()),
                "run doctor again; until the checkpoint API is confirmed, services with park: {kind: cuda-checkpoint} may be stopped instead of parked".into(),
            ),
        }
    }
    let Ok(client) = reqwest::Client::builder()
        .no_proxy()
        .timeout(PROBE_TIMEOUT)
        .build()
    else {
        return;
    };
    for spec in config.inventory.iter() {
        if let Some(drain) = &spec.drain {
            check_drain(report, &client, spec, drain).await;
        }
        let urls: Vec<(&str, &str)> = match spec.park.as_ref().map(|p| &p.method) {
            Some(ParkMethod::Http { park, resume }) => {
                std::iter::once(("park.url", park.url.as_str()))
                    .chain(resume.as_ref().map(|r| ("park.resume_url", r.url.as_str())))
                    .collect()
            }
            Some(ParkMethod::Ollama { url }) => vec![("park.url", url.as_str())],
            Some(ParkMethod::CudaCheckpoint) | None => Vec::new(),
        };
        for (key, url) in urls {
            check_park_url(report, spec, key, url).await;
        }
    }
}

/// GETs the drain probe, as the daemon does before a stop or a park, and checks that the
/// answer has each `busy_if` pointer: one it lacks never counts as work in flight.
async fn check_drain(
    report: &mut Report,
    client: &reqwest::Client,
    spec: &ServiceSpec,
    drain: &DrainSpec,
) {
    let name = &spec.name;
    let answer = match client.get(&drain.url).send().await {
        Ok(response) if response.status().is_success() => response
            .json::<serde_json::Value>()
            .await
            .map_err(|e| format!("answered, but not JSON: {e}")),
        Ok(response) => Err(format!("answered {}", response.status())),
        Err(error) => Err(format!("no answer: {error}")),
    };
    match answer {
        Ok(answer) => {
            let missing: Vec<&str> = drain
                .busy_if
                .iter()
                .filter(|pointer| answer.pointer(pointer).is_none())
                .map(String::as_str)
                .collect();
            if missing.is_empty() {
                report.pass("drain", format!("{name}: {} answers with every busy_if pointer", drain.url));
            } else {
                report.warn(
                    "drain",
                    format!("{name}: {} answers without {}: its work there never counts as in flight", drain.url, missing.join(", ")),
                    format!("fix services.{name}.drain.busy_if to point into its answer: {answer}"),
                );
            }
        }
        Err(error) => report.warn(
            "drain",
            format!("{name}: drain.url {} {error}", drain.url),
            format!("fine while {name} is not running (a service that cannot answer has no work to lose); otherwise fix services.{name}.drain.url"),
        ),
    }
}

/// Whether a park or resume request's host and port take connections. Only connects:
/// sending the request would park the service.
async fn check_park_url(report: &mut Report, spec: &ServiceSpec, key: &str, url: &str) {
    let name = &spec.name;
    let target = reqwest::Url::parse(url)
        .ok()
        .and_then(|u| Some(format!("{}:{}", u.host_str()?, u.port_or_known_default()?)));
    let Some(target) = target else {
        report.warn(
            "park",
            format!("{name}: {key} {url} names no host and port"),
            format!("fix services.{name}.{key}"),
        );
        return;
    };
    let problem =
        match tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(&target)).await {
            Ok(Ok(_)) => {
                report.pass("park", format!("{name}: {key} {url} takes connections"));
                return;
            }
            Ok(Err(error)) => error.to_string(),
            Err(_) => format!("no connection within {PROBE_TIMEOUT:?}"),
        };
    report.warn(
        "park",
        format!("{name}: {key} {url}: {problem}"),
        format!("fine while {name} is not running; otherwise fix services.{name}.{key}, or it is stopped instead of parked"),
    );
}

/// The CUDA checkpoint API that `park: {kind: cuda-checkpoint}` needs, in `library`
/// (`gpu.cuda_library`). Without it such services are stopped instead of parked, so its
/// absence is a warning, not a failure. Blocks (it loads the driver and calls `cuInit`).
pub fn check_cuda_checkpoint(library: &Path) -> Finding {
    let (status, detail, fix) = match CudaCheckpoint::load(library) {
        Ok(api) => (
            Outcome::Pass,
            format!(
                "{}: checkpoint API present, the driver supports CUDA {}",
                library.display(),
                api.driver_version()
                    .map_or_else(|| "(version unknown)".to_owned(), cuda_release)
            ),
            None,
        ),
        Err(error) => (
            Outcome::Warn,
            error.to_string(),
            Some(
                "install NVIDIA driver 570 or newer, or point gpu.cuda_library at its libcuda.so.1; \
                 until then services with park: {kind: cuda-checkpoint} are stopped instead of parked"
                    .into(),
            ),
        ),
    };
    Finding {
        check: "cuda".into(),
        status,
        detail,
        fix,
    }
}

/// The Docker engine, and each docker service's container with its image and state.
/// Returns the names of the containers that run.
async fn check_docker(report: &mut Report, config: &Config) -> BTreeSet<String> {
    let mut running = BTreeSet::new();
    let services: Vec<(&ServiceSpec, &str)> = config
        .inventory
        .iter()
        .filter_map(|spec| match &spec.runtime {
            Runtime::Docker(docker) => Some((spec, docker.container.as_str())),
            Runtime::Native(_) => None,
        })
        .collect();
    if services.is_empty() {
        report.pass(
            "docker",
            "no docker services: the engine is not needed".into(),
        );
        return running;
    }
    let driver = DockerDriver::from_env();
    let mut engine_ok = false;
    for (spec, container) in services {
        match driver.describe(&spec.name, container).await {
            Err(error) if error.is_unreachable() => {
                report.fail(
                    "docker",
                    error.to_string(),
                    "start the engine (systemctl start docker) or point DOCKER_HOST at it".into(),
                );
                return running;
            }
            Err(error) => report.fail(
                "container",
                error.to_string(),
                "check the container with docker inspect".into(),
            ),
            Ok(found) => {
                if !engine_ok {
                    engine_ok = true;
                    report.pass("docker", format!("engine reachable at {}", driver.host()));
                }
                match found {
                    Some(summary) => {
                        if summary.state == "running" {
                            running.insert(container.to_owned());
                        }
                        report.pass(
                            "container",
                            format!(
                                "{}: {container} exists, image {}, {}",
                                spec.name, summary.image, summary.state
                            ),
                        );
                    }
                    None => report.fail(
                        "container",
                        format!("{}: container {container} does not exist", spec.name),
                        format!("create it once with its image, mounts and GPU options (docker create --name {container} --gpus all ... IMAGE): the daemon starts and stops it but never creates it"),
                    ),
                }
            }
        }
    }
    running
}

/// Each native command resolves to an executable, and its workdir exists.
fn check_native(report: &mut Report, config: &Config) {
    for spec in config.inventory.iter() {
        let Runtime::Native(native) = &spec.runtime else {
            continue;
        };
        let argv = native.command.argv();
        let program = &argv[0];
        if let Some(workdir) = &native.workdir {
            if !workdir.is_dir() {
                report.fail(
                    "command",
                    format!("{}: workdir {} does not exist", spec.name, workdir.display()),
                    format!(
                        "create it or fix services.{}.workdir (relative paths are relative to the config file)",
                        spec.name
                    ),
                );
                continue;
            }
        }
        let search_path = native
            .env
            .get("PATH")
            .cloned()
            .or_else(|| std::env::var("PATH").ok())
            .unwrap_or_default();
        match resolve(program, native.workdir.as_deref(), &search_path) {
            Some(found) => report.pass(
                "command",
                format!("{}: {} is executable", spec.name, found.display()),
            ),
            None => report.fail(
                "command",
                format!(
                    "{}: {program:?} is not an executable file{}",
                    spec.name,
                    if program.contains('/') {
                        String::new()
                    } else {
                        " in PATH".to_owned()
                    }
                ),
                format!(
                    "install it or give services.{}.command the full path",
                    spec.name
                ),
            ),
        }
    }
}

/// Where `program` would be found: a path with a slash is taken from the workdir (where
/// the service starts), a bare name is searched in `search_path`.
fn resolve(program: &str, workdir: Option<&Path>, search_path: &str) -> Option<PathBuf> {
    let executable = |path: &Path| {
        path.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        let path = match workdir {
            Some(dir) => dir.join(program),
            None => PathBuf::from(program),
        };
        return executable(&path).then_some(path);
    }
    search_path
        .split(':')
        .filter(|dir| !dir.is_empty())
        .map(|dir| Path::new(dir).join(program))
        .find(|path| executable(path))
}

/// Each local health URL's port: free, or held by the service itself (a process the
/// daemon would adopt, or its running container). Held by anything else, the service's
/// start would fail to bind, or its health check would ask the wrong process.
fn check_health_ports(report: &mut Report, config: &Config, running_containers: &BTreeSet<String>) {
    let table = ProcessTable::read().ok();
    for spec in config.inventory.iter() {
        let Some(health) = &spec.health else {
            continue;
        };
        let Some((host, port)) = local_port(&health.url) else {
            report.pass(
                "port",
                format!(
                    "{}: {} is not on this host, not checked",
                    spec.name, health.url
                ),
            );
            continue;
        };
        let free = TcpListener::bind((host, port)).is_ok();
        if free {
            report.pass("port", format!("{}: port {port} is free", spec.name));
            continue;
        }
        let owner = listening_pid(port);
        let adoptable = match &spec.runtime {
            Runtime::Docker(docker) => running_containers.contains(&docker.container),
            Runtime::Native(native) => owner.zip(table.as_ref()).is_some_and(|(pid, table)| {
                let recorded = recorded_pid(&config.state_dir, &spec.name);
                let matching = native
                    .match_pattern
                    .as_deref()
                    .map(|pattern| table.matching(pattern))
                    .unwrap_or_default();
                recorded
                    .into_iter()
                    .chain(matching)
                    .any(|root| root == pid || table.descendants(root).contains(&pid))
            }),
        };
        if adoptable {
            report.pass(
                "port",
                format!(
                    "{}: port {port} is held by the service itself, which the daemon adopts",
                    spec.name
                ),
            );
            continue;
        }
        let holder = match owner {
            Some(pid) => format!("pid {pid} ({})", command_of(table.as_ref(), pid)),
            None => "a process doctor cannot see (another user's, or a container's)".to_owned(),
        };
        report.fail(
            "port",
            format!("{}: port {port} of {} is held by {holder}, which the daemon does not manage", spec.name, health.url),
            format!("stop that process, give services.{}.match a part of its command line so the daemon adopts it, or move the service to another port", spec.name),
        );
    }
}

/// The host and port of an http(s) URL on this machine; None for another host.
fn local_port(url: &str) -> Option<(IpAddr, u16)> {
    let url = reqwest::Url::parse(url).ok()?;
    let port = url.port_or_known_default()?;
    let host: IpAddr = match url.host_str()? {
        "localhost" => IpAddr::from([127, 0, 0, 1]),
        other => other.trim_matches(['[', ']']).parse().ok()?,
    };
    let local = host.is_loopback() || host.is_unspecified();
    local.then_some((host, port))
}

/// The process listening on TCP `port`, from /proc/net/tcp{,6} and the processes' fds.
fn listening_pid(port: u16) -> Option<u32> {
    const LISTEN: &str = "0A";
    let inodes: BTreeSet<String> = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|table| std::fs::read_to_string(table).ok())
        .flat_map(|text| {
            text.lines()
                .skip(1)
                .filter_map(|line| {
                    let fields: Vec<&str> = line.split_whitespace().collect();
                    let local_port = fields.get(1)?.rsplit(':').next()?;
                    let listening = fields.get(3) == Some(&LISTEN);
                    (listening && u16::from_str_radix(local_port, 16).ok()? == port)
                        .then(|| fields.get(9).map(|inode| inode.to_string()))
                        .flatten()
                })
                .collect::<Vec<_>>()
        })
        .collect();
    if inodes.is_empty() {
        return None;
    }
    let wanted: BTreeSet<String> = inodes.iter().map(|i| format!("socket:[{i}]")).collect();
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let fds = std::fs::read_dir(entry.path().join("fd")).ok()?;
            fds.flatten()
                .filter_map(|fd| std::fs::read_link(fd.path()).ok())
                .any(|target| wanted.contains(target.to_string_lossy().as_ref()))
                .then_some(pid)
        })
}

/// `pid 1234 (its command line)` of the process listening on TCP `port`, when visible.
fn port_holder(port: u16) -> Option<String> {
    let pid = listening_pid(port)?;
    let command = command_of(ProcessTable::read().ok().as_ref(), pid);
    Some(format!("pid {pid} ({command})"))
}

fn command_of(table: Option<&ProcessTable>, pid: u32) -> String {
    table
        .and_then(|t| t.get(pid))
        .map(|p| p.cmdline.clone())
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| "command unknown".to_owned())
}

/// Redis reachable, and who holds the lease key now.
async fn check_redis(report: &mut Report, config: &Config) {
    let lease = &config.lease;
    let Some(url) = &lease.redis_url else {
        report.warn(
            "redis",
            "no lease.redis_url: the lease is in-process, so Python consumers' gpu_lock is not seen".into(),
            "set lease.redis_url to the Redis your Python consumers lock the GPU with".into(),
        );
        return;
    };
    let probe = async {
        let client = redis::Client::open(url.as_str())?;
        let mut connection = client.get_multiplexed_async_connection().await?;
        redis::cmd("GET")
            .arg(&lease.key)
            .query_async::<Option<String>>(&mut connection)
            .await
    };
    match tokio::time::timeout(PROBE_TIMEOUT, probe).await {
        Ok(Ok(None)) => report.pass("redis", format!("{url} reachable; lease key {} is free", lease.key)),
        Ok(Ok(Some(holder))) => report.pass(
            "redis",
            format!("{url} reachable; lease key {} is held by {holder}", lease.key),
        ),
        Ok(Err(error)) => report.fail(
            "redis",
            format!("{url} is unreachable: {error}"),
            "start Redis (systemctl start redis-server) or fix lease.redis_url; transitions are refused (503) while it is down".into(),
        ),
        Err(_) => report.fail(
            "redis",
            format!("{url} did not answer within {PROBE_TIMEOUT:?}"),
            "check that Redis runs there and that no firewall drops the connection".into(),
        ),
    }
}

/// The API address can be bound (and may be: a token where it is not loopback).
async fn check_api(report: &mut Report, config: &Config) {
    if let Err(error) = Auth::from_config(&config.api) {
        report.fail(
            "api",
            error.to_string(),
            "fix api.listen or api.token_file".into(),
        );
        return;
    }
    let addr = config.api.listen;
    match TcpListener::bind(addr) {
        Ok(_) => report.pass("api", format!("{addr} can be bound")),
        Err(error) if error.kind() == std::io::ErrorKind::AddrInUse => {
            if answers_healthz(addr).await {
                report.warn(
                    "api",
                    format!("{addr} is taken by a gpu-manager that answers /healthz"),
                    "this is the running daemon, or another one: stop it before starting this config, or give this one another api.listen".into(),
                );
            } else {
                let holder = port_holder(addr.port())
                    .map(|holder| format!(" by {holder}"))
                    .unwrap_or_default();
                report.fail(
                    "api",
                    format!("{addr} is taken{holder}"),
                    "stop that process or change api.listen".into(),
                );
            }
        }
        Err(error) => report.fail(
            "api",
            format!("cannot bind {addr}: {error}"),
            "change api.listen to an address of this host".into(),
        ),
    }
}

async fn answers_healthz(addr: SocketAddr) -> bool {
    api_get(addr, "/healthz")
        .await
        .is_some_and(|body| body["ok"] == true)
}

/// GETs `path` from the API listening on `addr` (a daemon that runs now): its JSON
/// answer, or None when nothing answers there with JSON.
async fn api_get(addr: SocketAddr, path: &str) -> Option<serde_json::Value> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(PROBE_TIMEOUT)
        .build()
        .ok()?;
    let host = if addr.ip().is_unspecified() {
        SocketAddr::new(IpAddr::from([127, 0, 0, 1]), addr.port())
    } else {
        addr
    };
    let response = client
        .get(format!("http://{host}{path}"))
        .send()
        .await
        .ok()?;
    response.json().await.ok()
}

/// Each `proxy:` (docs/ARCHITECTURE.md, "The demand proxy"): its upstream, resolved
/// here, is not the proxy's own address (the config check compares addresses as
/// written; a host name is only resolved now), and its `listen` can be bound, as the
/// daemon binds every one at startup and refuses to start otherwise. A running daemon
/// holds the listen addresses of its own config: taken by it is a PASS.
async fn check_proxies(report: &mut Report, config: &Config) {
    let proxied: Vec<(&ServiceSpec, &ProxySpec)> = config
        .inventory
        .iter()
        .filter_map(|spec| Some((spec, spec.proxy.as_ref()?)))
        .collect();
    if proxied.is_empty() {
        return;
    }
    // Asked once, and only when a listen address is taken.
    let mut running: Option<Option<serde_json::Value>> = None;
    for (spec, proxy) in proxied {
        check_proxy_upstream(report, spec, proxy).await;
        let name = &spec.name;
        let key = format!("services.{name}.proxy.listen");
        let listen = proxy.listen;
        let error = match TcpListener::bind(listen) {
            Ok(_) => {
                report.pass("proxy", format!("{name}: {key} {listen} can be bound"));
                continue;
            }
            Err(error) => error,
        };
        let detail = format!("{name}: {key} {listen} cannot be bound: {error}");
        match error.kind() {
            std::io::ErrorKind::AddrInUse => {
                if running.is_none() {
                    running = Some(api_get(config.api.listen, "/gpu/status").await);
                }
                let status = running.as_ref().and_then(Option::as_ref);
                if let Some(owner) = status.and_then(|s| proxy_owner(s, listen)) {
                    report.pass(
                        "proxy",
                        format!(
                            "{name}: {key} {listen} is held by the running daemon (its API at {} lists it as {owner}'s proxy)",
                            config.api.listen
                        ),
                    );
                    continue;
                }
                let holder = port_holder(listen.port())
                    .map(|holder| format!("; held by {holder}"))
                    .unwrap_or_default();
                report.fail(
                    "proxy",
                    format!("{detail}{holder}"),
                    format!(
                        "if that is {name} itself on its old port, move it to the port of proxy.upstream ({}) so that the daemon can take {listen}; otherwise stop that process or give {key} another port",
                        proxy.upstream
                    ),
                );
            }
            std::io::ErrorKind::PermissionDenied => report.fail(
                "proxy",
                detail,
                format!("a port below 1024 needs privilege: give {key} a higher port, or the daemon CAP_NET_BIND_SERVICE (AmbientCapabilities= in its systemd unit)"),
            ),
            _ => report.fail(
                "proxy",
                detail,
                format!("give {key} an address of this host (127.0.0.1, 0.0.0.0, or one of its interfaces)"),
            ),
        }
    }
}

/// The service whose proxy listens on `listen`, by a running daemon's `/gpu/status`.
fn proxy_owner(status: &serde_json::Value, listen: SocketAddr) -> Option<String> {
    status["services"]
        .as_object()?
        .iter()
        .find_map(|(name, service)| {
            let theirs: SocketAddr = service["proxy"]["listen"].as_str()?.parse().ok()?;
            (theirs == listen).then(|| name.clone())
        })
}

/// The upstream's host resolved as the daemon would resolve it: none of its addresses
/// may be the proxy's own listen address, or each request would be forwarded back to
/// the proxy until the queue fills.
async fn check_proxy_upstream(report: &mut Report, spec: &ServiceSpec, proxy: &ProxySpec) {
    let name = &spec.name;
    let (upstream, listen) = (&proxy.upstream, proxy.listen);
    // The config made it `http://host:port`.
    let authority = upstream.trim_start_matches("http://");
    let resolved = match tokio::time::timeout(PROBE_TIMEOUT, tokio::net::lookup_host(authority))
        .await
    {
        Ok(Ok(addresses)) => addresses.collect::<Vec<_>>(),
        Ok(Err(error)) => {
            report.warn(
                "proxy",
                format!("{name}: proxy.upstream {upstream} does not resolve here: {error}"),
                format!("requests through {listen} will get 502 until it does: fix services.{name}.proxy.upstream"),
            );
            return;
        }
        Err(_) => {
            report.warn(
                "proxy",
                format!(
                    "{name}: proxy.upstream {upstream} did not resolve within {PROBE_TIMEOUT:?}"
                ),
                "check this host's resolver (/etc/hosts, DNS)".into(),
            );
            return;
        }
    };
    match resolved.iter().find(|to| reaches(listen, **to)) {
        Some(to) => report.fail(
            "proxy",
            format!("{name}: proxy.upstream {upstream} is {to}, the proxy's own listen address {listen}: every request would be forwarded back to the proxy"),
            format!("move {name} to another port and name that port in services.{name}.proxy.upstream"),
        ),
        None => report.pass(
            "proxy",
            format!("{name}: proxy.upstream {upstream} is not the proxy's own address {listen}"),
        ),
    }
}

/// Whether a connection to `to` lands on a socket listening on `listen`: the same port,
/// and the same address, or any address of this host when `listen` is 0.0.0.0 or `::`.
/// An IPv4-mapped IPv6 address (`[::ffff:127.0.0.1]`) reaches the IPv4 socket.
fn reaches(listen: SocketAddr, to: SocketAddr) -> bool {
    let (ip, listen_ip) = (to.ip().to_canonical(), listen.ip().to_canonical());
    to.port() == listen.port()
        && (ip == listen_ip || listen_ip.is_unspecified() && (ip.is_loopback() || is_this_host(ip)))
}

/// Whether `ip` is one of this host's addresses: only those can be bound.
fn is_this_host(ip: IpAddr) -> bool {
    UdpSocket::bind((ip, 0)).is_ok()
}

/// Every phase's services fit the budget together, each at its declared size or, when
/// the daemon learned it takes more, at its learned peak (src/footprints.rs).
fn check_phases_fit(report: &mut Report, config: &Config, gpu_total: Option<u64>) {
    let footprints =
        Footprints::load(&config.state_dir, &config.inventory).unwrap_or_else(|error| {
            report.warn(
                "footprints",
                error.to_string(),
                "the phases below are checked at the declared sizes alone".into(),
            );
            Footprints::empty(&config.state_dir)
        });
    let Some(total_mb) = gpu_total else {
        report.warn(
            "phases",
            "the GPU's size is unknown, so the phases were not checked against it".into(),
            "fix the gpu check above, or set gpu.total_mb".into(),
        );
        return;
    };
    // External memory (a desktop) is not known before the daemon runs: it lowers this.
    let budget = Budget {
        total_mb,
        reserve_mb: config.gpu.reserve_mb,
        external_mb: 0,
    }
    .usable_mb();
    for phase in config.inventory.phases() {
        let wanted: Vec<&ServiceSpec> = config.inventory.in_phase(phase).collect();
        let need: u64 = wanted.iter().map(|s| footprints.budget_mb(s)).sum();
        let names: Vec<String> = wanted
            .iter()
            .map(|s| match footprints.budget_mb(s) {
                mb if mb > s.vram_mb => {
                    format!(
                        "{} {mb} MB (learned peak; declared {} MB)",
                        s.name, s.vram_mb
                    )
                }
                mb => format!("{} {mb} MB", s.name),
            })
            .collect();
        let detail = format!(
            "phase {phase}: {} = {need} MB of a {budget} MB budget ({total_mb} MB - {} MB reserve)",
            names.join(" + "),
            config.gpu.reserve_mb
        );
        if need <= budget {
            report.pass("phases", detail);
        } else {
            report.fail(
                "phases",
                detail,
                format!("prepare_for_phase({phase}) would leave the lowest priorities preempted: lower their vram_mb (a learned peak is reset by `gpu-manager forget NAME`), or move a service to another phase"),
            );
        }
    }
}

/// The daemon writes there (pid files and logs; the desired-state file). A folder that
/// does not exist yet is probed at its nearest existing parent, where the daemon would
/// create it; doctor creates nothing.
fn check_writable(report: &mut Report, check: &str, folder: &Path) {
    if folder.exists() && !folder.is_dir() {
        report.fail(
            check,
            format!("{} is not a folder", folder.display()),
            "move that file away, or point the config at a folder".into(),
        );
        return;
    }
    let existing = folder.ancestors().find(|p| p.is_dir()).unwrap_or(folder);
    let probe = existing.join(format!(".gpu-manager-doctor-{}", std::process::id()));
    let written = std::fs::write(&probe, b"probe").and_then(|()| std::fs::remove_file(&probe));
    let what = if existing == folder {
        format!("{} is writable", folder.display())
    } else {
        format!(
            "{} can be created in {}",
            folder.display(),
            existing.display()
        )
    };
    match written {
        Ok(()) => report.pass(check, what),
        Err(error) => report.fail(
            check,
            format!("cannot write in {}: {error}", existing.display()),
            format!("create {} and give the daemon's user write access to it, or point the config elsewhere", folder.display()),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_upstream_reaches_the_proxy_only_on_its_port_and_address() {
        let at = |text: &str| -> SocketAddr { text.parse().unwrap() };
        assert!(reaches(at("127.0.0.1:9000"), at("127.0.0.1:9000")));
        assert!(reaches(at("127.0.0.1:9000"), at("[::ffff:127.0.0.1]:9000")));
        assert!(!reaches(at("127.0.0.1:9000"), at("127.0.0.1:9001")));
        assert!(!reaches(at("127.0.0.1:9000"), at("127.0.0.2:9000")));
        // A listen on every address is reached through any of this host's.
        assert!(reaches(at("0.0.0.0:9000"), at("127.0.0.5:9000")));
        assert!(reaches(at("[::]:9000"), at("[::1]:9000")));
        // 192.0.2.1 is TEST-NET-1, never an address of this host.
        assert!(!reaches(at("0.0.0.0:9000"), at("192.0.2.1:9000")));
    }

    #[test]
    fn the_running_daemon_owns_a_listen_address_its_status_lists() {
        let status = serde_json::json!({"services": {
            "vidi": {"state": "stopped"},
            "ollama": {"state": "ready", "proxy": {"listen": "127.0.0.1:11434"}},
        }});
        let owner = |text: &str| proxy_owner(&status, text.parse().unwrap());
        assert_eq!(owner("127.0.0.1:11434").as_deref(), Some("ollama"));
        assert_eq!(owner("127.0.0.1:11435"), None);
        assert_eq!(owner("0.0.0.0:11434"), None);
    }
}
