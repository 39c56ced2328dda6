#!/usr/bin/env bash
# The real-GPU check (issue 6). Needs an NVIDIA GPU, python3 with torch and pynvml
# (nvidia-ml-py), and the release binary built beforehand (`cargo build --release`):
# no cargo is needed here. Prints a PASS/FAIL table; exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/../.."
binary="${GPU_MANAGER:-target/release/gpu-manager}"
[ -x "$binary" ] || { echo "missing $binary: run cargo build --release first (or set GPU_MANAGER)"; exit 2; }
command -v nvidia-smi >/dev/null || { echo "nvidia-smi not found: this check needs an NVIDIA GPU and driver"; exit 2; }
python3 -c 'import torch, pynvml; assert torch.cuda.is_available()' \
  || { echo "python3 needs torch with CUDA and pynvml (nvidia-ml-py)"; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
exec timeout 280 python3 -u tests/gpu/check.py --binary "$binary"
