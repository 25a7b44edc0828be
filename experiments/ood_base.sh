#!/usr/bin/env bash
# The OOD-capable bases of docs/experiments.md section 0.6 (bases that score above 0 out of
# distribution before RL), from the shipped
# tiny-base v2: two more mid-training stages of the base-mix recipe with more OOD examples
# (content_ood families and the format_ood call syntax) and 3 % of examples cut to a bare
# `<tool_call>\n` turn. ~14 + ~11 min on one free CPU core. Writes runs/s5/v3_400 and runs/s5/v4_300.
#   bash experiments/ood_base.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
train-minimal sft --preset base-mix --set sft.steps=400 --set sft.ood_rate=0.5 \
  --set sft.truncated_call_rate=0.03 --set model.path=tiny-base --out runs/s5/base_v3
cp -r runs/s5/base_v3/checkpoints/step-000400 runs/s5/v3_400
train-minimal sft --preset base-mix --set sft.steps=300 --set sft.ood_rate=0.6 \
  --set sft.truncated_call_rate=0.03 --set model.path=runs/s5/v3_400 --out runs/s5/base_v4
cp -r runs/s5/base_v4/checkpoints/step-000300 runs/s5/v4_300
