#!/usr/bin/env bash
# The benchmark on a GPU machine: (1) whole volumes at 128^3 (centralized vs NVFlare simulator vs POC, every
# process on the one GPU); (2) the native job's network on 1 mm, 240x240x155 phantoms, 128^3 patches with mixed
# precision: learning curves (benchmarks/native.py). Run from anywhere with the packages installed (or on
# PYTHONPATH):
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
# (2) The native job's network at 1 mm, 128^3 patches, label sampling, split (simulator) and centralized on the same
# patches and steps: a learning curve of source-space Dice on 8 validation patients every 250 steps (its GPU time
# was never measured: no GPU was lent to this project; STEPS lower gives a quicker look).
STEPS=${STEPS:-1500}
NOTE="GPU: $(command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
"$PYTHON" benchmarks/native.py --out "$OUT/native" --only native1_label,central1_label --patch 128 \
    --network native --device "$DEVICE" --steps "$STEPS" --interval 250 --curve-every 250 --eval-overlap 0.5 \
    --note "$NOTE"
