#!/usr/bin/env bash
# The real-GPU check of cuda-checkpoint parking (issue 10). Needs an NVIDIA GPU with
# driver 570 or newer (the CUDA 12.8 checkpoint API) and python3 with torch and pynvml
# (nvidia-ml-py); nothing to build. Extra arguments go to checkpoint.py
# (--cuda-library PATH, --sizes-mb 4096,20480). Prints a PASS/FAIL table and the park and
# resume times; exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/../.."
command -v nvidia-smi >/dev/null || { echo "nvidia-smi not found: this check needs an NVIDIA GPU and driver"; exit 2; }
python3 -c 'import torch, pynvml; assert torch.cuda.is_available()' \
  || { echo "python3 needs torch with CUDA and pynvml (nvidia-ml-py)"; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version,persistence_mode --format=csv,noheader
exec timeout 400 python3 -u tests/gpu/checkpoint.py "$@"
