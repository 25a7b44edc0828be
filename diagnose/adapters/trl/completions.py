"""One TRL ``completions_<step>.parquet`` file as rollout rows (TRL 1.16 / 1.10
``trl/trainer/grpo_trainer.py`` ``GRPOTrainer.log``).

A cell of ``prompt``/``completion`` is either text decoded with special tokens skipped (TRL 1.10,
or non-conversational data) or a list of messages (TRL 1.16, conversational:
``GRPOTrainer._generate`` / ``_tool_call_loop``, each assistant turn from
``trl.chat_template_utils.parse_response``). Turns are taken the way TRL assembled them:

* messages: one turn per ``assistant`` message; its ``tool_calls`` (a well-formed call, parsed by
  TRL) are rendered back as Hermes blocks (`diagnose.conversations.assistant_text`), its
  ``content`` kept (a malformed call is there as text, special tokens skipped); ``tool``
  messages are observations. Parquet stores the calls' ``arguments`` as one struct for the whole
  column, so keys of other calls come back as null: null arguments are dropped.
* text: split on the tool suffix of ``_get_tool_suffix_ids`` as it survives decoding
  (`diagnose.transcripts.Dialect.TRL`); anything else is one turn.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from diagnose.adapters._common.io import check_parquet, read_parquet
from diagnose.adapters._common.issues import IssueLog
from diagnose.adapters._common.rollouts import ListColumn, groups_consecutive, rollouts_frame
from diagnose.adapters._common.turns import TurnClassifier
from diagnose.adapters._common.values import as_step
from diagnose.chat import IM_END, IM_START
from diagnose.transcripts import Dialect, split_turns

CORE = ("step", "prompt", "completion", "advantage")
_FLOAT = (pl.Float32, pl.Float64)
_INT = (pl.Int8, pl.Int16, pl.Int32, pl.Int64, pl.UInt8, pl.UInt16, pl.UInt32, pl.UInt64)


@dataclass
class Turns:
    """What the turns of one completion cell say."""

    texts: list[str]
    chatml: str
    both: int = 0  #: assistant messages with content and tool_calls (text after a call is indistinguishable)
    nulls: int = 0  #: null arguments dropped


def _content(m: dict[str, Any]) -> str:
    c = m.get("content")
    if isinstance(c, list):  # [{"type": "text", "text": ...}, ...]
        c = "".join(str(p.get("text") or "") for p in c if isinstance(p, dict))
    return c if isinstance(c, str) else ("" if c is None else str(c))


def _calls(raw: Any) -> tuple[list[dict[str, Any]], int]:
    """``tool_calls`` with the parquet struct's null arguments dropped."""
    out, dropped = [], 0
    for tc in raw if isinstance(raw, list) else []:
        if not isinstance(tc, dict):
            continue
        fn = tc.get("function", tc)
        if not isinstance(fn, dict):
            continue
        args = fn.get("arguments")
        if isinstance(args, dict):
            kept = {k: v for k, v in args.items() if v is not None}
            dropped += len(args) - len(kept)
            args = kept
        out.append({"name": fn.get("name"), "arguments": {} if args is None else args})
    return out, dropped


def assistant_turn(m: dict[str, Any]) -> tuple[str, bool, int]:
    """The text of one assistant message as the model emitted it (calls rendered back), whether
    it has both content and calls, and how many null arguments were dropped."""
    text = _content(m)
    calls, dropped = _calls(m.get("tool_calls"))
    if not calls:
        return text, False, dropped
    from diagnose.conversations import assistant_text

    try:
        return assistant_text({"content": text, "tool_calls": calls}), bool(text.strip()), dropped
    except (ValueError, TypeError):  # not a call (a name that is no string ...): shown to the parser as is
        blocks = "\n".join(f"<tool_call>\n{json.dumps(c, ensure_ascii=False, default=str)}\n</tool_call>" for c in calls)
        return f"{text}\n{blocks}" if text else blocks, bool(text.strip()), dropped


def message_turns(value: list[Any]) -> Turns:
    turns: list[str] = []
    chat: list[str] = []
    both = nulls = 0
    for i, m in enumerate(v for v in value if isinstance(v, dict)):
        role = m.get("role") or "assistant"
        if role == "assistant":
            text, b, d = assistant_turn(m)
            turns.append(text)
            both += b
            nulls += d
            chat.append(text if i == 0 else f"{IM_START}assistant\n{text}")
        else:
            body = f"<tool_response>\n{_content(m)}\n</tool_response>" if role == "tool" else _content(m)
            chat.append(f"{IM_START}{'user' if role == 'tool' else role}\n{body}")
    return Turns(turns or [""], f"{IM_END}\n".join(chat), both, nulls)


def text_turns(text: str) -> Turns:
    return Turns(split_turns(text, Dialect.TRL), text)


def cell_turns(value: Any) -> Turns | None:
    """Turns of a completion cell (None: a null cell)."""
    if value is None:
        return None
    if isinstance(value, str):
        return text_turns(value)
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list):
        return message_turns(value)
    return text_turns(str(value))


def prompt_text(value: Any) -> str | None:
    """A prompt cell as text: decoded text as is; messages as ChatML ending with the assistant header."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list):
        return "".join(f"{IM_START}{m.get('role') or 'user'}\n{_content(m)}{IM_END}\n"
                       for m in value if isinstance(m, dict)) + f"{IM_START}assistant\n"
    return json.dumps(value, default=str)


@dataclass
class FileRows:
    """The rows of one file, and what reading them found."""

    frame: pl.DataFrame
    float_columns: list[str]
    key: int  #: hash of (prompt, completion, advantage): an identical re-log has the same key
    messages: bool
    both: int = 0
    nulls: int = 0
    steps: set[int] = field(default_factory=set)


def _steps(df: pl.DataFrame, step: int, f: Path, issues: IssueLog) -> list[int]:
    """The ``step`` column (authoritative), the file name's step filling gaps."""
    n = df.height
    steps = [step] * n
    if "step" not in df.columns:
        return steps
    if df.schema["step"] not in _INT + _FLOAT:
        issues.add(f, None, f"'step' column has dtype {df.schema['step']}; the file name's step {step} used")
        return steps
    bad = 0
    for i, v in enumerate(df.get_column("step").cast(pl.Float64).to_list()):
        s = as_step(v)
        if s is None:
            bad += 1
        else:
            steps[i] = s
    if bad:
        issues.add(f, None, f"{bad} row(s) with a missing or invalid 'step'; the file name's step {step} used")
    other = sorted(set(steps) - {step})
    if other:
        issues.step_mismatch(f, "rows", other[:5], step, "the step column")
    return steps


ROLES = ("system", "user", "assistant", "tool")


def _check_shapes(df: pl.DataFrame, f: Path, issues: IssueLog) -> None:
    """Name prompt / completion columns that are neither text nor message lists (TRL writes one
    of the two), and messages of a role TRL never writes: they are read anyway, as best as can be."""
    for col in ("prompt", "completion"):
        dt = df.schema.get(col)
        if dt is None or dt == pl.String or dt == pl.Null or isinstance(dt, pl.Struct) or (
                isinstance(dt, pl.List) and isinstance(dt.inner, pl.Struct)):
            continue
        issues.add(f, None, f"{col!r} column is {dt}, not text or a list of messages; read as text")
    dt = df.schema.get("completion")
    if isinstance(dt, pl.List) and isinstance(dt.inner, pl.Struct) and "role" in dt.inner.to_schema():
        roles = df.get_column("completion").explode().struct.field("role")
        bad = roles.filter(roles.is_not_null() & ~roles.is_in(ROLES))
        if bad.len():
            issues.add(f, None, f"{bad.len()} message(s) with a role TRL does not write (e.g. {bad[0]!r}); "
                                "not read as model turns")


def read_file(step: int, f: Path, issues: IssueLog, classifier: TurnClassifier) -> FileRows | None:
    """The rows of ``completions_<step>.parquet`` (None: unreadable, reported)."""
    schema, err = check_parquet(f)
    if err:
        issues.add(f, None, f"{err}; file skipped")
        return None
    if "completion" not in schema:
        issues.add(f, None, f"no 'completion' column (columns: {list(schema.names())}); file skipped")
        return None
    df, err = read_parquet(f)
    if df is None:
        issues.add(f, None, f"{err}; file skipped")
        return None
    if df.height == 0:
        issues.add(f, None, "no rows; file skipped")
        return None
    _check_shapes(df, f, issues)
    return frame_rows(step, df, f, issues, classifier)


def frame_rows(step: int, df: pl.DataFrame, f: Path, issues: IssueLog, classifier: TurnClassifier,
               cells: dict[str, list[Any]] | None = None) -> FileRows:
    """The rows of one logged completions table: ``df`` as TRL's ``pd.DataFrame(table)`` was
    stored (a parquet file, or a W&B ``completions`` table), ``step`` its log's step. ``cells``:
    the ``prompt`` / ``completion`` values as Python objects where ``df`` cannot hold them
    (message lists of a W&B table); else they are ``df``'s columns."""
    cells = cells or {}
    steps = _steps(df, step, f, issues)
    raw = cells["completion"] if "completion" in cells else df.get_column("completion").to_list()
    turns = [cell_turns(v) for v in raw]
    if any(c is None for c in turns):
        issues.add(f, None, f"{sum(c is None for c in turns)} row(s) with a null 'completion' (read as empty)")
    prompt_cells = cells["prompt"] if "prompt" in cells else (df.get_column("prompt").to_list() if "prompt" in df.columns
                                                               else None)
    prompts = [prompt_text(v) for v in prompt_cells] if prompt_cells is not None else [None] * len(raw)
    if prompt_cells is None:
        issues.add(f, None, "no 'prompt' column: each row is its own group")
    states, errors = ListColumn(), ListColumn()
    n_turns = []
    for c in turns:
        s, e = classifier.turns(c.texts if c is not None else [""])
        states.append(s)
        errors.append(e)
        n_turns.append(len(s))
    groups = groups_consecutive(prompts)
    floats = [c for c, dt in df.schema.items() if dt in _FLOAT and c not in CORE]
    cols: dict[str, Any] = {
        "step": steps, "sample_id": list(range(len(raw))), "group_id": groups, "prompt": prompts,
        "completion": [c.chatml if c is not None else "" for c in turns],
        "turn_states": states.series("turn_states"), "error_types": errors.series("error_types"), "n_turns": n_turns,
    }
    extras: dict[str, pl.Series] = {}
    for c in df.columns:
        if c in ("step", "prompt", "completion"):
            continue
        s = df.get_column(c)
        if s.dtype.is_nested() or s.dtype == pl.Object:
            s = pl.Series(c, [None if v is None else json.dumps(v, default=str) for v in s.to_list()], dtype=pl.String)
        extras[c] = s
    adv = df.get_column("advantage").cast(pl.Float64, strict=False).to_list() if "advantage" in df.columns else []
    key = hash((tuple(map(str, raw)), tuple(prompts), tuple(_round(a) for a in adv)))
    return FileRows(rollouts_frame(cols, extras), floats, key, any(isinstance(v, list) for v in raw),
                    sum(c.both for c in turns if c), sum(c.nulls for c in turns if c), set(steps))


def _round(v: Any) -> Any:
    return round(v, 9) if isinstance(v, float) and math.isfinite(v) else v


def reward_sum(df: pl.DataFrame, columns: Sequence[str]) -> list[float | None]:
    """Unweighted sum of the reward columns per row, NaN (a function that returned None) left
    out as TRL's ``nansum``; all-NaN gives NaN (TRL's unscorable rows)."""
    if not columns:
        return [None] * df.height
    mat = np.column_stack([df.get_column(c).cast(pl.Float64).fill_null(float("nan")).to_numpy() for c in columns])
    with np.errstate(invalid="ignore"):
        sums = np.nansum(mat, axis=1)
    sums[np.isnan(mat).all(axis=1)] = np.nan
    return sums.tolist()
