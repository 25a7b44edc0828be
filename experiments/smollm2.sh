#!/usr/bin/env bash
# The real-model experiment of docs/experiments.md section 7, end to end (CPU; hours on 2 shared cores).
# Each line is also one command on its own. OUT defaults to runs/sm2.
#   bash experiments/smollm2.sh            # seed 0: warm start, RL-only, synchronous supervision, probe, table
#   SEEDS="0 1" bash experiments/smollm2.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/sm2}
SEEDS=${SEEDS:-0}
LR=${LR:-2e-3}
STEPS=${STEPS:-15}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
py() { nice -n 10 python "$@"; }

[ -f "$OUT/warm/adapter/adapter_model.safetensors" ] || py experiments/smollm2_grpo.py warmstart --out "$OUT/warm"
for s in $SEEDS; do
  py experiments/smollm2_grpo.py grpo --warm "$OUT/warm/adapter" --out "$OUT/rl-s$s" --seed "$s" --lr "$LR" \
     --steps "$STEPS" &
  py experiments/smollm2_grpo.py grpo --warm "$OUT/warm/adapter" --out "$OUT/sync-s$s" --seed "$s" --lr "$LR" \
     --steps "$STEPS" --sft-weight 1 &
  wait
done
# the probe before the onset and at the trough (checkpoint names from `diagnose scan`; here the first and the last)
for r in "$OUT"/rl-s* "$OUT"/sync-s*; do
  first=$(ls -d "$r"/checkpoint-* | sort -t- -k2 -n | head -1)
  last=$(ls -d "$r"/checkpoint-* | sort -t- -k2 -n | tail -1)
  py experiments/smollm2_grpo.py probe "$r" --checkpoints "$(basename "$first"),$(basename "$last")" --tasks 8
done
# where the push on <|im_end|> and < came from (rescore of the first checkpoints; docs/experiments.md 7.4)
for r in "$OUT"/rl-s*; do
  py experiments/smollm2_push.py "$r" --checkpoints checkpoint-1,checkpoint-2,checkpoint-3,checkpoint-4 --markdown
done
python experiments/smollm2_table.py "$OUT"/rl-s* "$OUT"/sync-s* --markdown
