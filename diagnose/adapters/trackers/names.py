"""A tracker's metric names as the signals the detectors know, per trainer.

* TRL / transformers: the trackers get ``rewrite_logs(logs)`` (``integrations/integration_utils.py``):
  ``train/<k>``, ``eval/<k>`` for ``eval_<k>``, ``test/<k>``. Undone here, so a W&B or
  TensorBoard history has the names of ``trainer_state.json``'s ``log_history``, then TRL's own
  mapping (`diagnose.adapters.trl.NAME_MAP`). ``profiling/*`` (TRL's ``profiling_context``
  timings, logged straight to W&B in rows of their own) are left out.
* verl: the trackers get the raw keys the file logger writes (``Tracking.log``), mapped as the
  verl adapter maps them (`diagnose.adapters.verl.NAME_MAP`; ``response_length/*`` only for
  single-turn runs, decided where the rollouts are known).
* open-instruct ``grpo_fast.py`` (W&B only): ``scores`` (mean reward of the batch,
  ``data_loader.py``), ``policy/entropy_avg``, ``objective/kl{kl_estimator}_avg`` (estimator 2,
  the default, is ``expm1(-d) + d``: TRL's ``kl``), ``policy/clipfrac_avg``, ``optim/grad_norm``,
  ``lr``, ``val/sequence_lengths*``. Its ``global_step`` is the episode count, not a step.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import polars as pl

from diagnose.adapters._common.metrics import map_names

__all__ = ["OPEN_INSTRUCT_NAME_MAP", "guess_trainer", "signal_names", "trainer_names", "undo_rewrite_logs"]

_TRL_PREFIX = {"train/": "", "eval/": "eval_", "test/": "test_"}
_VERL_HINTS = ("actor/", "critic/", "timing_s/", "perf/", "response_length/", "val-core/", "val-aux/")
_OI_HINTS = ("objective/", "policy/entropy_avg", "optim/grad_norm", "time/training", "val/sequence_lengths")
_TRL_HINTS = ("loss", "reward", "learning_rate", "grad_norm", "epoch", "entropy", "train_runtime")

OPEN_INSTRUCT_NAME_MAP: dict[str, str] = {
    "scores": "reward",
    "policy/entropy_avg": "entropy",
    "policy/clipfrac_avg": "clip_ratio",
    "optim/grad_norm": "grad_norm",
    "val/sequence_lengths": "completions/mean_length",
    "val/sequence_lengths_min": "completions/min_length",
    "val/sequence_lengths_max": "completions/max_length",
}


def guess_trainer(columns: Iterable[str], config: Mapping[str, Any] | None = None) -> str | None:
    """``trl`` | ``verl`` | ``open_instruct`` from the logged names (and config), else None."""
    cols = [c for c in columns if c != "step"]
    cfg = config or {}
    if "training/global_step" in cols or any(c.startswith(_VERL_HINTS) for c in cols) or \
            isinstance(cfg.get("actor_rollout_ref"), dict):
        return "verl"
    if "training_step" in cols or any(c.startswith(_OI_HINTS) for c in cols):
        return "open_instruct"
    if any(c.startswith(("train/", "eval/")) for c in cols) or any(c in _TRL_HINTS for c in cols):
        return "trl"
    return None


def undo_rewrite_logs(df: pl.DataFrame) -> pl.DataFrame:
    """``train/reward`` -> ``reward``, ``eval/loss`` -> ``eval_loss`` (transformers'
    ``rewrite_logs`` undone); a name already present keeps its column."""
    renames: dict[str, str] = {}
    taken = set(df.columns)
    for c in df.columns:
        for pre, new in _TRL_PREFIX.items():
            if c.startswith(pre) and (new + c[len(pre):]) not in taken:
                renames[c] = new + c[len(pre):]
                taken.add(renames[c])
                break
    return df.rename(renames) if renames else df


def trainer_names(df: pl.DataFrame, trainer: str | None) -> pl.DataFrame:
    """A tracker's frame under the names the trainer's own files use (TRL: ``log_history``'s,
    ``profiling/*`` left out; verl and open-instruct log their own names to every tracker). Steps
    left with no value (a W&B row of ``profiling/*`` timings only) are dropped."""
    if trainer == "trl":
        df = undo_rewrite_logs(df.drop([c for c in df.columns if c.startswith("profiling/")]))
    names = [c for c in df.columns if c != "step"]
    return df.filter(pl.any_horizontal(pl.col(names).is_not_null())) if names else df


def signal_names(df: pl.DataFrame, trainer: str | None, config: Mapping[str, Any] | None = None) -> pl.DataFrame:
    """``df`` (``step`` + a tracker's names) in the trainer's names (`trainer_names`) with the
    names the detectors know added (the trainer's own names are kept, as the trainer adapters
    keep them)."""
    df = trainer_names(df, trainer)
    if trainer == "trl":
        from diagnose.adapters.trl import NAME_MAP

        df = map_names(df, NAME_MAP)
    elif trainer == "verl":
        from diagnose.adapters.verl.metrics import verl_names

        df = verl_names(df)
    elif trainer == "open_instruct":
        est = (config or {}).get("kl_estimator", 2)
        est = est if isinstance(est, int) and not isinstance(est, bool) and 0 <= est <= 3 else 2
        df = map_names(df, {**OPEN_INSTRUCT_NAME_MAP, f"objective/kl{est}_avg": "kl"})
    return df
