#!/usr/bin/env bash
# Runs Split-U-Net in a real NVFlare federation on this machine (POC mode, loopback only), with no prompt:
# prepare (the project: split_unet.launch.poc.poc_project), start the server and the four sites, PSI, training, split inference,
# download the results, stop. Example:
#   bash poc/run.sh --sites data/phantom64/sites --workspace runs/poc --epochs 2
# Options: split-unet poc --help. Phase wall times and job ids end up in WORKSPACE/poc.json.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec "${SPLIT_UNET:-.venv/bin/split-unet}" poc "$@"
