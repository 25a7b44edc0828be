#!/usr/bin/env bash
# The main job on the embedded default model (no GPU, no downloads): train the `collapse`
# preset from the shipped tiny base model (SFT warm start, then RL-only GRPO; ~4-5 min on 2 CPU
# cores), then `diagnose scan` the run and write its HTML report.
#   bash scripts/demo.sh [RUN_DIR]        (default runs/collapse; an existing run is resumed/reused)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OUT=${1:-runs/collapse}
if [ -f "$OUT/run.json" ]; then
  train-minimal run --preset collapse --out "$OUT" --resume
else
  train-minimal run --preset collapse --out "$OUT"
fi
# exit code 1 means "collapse found" (docs/scan.md); here that is the expected finding, not a failure
diagnose scan "$OUT" --report "$OUT.html" --fail-on never
echo "HTML report: $OUT.html   (is the skill still there? diagnose probe $OUT)"
