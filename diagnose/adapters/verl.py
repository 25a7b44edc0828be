"""verl run as a `RunSource`.

Reads the rollout dumps of ``trainer.rollout_data_dir`` -- one ``<step>.jsonl`` per step, one
line per sample with ``input``, ``output``, ``score``, ``step``, ``gts`` and any extra reward
keys -- and the file logger's metrics JSONL (``{"step": N, "data": {...}}`` per line; any
``*.jsonl`` name, found by content).

``path`` may be the rollout folder itself, or a run folder holding the metrics file and the
rollout folder one level down (with several dump folders, one named like ``rollout*``/``train*``
is preferred and validation dumps are ignored). Groups are identical ``input`` within a step;
``reward`` is ``score``; ``accuracy`` is the ``acc``/``accuracy`` extra key when present.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import polars as pl

from diagnose.adapters._io import first_object, subdirs, visible_files
from diagnose.adapters._issues import IssueLog, NonFinite
from diagnose.adapters._metrics import (
    derived_metrics,
    map_names,
    merge_metrics,
    metrics_frame,
    nonfinite_metric_issues,
)
from diagnose.adapters._rollouts import (
    empty_rollouts,
    groups_by_key,
    json_scalar_column,
    rollouts_frame,
    turn_columns,
)
from diagnose.adapters._source import make_source
from diagnose.adapters._turns import TurnClassifier
from diagnose.adapters._values import as_float, as_step
from diagnose.chat import IM_START
from diagnose.jsonl import LineError, iter_jsonl
from diagnose.rundir.writer import flatten_metrics
from diagnose.source import RunSource

FORMAT = "verl"
STEP_FILE_RE = re.compile(r"^(\d+)\.jsonl$")

#: verl metric name -> our name (originals are kept as well).
NAME_MAP: dict[str, str] = {
    "actor/entropy": "entropy",
    "actor/pg_clipfrac": "clip_ratio",
    "actor/ppo_kl": "kl",
    "actor/grad_norm": "grad_norm",
    "actor/lr": "lr",
    "response_length/mean": "completions/mean_length",
    "response_length/max": "completions/max_length",
    "response_length/min": "completions/min_length",
    "response_length/clip_ratio": "completions/clipped_ratio",
    "critic/score/mean": "reward",
    "training/rollout_probs_diff_mean": "mismatch/prob_diff",
}

_CORE = ("input", "output", "score", "step")
_ACCURACY_KEYS = ("acc", "accuracy")


# ---- discovery ----------------------------------------------------------------------


def _step_files(d: Path) -> list[tuple[int, Path]]:
    out = []
    for f in visible_files(d):
        m = STEP_FILE_RE.match(f.name)
        if m:
            out.append((int(m.group(1)), f))
    out.sort(key=lambda x: x[0])
    return out


def _kind(obj: dict[str, Any] | None) -> str | None:
    """'rollout' | 'metrics' | 'other' for a first JSONL object, None if there is none."""
    if obj is None:
        return None
    if isinstance(obj.get("data"), dict) and "step" in obj:
        return "metrics"
    if "messages" in obj or "response_tokens" in obj:
        return "other"
    if "output" in obj or ("input" in obj and "score" in obj):
        return "rollout"
    return "other"


def _dir_kind(files: list[tuple[int, Path]], sniff: int = 3) -> str | None:
    kinds = [_kind(first_object(f)) for _, f in files[:sniff]]
    kinds = [k for k in kinds if k is not None]
    if "rollout" in kinds:
        return "rollout"
    return "other" if kinds else None


def rollout_dirs(p: Path, strict: bool) -> tuple[list[Path], list[Path]]:
    """``(used, ignored)`` rollout-dump folders. ``strict``: content must look like verl dumps;
    else folders whose content is unreadable also count (they are reported when read)."""
    if p.is_file():
        return [], []

    def ok(d: Path) -> bool:
        files = _step_files(d)
        if not files:
            return False
        k = _dir_kind(files)
        return k == "rollout" or (not strict and k is None)

    if ok(p):
        return [p], []
    found = [d for d in subdirs(p) if ok(d)]
    if len(found) <= 1:
        return found, []

    def rank(d: Path) -> int:
        n = d.name.lower()
        if "val" in n or "test" in n or "eval" in n:
            return 2
        return 0 if ("rollout" in n or "train" in n) else 1

    found.sort(key=lambda d: (rank(d), d.name))
    return found[:1], found[1:]


def metrics_files(p: Path) -> list[Path]:
    if p.is_file():
        return [p] if _kind(first_object(p)) == "metrics" else []
    return [f for f in visible_files(p)
            if f.suffix == ".jsonl" and not STEP_FILE_RE.match(f.name) and _kind(first_object(f)) == "metrics"]


def detect(p: Path) -> bool:
    if p.is_file():
        return p.suffix == ".jsonl" and _kind(first_object(p)) in ("rollout", "metrics")
    return bool(rollout_dirs(p, strict=True)[0]) or bool(metrics_files(p))


def has_candidates(p: Path) -> bool:
    if p.is_file():
        return p.suffix == ".jsonl"
    return bool(_step_files(p)) or any(_step_files(d) for d in subdirs(p)) or \
        any(f.suffix == ".jsonl" for f in visible_files(p))


# ---- rollouts -----------------------------------------------------------------------


def _read_rollouts(files: list[tuple[int, Path]], issues: IssueLog, classifier: TurnClassifier) -> pl.DataFrame:
    rows: list[tuple[int, str | None, str, float | None, dict[str, Any]]] = []
    nonfinite = NonFinite()
    for fstep, f in files:
        n_good = 0
        bad_step = missing_input = missing_score = 0
        other_steps: set[int] = set()
        for line_no, obj in iter_jsonl(f):
            if isinstance(obj, LineError):
                issues.line_error(obj)
                continue
            output = obj.get("output")
            if not isinstance(output, str):
                issues.add(f, line_no, f"no 'output' string (got {type(output).__name__}); line skipped")
                continue
            step = as_step(obj.get("step"))
            if step is None:
                bad_step += 1
                step = fstep
            elif step != fstep:
                other_steps.add(step)
            inp = obj.get("input")
            if not isinstance(inp, str):
                missing_input += 1
                inp = None
            score = obj.get("score")
            reward = as_float(score)
            if reward is None:
                if score is None:
                    missing_score += 1
                else:
                    issues.add(f, line_no, f"'score' is not a number ({type(score).__name__}); reward set to null")
            nonfinite.check(f, "score", reward, line_no)
            extra = {k: v for k, v in obj.items() if k not in _CORE}
            for k, v in extra.items():
                if isinstance(v, float):
                    nonfinite.check(f, k, v, line_no)
            rows.append((step, inp, output, reward, extra))
            n_good += 1
        if bad_step:
            issues.add(f, None, f"{bad_step} line(s) without a valid 'step'; the file name's step {fstep} used")
        if other_steps:
            issues.add(f, None, f"lines have step(s) {sorted(other_steps)[:5]} but the file name says {fstep}; "
                                "the 'step' key is authoritative")
        if missing_input:
            issues.add(f, None, f"{missing_input} line(s) without an 'input' string: each is its own group")
        if missing_score:
            issues.add(f, None, f"{missing_score} line(s) without 'score': reward is null")
        if n_good == 0:
            issues.add(f, None, "no readable rollout lines in this file")
    nonfinite.flush(issues)
    if not rows:
        return empty_rollouts()

    # ids within each step, in file/line order
    by_step: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        by_step.setdefault(r[0], []).append(i)
    sample_ids = [0] * len(rows)
    group_ids = [0] * len(rows)
    for idx in by_step.values():
        gs = groups_by_key([rows[i][1] for i in idx])
        for k, i in enumerate(idx):
            sample_ids[i] = k
            group_ids[i] = gs[k]
    completions = [r[2] for r in rows]
    cols: dict[str, list[Any]] = {
        "step": [r[0] for r in rows],
        "sample_id": sample_ids,
        "group_id": group_ids,
        "prompt": [r[1] for r in rows],
        "completion": completions,
        "reward": [r[3] for r in rows],
    }
    keys: dict[str, None] = {}
    for r in rows:
        for k in r[4]:
            keys.setdefault(k, None)
    extras = {k: json_scalar_column(k, [r[4].get(k) for r in rows]) for k in keys}
    for k in _ACCURACY_KEYS:
        if k in extras and extras[k].dtype in (pl.Float64, pl.Int64, pl.Boolean):
            cols["accuracy"] = extras[k].cast(pl.Float64).to_list()
            break
    cols.update(turn_columns(classifier, completions))
    return rollouts_frame(cols, extras)


# ---- metrics ------------------------------------------------------------------------


def read_metrics(files: list[Path], issues: IssueLog) -> pl.DataFrame | None:
    if not files:
        return None
    records: dict[int, dict[str, Any]] = {}
    for f in files:
        for line_no, obj in iter_jsonl(f):
            if isinstance(obj, LineError):
                issues.line_error(obj)
                continue
            step = as_step(obj.get("step"))
            data = obj.get("data")
            if step is None or not isinstance(data, dict):
                issues.add(f, line_no, "not a {\"step\": N, \"data\": {...}} metrics line; line skipped")
                continue
            flat: dict[str, Any] = {}
            flatten_metrics("", data, flat)
            records.setdefault(step, {}).update(flat)
    df = metrics_frame(records)
    nonfinite_metric_issues(df, ", ".join(str(f) for f in files), issues)
    return map_names(df, NAME_MAP)


# ---- load ---------------------------------------------------------------------------


def load(p: Path) -> RunSource:
    issues = IssueLog()
    notes = ["verl rollout dumps carry decoded text only: no token probabilities, no control-token signals"]
    classifier = TurnClassifier()
    if p.is_file():
        m = STEP_FILE_RE.match(p.name)
        kind = _kind(first_object(p))
        files = [(int(m.group(1)) if m else 0, p)] if kind != "metrics" else []
        dirs, ignored = [], []
        mfiles = [p] if kind == "metrics" else []
    else:
        dirs, ignored = rollout_dirs(p, strict=False)
        files = [x for d in dirs for x in _step_files(d)]
        files.sort(key=lambda x: x[0])
        mfiles = metrics_files(p)
        if dirs and dirs[0] != p:
            mfiles += [f for f in metrics_files(dirs[0]) if f not in mfiles]
    for d in ignored:
        notes.append(f"rollout dumps in {d} ignored (using {dirs[0]}; validation dumps?)")
    rollouts = _read_rollouts(files, issues, classifier)
    if not files:
        notes.append("no <step>.jsonl rollout dumps (trainer.rollout_data_dir unset?): no rollouts, no turn states")
    elif rollouts.height and not rollouts.select(
            pl.col("completion").str.contains(IM_START, literal=True).any()).item():
        notes.append("verl decodes the dumps with special tokens skipped: ChatML markers are gone, so multi-turn "
                     "outputs are split on bare user/assistant lines around <tool_response> blocks and stray "
                     "<|im_start|>/<|im_end|> cannot be seen")
    metrics = read_metrics(mfiles, issues)
    derived = derived_metrics(rollouts)
    if metrics is None:
        notes.append("no verl file-logger metrics JSONL ({\"step\", \"data\"} lines): metrics derived from the "
                     "rollout dumps; no entropy, KL, clip ratio or grad norm")
        metrics = derived
    else:
        metrics = merge_metrics(metrics, derived)
        if "actor/ppo_kl" in metrics.columns:
            notes.append("'kl' is verl's actor/ppo_kl (KL between the rollout and the updated policy), not the "
                         "KL to the reference model (actor/kl_loss, kept under its own name)")
    all_files = [f for _, f in files] + mfiles
    return make_source(p, FORMAT, metrics=metrics, rollouts=rollouts, issues=issues, notes=notes, files=all_files)


_STEP_FILE = re.compile(r"(?:^|/)(\d+)\.jsonl$")


def step_of_file(rel: str, single_file: bool) -> int | str:
    """What a fingerprint file (``/``-separated path relative to the run) holds, for the scan
    cache: its step (a ``<step>.jsonl`` rollout dump), ``"metrics"`` (any other ``.jsonl``: the
    file logger's metrics) or ``"global"`` (any step may depend on it)."""
    m = _STEP_FILE.search(rel)
    if m:
        return int(m.group(1))
    return "metrics" if rel.endswith(".jsonl") else "global"
