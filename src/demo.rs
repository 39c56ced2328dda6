//! `gpu-manager demo`: the requirements' pipeline on a simulated 24 GB GPU, so a
//! newcomer sees phases 2 -> 3 -> 4 work on a laptop. The services are stand-ins
//! (`gpu-standin`) that allocate their VRAM on the simulated GPU, answer their health
//! URL after a start delay and exit after a stop delay, like the real ones.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use sim_gpu::{DeviceSpec, SimGpuDir};

use crate::config::Config;
use crate::daemon;
use crate::desired::{write_atomic, DesiredState};
use crate::reconcile::ReconcilerHandle;
use crate::status::Status;

/// The requirements' service inventory, sized as in its table.
const SERVICES: [(&str, u64, i64, &str, u64); 4] = [
    ("comfyui", 20480, 100, "[4]", 1500),
    ("cosyvoice", 4096, 50, "[3]", 800),
    ("vidi", 4096, 40, "[2]", 600),
    ("ollama", 18432, 10, "[]", 500),
];

pub async fn run(dir: Option<PathBuf>) -> anyhow::Result<()> {
    let temp;
    let dir = match dir {
        Some(dir) => dir,
        None => {
            temp = tempfile_dir()?;
            temp.clone()
        }
    };
    let config_path = write_demo_files(&dir)?;
    let gpu = SimGpuDir::open(dir.join("gpu"))?;
    println!("demo folder: {}", dir.display());
    println!("config:      {}", config_path.display());
    println!("simulated GPU: 24576 MB, 1024 MB used by a desktop, 300 ms to reclaim a dead process's memory\n");

    let config = Arc::new(Config::load(&config_path)?);
    let reconciler = daemon::build(config.clone())?;
    let mut handle = reconciler.handle();
    let daemon = tokio::spawn(reconciler.run());

    let steps: [(&str, DesiredState); 5] = [
        ("AC-1: phase 2 (Vidi)", phase(Some(2), &[])),
        (
            "AC-1: phase 3 (stop Vidi, start CosyVoice)",
            phase(Some(3), &[]),
        ),
        (
            "AC-1: phase 4 (stop CosyVoice, start ComfyUI)",
            phase(Some(4), &[]),
        ),
        (
            "pin Ollama during phase 4: it does not fit beside ComfyUI",
            phase(Some(4), &["ollama"]),
        ),
        ("no phase: everything stops", phase(None, &[])),
    ];
    for (title, state) in steps {
        println!("== {title}");
        write_atomic(&config.desired_state, &state)?;
        let status = converged(&mut handle, &state).await?;
        for action in status
            .recent_actions
            .iter()
            .filter(|a| a.generation == status.desired.generation)
        {
            let outcome = match &action.outcome {
                Ok(detail) => detail,
                Err(error) => error,
            };
            println!(
                "  {} {} in {} ms: {outcome}",
                action.op, action.service, action.duration_ms
            );
        }
        print!("{}", render_status(&status));
        let ooms = gpu.oom_log()?;
        anyhow::ensure!(
            ooms.is_empty(),
            "out-of-memory on the simulated GPU: {ooms:?}"
        );
        println!();
    }
    daemon.abort();
    println!("oom.log is empty: no service ever ran out of memory.");
    Ok(())
}

fn phase(phase: Option<u32>, pinned: &[&str]) -> DesiredState {
    DesiredState {
        phase,
        pinned: pinned
            .iter()
            .filter_map(|p| crate::config::ServiceName::parse(p).ok())
            .collect(),
        held: Vec::new(),
    }
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("gpu-manager-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Waits until the daemon has accepted `state` and converged on it.
async fn converged(handle: &mut ReconcilerHandle, state: &DesiredState) -> anyhow::Result<Status> {
    let wanted_pins: Vec<String> = state.pinned.iter().map(|p| p.to_string()).collect();
    let wait = handle.status.wait_for(|s| {
        s.desired.phase == state.phase
            && s.desired.pinned == wanted_pins
            && s.desired.generation > 0
            && s.desired.converged_generation == s.desired.generation
    });
    let status = tokio::time::timeout(Duration::from_secs(60), wait)
        .await
        .context("the daemon did not converge within 60 s")?
        .context("the daemon stopped")?;
    Ok(status.clone())
}

/// A readable table of VRAM and services.
pub fn render_status(status: &Status) -> String {
    let vram = &status.vram;
    let mut out = format!(
        "VRAM {} / {} MB used, {} MB free ({} MB external)\n",
        vram.used_mb, vram.total_mb, vram.free_mb, vram.external_mb
    );
    for (name, service) in &status.services {
        let observed = service
            .observed_vram_mb
            .map(|mb| format!("{mb} MB on GPU"))
            .unwrap_or_else(|| "-".to_owned());
        out.push_str(&format!(
            "  {name:<10} {:<9} {:>6} MB declared  {observed:<14} {}\n",
            service.state.to_string(),
            service.declared_vram_mb,
            service.reason.as_deref().unwrap_or("")
        ));
    }
    out
}

/// Writes the simulated GPU, the config and an empty desired state into `dir`.
fn write_demo_files(dir: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    SimGpuDir::create(
        dir.join("gpu"),
        &DeviceSpec {
            name: "Simulated RTX 4090".to_owned(),
            total_mb: 24576,
            baseline_mb: 1024,
            reclaim_ms: 300,
            temperature_c: 45,
            utilization_pct: 0,
        },
    )?;
    let standin = std::env::current_exe()?.with_file_name("gpu-standin");
    anyhow::ensure!(
        standin.exists(),
        "{} is missing: build the whole workspace first (cargo build --release --workspace)",
        standin.display()
    );
    let mut config = String::from(
        "# gpu-manager demo: the requirements' inventory with stand-in services\n\
         gpu: { simulated: gpu, reserve_mb: 512 }\n\
         desired_state: desired-state/state.yaml\n\
         state_dir: state\n\
         resync_ms: 1000\n\
         services:\n",
    );
    for (name, vram_mb, priority, phases, start_delay_ms) in SERVICES {
        let port = free_port()?;
        config.push_str(&format!(
            "  {name}:\n    kind: native\n    command: [{standin:?}, \"--name\", \"{name}\", \"--sim-dir\", \"gpu\", \"--vram-mb\", \"{vram_mb}\", \"--port\", \"{port}\", \"--start-delay-ms\", \"{start_delay_ms}\", \"--stop-delay-ms\", \"200\"]\n    workdir: .\n    vram_mb: {vram_mb}\n    priority: {priority}\n    phases: {phases}\n    health: {{ url: \"http://127.0.0.1:{port}/health\" }}\n    start_timeout_ms: 20000\n    stop_timeout_ms: 5000\n"
        ));
    }
    let path = dir.join("gpu-manager.yaml");
    std::fs::write(&path, config)?;
    write_atomic(
        &dir.join("desired-state/state.yaml"),
        &DesiredState::default(),
    )?;
    Ok(path)
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
