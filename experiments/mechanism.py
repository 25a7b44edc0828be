"""Why a run collapses, step by step, at the call-open context (docs/experiments.md).

    python experiments/mechanism.py runs/exp/collapse-s0 [--markdown]

Per RL step, from the run's own files (token traces, rollouts, metrics; nothing recomputed by
a model):

* ``reward``, ``collapsed``: on-policy reward and the share of collapsed turns;
* ``p_end@open``: mean policy probability of ``<|im_end|>`` right after ``<tool_call>\\n`` over
  every such position in the step's rollouts (the sampled contexts, not the fixed probe's);
* ``end@open``: how many of those positions sampled ``<|im_end|>`` (a bare ``<tool_call>`` turn);
* ``n_open+`` / ``n_open-``: call-open positions in samples with positive / negative advantage;
* ``sumA@open``: the sum of advantages over the call-open positions: the net push the
  policy-gradient step puts on the body start ``{"`` there (negative: ``{"`` pushed down, every
  alternative up);
* ``sumA/len@open``: the same with each sample's advantage divided by its generated length, the
  weight a sequence-mean aggregation (verl's ``seq-mean-token-mean``) would give those positions;
* ``self@open`` / ``other@open``: the logit-gradient attribution of ``<|im_end|>`` at those
  positions (``sum A (1 - p)`` where it was sampled; ``-sum A p`` where another token was), the
  same decomposition as the trainer's ``attribution/im_end/*`` restricted to the call context.

The advantages are the trainer's (`train_minimal.losses.group_advantages` on the rollouts'
rewards, gold members included, with the run's ``grpo.scale_rewards``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import polars as pl
import torch
from rich.console import Console
from rich.table import Table

from diagnose.rundir import RunReader, ctrl_column
from train_minimal.losses import group_advantages


def _ids(run: Path) -> tuple[int, int, int]:
    """(``<tool_call>``, ``\\n`` after it, ``<|im_end|>``) token ids from the run's control tokens."""
    reg = {t["name"]: t["token_id"] for t in json.loads((run / "run.json").read_text())["control_tokens"]}
    return reg["tool_call_open"], reg["call_open_newline"], reg["im_end"]


def step_row(run: Path, step: int, cfg: dict, ids: tuple[int, int, int]) -> dict[str, float] | None:
    tok_path, roll_path = run / "tokens" / f"step-{step:06d}.parquet", run / "rollouts" / f"step-{step:06d}.parquet"
    if not tok_path.exists() or not roll_path.exists():
        return None
    call_open, newline, im_end = ids
    rolls = pl.read_parquet(roll_path, columns=["sample_id", "reward", "is_off_policy"]).sort("sample_id")
    adv = group_advantages(torch.tensor(rolls["reward"].to_numpy(), dtype=torch.float32),
                           cfg["rollout"]["group_size"], scale=cfg["grpo"]["scale_rewards"]).numpy()
    t = (pl.read_parquet(tok_path, columns=["sample_id", "position", "token_id", "is_generated",
                                            ctrl_column("im_end")])
         .sort("sample_id", "position")
         .with_columns(n_gen=pl.col("is_generated").sum().over("sample_id"))
         .with_columns(prev1=pl.col("token_id").shift(1).over("sample_id"),
                       prev2=pl.col("token_id").shift(2).over("sample_id"))
         .filter(pl.col("is_generated") & (pl.col("prev1") == newline) & (pl.col("prev2") == call_open)))
    a = adv[t["sample_id"].to_numpy()]
    p = np.exp(t[ctrl_column("im_end")].to_numpy())
    is_end = t["token_id"].to_numpy() == im_end
    return {
        "p_end@open": float(p.mean()) if len(p) else float("nan"),
        "end@open": int(is_end.sum()),
        "n_open+": int((a > 0).sum()),
        "n_open-": int((a < 0).sum()),
        "sumA@open": float(a.sum()),
        "sumA/len@open": float((a / np.maximum(t["n_gen"].to_numpy(), 1)).sum()),
        "self@open": float((a * is_end * (1 - p)).sum()),
        "other@open": float((-a * ~is_end * p).sum()),
    }


def mechanism_table(run: Path) -> pl.DataFrame:
    cfg = json.loads((run / "run.json").read_text())["config"]
    ids = _ids(run)
    m = RunReader(run).metrics().filter(pl.col("phase") == "rl")
    rows = []
    for step, reward, collapsed in m.select("step", "reward", "turn_state/collapsed").iter_rows():
        r = step_row(run, int(step), cfg, ids)
        if r is not None:
            rows.append({"step": int(step), "reward": reward, "collapsed": collapsed, **r})
    return pl.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args()
    df = mechanism_table(a.run)
    if a.markdown:  # 3 significant digits: the probabilities span 1e-6 .. 1
        df = df.with_columns(pl.col(pl.Float64).map_elements(lambda v: f"{v:.3g}", return_dtype=pl.String))
        with pl.Config(tbl_formatting="MARKDOWN", tbl_hide_column_data_types=True, tbl_hide_dataframe_shape=True,
                        tbl_rows=-1, tbl_cols=-1, tbl_width_chars=1000):
            print(df)
        return
    table = Table(title=f"{a.run}: the call-open context, per RL step")
    for c in df.columns:
        table.add_column(c, justify="right")
    for r in df.iter_rows():
        table.add_row(*(f"{v:.3g}" if isinstance(v, float) else str(v) for v in r))
    Console().print(table)


if __name__ == "__main__":
    main()
