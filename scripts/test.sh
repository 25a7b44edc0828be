#!/usr/bin/env bash
# The test command (README, and .ci/run calls exactly this). Extra args go to pytest,
# e.g. `bash scripts/test.sh -m slow` for the slow experiments.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec python3 -m pytest "$@"
