#!/usr/bin/env bash
# Sets up and runs the test suite (unit tests and NVFlare simulator integration tests).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
python -m pytest "$@"
