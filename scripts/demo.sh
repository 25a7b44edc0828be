#!/usr/bin/env bash
# The main job on the embedded default model (no GPU, no downloads): train the `collapse` preset
# from the shipped tiny base model (SFT warm start, then RL-only GRPO; ~4-5 min on 2 free CPU
# cores), `diagnose scan` the run and write its HTML report, then ask the capability probe
# whether the skill is still there (~2-3 min: 32 held-out tasks at the checkpoints before the
# onset, at the trough and the last) and end with what it found.
#   bash scripts/demo.sh [RUN_DIR]        (default runs/collapse; an existing run is resumed/reused)
#   DEMO_PROBE_TASKS=100 bash scripts/demo.sh    (the probe on more tasks; 0 skips it)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OUT=${1:-runs/collapse}
TASKS=${DEMO_PROBE_TASKS:-32}
if [ -f "$OUT/run.json" ]; then
  train-minimal run --preset collapse --out "$OUT" --resume
else
  train-minimal run --preset collapse --out "$OUT"
fi
# exit code 1 means "collapse found" (docs/scan.md); here that is the expected finding, not a failure
diagnose scan "$OUT" --report "$OUT.html" --fail-on never
echo "HTML report: $OUT.html"
if [ "$TASKS" -gt 0 ]; then
  diagnose probe "$OUT" --tasks "$TASKS"
  python experiments/probe_story.py "$OUT"
else
  echo "is the skill still there? diagnose probe $OUT"
fi
