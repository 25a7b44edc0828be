"""Greedy accuracy of one model on the held-out splits (test, content_ood, format_ood), on more
tasks than a run's periodic eval (docs/experiments.md section 0.6).

    python experiments/eval_splits.py runs/s5/v4_300 [--tasks 64]

The same eval sets as `train-minimal` (``make_tasks(split, n, seed=1000)``, data seed 0) and the
same greedy rollouts (`train_minimal.trainer.evaluate`).
"""

from __future__ import annotations

import argparse

from diagnose.model.resolve import load_model_and_tokenizer
from diagnose.tasks import make_tasks
from train_minimal.config import build_config
from train_minimal.trainer import EVAL_SPLITS, evaluate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--tasks", type=int, default=64)
    a = ap.parse_args()
    model, tok = load_model_and_tokenizer(a.model)
    model.eval()
    sets = {s: make_tasks(s, a.tasks, seed=1000) for s in EVAL_SPLITS}
    r = evaluate(model, tok, sets, build_config({}, overrides=[]))
    print(a.model, " ".join(f"{s}={r[f'eval/{s}/accuracy']:.3f}" for s in EVAL_SPLITS), f"(n={a.tasks} per split)")


if __name__ == "__main__":
    main()
