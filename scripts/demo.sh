#!/usr/bin/env bash
# The main job on the embedded default model: no GPU, no downloads.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec diagnose demo "$@"
