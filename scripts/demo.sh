#!/usr/bin/env bash
# The main job on the embedded default model (no GPU, no downloads beyond the Python packages):
#   1. setup: the package with the [train,dashboard] extras (seconds when already installed; no test
#      tools, no browser);
#   2. train the `collapse` preset from the shipped tiny base model (SFT warm start, then RL-only
#      GRPO that collapses after a healthy stretch; ~5 min on 2 free CPU cores, one line per step);
#   3. the capability probe on the checkpoints before the onset, at the trough and the last
#      (32 held-out tasks; ~1-2 min): is the skill still there?
#   4. `diagnose scan`: the verdict (when the reward dropped, what moved first, what broke, what
#      the probe found) and the HTML report, written after the probe so that it holds its results.
#   bash scripts/demo.sh [RUN_DIR]              (default runs/collapse; an existing run is resumed/reused)
#   DEMO_PROBE_TASKS=100 bash scripts/demo.sh   (the probe on more tasks; 0 skips it)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/collapse}
TASKS=${DEMO_PROBE_TASKS:-32}
START=$SECONDS
say() { local t=$((SECONDS - START)); printf '\n== [%d:%02d] %s\n' $((t / 60)) $((t % 60)) "$*"; }

say "1/4 setup: checking the installed packages (a fresh machine installs torch (CPU) and the package: a few minutes)"
bash scripts/setup.sh demo

say "2/4 training the collapse preset into $OUT (~5 min on 2 free cores, longer on a busy machine; one line per step)"
if [ -f "$OUT/run.json" ]; then
  train-minimal run --preset collapse --out "$OUT" --resume
else
  train-minimal run --preset collapse --out "$OUT"
fi

if [ "$TASKS" -gt 0 ]; then
  say "3/4 capability probe: $TASKS held-out tasks at the checkpoints around the collapse (~1-2 min)"
  diagnose probe "$OUT" --tasks "$TASKS"
else
  say "3/4 capability probe skipped (DEMO_PROBE_TASKS=0)"
fi

say "4/4 scan: what happened, and the HTML report"
# exit code 1 means "collapse found" (docs/scan.md); here that is the expected finding, not a failure
diagnose scan "$OUT" --report "$OUT.html" --fail-on never

say "done in $(( (SECONDS - START) / 60 )) min $(( (SECONDS - START) % 60 )) s"
echo "report: $OUT.html"
echo "next: diagnose dashboard $(dirname "$OUT")"
