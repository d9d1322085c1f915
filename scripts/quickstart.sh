#!/usr/bin/env bash
# Sets up, generates the 64^3 phantom, partitions it into four modality sites plus the label holder, and
# runs the Split-U-Net job in the NVFlare simulator. Prints progress, the Dice table and where the artefacts are.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
DATA="${SPLIT_UNET_DATA:-data/phantom64}"
WORKSPACE="${SPLIT_UNET_WORKSPACE:-runs/quickstart}"
if [ ! -f "$DATA/msd/dataset.json" ]; then
  split-unet synth --out "$DATA/msd" --patients 64 --size 64 --seed 0
fi
if [ ! -f "$DATA/sites/server/datalist.json" ]; then
  split-unet partition --data "$DATA/msd" --out "$DATA/sites"
fi
split-unet simulate --sites "$DATA/sites" --workspace "$WORKSPACE" "$@"
