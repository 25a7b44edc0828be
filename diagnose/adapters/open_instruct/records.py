"""One open-instruct trace line (``asdict(RolloutRecord)``, ``open_instruct/rl_utils.py``
``_save_rollouts``) checked and typed: bad values become issues naming file and line, the rest
of the record is kept.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diagnose.adapters._common.issues import IssueLog, NonFinite
from diagnose.adapters._common.values import as_float, as_step

__all__ = ["Record", "TraceCounts", "parse_record", "token_ids"]

_I32 = 2**31 - 1


@dataclass
class Record:
    step: int
    sample_idx: int | None
    prompt_idx: Any
    prompt: np.ndarray | None
    ids: np.ndarray | None  # response_tokens
    lps: np.ndarray  # float64 per response token (NaN where unknown)
    known: np.ndarray  # bool: a log-prob was saved for that token
    reward: float | None
    advantage: float | None
    finish_reason: str | None
    dataset: str | None
    ground_truth: Any
    num_calls: int | None = None
    n_failed_calls: int | None = None
    called: bool | None = None
    timeout: bool | None = None
    tool_errors: str | None = None
    tool_runtime: float | None = None
    tool_outputs: str | None = None
    path: Path | None = None  # where the line is (for issues found later)
    line: int = 0


@dataclass
class TraceCounts:
    """Per-file counts of recurring problems (one issue each, not one per line)."""

    n: dict[str, int] = field(default_factory=dict)
    #: the line being read (set by `parse_record`) and the first line of each problem, for the issue
    line: int = 0
    first: dict[str, int] = field(default_factory=dict)

    def bump(self, key: str, k: int = 1) -> None:
        self.n[key] = self.n.get(key, 0) + k
        if k:
            self.first.setdefault(key, self.line)

    def report(self, f: Path, issues: IssueLog) -> None:
        msgs = {
            "mismatch": "line(s) where 'logprobs' and 'response_tokens' differ in length: aligned on the tokens "
                        "(missing log-probs are null)",
            "no_lp": "line(s) without 'logprobs' (saved as null when vLLM returned none): log-probs null, tool "
                     "outputs found by structure only",
            "pos_lp": "log-prob value(s) > 0 (not a log-probability); kept",
            "no_idx": "line(s) without 'prompt_idx': each is its own group",
            "no_tokens": "line(s) without 'response_tokens': no tokens for them",
            "no_reward": "line(s) without 'reward': reward is null",
            "empty_gen": "empty generation(s) (open-instruct saves [eos_token_id] with log-prob NaN, vllm_utils."
                         "process_request): read as an empty turn, the NaN not counted as a bad log-prob",
            "bad_info": "line(s) whose 'request_info' is not an object: no tool-use data for them",
            "bad_info_field": "line(s) whose 'request_info' holds values of the wrong type (num_calls, timeouts, "
                              "tool_errors, tool_outputs, tool_runtimes or tool_calleds): those read as null",
            "bad_lp": "'logprobs' value(s) that are not numbers (strings, lists, bools): read as null",
        }
        for key, msg in msgs.items():
            if self.n.get(key):
                first = f" (first at line {self.first[key]})" if self.first.get(key) else ""
                issues.add(f, None, f"{self.n[key]} {msg}{first}")


def token_ids(v: Any) -> np.ndarray | None:
    """A list of token ids as an int64 array, or None if it is not one."""
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
    """``(values, known)`` of length ``n``: numbers as float64 (NaN/inf kept), anything else
    (null, strings, bools) and missing positions unknown."""
    part = raw[:n]
    arr = None
    if None not in part:
        try:
            a = np.asarray(part)
            if a.ndim == 1 and a.dtype.kind in "fiu":
                arr = a.astype(np.float64)
                known = np.ones(len(arr), dtype=bool)
        except (ValueError, TypeError, OverflowError):
            arr = None
    if arr is None:
        vals = [None if isinstance(v, bool) else as_float(v) for v in part]
        known = np.array([v is not None for v in vals], dtype=bool)
        arr = np.array([math.nan if v is None else v for v in vals], dtype=np.float64)
    if len(arr) < n:
        arr = np.concatenate([arr, np.full(n - len(arr), math.nan)])
        known = np.concatenate([known, np.zeros(n - len(known), dtype=bool)])
    return arr, known


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


def _str(v: Any) -> str | None:
    return v if isinstance(v, str) else None


def _request_info(rec: Record, info: Any, counts: TraceCounts) -> None:
    """``_get_request_info_for_sample``: num_calls, timeouts, tool_errors, tool_outputs,
    tool_runtimes, tool_calleds, tool_call_stats (success per call), rollout_state."""
    if info is None:
        return
    if not isinstance(info, dict):
        counts.bump("bad_info")
        return
    rec.num_calls = _int(info.get("num_calls"))
    called = info.get("tool_calleds")
    rec.called = called if isinstance(called, bool) else (None if rec.num_calls is None else rec.num_calls > 0)
    t = info.get("timeouts")
    rec.timeout = bool(t) if isinstance(t, (bool, int)) else None
    rec.tool_errors = _str(info.get("tool_errors"))
    rec.tool_outputs = _str(info.get("tool_outputs"))
    rt = as_float(info.get("tool_runtimes"))
    rec.tool_runtime = rt
    parsed = {"num_calls": rec.num_calls, "timeouts": rec.timeout, "tool_errors": rec.tool_errors,
              "tool_outputs": rec.tool_outputs, "tool_runtimes": rt, "tool_calleds": called if isinstance(called, bool)
              else None}
    if any(info.get(k) is not None and v is None for k, v in parsed.items()):
        counts.bump("bad_info_field")
    stats = info.get("tool_call_stats")
    if isinstance(stats, list) and all(isinstance(s, dict) for s in stats):
        rec.n_failed_calls = sum(1 for s in stats if s.get("success") is False)
        if rec.num_calls is None:
            rec.num_calls = len(stats)
    elif rec.num_calls is not None:
        rec.n_failed_calls = min(rec.num_calls, 1) if rec.tool_errors else 0


def parse_record(obj: dict[str, Any], f: Path, line_no: int, issues: IssueLog, nonfinite: NonFinite,
                 counts: TraceCounts) -> Record | None:
    """The record of one line, or None (line skipped, issue added) when it has no valid step."""
    counts.line = line_no
    step = as_step(obj.get("step"))
    if step is None:
        issues.add(f, line_no, f"no valid 'step' ({_short(obj.get('step'))}); line skipped")
        return None
    idx = obj.get("prompt_idx")
    if isinstance(idx, bool) or not isinstance(idx, (int, str)):
        counts.bump("no_idx")
        idx = None
    reward_raw = obj.get("reward")
    reward = as_float(reward_raw)
    if reward is None:
        if reward_raw is None:
            counts.bump("no_reward")
        else:
            issues.add(f, line_no, f"'reward' is not a number ({type(reward_raw).__name__}); set to null")
    nonfinite.check(f, "reward", reward, line_no)
    adv = as_float(obj.get("advantage"))
    nonfinite.check(f, "advantage", adv, line_no)
    prompt = token_ids(obj.get("prompt_tokens"))
    if prompt is None and obj.get("prompt_tokens") is not None:
        issues.add(f, line_no, "'prompt_tokens' is not a list of token ids; prompt left out")
    ids = token_ids(obj.get("response_tokens"))
    if ids is None:
        if obj.get("response_tokens") is not None:
            issues.add(f, line_no, "'response_tokens' is not a list of token ids; no tokens for this sample")
        else:
            counts.bump("no_tokens")
        lps, known = np.zeros(0), np.zeros(0, dtype=bool)
    else:
        lps, known = _read_logprobs(obj.get("logprobs"), ids, f, line_no, nonfinite, counts)
    rec = Record(step, _int(obj.get("sample_idx")), idx, prompt, ids, lps, known, reward, adv,
                 _str(obj.get("finish_reason")), _str(obj.get("dataset")), obj.get("ground_truth"))
    rec.path, rec.line = f, line_no
    _request_info(rec, obj.get("request_info"), counts)
    return rec


def _read_logprobs(raw: Any, ids: np.ndarray, f: Path, line_no: int, nonfinite: NonFinite,
                   counts: TraceCounts) -> tuple[np.ndarray, np.ndarray]:
    n = len(ids)
    if not isinstance(raw, list):
        if raw is None:
            counts.bump("no_lp")
        else:
            counts.bump("bad_lp", n)
        return np.full(n, math.nan), np.zeros(n, dtype=bool)
    if len(raw) != n:
        counts.bump("mismatch")
    lps, known = _logprobs(raw, n)
    if not known[: len(raw)].all():
        counts.bump("bad_lp", sum(1 for v, k in zip(raw, known) if not k and v is not None))
    if n == 1 and known[0] and math.isnan(lps[0]):
        counts.bump("empty_gen")  # the placeholder for an empty generation: no log-prob
        known[0] = False
        return lps, known
    bad = known & ~np.isfinite(lps)
    if bad.any():
        nonfinite.add(f, "logprobs", int(bad.sum()), float(lps[bad][0]), line_no)
    counts.bump("pos_lp", int((lps[known & ~bad] > 1e-6).sum()))
    return lps, known


def _short(v: Any, n: int = 60) -> str:
    s = json.dumps(v, default=str) if not isinstance(v, str) else repr(v)
    return s if len(s) <= n else s[: n - 3] + "..."
