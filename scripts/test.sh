#!/usr/bin/env bash
# Sets up and runs the test suite (unit tests and NVFlare simulator integration tests).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
# Two workers: see tests/conftest.py (pass -n 0 to run in one process). The 25 slowest tests are listed at the end:
# the suite is kept under 20 minutes.
python -m pytest -n 2 --dist loadscope --durations=25 "$@"
