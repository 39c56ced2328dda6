//! The command line: parse, load the config, call into the library.
// As in lib.rs: serving the API's filter tree needs a deeper `Unpin` check in release.
#![recursion_limit = "256"]

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use reqwest::Url;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio_util::sync::CancellationToken;

use gpu_manager::client::{self, Client, Request};
use gpu_manager::config::Config;
use gpu_manager::footprints::Footprints;
use gpu_manager::observe::gpu::Gpu;
use gpu_manager::observe::nvml::NvmlGpu;
use gpu_manager::reconcile::{
    Command as ReconcilerCommand, ConfigWatch, GpuSource, ReconcilerHandle,
};
use gpu_manager::reload::{ReloadTrigger, RemovedServices};
use gpu_manager::{api, daemon, demo, desired, doctor, notify, plan, proxy};

#[derive(Parser)]
#[command(
    name = "gpu-manager",
    version,
    about = "Keeps GPU services started and stopped so that what is wanted fits in VRAM"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Human, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the reconcile loop: keep what runs equal to the desired-state file.
    Watch {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run the reconcile loop and the HTTP API: the daemon users deploy. SIGHUP
    /// re-reads the config and applies what changed.
    Serve {
        #[arg(long, short)]
        config: PathBuf,
        /// Also re-read the config whenever the file changes (debounced).
        #[arg(long)]
        watch_config: bool,
    },
    /// Print the actions the daemon would take now, and why; changes nothing.
    Plan {
        #[arg(long, short)]
        config: PathBuf,
        /// Plan for this phase instead of the desired-state file's.
        #[arg(long)]
        phase: Option<u32>,
    },
    /// Internal: a native service's log writer, reading the service's output on stdin
    /// (started by the daemon; see `act::service_log`).
    #[command(name = "service-log", hide = true)]
    ServiceLog {
        #[arg(long)]
        path: PathBuf,
        #[arg(long)]
        max_bytes: u64,
        #[arg(long)]
        keep: u32,
    },
    /// Check a config file; exit non-zero with the file, line and key if it is invalid.
    Validate {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Check this host against a config: PASS / WARN / FAIL, each with its fix. Exit 0
    /// when nothing fails.
    Doctor {
        #[arg(long, short)]
        config: PathBuf,
        /// Print the checks as JSON (for machines).
        #[arg(long)]
        json: bool,
    },
    /// Print what the daemon sees of the GPU (NVML, or the config's simulated GPU).
    Gpu {
        /// Observe the GPU this config names (default: NVML, GPU 0).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Load this libnvidia-ml instead of the system's.
        #[arg(long, conflicts_with = "config")]
        nvml_library: Option<PathBuf>,
        /// Also time this many observations and print their median and p99.
        #[arg(long, default_value_t = 0)]
        bench: usize,
    },
    /// Run the requirements' pipeline on a simulated 24 GB GPU: phases 2 -> 3 -> 4.
    Demo {
        /// Where to put the simulated GPU, config and logs (default: a temp folder).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Ask a running daemon for its status: VRAM, services, states.
    Status {
        #[command(flatten)]
        daemon: DaemonArgs,
    },
    /// Ask a running daemon whether MB fit on the GPU now: exit 0 if so, 1 if not.
    CanFit {
        mb: u64,
        /// Also say what a start of that size at this priority would stop.
        #[arg(long, allow_negative_numbers = true)]
        priority: Option<i64>,
        #[command(flatten)]
        daemon: DaemonArgs,
    },
    /// Ask a running daemon to prepare a phase; waits until it has converged.
    Phase {
        phase: u32,
        /// Skip draining: stop or park services at once, without waiting for their work
        /// in flight to end. That work is lost.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        daemon: DaemonArgs,
    },
    /// Ask a running daemon to start (pin) a service, preempting lower priorities.
    Start {
        name: String,
        /// Skip draining: stop or park services at once, without waiting for their work
        /// in flight to end. That work is lost.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        daemon: DaemonArgs,
    },
    /// Ask a running daemon to stop a service and hold it stopped.
    Stop {
        name: String,
        /// Skip draining: stop or park services at once, without waiting for their work
        /// in flight to end. That work is lost.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        daemon: DaemonArgs,
    },
    /// Take (or renew) a claim on a service: it is started if needed and, while the
    /// claim lives, never stopped, parked or preempted (docs/ARCHITECTURE.md, "Claims").
    Claim {
        name: String,
        /// How long the claim lasts: 600, 90s, 30m, 2h (at most a day). Renew to hold longer.
        #[arg(long, value_parser = parse_ttl)]
        ttl: u64,
        /// Who holds it (free text: a job id, a person): the same holder renews or releases.
        #[arg(long)]
        holder: String,
        #[command(flatten)]
        daemon: DaemonArgs,
    },
    /// End a holder's claim on a service.
    Release {
        name: String,
        #[arg(long)]
        holder: String,
        #[command(flatten)]
        daemon: DaemonArgs,
    },
    /// Ask a running daemon to re-read its config file and apply what changed: what did
    /// not change is untouched; a refused config leaves the running one in force.
    Reload {
        /// Leave the processes of services the new config removes running, unmanaged
        /// (by default they are stopped, drained first).
        #[arg(long)]
        keep_removed: bool,
        #[command(flatten)]
        daemon: DaemonArgs,
    },
    /// Reset what was learned of a service's VRAM footprint (its peak and residual):
    /// through the daemon when it answers, else in the config's state_dir directly.
    Forget {
        name: String,
        #[command(flatten)]
        daemon: DaemonArgs,
    },
}

/// Where the client commands find the daemon. Exit codes: 0 done, 1 refused or failed,
/// 2 the daemon cannot be reached.
#[derive(Args)]
struct DaemonArgs {
    /// The daemon's URL [default: the --config file's api.listen, else http://127.0.0.1:8000]
    #[arg(long, value_parser = parse_url)]
    url: Option<Url>,
    /// The daemon's config: its api.listen and api.token_file.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// A file holding the bearer token POSTs need (overrides the config's).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Print the daemon's JSON answer instead of text (for scripts).
    #[arg(long)]
    json: bool,
}

impl DaemonArgs {
    fn client(&self) -> Result<Client, client::ClientError> {
        Client::new(
            self.url.clone(),
            self.config.as_deref(),
            self.token_file.as_deref(),
        )
    }

    /// Runs a transition against the daemon: its exit code.
    async fn transition(self, request: Request, force: bool) -> ExitCode {
        client::run_transition(self.client(), request, force, self.json).await
    }
}

fn parse_url(text: &str) -> Result<Url, String> {
    let url = Url::parse(text).map_err(|e| format!("{text:?} is not a URL: {e}"))?;
    match url.scheme() {
        "http" => Ok(url),
        scheme => Err(format!(
            "{scheme}:// is not supported: the daemon speaks plain HTTP (use http://HOST:PORT)"
        )),
    }
}

/// A claim's `--ttl`: bare seconds or a duration such as `30m`, in whole seconds.
fn parse_ttl(text: &str) -> Result<u64, String> {
    let seconds = match text.parse::<u64>() {
        Ok(seconds) => seconds,
        Err(_) => humantime::parse_duration(text)
            .map_err(|e| {
                format!("{text:?} is not a duration ({e}): give seconds, or 90s, 30m, 2h")
            })?
            .as_secs(),
    };
    let max = gpu_manager::claim_request::MAX_TTL_S;
    match seconds {
        1..=gpu_manager::claim_request::MAX_TTL_S => Ok(seconds),
        _ => Err(format!(
            "{text:?} is out of range: a claim lasts 1 s to {max} s (a day); renew to hold longer"
        )),
    }
}

/// Whether the daemon serves the HTTP API beside the reconcile loop.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    WatchOnly,
    WithApi,
}

/// Runs the reconcile loop (and the API) until SIGTERM or SIGINT, then shuts down
/// gracefully (docs/ARCHITECTURE.md, "Shutdown"): services keep running when the daemon
/// stops, and the next daemon adopts them.
async fn run_daemon(config: &Path, mode: Mode, watch: ConfigWatch) -> anyhow::Result<()> {
    let config = Arc::new(Config::load(config)?);
    let reconciler = daemon::build(config.clone()).await?.watching_config(watch);
    // Before the first round: an early SIGHUP must not kill the daemon.
    let hangups = signal(SignalKind::hangup())?;
    tokio::spawn(reload_on_hangup(hangups, reconciler.handle()));
    if let Some(notifier) = notify::Notifier::from_env() {
        tokio::spawn(notify::follow(notifier, reconciler.handle().status));
    }
    gpu_manager::act::reaper::start()?;
    let shutdown = CancellationToken::new();
    let api_stop = CancellationToken::new();
    let api = match mode {
        Mode::WithApi => {
            let stop = api_stop.clone().cancelled_owned();
            Some(tokio::spawn(
                api::serve(reconciler.handle(), &config.api, stop).await?.1,
            ))
        }
        Mode::WatchOnly => None,
    };
    // The demand proxies listen from startup (docs/ARCHITECTURE.md, "The demand proxy").
    let proxy_stop = CancellationToken::new();
    let proxies = proxy::start(&reconciler.handle(), proxy_stop.clone()).await?;
    tokio::spawn(forward_signals(shutdown.clone()));
    reconciler.run(shutdown).await;
    // The answers owed to waiting callers are on their way out: let the server finish
    // them (event streams never finish: they are cut after a moment).
    api_stop.cancel();
    proxy_stop.cancel();
    if let Some(api) = api {
        let _ = tokio::time::timeout(API_DRAIN, api).await;
    }
    let _ = tokio::time::timeout(API_DRAIN, proxies).await;
    Ok(())
}

/// SIGHUP (`systemctl reload`) re-reads the config, within systemd's reload protocol:
/// `RELOADING=1` before, `READY=1` after, whether it was applied or refused.
async fn reload_on_hangup(mut hangups: Signal, handle: ReconcilerHandle) {
    while hangups.recv().await.is_some() {
        tracing::info!("SIGHUP: re-reading the config");
        notify::reloading();
        let (reply, answer) = tokio::sync::oneshot::channel();
        let command = ReconcilerCommand::Reload {
            removed: RemovedServices::Stop,
            trigger: ReloadTrigger::Signal,
            reply,
        };
        if handle.commands.send(command).await.is_err() {
            return;
        }
        // The loop logs what it did or why it refused.
        if answer.await.is_err() {
            return;
        }
        notify::reloaded(&handle.status.borrow());
    }
}

/// How long the API gets to finish its answers at shutdown.
const API_DRAIN: Duration = Duration::from_secs(2);

/// SIGTERM (systemd, `docker stop`) and SIGINT (Ctrl-C) both begin a graceful shutdown.
async fn forward_signals(shutdown: CancellationToken) {
    let mut terminate = match signal(SignalKind::terminate()) {
        Ok(stream) => stream,
        Err(error) => {
            tracing::error!(%error, "cannot handle SIGTERM: only Ctrl-C shuts down gracefully");
            let _ = tokio::signal::ctrl_c().await;
            notify::stopping();
            shutdown.cancel();
            return;
        }
    };
    let name = tokio::select! {
        _ = terminate.recv() => "SIGTERM",
        _ = tokio::signal::ctrl_c() => "SIGINT",
    };
    tracing::info!(signal = name, "shutting down gracefully");
    notify::stopping();
    shutdown.cancel();
}

/// One observation, and with `bench` > 0 the median and p99 of that many more.
fn observe_report(gpu: &dyn Gpu, bench: usize) -> anyhow::Result<serde_json::Value> {
    let sample = gpu.sample()?;
    let mut report = serde_json::json!({ "source": gpu.describe(), "sample": sample });
    if bench > 0 {
        let mut micros = Vec::with_capacity(bench);
        for _ in 0..bench {
            let started = std::time::Instant::now();
            gpu.sample()?;
            micros.push(started.elapsed().as_secs_f64() * 1e6);
        }
        micros.sort_by(f64::total_cmp);
        let at = |q: f64| micros[((micros.len() - 1) as f64 * q).round() as usize];
        report["bench"] = serde_json::json!({
            "samples": bench, "median_us": at(0.5), "p99_us": at(0.99), "max_us": at(1.0),
        });
    }
    Ok(report)
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: a log file gets plain text that grep can match.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::ServiceLog {
        path,
        max_bytes,
        keep,
    } = &cli.command
    {
        // Before the async runtime: the writer is one blocking loop, one per service.
        let stdin = std::io::stdin().lock();
        return match gpu_manager::act::service_log::write_rotated(stdin, path, *max_bytes, *keep) {
            Ok(()) => ExitCode::SUCCESS,
            Err(_) => ExitCode::FAILURE,
        };
    }
    gpu_manager::memory::fewer_arenas();
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Watch { config } => run_daemon(&config, Mode::WatchOnly, ConfigWatch::Off).await?,
        Command::Serve {
            config,
            watch_config,
        } => {
            let watch = match watch_config {
                true => ConfigWatch::On,
                false => ConfigWatch::Off,
            };
            run_daemon(&config, Mode::WithApi, watch).await?
        }
        Command::Plan { config, phase } => {
            let config = Config::load(&config)?;
            let mut state = desired::load_or_initial(&config.desired_state, &config.inventory)?;
            if let Some(phase) = phase {
                state.phase = Some(phase);
                state.held.clear();
                state.check_against(&config.desired_state, &config.inventory)?;
            }
            let footprints = Footprints::load_or_empty(&config.state_dir, &config.inventory);
            let inventory = config.inventory.clone();
            let reconciler = daemon::build_read_only(Arc::new(config)).await?;
            let plan = reconciler.dry_run(&state).await;
            print!("{}", plan::render(&plan));
            print!("{}", footprints.render(&inventory));
        }
        Command::ServiceLog { .. } => unreachable!("handled in main, before the runtime"),
        Command::Validate { config } => {
            let config = Config::load(&config)?;
            daemon::check_against_gpu(&config, &daemon::open_gpu(&config).await)?;
            println!(
                "{}: valid ({} services, phases {:?})",
                config.path.display(),
                config.inventory.len(),
                config.inventory.phases()
            );
        }
        Command::Doctor { config, json } => {
            let report = doctor::run(&config).await;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.render());
            }
            if !report.ok {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Gpu {
            config,
            nvml_library,
            bench,
        } => {
            let gpu = match config {
                Some(config) => match daemon::open_gpu(&Config::load(&config)?).await {
                    GpuSource::Observed { gpu, .. } => gpu,
                    GpuSource::Unavailable { reason } => anyhow::bail!(reason),
                },
                None => Arc::new(NvmlGpu::open(nvml_library.as_deref(), 0)?),
            };
            let report =
                tokio::task::spawn_blocking(move || observe_report(gpu.as_ref(), bench)).await??;
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        Command::Demo { dir } => {
            gpu_manager::act::reaper::start()?;
            demo::run(dir).await?
        }
        Command::Status { daemon } => {
            return Ok(client::run_status(daemon.client(), daemon.json).await)
        }
        Command::CanFit {
            mb,
            priority,
            daemon,
        } => return Ok(client::run_can_fit(daemon.client(), mb, priority, daemon.json).await),
        Command::Phase {
            phase,
            force,
            daemon,
        } => return Ok(daemon.transition(Request::Phase(phase), force).await),
        Command::Start {
            name,
            force,
            daemon,
        } => return Ok(daemon.transition(Request::Start(name), force).await),
        Command::Stop {
            name,
            force,
            daemon,
        } => return Ok(daemon.transition(Request::Stop(name), force).await),
        Command::Claim {
            name,
            ttl,
            holder,
            daemon,
        } => {
            let request = Request::Claim {
                name,
                holder,
                ttl_s: ttl,
            };
            return Ok(daemon.transition(request, false).await);
        }
        Command::Release {
            name,
            holder,
            daemon,
        } => {
            return Ok(daemon
                .transition(Request::Release { name, holder }, false)
                .await)
        }
        Command::Reload {
            keep_removed,
            daemon,
        } => {
            let removed = match keep_removed {
                true => RemovedServices::Keep,
                false => RemovedServices::Stop,
            };
            return Ok(client::run_reload(daemon.client(), removed, daemon.json).await);
        }
        Command::Forget { name, daemon } => {
            let client = daemon.client();
            let config = daemon.config.as_deref();
            return Ok(client::run_forget(client, config, &name, daemon.json).await);
        }
    }
    Ok(ExitCode::SUCCESS)
}
