//! The service inventory: the YAML config file, parsed and validated up front.
//!
//! Nothing may start from an invalid config, so every rule is checked here and each error
//! names the file, the line, the key and what would be valid.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub mod diff;
mod park;
mod proxy;

pub use park::{DrainSpec, HttpRequest, ParkMethod, ParkSpec};
pub use proxy::ProxySpec;

/// A pipeline phase number (the requirements' `prepare_for_phase(n)`).
pub type Phase = u32;

/// A service name: `[a-z0-9_-]+`, the key under `services:`.
///
/// Every way in checks the rule: `parse`, and deserialization (the desired-state file,
/// footprints, parked markers, JSON bodies) through `TryFrom<String>`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(try_from = "String")]
pub struct ServiceName(String);

impl ServiceName {
    /// Checks the `[a-z0-9_-]+` rule; the API relies on it to reject odd paths untouched.
    pub fn parse(raw: &str) -> Result<Self, String> {
        Self::try_from(raw.to_owned())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ServiceName {
    type Error = String;

    fn try_from(raw: String) -> Result<Self, String> {
        let valid = !raw.is_empty()
            && raw.len() <= 64
            && raw
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if valid {
            Ok(Self(raw))
        } else {
            Err(format!(
                "service name {raw:?} is invalid: use 1-64 characters from [a-z0-9_-]"
            ))
        }
    }
}

/// Written as the bare string, as it is read.
impl Serialize for ServiceName {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A config file that could not be used, with where and why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
}

/// The whole validated config. Paths inside it are absolute (resolved against the
/// config file's folder), so nothing downstream depends on the working directory.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub api: ApiConfig,
    pub gpu: GpuConfig,
    pub lease: LeaseConfig,
    pub desired_state: PathBuf,
    /// Pid files and service logs live here, so a restarted daemon can adopt.
    pub state_dir: PathBuf,
    /// How often the reconciler re-observes even when nothing was triggered.
    pub resync: Duration,
    /// How long a graceful shutdown waits for actions under way to reach a safe point.
    pub shutdown_timeout: Duration,
    pub inventory: Inventory,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ApiConfig {
    pub listen: SocketAddr,
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GpuConfig {
    pub index: u32,
    pub reserve_mb: u64,
    /// Another libnvidia-ml to load (the fake one in tests).
    pub nvml_library: Option<PathBuf>,
    /// The CUDA driver library for `park: {kind: cuda-checkpoint}` (the fake one in
    /// tests): a bare name is looked up as dlopen does.
    pub cuda_library: PathBuf,
    /// A simulated GPU folder (the `sim-gpu` crate) instead of NVML: the demo uses it.
    pub simulated: Option<PathBuf>,
    /// The GPU's size for budgeting when it cannot be observed (no NVML).
    pub total_mb: Option<u64>,
    /// How long to wait for the GPU to show a stopped service's memory free.
    pub reclaim_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LeaseConfig {
    /// None: the in-process lease of a single daemon.
    pub redis_url: Option<String>,
    pub key: String,
    pub ttl: Duration,
    /// How long a transition waits for another holder of `key` (a Python consumer,
    /// another gpu-manager) before it is refused (HTTP 423) until the next round.
    pub wait: Duration,
}

/// The services, kept sorted by priority (highest first) so every consumer sees the
/// same order; priorities are unique, which makes that order total.
#[derive(Debug, Clone, Default)]
pub struct Inventory {
    services: Vec<ServiceSpec>,
}

impl Inventory {
    pub fn new(mut services: Vec<ServiceSpec>) -> Self {
        services.sort_by(|a, b| b.priority.cmp(&a.priority).then(a.name.cmp(&b.name)));
        Self { services }
    }

    /// Highest priority first.
    pub fn iter(&self) -> impl Iterator<Item = &ServiceSpec> {
        self.services.iter()
    }

    pub fn get(&self, name: &ServiceName) -> Option<&ServiceSpec> {
        self.services.iter().find(|s| &s.name == name)
    }

    pub fn find(&self, name: &str) -> Option<&ServiceSpec> {
        self.services.iter().find(|s| s.name.as_str() == name)
    }

    pub fn names(&self) -> Vec<ServiceName> {
        self.services.iter().map(|s| s.name.clone()).collect()
    }

    /// Every phase some service belongs to, ascending.
    pub fn phases(&self) -> BTreeSet<Phase> {
        self.services
            .iter()
            .flat_map(|s| s.phases.iter().copied())
            .collect()
    }

    pub fn in_phase(&self, phase: Phase) -> impl Iterator<Item = &ServiceSpec> {
        self.services
            .iter()
            .filter(move |s| s.phases.contains(&phase))
    }

    pub fn len(&self) -> usize {
        self.services.len()
    }

    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServiceSpec {
    pub name: ServiceName,
    pub runtime: Runtime,
    pub vram_mb: u64,
    pub priority: i64,
    pub phases: Vec<Phase>,
    pub health: Option<HealthCheck>,
    pub start_timeout: Duration,
    pub stop_timeout: Duration,
    /// How it gives its VRAM back while it keeps running, if it can.
    pub park: Option<ParkSpec>,
    /// How to tell it has work in flight, waited for before a stop or a park.
    pub drain: Option<DrainSpec>,
    /// Where its consumers connect through the daemon, which starts it on demand.
    pub proxy: Option<ProxySpec>,
}

impl ServiceSpec {
    /// How long a stop or park waits for its work in flight: the `drain:` probe's
    /// timeout, else its proxy's; None: it has no way to tell, and does not wait.
    pub fn drain_timeout(&self) -> Option<Duration> {
        match (&self.drain, &self.proxy) {
            (Some(drain), _) => Some(drain.timeout),
            (None, Some(proxy)) => Some(proxy.drain_timeout),
            (None, None) => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Runtime {
    Native(NativeSpec),
    Docker(DockerSpec),
}

impl Runtime {
    pub fn kind(&self) -> &'static str {
        match self {
            Runtime::Native(_) => "native",
            Runtime::Docker(_) => "docker",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct NativeSpec {
    pub command: CommandLine,
    pub workdir: Option<PathBuf>,
    pub env: BTreeMap<String, String>,
    /// A substring of a running process's command line that marks it as this service.
    pub match_pattern: Option<String>,
    /// Where its stdout and stderr go.
    pub log: LogTarget,
}

/// Where a native service's stdout and stderr go (`services.NAME.log`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogTarget {
    /// `state_dir/logs/NAME.log`, renamed to `NAME.log.1` (older ones shifted up to
    /// `NAME.log.<keep>`) before it would pass `max_bytes`.
    Files { max_bytes: u64, keep: u32 },
    /// The systemd journal, with the service's name as identifier.
    Journald,
}

impl Default for LogTarget {
    fn default() -> Self {
        LogTarget::Files {
            max_bytes: DEFAULT_LOG_MAX_MB * MB,
            keep: DEFAULT_LOG_KEEP,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum CommandLine {
    Argv(Vec<String>),
    /// Run by `sh -c`.
    Shell(String),
}

impl CommandLine {
    /// The argv actually executed.
    pub fn argv(&self) -> Vec<String> {
        match self {
            CommandLine::Argv(argv) => argv.clone(),
            CommandLine::Shell(script) => vec!["sh".into(), "-c".into(), script.clone()],
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct DockerSpec {
    pub container: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HealthCheck {
    pub url: String,
    /// One probe's timeout.
    pub timeout: Duration,
}

const DEFAULT_LISTEN: &str = "127.0.0.1:8000";
const DEFAULT_CUDA_LIBRARY: &str = "libcuda.so.1";
const DEFAULT_RESERVE_MB: u64 = 512;
const DEFAULT_LEASE_KEY: &str = "gpu_lock";
const DEFAULT_LEASE_TTL_MS: u64 = 30_000;
const DEFAULT_LEASE_WAIT_MS: u64 = 5_000;
/// The reconciler does nothing else while it waits for the lease: keep that short.
const MAX_LEASE_WAIT_MS: u64 = 60_000;
const DEFAULT_HEALTH_TIMEOUT_MS: u64 = 10_000;
const DEFAULT_START_TIMEOUT_MS: u64 = 120_000;
const DEFAULT_STOP_TIMEOUT_MS: u64 = 30_000;
const DEFAULT_RESYNC_MS: u64 = 2_000;
/// Default bound on a graceful shutdown (SIGTERM, SIGINT).
const DEFAULT_SHUTDOWN_TIMEOUT_MS: u64 = 10_000;
const DEFAULT_RECLAIM_TIMEOUT_MS: u64 = 30_000;
const DEFAULT_LOG_MAX_MB: u64 = 64;
const DEFAULT_LOG_KEEP: u32 = 3;
const MAX_LOG_MAX_MB: u64 = 1024 * 1024;
const MAX_LOG_KEEP: u32 = 100;
const MB: u64 = 1024 * 1024;

// ---- the file as written (serde), before validation ----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    api: RawApi,
    #[serde(default)]
    gpu: RawGpu,
    #[serde(default)]
    lease: RawLease,
    #[serde(default = "default_desired_state")]
    desired_state: PathBuf,
    #[serde(default = "default_state_dir")]
    state_dir: PathBuf,
    #[serde(default = "default_resync_ms")]
    resync_ms: u64,
    #[serde(default = "default_shutdown_timeout_ms")]
    shutdown_timeout_ms: u64,
    services: serde_yaml::Mapping,
}

fn default_desired_state() -> PathBuf {
    PathBuf::from("desired-state/state.yaml")
}
fn default_state_dir() -> PathBuf {
    PathBuf::from(".gpu-manager")
}
fn default_resync_ms() -> u64 {
    DEFAULT_RESYNC_MS
}
fn default_shutdown_timeout_ms() -> u64 {
    DEFAULT_SHUTDOWN_TIMEOUT_MS
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawApi {
    listen: Option<String>,
    token_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawGpu {
    #[serde(default)]
    index: u32,
    reserve_mb: Option<u64>,
    nvml_library: Option<PathBuf>,
    cuda_library: Option<PathBuf>,
    simulated: Option<PathBuf>,
    total_mb: Option<u64>,
    reclaim_timeout_ms: Option<u64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLease {
    redis_url: Option<String>,
    key: Option<String>,
    ttl_ms: Option<u64>,
    wait_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    kind: RawKind,
    command: Option<RawCommand>,
    workdir: Option<PathBuf>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(rename = "match")]
    match_pattern: Option<String>,
    container: Option<String>,
    /// Replaced by `park: {kind: ollama}`; read only to say so.
    evict: Option<serde_yaml::Value>,
    evict_url: Option<String>,
    park: Option<park::RawPark>,
    drain: Option<park::RawDrain>,
    proxy: Option<proxy::RawProxy>,
    vram_mb: u64,
    #[serde(default)]
    priority: i64,
    #[serde(default)]
    phases: Vec<Phase>,
    health: Option<RawHealth>,
    start_timeout_ms: Option<u64>,
    stop_timeout_ms: Option<u64>,
    /// `journald` or `{max_mb, keep}`; checked by hand for clearer errors.
    log: Option<serde_yaml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLogFiles {
    max_mb: Option<u64>,
    keep: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawKind {
    Native,
    Docker,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawCommand {
    Argv(Vec<String>),
    Shell(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    url: String,
    timeout_ms: Option<u64>,
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses and validates config text; `path` names it in errors and anchors
    /// relative paths.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let source = Source { path, text };
        let raw: RawConfig = serde_yaml::from_str(text).map_err(|e| source.yaml_error(&e))?;
        let base = config_folder(path);

        let listen_text = raw.api.listen.as_deref().unwrap_or(DEFAULT_LISTEN);
        let listen = listen_text.parse().map_err(|_| {
            source.invalid(
                &["api", "listen"],
                format!("api.listen {listen_text:?} is not an address: use HOST:PORT such as \"127.0.0.1:8000\""),
            )
        })?;

        let mut services = Vec::new();
        for (key, value) in &raw.services {
            services.push(parse_service(&source, &base, key, value)?);
        }
        if services.is_empty() {
            return Err(source.invalid(
                &["services"],
                "services: is empty: declare at least one service".into(),
            ));
        }
        check_unique_priorities(&source, &services)?;
        check_proxy_listens(&source, listen, &services)?;

        let lease_key = raw
            .lease
            .key
            .unwrap_or_else(|| DEFAULT_LEASE_KEY.to_owned());
        if lease_key.is_empty() {
            return Err(source.invalid(
                &["lease", "key"],
                "lease.key is empty: name the Redis key, e.g. \"gpu_lock\"".into(),
            ));
        }
        let ttl_ms = raw.lease.ttl_ms.unwrap_or(DEFAULT_LEASE_TTL_MS);
        if ttl_ms < 1000 {
            return Err(source.invalid(
                &["lease", "ttl_ms"],
                format!("lease.ttl_ms {ttl_ms} is too short: use at least 1000"),
            ));
        }
        let wait_ms = raw.lease.wait_ms.unwrap_or(DEFAULT_LEASE_WAIT_MS);
        if wait_ms > MAX_LEASE_WAIT_MS {
            return Err(source.invalid(
                &["lease", "wait_ms"],
                format!("lease.wait_ms {wait_ms} is too long: the reconciler does nothing else while it waits; use at most {MAX_LEASE_WAIT_MS} (it tries again every round)"),
            ));
        }
        if let Some(url) = &raw.lease.redis_url {
            if let Err(error) = redis::IntoConnectionInfo::into_connection_info(url.as_str()) {
                return Err(source.invalid(
                    &["lease", "redis_url"],
                    format!("lease.redis_url {url:?} is not a Redis URL ({error}): use redis://HOST:PORT[/DB], or remove it for the in-process lease"),
                ));
            }
        }
        if raw.resync_ms < 50 {
            return Err(source.invalid(
                &["resync_ms"],
                format!("resync_ms {} is too short: use at least 50", raw.resync_ms),
            ));
        }

        Ok(Config {
            path: path.to_owned(),
            api: ApiConfig {
                listen,
                token_file: raw.api.token_file.map(|p| base.join(p)),
            },
            gpu: GpuConfig {
                index: raw.gpu.index,
                reserve_mb: raw.gpu.reserve_mb.unwrap_or(DEFAULT_RESERVE_MB),
                nvml_library: raw.gpu.nvml_library.map(|p| base.join(p)),
                cuda_library: match raw.gpu.cuda_library {
                    // A bare name is for the dynamic linker's search path, as dlopen takes it.
                    Some(path) if path.components().count() > 1 => base.join(path),
                    Some(name) => name,
                    None => PathBuf::from(DEFAULT_CUDA_LIBRARY),
                },
                simulated: raw.gpu.simulated.map(|p| base.join(p)),
                total_mb: raw.gpu.total_mb,
                reclaim_timeout: Duration::from_millis(
                    raw.gpu
                        .reclaim_timeout_ms
                        .unwrap_or(DEFAULT_RECLAIM_TIMEOUT_MS),
                ),
            },
            lease: LeaseConfig {
                redis_url: raw.lease.redis_url,
                key: lease_key,
                ttl: Duration::from_millis(ttl_ms),
                wait: Duration::from_millis(wait_ms),
            },
            desired_state: base.join(raw.desired_state),
            state_dir: base.join(raw.state_dir),
            resync: Duration::from_millis(raw.resync_ms),
            shutdown_timeout: Duration::from_millis(raw.shutdown_timeout_ms),
            inventory: Inventory::new(services),
        })
    }

    /// The contract's rule that no service may want more than the GPU has; checked once
    /// the GPU's size is known (at daemon start, or by `validate` when a GPU answers).
    pub fn check_fits_gpu(&self, total_mb: u64) -> Result<(), ConfigError> {
        let text = std::fs::read_to_string(&self.path).unwrap_or_default();
        let source = Source {
            path: &self.path,
            text: &text,
        };
        let usable = total_mb.saturating_sub(self.gpu.reserve_mb);
        for service in self.inventory.iter() {
            if service.vram_mb > usable {
                return Err(source.invalid(
                    &["services", service.name.as_str(), "vram_mb"],
                    format!(
                        "services.{}.vram_mb {} is above what the GPU can give: {} MB total - {} MB reserve = {} MB; lower vram_mb or gpu.reserve_mb",
                        service.name, service.vram_mb, total_mb, self.gpu.reserve_mb, usable
                    ),
                ));
            }
        }
        Ok(())
    }
}

fn parse_service(
    source: &Source<'_>,
    base: &Path,
    key: &serde_yaml::Value,
    value: &serde_yaml::Value,
) -> Result<ServiceSpec, ConfigError> {
    let key_text = match key {
        serde_yaml::Value::String(s) => s.clone(),
        other => format!("{other:?}"),
    };
    let name = ServiceName::parse(&key_text)
        .map_err(|message| source.invalid(&["services", &key_text], message))?;
    let at = |field: &str| -> Vec<String> {
        ["services", name.as_str(), field]
            .iter()
            .map(|s| s.to_string())
            .collect()
    };
    let raw: RawService = serde_path_to_error::deserialize(value.clone())
        .map_err(|e| service_error(source, &name, &e))?;
    let invalid = |field: &str, message: String| source.invalid_owned(&at(field), message);

    if raw.evict.is_some() || raw.evict_url.is_some() {
        let field = if raw.evict.is_some() {
            "evict"
        } else {
            "evict_url"
        };
        return Err(invalid(
            field,
            park::evict_migration(name.as_str(), raw.evict_url.as_deref()),
        ));
    }
    let park = raw
        .park
        .map(|p| park::parse_park(name.as_str(), p))
        .transpose()
        .map_err(|e| invalid(e.key, e.message))?;
    let drain = raw
        .drain
        .map(|d| park::parse_drain(name.as_str(), d))
        .transpose()
        .map_err(|e| invalid(e.key, e.message))?;
    if raw.vram_mb == 0 {
        return Err(invalid(
            "vram_mb",
            format!("services.{name}.vram_mb is 0: declare the VRAM the service needs, in MB"),
        ));
    }
    if let Some(residual_mb) = park.as_ref().map(|p| p.residual_mb) {
        // The planner counts a service on its way down from parked at what it runs
        // with: a residual above that would be memory it never budgets.
        if residual_mb > raw.vram_mb {
            return Err(invalid(
                "park",
                format!("services.{name}.park.residual_mb {residual_mb} is above vram_mb {}: a park would keep more than the service runs with; lower residual_mb (the default for kind: http is 1024) or raise vram_mb", raw.vram_mb),
            ));
        }
    }
    let runtime = match raw.kind {
        RawKind::Native => {
            for (field, present) in [("container", raw.container.is_some())] {
                if present {
                    return Err(invalid(
                        field,
                        format!("services.{name}.{field} is for kind: docker; a native service has command, workdir, env and match"),
                    ));
                }
            }
            let command = match raw.command {
                Some(RawCommand::Argv(argv)) if !argv.is_empty() => CommandLine::Argv(argv),
                Some(RawCommand::Shell(script)) if !script.trim().is_empty() => {
                    CommandLine::Shell(script)
                }
                _ => {
                    return Err(invalid(
                        "command",
                        format!("services.{name}.command is missing or empty: give an argv list like [\"python\", \"main.py\"] or a string run by sh -c"),
                    ))
                }
            };
            if raw.match_pattern.as_deref() == Some("") {
                return Err(invalid(
                    "match",
                    format!("services.{name}.match is empty: it would match every process; give a distinctive part of the command line or remove it"),
                ));
            }
            Runtime::Native(NativeSpec {
                command,
                workdir: raw.workdir.map(|w| base.join(w)),
                env: raw.env,
                match_pattern: raw.match_pattern,
                log: parse_log(&name, raw.log.as_ref(), invalid)?,
            })
        }
        RawKind::Docker => {
            for (field, present) in [
                ("command", raw.command.is_some()),
                ("workdir", raw.workdir.is_some()),
                ("match", raw.match_pattern.is_some()),
                ("env", !raw.env.is_empty()),
            ] {
                if present {
                    return Err(invalid(
                        field,
                        format!("services.{name}.{field} is for kind: native; a docker service names its container"),
                    ));
                }
            }
            if raw.log.is_some() {
                return Err(invalid(
                    "log",
                    format!("services.{name}.log is for kind: native; the engine keeps a container's output (docker logs, or the container's --log-driver)"),
                ));
            }
            let container = raw.container.filter(|c| !c.is_empty()).ok_or_else(|| {
                invalid(
                    "container",
                    format!("services.{name}.container is missing: name the Docker container (docker create it first)"),
                )
            })?;
            Runtime::Docker(DockerSpec { container })
        }
    };
    let health = match raw.health {
        Some(h) => {
            if !(h.url.starts_with("http://") || h.url.starts_with("https://")) {
                return Err(invalid(
                    "health",
                    format!(
                        "services.{name}.health.url {:?} is not an http(s) URL",
                        h.url
                    ),
                ));
            }
            Some(HealthCheck {
                url: h.url,
                timeout: Duration::from_millis(h.timeout_ms.unwrap_or(DEFAULT_HEALTH_TIMEOUT_MS)),
            })
        }
        None => None,
    };
    let proxy = raw
        .proxy
        .map(|p| proxy::parse_proxy(name.as_str(), p, health.as_ref().map(|h| h.url.as_str())))
        .transpose()
        .map_err(|e| {
            source.invalid_owned(
                &[
                    "services".into(),
                    name.to_string(),
                    "proxy".into(),
                    e.key.into(),
                ],
                e.message,
            )
        })?;
    let timeout = |field: &str, value: Option<u64>, default: u64| {
        let ms = value.unwrap_or(default);
        if ms == 0 {
            Err(invalid(
                field,
                format!("services.{name}.{field} is 0: give a timeout in milliseconds"),
            ))
        } else {
            Ok(Duration::from_millis(ms))
        }
    };
    Ok(ServiceSpec {
        start_timeout: timeout(
            "start_timeout_ms",
            raw.start_timeout_ms,
            DEFAULT_START_TIMEOUT_MS,
        )?,
        stop_timeout: timeout(
            "stop_timeout_ms",
            raw.stop_timeout_ms,
            DEFAULT_STOP_TIMEOUT_MS,
        )?,
        name,
        runtime,
        vram_mb: raw.vram_mb,
        priority: raw.priority,
        phases: raw.phases,
        health,
        park,
        drain,
        proxy,
    })
}

/// `services.NAME.log`: absent (64 MB files, 3 kept), `journald`, or `{max_mb, keep}`.
fn parse_log(
    name: &ServiceName,
    raw: Option<&serde_yaml::Value>,
    invalid: impl Fn(&str, String) -> ConfigError,
) -> Result<LogTarget, ConfigError> {
    let valid = "journald, or {max_mb: 64, keep: 3} for size-rotated files in state_dir/logs";
    let files = match raw {
        None => return Ok(LogTarget::default()),
        Some(serde_yaml::Value::String(word)) if word == "journald" => {
            return Ok(LogTarget::Journald)
        }
        Some(serde_yaml::Value::Mapping(_)) => {
            serde_yaml::from_value::<RawLogFiles>(raw.cloned().unwrap_or_default())
                .map_err(|e| invalid("log", format!("services.{name}.log: {e}; valid: {valid}")))?
        }
        Some(other) => {
            let written = serde_yaml::to_string(other).unwrap_or_default();
            return Err(invalid(
                "log",
                format!(
                    "services.{name}.log: {} is not valid: use {valid}",
                    written.trim()
                ),
            ));
        }
    };
    let max_mb = files.max_mb.unwrap_or(DEFAULT_LOG_MAX_MB);
    if !(1..=MAX_LOG_MAX_MB).contains(&max_mb) {
        return Err(invalid(
            "log",
            format!("services.{name}.log.max_mb is {max_mb}: give the size at which the log is rotated, from 1 to {MAX_LOG_MAX_MB} MB"),
        ));
    }
    let keep = files.keep.unwrap_or(DEFAULT_LOG_KEEP);
    if keep > MAX_LOG_KEEP {
        return Err(invalid(
            "log",
            format!("services.{name}.log.keep is {keep}: keep at most {MAX_LOG_KEEP} rotated files (0 keeps none)"),
        ));
    }
    Ok(LogTarget::Files {
        max_bytes: max_mb * MB,
        keep,
    })
}

/// A service that does not deserialize, located at the offending key: the path serde
/// reached (`vram_mb`, `health.url`), or for an unknown key the name in the message.
fn service_error(
    source: &Source<'_>,
    name: &ServiceName,
    error: &serde_path_to_error::Error<serde_yaml::Error>,
) -> ConfigError {
    let mut keys = vec!["services".to_owned(), name.to_string()];
    let reached: Vec<String> = error
        .path()
        .iter()
        .map_while(|segment| match segment {
            serde_path_to_error::Segment::Map { key } => Some(key.clone()),
            _ => None,
        })
        .collect();
    let inner = error.inner().to_string();
    let mut key_path = format!("services.{name}");
    if reached.is_empty() {
        // An unknown or missing field names itself in backticks.
        keys.extend(inner.split('`').nth(1).map(str::to_owned));
    } else {
        key_path = format!("{key_path}.{}", reached.join("."));
        keys.extend(reached);
    }
    source.invalid_owned(&keys, format!("{key_path}: {inner}"))
}

fn check_unique_priorities(
    source: &Source<'_>,
    services: &[ServiceSpec],
) -> Result<(), ConfigError> {
    let mut seen: BTreeMap<i64, &ServiceName> = BTreeMap::new();
    for service in services {
        if let Some(first) = seen.insert(service.priority, &service.name) {
            return Err(source.invalid(
                &["services", service.name.as_str(), "priority"],
                format!(
                    "services.{}.priority {} ties with services.{}: priorities decide who is preempted, so each must be unique; pick another number",
                    service.name, service.priority, first
                ),
            ));
        }
    }
    Ok(())
}

/// Each proxy listens on its own address, not the API's: a second bind would fail at
/// startup, or one service's consumers would reach another.
fn check_proxy_listens(
    source: &Source<'_>,
    api_listen: SocketAddr,
    services: &[ServiceSpec],
) -> Result<(), ConfigError> {
    let mut seen: BTreeMap<SocketAddr, &ServiceName> = BTreeMap::new();
    for service in services {
        let Some(proxy) = &service.proxy else {
            continue;
        };
        let at = ["services", service.name.as_str(), "proxy", "listen"];
        let overlaps = |other: SocketAddr| {
            other.port() == proxy.listen.port()
                && (other.ip() == proxy.listen.ip()
                    || other.ip().is_unspecified()
                    || proxy.listen.ip().is_unspecified())
        };
        if overlaps(api_listen) {
            return Err(source.invalid(
                &at,
                format!("services.{}.proxy.listen {} is where the API listens (api.listen {api_listen}): give the proxy the port the service's consumers use, and the API another", service.name, proxy.listen),
            ));
        }
        if let Some((_, first)) = seen.iter().find(|(addr, _)| overlaps(**addr)) {
            return Err(source.invalid(
                &at,
                format!("services.{}.proxy.listen {} is also services.{first}.proxy.listen: each proxied service needs its own port", service.name, proxy.listen),
            ));
        }
        seen.insert(proxy.listen, &service.name);
    }
    Ok(())
}

/// The folder relative paths in the config are resolved against, made absolute so that
/// nothing downstream depends on the working directory. A bare file name ("c.yaml") has
/// the empty path as its parent, so the config path is made absolute first.
fn config_folder(path: &Path) -> PathBuf {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    match absolute.parent() {
        Some(folder) if !folder.as_os_str().is_empty() => folder.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// The config text, to turn a key path into a line and column for error messages.
struct Source<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Source<'_> {
    fn yaml_error(&self, error: &serde_yaml::Error) -> ConfigError {
        let (line, column) = error
            .location()
            .map(|l| (l.line(), l.column()))
            .unwrap_or((1, 1));
        ConfigError::Invalid {
            path: self.path.to_owned(),
            line,
            column,
            message: error.to_string(),
        }
    }

    fn invalid(&self, keys: &[&str], message: String) -> ConfigError {
        let (line, column) = locate(self.text, keys);
        ConfigError::Invalid {
            path: self.path.to_owned(),
            line,
            column,
            message,
        }
    }

    fn invalid_owned(&self, keys: &[String], message: String) -> ConfigError {
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        self.invalid(&keys, message)
    }
}

/// Finds the line and column of a nested key (`services` > `comfyui` > `vram_mb`) in
/// block-style YAML, falling back to the deepest key found. serde's values carry no
/// positions, so errors found after parsing locate their key this way.
fn locate(text: &str, keys: &[&str]) -> (usize, usize) {
    let mut found = (1, 1);
    let mut min_indent = 0usize;
    let mut start_line = 0usize;
    'keys: for key in keys.iter().filter(|k| !k.is_empty()) {
        for (index, line) in text.lines().enumerate().skip(start_line) {
            let trimmed = line.trim_start();
            let indent = line.len() - trimmed.len();
            if index > start_line && indent < min_indent && !trimmed.is_empty() && found.0 > 1 {
                break 'keys;
            }
            let bare = trimmed.trim_start_matches("- ");
            let matches_key = bare
                .strip_prefix(key)
                .map(|rest| rest.trim_start().starts_with(':'))
                .unwrap_or(false);
            if indent >= min_indent && matches_key {
                found = (index + 1, indent + 1);
                min_indent = indent + 1;
                start_line = index + 1;
                continue 'keys;
            }
        }
        break;
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
gpu: { reserve_mb: 512 }
services:
  comfyui:
    kind: native
    command: ["python", "main.py", "--listen"]
    match: "python main.py --listen"
    vram_mb: 20480
    priority: 100
    phases: [4]
    health: { url: "http://localhost:8188/system_stats", timeout_ms: 10000 }
  cosyvoice:
    kind: docker
    container: mcn_cosyvoice
    vram_mb: 4096
    priority: 50
    phases: [3]
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/gpu/config.yaml"), text)
    }

    fn error_of(text: &str) -> (usize, String) {
        match parse(text) {
            Err(ConfigError::Invalid { line, message, .. }) => (line, message),
            other => panic!("expected an invalid config, got {other:?}"),
        }
    }

    #[test]
    fn parses_the_contract_example_with_defaults() {
        let config = parse(GOOD).unwrap();
        assert_eq!(config.api.listen, "127.0.0.1:8000".parse().unwrap());
        assert_eq!(config.lease.key, "gpu_lock");
        assert_eq!(config.lease.ttl, Duration::from_millis(30_000));
        assert_eq!(
            config.desired_state,
            PathBuf::from("/etc/gpu/desired-state/state.yaml")
        );
        let names: Vec<_> = config
            .inventory
            .iter()
            .map(|s| s.name.to_string())
            .collect();
        assert_eq!(names, ["comfyui", "cosyvoice"], "sorted by priority");
        let comfy = config.inventory.find("comfyui").unwrap();
        assert_eq!(comfy.start_timeout, Duration::from_millis(120_000));
        assert_eq!(comfy.stop_timeout, Duration::from_millis(30_000));
        assert_eq!(
            config.inventory.phases().into_iter().collect::<Vec<_>>(),
            [3, 4]
        );
    }

    #[test]
    fn unknown_key_names_the_line_and_valid_keys() {
        let text = GOOD.replace("    priority: 50", "    priorty: 50");
        let (line, message) = error_of(&text);
        assert_eq!(line, 16);
        assert!(message.contains("priorty"), "{message}");
        assert!(message.contains("priority"), "lists valid keys: {message}");
    }

    #[test]
    fn a_type_error_points_at_its_key() {
        let (line, message) = error_of(&GOOD.replace("vram_mb: 4096", "vram_mb: lots"));
        assert_eq!(line, 15, "{message}");
        assert!(
            message.starts_with("services.cosyvoice.vram_mb: invalid type"),
            "{message}"
        );
        let text = GOOD.replace("timeout_ms: 10000 }", "timeout_ms: soon }");
        let (line, message) = error_of(&text);
        assert_eq!(line, 11, "{message}");
        assert!(
            message.starts_with("services.comfyui.health.timeout_ms:"),
            "{message}"
        );
    }

    #[test]
    fn unknown_kind_is_refused() {
        let (_, message) = error_of(&GOOD.replace("kind: docker", "kind: podman"));
        assert!(
            message.contains("podman") && message.contains("native"),
            "{message}"
        );
    }

    #[test]
    fn bad_service_name_is_refused_with_its_line() {
        let (line, message) = error_of(&GOOD.replace("  cosyvoice:", "  CosyVoice:"));
        assert_eq!(line, 12);
        assert!(message.contains("[a-z0-9_-]"), "{message}");
    }

    #[test]
    fn a_name_deserialized_from_json_is_checked() {
        let good: ServiceName = serde_json::from_str("\"cosy-voice_2\"").unwrap();
        assert_eq!(good.as_str(), "cosy-voice_2");
        assert_eq!(serde_json::to_string(&good).unwrap(), "\"cosy-voice_2\"");
        for bad in [
            "\"Cosy\"",
            "\"a/b\"",
            "\"\"",
            &format!("\"{}\"", "a".repeat(65)),
        ] {
            let error = serde_json::from_str::<ServiceName>(bad)
                .unwrap_err()
                .to_string();
            assert!(error.contains("[a-z0-9_-]"), "{bad}: {error}");
        }
        let map: Result<BTreeMap<ServiceName, u64>, _> = serde_json::from_str(r#"{"a b": 1}"#);
        assert!(map.unwrap_err().to_string().contains("\"a b\" is invalid"));
    }

    #[test]
    fn duplicate_service_is_refused() {
        let text = format!(
            "{GOOD}  comfyui:\n    kind: docker\n    container: x\n    vram_mb: 1\n    priority: 1\n"
        );
        let (_, message) = error_of(&text);
        assert!(message.contains("duplicate"), "{message}");
    }

    #[test]
    fn priority_tie_is_refused_naming_both() {
        let (line, message) = error_of(&GOOD.replace("priority: 50", "priority: 100"));
        assert_eq!(line, 16);
        assert!(
            message.contains("comfyui") && message.contains("cosyvoice"),
            "{message}"
        );
    }

    #[test]
    fn vram_above_the_gpu_is_refused() {
        let config = parse(GOOD).unwrap();
        assert!(config.check_fits_gpu(24576).is_ok());
        let error = config.check_fits_gpu(16384).unwrap_err().to_string();
        assert!(error.contains("comfyui.vram_mb 20480"), "{error}");
    }

    #[test]
    fn service_logs_default_to_rotated_files_and_are_checked() {
        let native = |config: &Config| match &config.inventory.find("comfyui").unwrap().runtime {
            Runtime::Native(native) => native.log,
            Runtime::Docker(_) => unreachable!(),
        };
        let default = native(&parse(GOOD).unwrap());
        assert_eq!(
            default,
            LogTarget::Files {
                max_bytes: 64 << 20,
                keep: 3
            }
        );
        let with = |log: &str| {
            GOOD.replace(
                "    phases: [4]\n",
                &format!("    phases: [4]\n    log: {log}\n"),
            )
        };
        assert_eq!(
            native(&parse(&with("journald")).unwrap()),
            LogTarget::Journald
        );
        assert_eq!(
            native(&parse(&with("{ max_mb: 2, keep: 0 }")).unwrap()),
            LogTarget::Files {
                max_bytes: 2 << 20,
                keep: 0
            }
        );
        for (log, expected) in [
            ("syslog", "services.comfyui.log: syslog is not valid"),
            ("{ max_mb: 0 }", "services.comfyui.log.max_mb is 0"),
            ("{ keep: 1000 }", "services.comfyui.log.keep is 1000"),
            ("{ max_mb: 1, kept: 2 }", "unknown field `kept`"),
        ] {
            let (line, message) = error_of(&with(log));
            assert_eq!(line, 11, "{log}: {message}");
            assert!(message.contains(expected), "{log}: {message}");
        }
        let docker = GOOD.replace("    phases: [3]\n", "    phases: [3]\n    log: journald\n");
        let (line, message) = error_of(&docker);
        assert_eq!(line, 18);
        assert!(
            message.contains("services.cosyvoice.log is for kind: native"),
            "{message}"
        );
    }

    #[test]
    fn docker_fields_on_native_are_refused() {
        let (_, message) = error_of(&GOOD.replace(
            "    match: \"python main.py --listen\"",
            "    container: oops",
        ));
        assert!(message.contains("kind: docker"), "{message}");
    }

    #[test]
    fn malformed_yaml_reports_position() {
        let (line, _) = error_of("services:\n  a: [unclosed\n");
        assert!(line >= 2);
    }

    #[test]
    fn lease_keys_default_and_are_checked() {
        let config = parse(GOOD).unwrap();
        assert_eq!(config.lease.redis_url, None, "in-process by default");
        assert_eq!(config.lease.wait, Duration::from_millis(5_000));
        let with = |lease: &str| format!("lease: {lease}\n{GOOD}");
        let redis = parse(&with(
            "{ redis_url: \"redis://127.0.0.1:6380/2\", key: mcn_gpu, ttl_ms: 2000, wait_ms: 0 }",
        ))
        .unwrap();
        assert_eq!(
            redis.lease.redis_url.as_deref(),
            Some("redis://127.0.0.1:6380/2")
        );
        assert_eq!(redis.lease.key, "mcn_gpu");
        assert_eq!(redis.lease.ttl, Duration::from_millis(2000));
        assert_eq!(redis.lease.wait, Duration::ZERO);

        let (line, message) = error_of(&with("{ redis_url: \"http://127.0.0.1:6379\" }"));
        assert_eq!(line, 1);
        assert!(
            message.contains("lease.redis_url") && message.contains("redis://HOST:PORT"),
            "{message}"
        );
        let (_, message) = error_of(&with("{ wait_ms: 600000 }"));
        assert!(
            message.contains("lease.wait_ms 600000") && message.contains("at most 60000"),
            "{message}"
        );
        let (_, message) = error_of(&with("{ ttl_ms: 10 }"));
        assert!(message.contains("lease.ttl_ms 10"), "{message}");
        let (_, message) = error_of(&with("{ wait: 5 }"));
        assert!(message.contains("wait_ms"), "lists valid keys: {message}");
    }

    #[test]
    fn locate_finds_nested_keys() {
        assert_eq!(locate(GOOD, &["services", "cosyvoice", "vram_mb"]).0, 15);
        assert_eq!(locate(GOOD, &["services", "comfyui", "priority"]).0, 9);
    }

    #[test]
    fn a_bare_config_name_anchors_relative_paths_in_the_working_directory() {
        let text = format!(
            "desired_state: state.yaml\nstate_dir: run\n{}",
            &GOOD[GOOD.find("services:").unwrap()..]
        );
        let config = Config::parse(Path::new("c.yaml"), &text).unwrap();
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(config.desired_state, cwd.join("state.yaml"));
        assert_eq!(config.state_dir, cwd.join("run"));
    }
}
