#!/usr/bin/env bash
# The benchmark on a GPU machine: (1) whole volumes at 128^3 (centralized vs NVFlare simulator vs POC, every
# process on the one GPU); (2) the native job's network on 1 mm, 240x240x155 phantoms, 128^3 patches with mixed
# precision (seconds per step, MB per step per site, GPU memory, Dice after the few steps). Sized to finish in a
# few minutes. Run from anywhere with the packages installed (or on PYTHONPATH):
#   bash benchmarks/gpu_bench.sh [OUT] [SIZE]        # defaults: runs/bench/gpu128 128
# Prints the table; OUT/bench.json holds every figure. PYTHON (default python3) and DEVICE (default cuda) may be
# set; on a machine without the packages, install wheels first (pip install --no-index --target DIR wheels/*.whl
# and PYTHONPATH=DIR): it needs nvflare, monai, nibabel, nilearn, opacus and openmined.psi besides torch.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${1:-runs/bench/gpu128}
SIZE=${2:-128}
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
export PYTHONPATH="$PWD/custom${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
"$PYTHON" -m split_unet.cli bench --out "$OUT" --size "$SIZE" --patients 12 --epochs 2 --device "$DEVICE" \
    --modes centralized,simulator,poc
"$PYTHON" benchmarks/native.py --out "$OUT/native" --patients 8 --phantom-size 96 --patches 128 --steps 5 \
    --skip-budget --network native --device "$DEVICE" --note "GPU: $(command -v nvidia-smi >/dev/null && \
    nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
