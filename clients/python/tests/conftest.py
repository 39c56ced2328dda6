"""The real daemon for the client's tests: `gpu-manager serve` (built in the workspace)
on a simulated 24 GB GPU folder, with the requirements' services as `gpu-standin`
processes that really allocate on it, and the Redis lease on a throwaway redis-server.

GPU_MANAGER_BIN names the binary (default: the workspace's target/debug/gpu-manager).
Without redis-server the tests are skipped, and under CI=true they fail instead.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Dict, Iterator

import pytest
import requests

REPO = Path(__file__).resolve().parents[3]
# 24576 MB with a 1 GB desktop, 512 MB reserve: a 23040 MB budget.
SERVICES = [
    # name, MB, priority, phases
    ("comfyui", 20480, 100, "[4]"),
    ("cosyvoice", 4096, 50, "[3]"),
    ("vidi", 4096, 40, "[2]"),
    ("ollama", 18432, 10, "[]"),
]
# Drained before a stop or park: the stand-in's ComfyUI-shaped queue, busy while a job
# runs, for at most this many ms.
DRAIN_MS = {"cosyvoice": 2000}


def _require(available: bool, what: str) -> None:
    if available:
        return
    message = f"{what} is missing (tests/run.sh installs it)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true: {message}")
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(what: str, check, timeout: float = 30.0, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:  # not up yet
            pass
        time.sleep(0.05)
    context = log.read_text() if log and log.exists() else ""
    raise AssertionError(f"timed out waiting for {what}\n{context}")


@pytest.fixture(scope="session")
def binaries() -> Dict[str, Path]:
    daemon = Path(os.environ.get("GPU_MANAGER_BIN", REPO / "target/debug/gpu-manager"))
    standin = daemon.parent / "gpu-standin"
    for path in (daemon, standin):
        assert path.exists(), f"{path} is missing: run `cargo build --workspace` first"
    return {"daemon": daemon, "standin": standin}


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> Iterator[str]:
    _require(shutil.which("redis-server") is not None, "redis-server")
    try:
        import redis  # noqa: F401
    except ImportError:
        _require(False, "redis-py (pip install 'gpu-manager-client[redis]')")
    port = free_port()
    folder = tmp_path_factory.mktemp("redis")
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(folder)],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}"
    import redis as redis_py

    wait_until("redis-server answers", lambda: redis_py.Redis.from_url(url).ping())
    yield url
    server.kill()
    server.wait()


class Daemon:
    def __init__(self, folder: Path, url: str, process: subprocess.Popen, gpu: Path,
                 redis_url: str, lease_key: str, service_ports: Dict[str, int],
                 proxy_ports: Dict[str, int]):
        self.folder = folder
        self.service_ports = service_ports
        # Where each proxied service's demand proxy listens.
        self.proxy_ports = proxy_ports
        self.url = url
        self.redis_url = redis_url
        self.lease_key = lease_key
        self.process = process
        self.gpu = gpu
        self.log = folder / "daemon.log"

    def allocations(self) -> Dict[int, int]:
        """Live allocations on the simulated GPU: pid -> MB."""
        alloc = self.gpu / "alloc"
        return {
            int(f.name): int(f.read_text())
            for f in alloc.iterdir()
            if f.name.isdigit() and not (alloc / f"{f.name}.exited").exists()
        }

    def oom_log(self) -> str:
        return (self.gpu / "oom.log").read_text()

    def lost_log(self) -> str:
        """The jobs stand-ins were stopped in the middle of, one line each."""
        lost = self.gpu / "lost.log"
        return lost.read_text() if lost.exists() else ""

    def standin(self, name: str) -> str:
        """The URL of a service's stand-in (its /job, /state, /queue)."""
        return f"http://127.0.0.1:{self.service_ports[name]}"


@pytest.fixture
def daemon(binaries, redis_url, tmp_path, request) -> Iterator[Daemon]:
    """The daemon with the services above. Parametrized indirectly with
    ``{"proxy": {NAME: "more proxy keys"}}``, those services get a ``proxy:`` on a free
    port (``Daemon.proxy_ports``)."""
    proxied: Dict[str, str] = getattr(request, "param", {}).get("proxy", {})
    gpu = tmp_path / "gpu"
    (gpu / "alloc").mkdir(parents=True)
    (gpu / "oom.log").write_text("")
    (gpu / "device.json").write_text(json.dumps({
        "name": "Simulated RTX 4090", "total_mb": 24576, "baseline_mb": 1024,
        "reclaim_ms": 200, "temperature_c": 45, "utilization_pct": 0,
    }))
    (tmp_path / "desired-state").mkdir()
    (tmp_path / "desired-state/state.yaml").write_text("phase: null\n")
    port = free_port()
    key = f"gpu_lock_{port}"
    lines = [
        f'api: {{ listen: "127.0.0.1:{port}" }}',
        f"gpu: {{ simulated: {json.dumps(str(gpu))}, reserve_mb: 512, reclaim_timeout_ms: 10000 }}",
        f"lease: {{ redis_url: {json.dumps(redis_url)}, key: {key}, wait_ms: 300 }}",
        "desired_state: desired-state/state.yaml",
        "state_dir: state",
        "resync_ms: 500",
        "services:",
    ]
    ports: Dict[str, int] = {}
    proxy_ports: Dict[str, int] = {}
    for name, mb, priority, phases in SERVICES:
        service_port = free_port()
        ports[name] = service_port
        command = [str(binaries["standin"]), "--sim-dir", str(gpu), "--name", name,
                   "--vram-mb", str(mb), "--port", str(service_port),
                   "--start-delay-ms", "200"]
        lines += [
            f"  {name}:",
            "    kind: native",
            f"    command: {json.dumps(command)}",
            f"    vram_mb: {mb}",
            f"    priority: {priority}",
            f"    phases: {phases}",
            f'    health: {{ url: "http://127.0.0.1:{service_port}/health" }}',
            "    start_timeout_ms: 15000",
            "    stop_timeout_ms: 5000",
        ]
        if name in proxied:
            proxy_ports[name] = free_port()
            lines.append(f'    proxy: {{ listen: "127.0.0.1:{proxy_ports[name]}"{proxied[name]} }}')
        if name in DRAIN_MS:
            lines.append(
                f'    drain: {{ url: "http://127.0.0.1:{service_port}/queue", '
                f'busy_if: ["/queue_running", "/queue_pending"], timeout_ms: {DRAIN_MS[name]} }}'
            )
    config = tmp_path / "gpu-manager.yaml"
    config.write_text("\n".join(lines) + "\n")
    log = open(tmp_path / "daemon.log", "w")
    process = subprocess.Popen(
        [str(binaries["daemon"]), "serve", "--config", str(config)],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    the_daemon = Daemon(tmp_path, url, process, gpu, redis_url, key, ports, proxy_ports)
    # Ready as systemd is told: the first observation and adoption are done.
    wait_until("the daemon's first round",
               lambda: requests.get(url + "/gpu/status", timeout=1).json()["first_round_done"],
               log=the_daemon.log)
    yield the_daemon
    process.kill()
    process.wait()
    log.close()
    # The services the daemon started outlive it (by design): stop them.
    for service_port in ports.values():
        subprocess.run(["pkill", "-KILL", "-f", f"gpu-standin.*--port {service_port}"],
                       check=False)
