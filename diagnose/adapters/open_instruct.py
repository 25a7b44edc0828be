"""open-instruct rollout traces as a `RunSource`.

Reads ``*_rollouts_*.jsonl`` files (in ``path`` and one folder down): one line per sample with
``step``, ``prompt_idx``, ``response_tokens`` (token ids), ``logprobs`` (aligned with the
tokens), ``reward`` and optionally ``response`` / ``prompt`` text and ``advantage``.

* groups: same ``(step, prompt_idx)``; ``group_id`` numbers the prompts of a step in order of
  first appearance (``prompt_idx`` is kept as a column);
* tokens: one row per response token (``turn`` 0, ``is_generated`` true); the traced log-prob
  is the sampler's, so it is both ``sampler_logprob`` and ``logprob``; no entropy; no
  control-token columns (the tokenizer is unknown);
* turn states need the ``response`` text: rows without it get null ``turn_states``.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from diagnose.adapters._io import first_object, subdirs, visible_files
from diagnose.adapters._issues import IssueLog, NonFinite
from diagnose.adapters._metrics import derived_metrics
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
from diagnose.jsonl import LineError, iter_jsonl
from diagnose.rundir.schema import TOKENS_SCHEMA
from diagnose.source import RunSource

FORMAT = "open_instruct"
FILE_RE = re.compile(r"^.+_rollouts_.*\.jsonl$")
_NAME_STEP = re.compile(r"_rollouts_(?:step[_-]?)?(\d+)")
_CORE = ("step", "prompt_idx", "response_tokens", "logprobs", "reward", "response", "prompt")
_I32 = 2**31 - 1


def trace_files(p: Path) -> list[Path]:
    if p.is_file():
        return [p] if FILE_RE.match(p.name) else []
    out = [f for f in visible_files(p) if FILE_RE.match(f.name)]
    for d in subdirs(p):
        out.extend(f for f in visible_files(d) if FILE_RE.match(f.name))
    return out


def detect(p: Path) -> bool:
    files = trace_files(p)
    if not files:
        return False
    # the name is specific; content confirms when a first line is readable
    for f in files[:3]:
        obj = first_object(f)
        if obj is not None:
            return "response_tokens" in obj or "prompt_idx" in obj or "logprobs" in obj
    return True


def has_candidates(p: Path) -> bool:
    return bool(trace_files(p))


def _file_step(f: Path) -> int | None:
    m = _NAME_STEP.search(f.name)
    return int(m.group(1)) if m else None


def _token_ids(v: Any) -> np.ndarray | None:
    """A list of token ids as an int64 array, or None if it is not one (floats, bools, negative
    or > int32 ids, nesting)."""
    if not isinstance(v, list):
        return None
    if not v:
        return np.zeros(0, dtype=np.int64)
    try:
        a = np.asarray(v)
    except (ValueError, TypeError, OverflowError):
        return None
    if a.ndim != 1 or a.dtype.kind not in "iu" or a.min() < 0 or a.max() > _I32:
        return None
    return a.astype(np.int64)


def _logprobs(raw: list[Any], n: int) -> tuple[np.ndarray, np.ndarray]:
    """``(values, null mask)`` of length ``n``: numbers as float64 (NaN/inf kept), anything
    else (null, strings, bools) and missing positions masked as null."""
    part = raw[:n]
    arr = None
    if None not in part:
        try:
            a = np.asarray(part)
            if a.ndim == 1 and a.dtype.kind in "fiu":
                arr = a.astype(np.float64)
                mask = np.zeros(len(arr), dtype=bool)
        except (ValueError, TypeError, OverflowError):
            arr = None
    if arr is None:
        vals = [None if isinstance(v, bool) else as_float(v) for v in part]
        mask = np.array([v is None for v in vals], dtype=bool)
        arr = np.array([math.nan if v is None else v for v in vals], dtype=np.float64)
    if len(arr) < n:
        arr = np.concatenate([arr, np.full(n - len(arr), math.nan)])
        mask = np.concatenate([mask, np.ones(n - len(mask), dtype=bool)])
    return arr, mask


def load(p: Path) -> RunSource:
    issues = IssueLog()
    notes = [
        "open-instruct traces carry token ids and the sampler's (vLLM) log-probs only: logprob = sampler_logprob "
        "(no trainer-side log-probs, so no train/inference mismatch), no entropy",
        "no tokenizer known: no control-token log-prob columns (lp_ctrl_*), control tokens cannot be named",
        "no trainer metrics in the traces: metrics derived from the rollouts (reward, turn states, "
        "completions/mean_length in tokens)",
    ]
    classifier = TurnClassifier()
    files = trace_files(p)
    nonfinite = NonFinite()
    rows: list[dict[str, Any]] = []
    token_rows: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []  # (row, ids, logprobs, null mask)
    for f in files:
        fstep = _file_step(f)
        n_good = 0
        counts = {"mismatch": 0, "no_idx": 0, "no_tokens": 0, "bad_lp": 0, "pos_lp": 0, "no_reward": 0}
        for line_no, obj in iter_jsonl(f):
            if isinstance(obj, LineError):
                issues.line_error(obj)
                continue
            step = as_step(obj.get("step"))
            if step is None:
                if fstep is None:
                    issues.add(f, line_no, f"no valid 'step' ({obj.get('step')!r}); line skipped")
                    continue
                issues.add(f, line_no, f"no valid 'step' ({obj.get('step')!r}); the file name's step {fstep} used")
                step = fstep
            idx = obj.get("prompt_idx")
            if isinstance(idx, bool) or not isinstance(idx, (int, str)):
                counts["no_idx"] += 1
                idx = None
            reward_raw = obj.get("reward")
            reward = as_float(reward_raw)
            if reward is None:
                if reward_raw is None:
                    counts["no_reward"] += 1
                else:
                    issues.add(f, line_no, f"'reward' is not a number ({type(reward_raw).__name__}); set to null")
            nonfinite.check(f, "reward", reward, line_no)
            response = obj.get("response")
            response = response if isinstance(response, str) else None
            prompt = obj.get("prompt")
            prompt = prompt if isinstance(prompt, str) else None
            ids = _token_ids(obj.get("response_tokens"))
            i = len(rows)
            n_tokens = None
            if ids is None:
                if obj.get("response_tokens") is not None:
                    issues.add(f, line_no, "'response_tokens' is not a list of token ids; no tokens for this sample")
                else:
                    counts["no_tokens"] += 1
            else:
                n_tokens = len(ids)
                lps_raw = obj.get("logprobs")
                if not isinstance(lps_raw, list):
                    counts["bad_lp"] += 1
                    lps, mask = np.full(len(ids), math.nan), np.ones(len(ids), dtype=bool)
                else:
                    if len(lps_raw) != len(ids):
                        counts["mismatch"] += 1
                    lps, mask = _logprobs(lps_raw, len(ids))
                    bad = ~np.isfinite(lps) & ~mask
                    if bad.any():
                        nonfinite.add(f, "logprobs", int(bad.sum()), float(lps[bad][0]), line_no)
                    counts["pos_lp"] += int((lps[~mask & ~bad] > 1e-6).sum())
                token_rows.append((i, ids, lps, mask))
            extra = {k: v for k, v in obj.items() if k not in _CORE}
            for k, v in extra.items():
                if isinstance(v, float):
                    nonfinite.check(f, k, v, line_no)
            rows.append({"step": step, "prompt_idx": idx, "reward": reward, "response": response,
                         "prompt": prompt, "n_tokens": n_tokens, "extra": extra})
            n_good += 1
        if counts["mismatch"]:
            issues.add(f, None, f"{counts['mismatch']} line(s) where 'logprobs' and 'response_tokens' differ in "
                                "length: aligned on the tokens (missing log-probs are null)")
        if counts["bad_lp"]:
            issues.add(f, None, f"{counts['bad_lp']} line(s) without a 'logprobs' list: their log-probs are null")
        if counts["pos_lp"]:
            issues.add(f, None, f"{counts['pos_lp']} log-prob value(s) > 0 (not a log-probability); kept")
        if counts["no_idx"]:
            issues.add(f, None, f"{counts['no_idx']} line(s) without 'prompt_idx': each is its own group")
        if counts["no_tokens"]:
            issues.add(f, None, f"{counts['no_tokens']} line(s) without 'response_tokens': no tokens for them")
        if counts["no_reward"]:
            issues.add(f, None, f"{counts['no_reward']} line(s) without 'reward': reward is null")
        if n_good == 0:
            issues.add(f, None, "no readable rollout lines in this file")
    nonfinite.flush(issues)

    # ids within each step, in file/line order
    by_step: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        by_step.setdefault(r["step"], []).append(i)
    sample_ids = [0] * len(rows)
    group_ids = [0] * len(rows)
    for idx in by_step.values():
        gs = groups_by_key([rows[i]["prompt_idx"] for i in idx])
        for k, i in enumerate(idx):
            sample_ids[i] = k
            group_ids[i] = gs[k]

    if rows:
        completions = [r["response"] for r in rows]
        cols: dict[str, list[Any]] = {
            "step": [r["step"] for r in rows],
            "sample_id": sample_ids,
            "group_id": group_ids,
            "prompt": [r["prompt"] for r in rows],
            "completion": completions,
            "reward": [r["reward"] for r in rows],
        }
        cols.update(turn_columns(classifier, completions))
        extras: dict[str, Any] = {
            "prompt_idx": json_scalar_column("prompt_idx", [r["prompt_idx"] for r in rows]),
            "n_tokens": pl.Series("n_tokens", [r["n_tokens"] for r in rows], dtype=pl.Int64),
        }
        keys: dict[str, None] = {}
        for r in rows:
            for k in r["extra"]:
                keys.setdefault(k, None)
        for k in keys:
            extras[k] = json_scalar_column(k, [r["extra"].get(k) for r in rows])
        rollouts = rollouts_frame(cols, extras)
        n_text = sum(c is None for c in completions)
        if n_text:
            notes.append(f"{n_text} of {len(rows)} rollouts have no 'response' text: their turn_states/error_types "
                         "are null (turn states need the decoded text)")
    else:
        rollouts = empty_rollouts()

    tokens = _tokens_frame(rows, sample_ids, token_rows) if files else None
    metrics = derived_metrics(rollouts)
    if rollouts.height and metrics.height:
        lengths = (rollouts.group_by("step").agg(pl.col("n_tokens").cast(pl.Float64).mean()
                                                 .alias("completions/mean_length")))
        metrics = metrics.join(lengths, on="step", how="left").sort("step")
    if not files:
        notes.append("no *_rollouts_*.jsonl files")
    return make_source(p, FORMAT, metrics=metrics, rollouts=rollouts, tokens=tokens,
                       issues=issues, notes=notes, files=files)


def _tokens_frame(rows: list[dict[str, Any]], sample_ids: list[int],
                  token_rows: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]]) -> pl.LazyFrame:
    lengths = np.array([len(ids) for _, ids, _, _ in token_rows], dtype=np.int64)
    total = int(lengths.sum()) if len(lengths) else 0
    steps = np.repeat(np.array([rows[i]["step"] for i, *_ in token_rows], dtype=np.int64), lengths)
    sids = np.repeat(np.array([sample_ids[i] for i, *_ in token_rows], dtype=np.int64), lengths)
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths) if total else np.zeros(0, dtype=np.int64)
    positions = (np.arange(total, dtype=np.int64) - starts).astype(np.int32)
    if total:
        ids = np.concatenate([t[1] for t in token_rows]).astype(np.int32)
        lps = np.concatenate([t[2] for t in token_rows])
        null = np.concatenate([t[3] for t in token_rows])
    else:
        ids, lps, null = np.zeros(0, np.int32), np.zeros(0), np.zeros(0, dtype=bool)
    lp = pl.Series("logprob", lps.astype(np.float32), dtype=pl.Float32, nan_to_null=False)
    if null.any():
        lp = pl.select(pl.when(pl.lit(pl.Series(null))).then(None).otherwise(pl.lit(lp)).alias("logprob")).to_series()
    df = pl.DataFrame({
        "step": steps,
        "sample_id": sids,
        "turn": np.zeros(total, dtype=np.int32),
        "position": positions,
        "token_id": ids,
        "logprob": lp,
        "sampler_logprob": lp.alias("sampler_logprob"),
        "entropy": pl.Series("entropy", [None] * total, dtype=pl.Float32),
        "is_generated": np.ones(total, dtype=bool),
    })
    return df.cast(dict(TOKENS_SCHEMA)).lazy()



def step_of_file(rel: str, single_file: bool) -> int | str:
    """For the scan cache: always ``"global"``, since a trace file's name does not bind the
    steps of its lines (any step may depend on any file)."""
    return "global"
