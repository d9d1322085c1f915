#!/usr/bin/env bash
# Reproduces the README's comparison on the 64^3 phantom: split learning in the NVFlare simulator against
# centralized late fusion, early fusion and each single modality, all with the job's default budget; split
# learning both as shipped (defended: split_unet.defence) and undefended (--scope undefended), for the defence's cost.
# About 40 minutes on a 2-core CPU. Results under runs/; the table is printed at the end.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
DATA="${SPLIT_UNET_DATA:-data/phantom64}"
if [ ! -f "$DATA/msd/dataset.json" ]; then
  split-unet synth --out "$DATA/msd" --patients 64 --size 64 --seed 0
fi
if [ ! -f "$DATA/sites/server/datalist.json" ]; then
  split-unet partition --data "$DATA/msd" --out "$DATA/sites"
fi
[ -f runs/split/summary.json ] || split-unet simulate --sites "$DATA/sites" --workspace runs/split --record-steps 1,-1
[ -f runs/split_undefended/summary.json ] || split-unet simulate --sites "$DATA/sites" --workspace runs/split_undefended \
  --scope undefended --record-steps 1,-1
for mode in late early; do
  [ -f "runs/$mode/summary.json" ] || split-unet centralized --data "$DATA/msd" --mode "$mode" --out "runs/$mode"
done
for modality in flair t1w t1gd t2w; do
  [ -f "runs/single_$modality/summary.json" ] || \
    split-unet centralized --data "$DATA/msd" --mode single --modality "$modality" --out "runs/single_$modality"
done
split-unet table "split learning (simulator, defended)=runs/split" \
  "split learning (simulator, undefended)=runs/split_undefended" "centralized late fusion=runs/late" \
  "centralized early fusion=runs/early" "FLAIR only=runs/single_flair" "T1w only=runs/single_t1w" \
  "T1gd only=runs/single_t1gd" "T2w only=runs/single_t2w"
