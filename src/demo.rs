//! `gpu-manager demo`: the requirements' pipeline on a simulated 24 GB GPU, so a
//! newcomer sees phases 2 -> 3 -> 4 work on a laptop. The services are stand-ins
//! (`gpu-standin`) that allocate their VRAM on the simulated GPU, answer their health
//! URL after a start delay and exit after a stop delay, like the real ones.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sim_gpu::{DeviceSpec, SimGpuDir};

use crate::client::status_table;
use crate::config::Config;
use crate::desired::{write_atomic, DesiredState};
use crate::status::Status;
use tokio_util::sync::CancellationToken;

use crate::{api, daemon};

/// The requirements' service inventory, sized as in its table.
const SERVICES: [(&str, u64, i64, &str, u64); 4] = [
    ("comfyui", 20480, 100, "[4]", 1500),
    ("cosyvoice", 4096, 50, "[3]", 800),
    ("vidi", 4096, 40, "[2]", 600),
    ("ollama", 18432, 10, "[]", 500),
];

pub async fn run(dir: Option<PathBuf>) -> anyhow::Result<()> {
    let dir = match dir {
        Some(dir) => dir,
        None => tempfile_dir()?,
    };
    let config_path = write_demo_files(&dir)?;
    let gpu = SimGpuDir::open(dir.join("gpu"))?;
    println!("demo folder: {}", dir.display());
    println!("config:      {}", config_path.display());
    println!("simulated GPU: 24576 MB, 1024 MB used by a desktop, 300 ms to reclaim a dead process's memory\n");

    let config = Arc::new(Config::load(&config_path)?);
    let reconciler = daemon::build(config.clone()).await?;
    let shutdown = CancellationToken::new();
    let (addr, api) = api::serve(
        reconciler.handle(),
        &config.api,
        shutdown.clone().cancelled_owned(),
    )
    .await?;
    let daemon = tokio::spawn(reconciler.run(shutdown.clone()));
    let server = tokio::spawn(api);
    let client = reqwest::Client::builder().no_proxy().build()?;
    let base = format!("http://{addr}");

    let steps = [
        ("AC-1: phase 2 (Vidi)", "/gpu/prepare-phase/2"),
        (
            "AC-1: phase 3 (stop Vidi, start CosyVoice)",
            "/gpu/prepare-phase/3",
        ),
        (
            "AC-1: phase 4 (stop CosyVoice, start ComfyUI)",
            "/gpu/prepare-phase/4",
        ),
        (
            "Ollama does not fit beside ComfyUI (priority 100 > 10): refused",
            "/gpu/service/ollama/start",
        ),
        (
            "AC-3: back to phase 3, then start ComfyUI: CosyVoice is preempted",
            "/gpu/prepare-phase/3",
        ),
        ("AC-3", "/gpu/service/comfyui/start"),
        ("stop ComfyUI: held stopped", "/gpu/service/comfyui/stop"),
    ];
    for (title, path) in steps {
        println!("== {title}\n$ curl -X POST {base}{path}");
        let response = client.post(format!("{base}{path}")).send().await?;
        let code = response.status();
        let body: serde_json::Value = response.json().await?;
        if code.is_success() {
            for action in body["actions"].as_array().into_iter().flatten() {
                let outcome = action["outcome"]["Ok"]
                    .as_str()
                    .or(action["outcome"]["Err"].as_str())
                    .unwrap_or("");
                println!(
                    "  {} {} in {} ms: {outcome}",
                    action["op"].as_str().unwrap_or(""),
                    action["service"].as_str().unwrap_or(""),
                    action["duration_ms"]
                );
            }
        } else {
            println!("  HTTP {code}: {}", body["error"].as_str().unwrap_or(""));
        }
        print!("{}", status_table(&fetch_status(&client, &base).await?));
        let ooms = gpu.oom_log()?;
        anyhow::ensure!(
            ooms.is_empty(),
            "out-of-memory on the simulated GPU: {ooms:?}"
        );
        println!();
    }
    println!("== cleaning up: no phase, nothing pinned");
    write_atomic(&config.desired_state, &DesiredState::default())?;
    wait_all_stopped(&client, &base).await?;
    shutdown.cancel();
    daemon.await?;
    server.abort();
    println!("oom.log is empty: no service ever ran out of memory.");
    Ok(())
}

async fn fetch_status(client: &reqwest::Client, base: &str) -> anyhow::Result<Status> {
    Ok(client
        .get(format!("{base}/gpu/status"))
        .send()
        .await?
        .json()
        .await?)
}

/// Waits until every service is stopped (after the demo's last step).
async fn wait_all_stopped(client: &reqwest::Client, base: &str) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let status = fetch_status(client, base).await?;
        if status.services.values().all(|s| s.pids.is_empty()) {
            return Ok(());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "services did not stop within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("gpu-manager-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
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
         api: { listen: \"127.0.0.1:0\" }\n\
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
