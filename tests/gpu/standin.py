#!/usr/bin/env python3
"""A stand-in GPU service that allocates REAL VRAM with PyTorch (for tests/gpu/check.py).

It allocates its memory on the GPU and fills it with a known pattern, answers its health
URL after a start delay (and `GET /verify` with how many MB of the pattern changed), and
on SIGTERM waits a stop delay, frees and exits. It writes its own timeline (process start,
ready, SIGTERM, exit) so the check can tell the manager's overhead from its own time.

The card is scaled down: with PRETEND_TOTAL_MB set, an allocation that would take the
GPU's used memory past that many MB fails like a CUDA out-of-memory error, so an 80 GB
card behaves like the 24 GB card the pipeline runs on.
"""
import argparse
import http.server
import json
import os
import signal
import sys
import threading
import time

import pynvml
import torch


def process_start_epoch():
    """This process's start time in epoch seconds (interpreter start-up included), to
    the kernel's clock tick: boot time is taken from /proc/uptime, as /proc/stat's btime
    is rounded to whole seconds."""
    with open("/proc/self/stat") as f:
        start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
        boot = time.time() - float(f.read().split()[0])
    return boot + start_ticks / os.sysconf("SC_CLK_TCK")


MB = 1 << 20
# Rows of the pattern made at once: 64 MB of tensor, 256 MB of int32 scratch.
CHUNK_ROWS = 64


def pattern(start, count):
    """Rows start..start+count of the known contents: byte j of the MB-long row i is
    (7 i + j) mod 251, so a row moved, zeroed or swapped reads wrong."""
    i = torch.arange(start, start + count, dtype=torch.int32, device="cuda")[:, None]
    j = torch.arange(MB, dtype=torch.int32, device="cuda")[None, :]
    return ((7 * i + j) % 251).to(torch.uint8)


def verify(buffer):
    """GET /verify: how many MB rows of the tensor no longer hold the pattern (after a
    checkpoint and restore, none should)."""
    mismatched = 0
    for start in range(0, len(buffer), CHUNK_ROWS):
        rows = buffer[start:start + CHUNK_ROWS]
        mismatched += int((rows != pattern(start, len(rows))).any(dim=1).sum().item())
    return {"rows": len(buffer), "mismatched_rows": mismatched}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--mb", type=int, required=True, help="MB of tensor to allocate")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--start-delay-ms", type=int, default=0)
    parser.add_argument("--stop-delay-ms", type=int, default=0)
    parser.add_argument("--timeline", required=True, help="folder for the timeline JSON")
    args = parser.parse_args()
    timeline = {"name": args.name, "pid": os.getpid(), "process_start": process_start_epoch()}
    path = os.path.join(args.timeline, f"{args.name}-{os.getpid()}.json")

    def save():
        with open(path, "w") as f:
            json.dump(timeline, f)

    torch.cuda.init()
    torch.empty(1, device="cuda")  # the CUDA context
    pretend = int(os.environ.get("PRETEND_TOTAL_MB", "0"))
    if pretend:
        pynvml.nvmlInit()
        info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0))
        used_mb = (info.total - info.free) // (1 << 20)
        if used_mb + args.mb > pretend:
            print(f"torch.OutOfMemoryError: CUDA out of memory (pretend {pretend} MB card): "
                  f"{used_mb} MB used, tried to allocate {args.mb} MB", file=sys.stderr, flush=True)
            timeline["oom"] = True
            save()
            sys.exit(2)
    buffer = torch.empty(args.mb << 20, dtype=torch.uint8, device="cuda").view(args.mb, MB)
    for start in range(0, args.mb, CHUNK_ROWS):
        rows = buffer[start:start + CHUNK_ROWS]
        rows.copy_(pattern(start, len(rows)))
    torch.cuda.synchronize()
    timeline["allocated"] = time.time()
    print(f"{args.name}: allocated {args.mb} MB", file=sys.stderr, flush=True)
    time.sleep(args.start_delay_ms / 1000)
    ready = threading.Event()

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/verify":
                code, body = 200, json.dumps(verify(buffer)).encode()
            else:
                code = 200 if ready.is_set() else 503
                body = json.dumps({"name": args.name, "ready": ready.is_set()}).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", args.port), Health)

    def on_term(*_):
        timeline["sigterm"] = time.time()
        save()
        time.sleep(args.stop_delay_ms / 1000)
        timeline["exit"] = time.time()
        save()
        os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
    timeline["ready"] = time.time()
    ready.set()
    save()
    server.serve_forever()
    del buffer


if __name__ == "__main__":
    main()
