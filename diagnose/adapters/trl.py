"""TRL GRPOTrainer output directory as a `RunSource`.

Reads ``<output_dir>/completions/completions_<step>.parquet`` (``log_completions``; the step
zero-padded or not) with columns ``step``, ``prompt``, ``completion``, one float column per
reward function and ``advantage``; and, for metrics, the newest ``trainer_state.json``
(``log_history``) in the output directory or its ``checkpoint-*/`` folders.

* groups: consecutive rows sharing ``prompt`` within a step (TRL logs a group's completions
  together);
* ``reward``: the file's ``reward`` column if it has one, else the unweighted sum of the
  reward-function columns, NaN ignored (TRL's ``nansum``; all-NaN gives NaN). Each reward
  column is kept too; ``accuracy`` copies a column named ``accuracy`` or the first reward
  column whose name contains "accuracy";
* prompts/completions in conversational form (lists of ``{role, content}``) are rendered as
  ChatML, so multi-turn completions are split into assistant turns.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from diagnose.adapters._io import check_parquet, read_parquet, subdirs, visible_files
from diagnose.adapters._issues import IssueLog
from diagnose.adapters._metrics import (
    derived_metrics,
    map_names,
    merge_metrics,
    metrics_frame,
    nonfinite_metric_issues,
)
from diagnose.adapters._rollouts import (
    concat_frames,
    empty_rollouts,
    groups_consecutive,
    rollouts_frame,
    turn_columns,
)
from diagnose.adapters._source import make_source
from diagnose.adapters._turns import TurnClassifier
from diagnose.chat import IM_END, IM_START
from diagnose.source import RunSource

FORMAT = "trl"
FILE_RE = re.compile(r"^completions_(\d+)\.parquet$")
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"

#: Columns that are never reward functions.
NOT_REWARDS = frozenset({"step", "advantage", "advantages", "sample_id", "group_id", "index",
                         "__index_level_0__", "reward"})

#: TRL log_history name -> our name (originals are kept as well).
NAME_MAP: dict[str, str] = {
    "clip_ratio/region_mean": "clip_ratio",
    "completion_length": "completions/mean_length",
    "learning_rate": "lr",
}

_FLOAT = (pl.Float32, pl.Float64)
_INT = (pl.Int8, pl.Int16, pl.Int32, pl.Int64, pl.UInt8, pl.UInt16, pl.UInt32, pl.UInt64)


# ---- discovery ----------------------------------------------------------------------


def _completion_dirs(p: Path) -> list[Path]:
    if p.is_file():
        return []
    dirs = [p / "completions", p]
    return [d for d in dirs if d.is_dir()]


def completion_files(p: Path) -> list[tuple[int, Path]]:
    if p.is_file():
        m = FILE_RE.match(p.name)
        return [(int(m.group(1)), p)] if m else []
    out = []
    for d in _completion_dirs(p):
        for f in visible_files(d):
            m = FILE_RE.match(f.name)
            if m:
                out.append((int(m.group(1)), f))
    out.sort(key=lambda x: (x[0], x[1].name))
    return out


def state_files(p: Path) -> list[Path]:
    if p.is_file():
        return [p] if p.name == TRAINER_STATE else []
    roots = [p] + ([p.parent] if p.name == "completions" else [])
    out = []
    for r in roots:
        if (r / TRAINER_STATE).is_file():
            out.append(r / TRAINER_STATE)
        for d in subdirs(r):
            if CHECKPOINT_RE.match(d.name) and (d / TRAINER_STATE).is_file():
                out.append(d / TRAINER_STATE)
    return out


def _has_log_history(f: Path) -> bool:
    try:
        if f.stat().st_size > 256 * 1024 * 1024:
            return False
        obj = json.loads(f.read_bytes())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(obj, dict) and isinstance(obj.get("log_history"), list)


def detect(p: Path) -> bool:
    if completion_files(p):
        return True
    return any(_has_log_history(f) for f in state_files(p))


def has_candidates(p: Path) -> bool:
    if p.is_file():
        return bool(FILE_RE.match(p.name)) or p.name == TRAINER_STATE
    return (p / "completions").is_dir() or bool(state_files(p))


# ---- text ---------------------------------------------------------------------------


def _content(m: dict[str, Any]) -> str:
    c = m.get("content")
    if isinstance(c, list):  # [{"type": "text", "text": ...}, ...]
        c = "".join(str(part.get("text") or "") for part in c if isinstance(part, dict))
    text = c if isinstance(c, str) else ("" if c is None else str(c))
    if m.get("role") == "assistant" and m.get("tool_calls"):
        try:
            from diagnose.conversations import assistant_text

            return assistant_text({"content": text, "tool_calls": m["tool_calls"]})
        except Exception:  # noqa: BLE001 - malformed tool_calls: keep the text
            return text
    return text


def to_text(value: Any, *, prompt: bool) -> str | None:
    """A TRL prompt/completion cell as text: strings as is; conversational lists of messages
    rendered as ChatML (a prompt ends with the assistant header, a completion starts with the
    first assistant turn's text so `split_assistant_turns` finds every turn)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list) and all(isinstance(m, dict) for m in value):
        if prompt:
            body = "".join(f"{IM_START}{m.get('role') or 'user'}\n{_content(m)}{IM_END}\n" for m in value)
            return body + f"{IM_START}assistant\n"
        parts: list[str] = []
        for i, m in enumerate(value):
            role = m.get("role") or "assistant"
            if i == 0 and role == "assistant":
                parts.append(_content(m))
            else:
                parts.append(f"{IM_END}\n{IM_START}{role}\n{_content(m)}" if parts else
                             f"{IM_START}{role}\n{_content(m)}")
        return "".join(parts)
    return json.dumps(value, ensure_ascii=False, default=str)


# ---- completions --------------------------------------------------------------------


def _read_file(step: int, f: Path, issues: IssueLog, classifier: TurnClassifier,
               offsets: dict[int, tuple[int, int]]) -> tuple[pl.DataFrame | None, list[str], bool]:
    schema, err = check_parquet(f)
    if err:
        issues.add(f, None, f"{err}; file skipped")
        return None, [], False
    if "completion" not in schema:
        issues.add(f, None, f"no 'completion' column (columns: {list(schema.names())}); file skipped")
        return None, [], False
    df, err = read_parquet(f)
    if df is None:
        issues.add(f, None, f"{err}; file skipped")
        return None, [], False
    n = df.height
    if n == 0:
        issues.add(f, None, "no rows; file skipped")
        return None, [], False

    # step: the column is authoritative; the file name fills gaps
    steps = [step] * n
    if "step" in df.columns:
        if df.schema["step"] in _INT or df.schema["step"] in _FLOAT:
            col = df.get_column("step").cast(pl.Float64).to_list()
            bad = 0
            for i, v in enumerate(col):
                if v is not None and math.isfinite(v) and v >= 0 and float(v).is_integer():
                    steps[i] = int(v)
                else:
                    bad += 1
            if bad:
                issues.add(f, None, f"{bad} row(s) with a missing or invalid 'step'; the file name's step {step} used")
            other = sorted(set(steps) - {step})
            if other:
                issues.add(f, None, f"rows have step(s) {other[:5]} but the file name says {step}; "
                                    "the step column is authoritative")
        else:
            issues.add(f, None, f"'step' column has dtype {df.schema['step']}; the file name's step {step} used")

    completions_raw = df.get_column("completion").to_list()
    completions = [to_text(v, prompt=False) for v in completions_raw]
    n_null = sum(c is None for c in completions)
    if n_null:
        issues.add(f, None, f"{n_null} row(s) with a null 'completion' (read as empty)")
        completions = ["" if c is None else c for c in completions]
    prompts = ([to_text(v, prompt=True) for v in df.get_column("prompt").to_list()]
               if "prompt" in df.columns else [None] * n)
    if "prompt" not in df.columns:
        issues.add(f, None, "no 'prompt' column: each row is its own group")

    reward_cols = [c for c, dt in df.schema.items() if dt in _FLOAT and c not in NOT_REWARDS]
    for c in reward_cols:
        arr = df.get_column(c).cast(pl.Float64).to_numpy()
        n_nan = int(np.isnan(arr).sum())
        n_inf = int(np.isinf(arr).sum())
        if n_nan or n_inf:
            issues.add(f, None, f"reward column {c!r}: {n_nan} NaN, {n_inf} ±inf value(s) (NaN is left out "
                                "of the reward sum, as TRL's nansum; ±inf kept)")
    own_reward = "reward" in df.columns and (df.schema["reward"] in _FLOAT or df.schema["reward"] in _INT)
    if own_reward:
        reward = df.get_column("reward").cast(pl.Float64).to_list()
    elif reward_cols:
        mat = np.column_stack([df.get_column(c).cast(pl.Float64).fill_null(float("nan")).to_numpy()
                               for c in reward_cols])
        all_nan = np.isnan(mat).all(axis=1)
        with np.errstate(invalid="ignore"):
            sums = np.nansum(mat, axis=1)
        sums[all_nan] = np.nan
        reward = sums.tolist()
    else:
        reward = [None] * n
        issues.add(f, None, "no reward column (float columns other than step/advantage): reward is null")

    # ids: rows of several files for one step continue each other's numbering
    per_step: dict[int, list[int]] = {}
    for i, s in enumerate(steps):
        per_step.setdefault(s, []).append(i)
    sample_ids = [0] * n
    group_ids = [0] * n
    for s, idx in per_step.items():
        s0, g0 = offsets.get(s, (0, 0))
        gs = groups_consecutive([prompts[i] for i in idx])
        for k, i in enumerate(idx):
            sample_ids[i] = s0 + k
            group_ids[i] = g0 + gs[k]
        offsets[s] = (s0 + len(idx), g0 + gs[-1] + 1)

    cols: dict[str, list[Any]] = {
        "step": steps,
        "sample_id": sample_ids,
        "group_id": group_ids,
        "prompt": prompts,
        "completion": completions,
        "reward": reward,
    }
    acc_col = "accuracy" if "accuracy" in df.columns and df.schema["accuracy"] in _FLOAT + _INT else next(
        (c for c in reward_cols if "accuracy" in c.lower()), None)
    if acc_col is not None:
        cols["accuracy"] = df.get_column(acc_col).cast(pl.Float64).to_list()
    cols.update(turn_columns(classifier, completions))
    extras = {c: df.get_column(c) for c in df.columns
              if c not in ("step", "prompt", "completion", "reward", "accuracy")}
    for c, s in list(extras.items()):
        if isinstance(s.dtype, (pl.List, pl.Struct, pl.Array)) or s.dtype == pl.Object:
            extras[c] = pl.Series(c, [None if v is None else json.dumps(v, default=str) for v in s.to_list()],
                                  dtype=pl.String)
    return rollouts_frame(cols, extras), reward_cols, own_reward


# ---- metrics ------------------------------------------------------------------------


def _load_state(f: Path, issues: IssueLog) -> list[Any] | None:
    try:
        obj = json.loads(f.read_bytes())
    except (OSError, ValueError, RecursionError) as e:
        msg = f"{type(e).__name__}: {e}"
        issues.add(f, None, f"unreadable or not valid JSON ({msg[:200]}); ignored")
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("log_history"), list):
        issues.add(f, None, "no 'log_history' list; ignored")
        return None
    return obj["log_history"]


def _state_rank(f: Path, history: list[Any]) -> tuple[int, int, int]:
    steps = [e.get("step") for e in history if isinstance(e, dict)]
    top = max((s for s in steps if isinstance(s, int) and not isinstance(s, bool)), default=-1)
    m = CHECKPOINT_RE.match(f.parent.name)
    try:
        mtime = f.stat().st_mtime_ns
    except OSError:
        mtime = 0
    return (top, int(m.group(1)) if m else 1 << 62, mtime)


def trl_metrics(p: Path, issues: IssueLog) -> tuple[pl.DataFrame | None, Path | None]:
    """Metrics from the newest readable trainer_state.json (most logged steps), or None."""
    best: tuple[tuple[int, int, int], Path, list[Any]] | None = None
    for f in state_files(p):
        hist = _load_state(f, issues)
        if hist is None:
            continue
        rank = _state_rank(f, hist)
        if best is None or rank > best[0]:
            best = (rank, f, hist)
    if best is None:
        return None, None
    _, f, hist = best
    records: dict[int, dict[str, Any]] = {}
    for i, e in enumerate(hist):
        if not isinstance(e, dict):
            issues.add(f, None, f"log_history[{i}] is not an object; skipped")
            continue
        step = e.get("step")
        if isinstance(step, float) and step.is_integer():
            step = int(step)
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            issues.add(f, None, f"log_history[{i}] has no valid 'step' ({step!r}); skipped")
            continue
        rec = records.setdefault(step, {})
        for k, v in e.items():
            if k != "step" and not isinstance(v, (dict, list)):
                rec[k] = v
    df = metrics_frame(records)
    nonfinite_metric_issues(df, str(f), issues)
    mapping = dict(NAME_MAP)
    for c in df.columns:  # rewards/<fn>/mean (or older rewards/<fn>) of an accuracy reward
        if c.startswith("rewards/") and "accuracy" in c.lower() and not c.endswith("/std"):
            mapping.setdefault(c, "accuracy")
    return map_names(df, mapping), f


# ---- load ---------------------------------------------------------------------------


def load(p: Path) -> RunSource:
    issues = IssueLog()
    notes = ["TRL completions carry text only: no token probabilities, no control-token signals"]
    classifier = TurnClassifier()
    files = completion_files(p)
    frames: list[pl.DataFrame] = []
    reward_cols: list[str] = []
    offsets: dict[int, tuple[int, int]] = {}
    seen_steps: dict[int, Path] = {}
    summed = False
    for step, f in files:
        if step in seen_steps:
            issues.add(f, None, f"a second completions file for step {step} (also {seen_steps[step].name}); "
                                "rows appended to that step")
        seen_steps.setdefault(step, f)
        try:
            df, rcols, own_reward = _read_file(step, f, issues, classifier, offsets)
        except (KeyboardInterrupt, SystemExit, MemoryError):
            raise
        except Exception as e:  # noqa: BLE001 - unexpected column types: report, keep the other files
            issues.add(f, None, f"unreadable completions table ({type(e).__name__}: {str(e)[:200]}); file skipped")
            continue
        summed |= df is not None and not own_reward
        if df is not None:
            frames.append(df)
            reward_cols.extend(c for c in rcols if c not in reward_cols)
    if not files:
        notes.append("no completions/completions_<step>.parquet files (log_completions off?): "
                     "no rollouts, no turn states")
    has_acc = any("accuracy" in f.columns for f in frames)
    rollouts = concat_frames(frames, empty_rollouts(accuracy=has_acc)).sort(["step", "sample_id"])
    if files and rollouts.height == 0:
        issues.add(p, None, "no readable completions rows in any completions file")

    metrics, state = trl_metrics(p, issues)
    derived = derived_metrics(rollouts, reward_cols)
    if metrics is None:
        if state_files(p):
            notes.append("no readable trainer_state.json: metrics derived from the completions only")
        else:
            notes.append("no trainer_state.json with log_history: metrics (reward, accuracy, turn states) derived "
                         "from the logged completions; no entropy, KL, clip ratio or grad norm")
        metrics = derived
    else:
        notes.append(f"metrics from {state} (newest trainer_state.json); turn_state/* and format_error/* "
                     "derived from the logged completions")
        metrics = merge_metrics(metrics, derived)
    if summed:
        notes.append("reward = unweighted sum of the reward-function columns (NaN ignored, as TRL's nansum); "
                     "TRL's reward_weights are not in the completions files")
    notes.append("TRL logs only the completions it prints/keeps: rollout statistics cover those samples only")
    all_files = [f for _, f in files] + state_files(p)
    return make_source(p, FORMAT, metrics=metrics, rollouts=rollouts, issues=issues, notes=notes, files=all_files)


_STEP_FILE = re.compile(r"(?:^|/)completions_(\d+)\.parquet$")


def step_of_file(rel: str, single_file: bool) -> int | str:
    """What a fingerprint file (``/``-separated path relative to the run) holds, for the scan
    cache: its step (``completions_<step>.parquet``, from ``_log_completion_extra_columns`` /
    ``log_completions``), ``"metrics"`` (``trainer_state.json``: only the metrics layer) or
    ``"global"`` (any step may depend on it)."""
    m = _STEP_FILE.search(rel)
    if m:
        return int(m.group(1))
    return "metrics" if rel.rsplit("/", 1)[-1] == "trainer_state.json" else "global"
