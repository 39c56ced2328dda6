//! The command line: parse, load the config, call into the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};

use gpu_manager::config::Config;
use gpu_manager::{daemon, demo, desired, plan};

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
    /// Print the actions the daemon would take now, and why; changes nothing.
    Plan {
        #[arg(long, short)]
        config: PathBuf,
        /// Plan for this phase instead of the desired-state file's.
        #[arg(long)]
        phase: Option<u32>,
    },
    /// Check a config file; exit non-zero with the file, line and key if it is invalid.
    Validate {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run the requirements' pipeline on a simulated 24 GB GPU: phases 2 -> 3 -> 4.
    Demo {
        /// Where to put the simulated GPU, config and logs (default: a temp folder).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
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
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Watch { config } => {
            let config = Arc::new(Config::load(&config)?);
            let reconciler = daemon::build(config)?;
            tokio::select! {
                () = reconciler.run() => Ok(()),
                _ = tokio::signal::ctrl_c() => {
                    tracing::info!("interrupted: services keep running and will be adopted on restart");
                    Ok(())
                }
            }
        }
        Command::Plan { config, phase } => {
            let config = Config::load(&config)?;
            let mut state = desired::load(&config.desired_state, &config.inventory)?;
            if let Some(phase) = phase {
                state.phase = Some(phase);
                state.held.clear();
                state.check_against(&config.desired_state, &config.inventory)?;
            }
            let reconciler = daemon::build(Arc::new(config))?;
            let plan = reconciler.dry_run(&state).await;
            print!("{}", plan::render(&plan));
            Ok(())
        }
        Command::Validate { config } => {
            let config = Config::load(&config)?;
            daemon::check_against_gpu(&config, &daemon::open_gpu(&config))?;
            println!(
                "{}: valid ({} services, phases {:?})",
                config.path.display(),
                config.inventory.len(),
                config.inventory.phases()
            );
            Ok(())
        }
        Command::Demo { dir } => demo::run(dir).await,
    }
}
