#!/usr/bin/env python3
"""The real-GPU check (issue 6): gpu-manager against a real NVIDIA driver and real VRAM.

Run by tests/gpu/run.sh on a machine with an NVIDIA GPU, PyTorch and pynvml, with the
release binary already built (no cargo needed). Prints a PASS/FAIL table and exits 1 if
anything failed. Everything it starts listens on 127.0.0.1 and is stopped at the end.
"""
import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pynvml

HERE = os.path.dirname(os.path.abspath(__file__))
PRETEND_TOTAL_MB = 24576  # the pipeline's RTX 4090
# name, declared MB, priority, phases, start delay ms. The stand-in allocates the declared
# size minus room for its CUDA context, so what NVML shows stays within the declaration.
SERVICES = [
    ("comfyui", 20480, 100, [4], 300),
    ("cosyvoice", 4096, 50, [3], 200),
    ("vidi", 4096, 40, [2], 200),
    ("ollama", 18432, 10, [], 200),
]
# A CUDA context with PyTorch takes about 500 MB: what the stand-in leaves for it.
CONTEXT_ROOM_MB = 640

results = []


def check(name, ok, detail=""):
    results.append((name, bool(ok), detail))
    print(f"[{'PASS' if ok else 'FAIL'}] {name}: {detail}", flush=True)
    return ok


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method, url, timeout=300):
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def nvml_view(handle):
    """One full observation through pynvml: what gpu-manager's NVML backend reads."""
    memory = pynvml.nvmlDeviceGetMemoryInfo(handle, version=pynvml.nvmlMemory_v2)
    return {
        "name": pynvml.nvmlDeviceGetName(handle),
        "total_mb": memory.total >> 20,
        "used_mb": (memory.used + memory.reserved) >> 20,
        "free_mb": memory.free >> 20,
        "temperature_c": pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU),
        "utilization_pct": pynvml.nvmlDeviceGetUtilizationRates(handle).gpu,
        "pids": sorted(p.pid for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)),
    }


def gpu_pids(handle):
    return sorted(p.pid for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle))


def check_observation(binary, handle):
    out = subprocess.run([binary, "gpu", "--bench", "1000"], capture_output=True, text=True, timeout=120)
    if not check("gpu-manager reads the GPU through NVML", out.returncode == 0, out.stderr.strip()[-300:]):
        return
    report = json.loads(out.stdout)
    sample = report["sample"]
    ours = nvml_view(handle)
    smi = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,memory.total,memory.used,memory.free,temperature.gpu,utilization.gpu",
         "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=60).stdout.strip()
    print(f"    gpu-manager: {json.dumps(sample)}\n    pynvml:      {json.dumps(ours)}\n    nvidia-smi:  {smi}")
    smi_fields = [f.strip() for f in smi.split(",")]
    check("name matches nvidia-smi and pynvml", sample["name"] == ours["name"] == smi_fields[0], sample["name"])
    check("total matches nvidia-smi and pynvml",
          abs(sample["total_mb"] - ours["total_mb"]) <= 1 and abs(sample["total_mb"] - int(smi_fields[1])) <= 1,
          f"{sample['total_mb']} MB vs pynvml {ours['total_mb']} vs smi {smi_fields[1]}")
    check("used/free match pynvml (v2: reserved counted as used)",
          abs(sample["used_mb"] - ours["used_mb"]) <= 64 and abs(sample["free_mb"] - ours["free_mb"]) <= 64,
          f"used {sample['used_mb']}/{ours['used_mb']}, free {sample['free_mb']}/{ours['free_mb']}")
    check("temperature and utilization are read",
          sample["temperature_c"] is not None and abs(sample["temperature_c"] - ours["temperature_c"]) <= 3
          and sample["utilization_pct"] is not None,
          f"{sample['temperature_c']} C, {sample['utilization_pct']} %")
    check("compute processes match pynvml", sorted(p["pid"] for p in sample["processes"]) == ours["pids"],
          f"{[p['pid'] for p in sample['processes']]} vs {ours['pids']}")
    timings = []
    for _ in range(1000):
        started = time.perf_counter()
        nvml_view(handle)
        timings.append((time.perf_counter() - started) * 1e6)
    timings.sort()
    bench = report["bench"]
    check("one full observation (nvml-wrapper) under 1 ms median", bench["median_us"] < 1000,
          f"nvml-wrapper median {bench['median_us']:.0f} us p99 {bench['p99_us']:.0f} us; "
          f"pynvml median {statistics.median(timings):.0f} us p99 {timings[989]:.0f} us")


def write_config(work, handle, api_port):
    total_mb = pynvml.nvmlDeviceGetMemoryInfo(handle).total >> 20
    reserve_mb = total_mb - PRETEND_TOTAL_MB + 512
    lines = [
        f'api: {{ listen: "127.0.0.1:{api_port}" }}',
        f"gpu: {{ index: 0, reserve_mb: {reserve_mb}, reclaim_timeout_ms: 60000 }}",
        "desired_state: desired-state/state.yaml",
        "state_dir: state",
        "resync_ms: 1000",
        "services:",
    ]
    ports = {}
    for name, mb, priority, phases, delay in SERVICES:
        ports[name] = free_port()
        argv = [sys.executable, os.path.join(HERE, "standin.py"), "--name", name, "--mb", str(mb - CONTEXT_ROOM_MB),
                "--port", str(ports[name]), "--start-delay-ms", str(delay), "--stop-delay-ms", "200",
                "--timeline", os.path.join(work, "timeline")]
        lines += [
            f"  {name}:",
            "    kind: native",
            f"    command: {json.dumps(argv)}",
            f'    env: {{ PRETEND_TOTAL_MB: "{PRETEND_TOTAL_MB}" }}',
            f"    vram_mb: {mb}",
            f"    priority: {priority}",
            f"    phases: {json.dumps(phases)}",
            f'    health: {{ url: "http://127.0.0.1:{ports[name]}/health", timeout_ms: 2000 }}',
            "    start_timeout_ms: 120000",
            "    stop_timeout_ms: 30000",
        ]
    os.makedirs(os.path.join(work, "timeline"))
    path = os.path.join(work, "gpu-manager.yaml")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def transition(base, method_path, expect_ready, handle, label):
    started = time.time()
    code, body = http("POST", base + method_path)
    elapsed = time.time() - started
    actions = [f"{a['op']} {a['service']} {a['duration_ms']} ms" for a in (body or {}).get("actions", [])]
    if not check(f"{label}: POST {method_path} answers 200", code == 200,
                 f"{code} in {elapsed:.1f}s: {actions or body}"):
        return None
    _, status = http("GET", base + "/gpu/status")
    ready = sorted(n for n, s in status["services"].items() if s["state"] == "ready")
    check(f"{label}: only {expect_ready} ready", ready == sorted(expect_ready), f"ready: {ready}")
    pids = gpu_pids(handle)
    owned = sorted(pid for s in status["services"].values() for pid in s["pids"])
    check(f"{label}: NVML lists exactly the ready services' processes", pids == owned,
          f"NVML {pids}, services {owned}")
    for name in expect_ready:
        service = status["services"][name]
        observed = service["observed_vram_mb"] or 0
        check(f"{label}: {name}'s VRAM is attributed to it",
              service["declared_vram_mb"] - CONTEXT_ROOM_MB <= observed <= service["declared_vram_mb"] + 512,
              f"observed {observed} MB of declared {service['declared_vram_mb']} MB")
    return body


def kill_standins():
    """Stops any stand-in still running (the daemon leaves services running on exit)."""
    marker = os.path.join(HERE, "standin.py").encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker in f.read():
                    os.kill(int(pid), signal.SIGKILL)
        except OSError:
            pass


def start_overheads(body, work):
    """Manager time in each start: action duration minus the stand-in's own start time."""
    overheads = []
    timelines = {}
    folder = os.path.join(work, "timeline")
    for file in os.listdir(folder):
        with open(os.path.join(folder, file)) as f:
            entry = json.load(f)
        timelines.setdefault(entry["name"], []).append(entry)
    for action in body.get("actions", []):
        if action["op"] != "start" or "Ok" not in action["outcome"]:
            continue
        began = (action["finished_at_ms"] - action["duration_ms"]) / 1000
        finished = action["finished_at_ms"] / 1000
        runs = [t for t in timelines.get(action["service"], []) if began - 1 <= t["process_start"] <= finished and "ready" in t]
        if runs:
            run = runs[-1]
            own = run["ready"] - run["process_start"]
            overheads.append((action["duration_ms"] / 1000 - own) * 1000)
    return overheads


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--binary", default="target/release/gpu-manager")
    args = parser.parse_args()
    binary = os.path.abspath(args.binary)
    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    check_observation(binary, handle)

    work = tempfile.mkdtemp(prefix="gpu-manager-check-")
    api_port = free_port()
    config = write_config(work, handle, api_port)
    log = open(os.path.join(work, "daemon.log"), "w")
    daemon = subprocess.Popen([binary, "serve", "--config", config], stdout=log, stderr=log, start_new_session=True)
    base = f"http://127.0.0.1:{api_port}"
    overheads = []
    try:
        for _ in range(100):
            try:
                if http("GET", base + "/healthz", timeout=2)[0] == 200:
                    break
            except OSError:
                time.sleep(0.1)
        for phase, ready in [(2, ["vidi"]), (3, ["cosyvoice"]), (4, ["comfyui"])]:
            body = transition(base, f"/gpu/prepare-phase/{phase}", ready, handle, f"AC-1 phase {phase}")
            overheads += start_overheads(body or {}, work)
        transition(base, "/gpu/prepare-phase/3", ["cosyvoice"], handle, "AC-3 setup")
        body = transition(base, "/gpu/service/comfyui/start", ["comfyui"], handle, "AC-3")
        ops = [f"{a['op']} {a['service']}" for a in (body or {}).get("actions", [])]
        check("AC-3: CosyVoice stopped (memory confirmed free) before ComfyUI started",
              ops == ["stop cosyvoice", "start comfyui"], f"{ops}")
        overheads += start_overheads(body or {}, work)
        code, body = http("POST", base + "/gpu/service/ollama/start")
        check("Ollama beside ComfyUI is refused with 409", code == 409, (body or {}).get("error", ""))
        http("POST", base + "/gpu/service/comfyui/stop")
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)
        daemon.wait(timeout=30)
        kill_standins()
    logs = ""
    for root, _, files in os.walk(os.path.join(work, "state")):
        for file in files:
            with open(os.path.join(root, file), errors="replace") as f:
                logs += f.read()
    check("no CUDA out-of-memory in any stand-in's log", "out of memory" not in logs.lower(),
          f"{logs.lower().count('out of memory')} found")
    if overheads:
        check("manager overhead per start (median) under 50 ms", statistics.median(overheads) < 50,
              f"median {statistics.median(overheads):.1f} ms over {len(overheads)} starts: "
              f"{[round(o, 1) for o in overheads]}")
    else:
        check("manager overhead per start measured", False, "no start timeline found")

    print("\n| check | result | detail |\n|---|---|---|")
    for name, ok, detail in results:
        print(f"| {name} | {'PASS' if ok else 'FAIL'} | {detail} |")
    failed = sum(1 for _, ok, _ in results if not ok)
    print(f"\n{len(results) - failed} passed, {failed} failed")
    out = os.environ.get("OUT")
    if out:
        shutil.copy(os.path.join(work, "daemon.log"), os.path.join(out, "daemon.log"))
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
