#!/usr/bin/env python3
"""The real-GPU check of cuda-checkpoint parking (issue 10): park and resume a PyTorch
stand-in through the CUDA driver's checkpoint API, with the calls gpu-manager makes
(src/act/cuda_checkpoint.rs), and time them.

For each size (4 GB and 20 GB by default) it starts tests/gpu/standin.py, which fills a
tensor with a known pattern, then:
- parks it: cuCheckpointProcessLock (with a timeout) + cuCheckpointProcessCheckpoint;
- confirms through NVML that the pid holds no VRAM and the GPU got the memory back;
- resumes it: cuCheckpointProcessRestore + cuCheckpointProcessUnlock;
- confirms through NVML that the memory is back, and asks the stand-in (GET /verify)
  whether every MB of its tensor still holds the pattern.

Run by tests/gpu/run_checkpoint.sh on a machine with an NVIDIA GPU (driver 570 or newer),
PyTorch and pynvml; nothing to build. Prints a PASS/FAIL table in the format of
tests/gpu/RESULTS.md and exits 1 if anything failed.
"""
import argparse
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from check import HERE, check, free_port, http, results

CUDA_SUCCESS = 0
# CUprocessState
RUNNING, LOCKED, CHECKPOINTED = 0, 1, 2
STATE_NAMES = {0: "running", 1: "locked", 2: "checkpointed", 3: "failed", 4: "checkpointing", 5: "restoring"}
# The first cuDriverGetVersion with the checkpoint API: CUDA 12.8, driver 570.
CHECKPOINT_DRIVER_VERSION = 12080
LOCK_TIMEOUT_MS = 30000


class LockArgs(ctypes.Structure):
    """CUcheckpointLockArgs from cuda.h, in its declared order."""
    _fields_ = [
        ("timeoutMs", ctypes.c_uint),
        ("reserved0", ctypes.c_uint),
        ("reserved1", ctypes.c_uint64 * 7),
    ]


class DriverError(Exception):
    pass


class Driver:
    """The CUDA driver's checkpoint API, called as CudaCheckpoint calls it."""

    def __init__(self, library):
        self.cuda = ctypes.CDLL(library)
        for name in ["cuCheckpointProcessCheckpoint", "cuCheckpointProcessRestore", "cuCheckpointProcessUnlock"]:
            getattr(self.cuda, name).argtypes = [ctypes.c_int, ctypes.c_void_p]
        self.cuda.cuCheckpointProcessLock.argtypes = [ctypes.c_int, ctypes.POINTER(LockArgs)]
        self.cuda.cuCheckpointProcessGetState.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
        self.cuda.cuGetErrorName.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
        version = ctypes.c_int()
        self.call("cuDriverGetVersion", None, ctypes.byref(version))
        self.version = version.value
        # A restore needs cuInit in the calling process unless persistence mode is on.
        self.call("cuInit", None, 0)

    def call(self, name, pid, *args):
        code = getattr(self.cuda, name)(*((pid,) if pid is not None else ()), *args)
        if code != CUDA_SUCCESS:
            text = ctypes.c_char_p()
            known = self.cuda.cuGetErrorName(code, ctypes.byref(text)) == CUDA_SUCCESS
            label = text.value.decode() if known else "CUresult"
            raise DriverError(f"{name} for pid {pid} failed: {label} ({code})")

    def state(self, pid):
        state = ctypes.c_int(-1)
        self.call("cuCheckpointProcessGetState", pid, ctypes.byref(state))
        return state.value

    def park(self, pid, timeout_ms):
        """Lock then checkpoint; a checkpoint that fails is undone with an unlock."""
        args = LockArgs(timeoutMs=timeout_ms)
        self.call("cuCheckpointProcessLock", pid, ctypes.byref(args))
        try:
            self.call("cuCheckpointProcessCheckpoint", pid, None)
        except DriverError:
            self.call("cuCheckpointProcessUnlock", pid, None)
            raise

    def resume(self, pid):
        self.call("cuCheckpointProcessRestore", pid, None)
        self.call("cuCheckpointProcessUnlock", pid, None)


def pid_vram_mb(pynvml, handle, pid):
    """What NVML lists for `pid`, in MB; None when it is not listed."""
    for process in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
        if process.pid == pid:
            return (process.usedGpuMemory or 0) >> 20
    return None


def used_mb(pynvml, handle):
    return pynvml.nvmlDeviceGetMemoryInfo(handle).used >> 20


def park_and_resume(driver, pynvml, handle, mb, work):
    """One stand-in of `mb` MB through a park and a resume; returns (park_s, resume_s) or
    None when a step failed."""
    label = f"{mb} MB"
    port = free_port()
    log = open(os.path.join(work, f"standin-{mb}.log"), "w")
    standin = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "standin.py"), "--name", f"ckpt-{mb}", "--mb", str(mb),
         "--port", str(port), "--timeline", work], stdout=log, stderr=log, start_new_session=True)
    pid = standin.pid
    try:
        deadline = time.time() + 180
        while time.time() < deadline and standin.poll() is None:
            try:
                if http("GET", f"http://127.0.0.1:{port}/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        held = pid_vram_mb(pynvml, handle, pid)
        if not check(f"{label}: the stand-in holds its tensor", held is not None and held >= mb,
                     f"NVML lists {held} MB for pid {pid}"):
            return None
        before = used_mb(pynvml, handle)

        started = time.perf_counter()
        try:
            driver.park(pid, LOCK_TIMEOUT_MS)
        except DriverError as error:
            check(f"{label}: park (lock + checkpoint)", False, str(error))
            return None
        park_s = time.perf_counter() - started
        state = driver.state(pid)
        check(f"{label}: checkpointed after the park", state == CHECKPOINTED, STATE_NAMES.get(state, state))
        parked = pid_vram_mb(pynvml, handle, pid)
        check(f"{label}: NVML lists no VRAM for the parked pid", not parked, f"{parked} MB listed")
        freed = before - used_mb(pynvml, handle)
        check(f"{label}: the GPU got the memory back", freed >= held - 64, f"{freed} MB freed of {held} MB")

        started = time.perf_counter()
        try:
            driver.resume(pid)
        except DriverError as error:
            check(f"{label}: resume (restore + unlock)", False, str(error))
            return None
        resume_s = time.perf_counter() - started
        state = driver.state(pid)
        check(f"{label}: running after the resume", state == RUNNING, STATE_NAMES.get(state, state))
        back = pid_vram_mb(pynvml, handle, pid)
        check(f"{label}: NVML lists the memory again", back is not None and abs(back - held) <= 64,
              f"{back} MB of {held} MB")
        code, verdict = http("GET", f"http://127.0.0.1:{port}/verify", timeout=120)
        check(f"{label}: the tensor's contents survived",
              code == 200 and (verdict or {}).get("mismatched_rows") == 0,
              f"{verdict}")
        check(f"{label}: park (lock + checkpoint)", True, f"{park_s:.2f} s")
        check(f"{label}: resume (restore + unlock)", True, f"{resume_s:.2f} s")
        return park_s, resume_s
    finally:
        os.killpg(standin.pid, signal.SIGKILL)
        standin.wait(timeout=30)
        log.close()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cuda-library", default="libcuda.so.1")
    parser.add_argument("--sizes-mb", default="4096,20480", help="comma-separated tensor sizes")
    args = parser.parse_args()
    import pynvml

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    driver = Driver(args.cuda_library)
    if not check("the driver has the checkpoint API (CUDA 12.8, driver 570)",
                 driver.version >= CHECKPOINT_DRIVER_VERSION,
                 f"cuDriverGetVersion {driver.version}, driver {pynvml.nvmlSystemGetDriverVersion()}"):
        sys.exit(1)
    work = tempfile.mkdtemp(prefix="gpu-manager-checkpoint-")
    times = {}
    for mb in [int(size) for size in args.sizes_mb.split(",")]:
        measured = park_and_resume(driver, pynvml, handle, mb, work)
        if measured:
            times[mb] = measured

    print("\n| check | result | detail |\n|---|---|---|")
    for name, ok, detail in results:
        print(f"| {name} | {'PASS' if ok else 'FAIL'} | {detail} |")
    print("\n| tensor | park (lock + checkpoint) | resume (restore + unlock) |\n|---|---|---|")
    for mb, (park_s, resume_s) in times.items():
        print(f"| {mb} MB | {park_s:.2f} s | {resume_s:.2f} s |")
    failed = sum(1 for _, ok, _ in results if not ok)
    print(f"\n{len(results) - failed} passed, {failed} failed")
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "checkpoint-results.json"), "w") as f:
            json.dump({"results": results, "times_s": times}, f, indent=1)
        for file in os.listdir(work):
            if file.endswith(".log"):
                shutil.copy(os.path.join(work, file), os.path.join(out, file))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
