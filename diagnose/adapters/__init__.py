"""Adapters: runs written by other trainers (and by ours) as one `RunSource`, auto-detected.

    from diagnose.adapters import load_run, detect_format
    src = load_run("outputs/grpo-qwen")          # format auto-detected
    src = load_run("rollout_data", format="verl")
    src.metrics.collect(); src.rollouts.collect(); src.issues; src.notes

Formats (``FORMATS``, detection order): ``native`` (our run directory, ``run.json``), ``trl``
(GRPOTrainer ``completions/completions_<step>.parquet`` + ``trainer_state.json``),
``open_instruct`` (``*_rollouts_*.jsonl`` traces with token log-probs), ``verl``
(``trainer.rollout_data_dir`` ``<step>.jsonl`` dumps + file-logger metrics JSONL) and
``conversations`` (conversation JSONL). What each reads, the metric-name mapping and what each
format cannot give are in docs/adapters.md.

Bad input never raises: every unreadable file, line or value becomes a `SourceIssue` naming the
file (and line) and the rest is read. `UnknownRunLayout` is raised only when no layout matches
(or the path does not exist).

This module also holds what the adapters share: turn splitting and cached turn
classification of completion texts, metric frames and name mapping, derived per-step
metrics, parquet footer checks and fingerprints.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import polars as pl

from diagnose.chat import IM_END, IM_START
from diagnose.jsonl import LineError, iter_jsonl
from diagnose.source import RunSource, SourceIssue
from diagnose.toolcall import CallSyntax
from diagnose.turns import FormatError, TurnState, classify_turn

__all__ = [
    "FORMATS",
    "LOOKED_FOR",
    "UnknownRunLayout",
    "detect_format",
    "load_run",
    "split_assistant_turns",
    "TurnClassifier",
]

#: Supported formats, in detection order.
FORMATS: tuple[str, ...] = ("native", "trl", "open_instruct", "verl", "conversations")

_MODULES = {
    "native": "diagnose.adapters.native",
    "trl": "diagnose.adapters.trl",
    "open_instruct": "diagnose.adapters.open_instruct",
    "verl": "diagnose.adapters.verl",
    "conversations": "diagnose.adapters.conversations",
}

#: What detection looks for, per format (quoted in `UnknownRunLayout`).
LOOKED_FOR: dict[str, str] = {
    "native": "run.json (our run directory, docs/run-format.md)",
    "trl": "completions/completions_<step>.parquet (TRL GRPOTrainer log_completions) or "
           "trainer_state.json with 'log_history' (also in checkpoint-*/)",
    "open_instruct": "*_rollouts_*.jsonl traces (open-instruct: step, prompt_idx, response_tokens, logprobs, reward)",
    "verl": "<step>.jsonl rollout dumps with input/output/score (verl trainer.rollout_data_dir, here or one "
            "folder down), or a *.jsonl of {\"step\": N, \"data\": {...}} metrics lines (verl file logger)",
    "conversations": "conversation JSONL with 'messages' (one file, or <step>.jsonl / step_<step>.jsonl / "
                     "step-NNNNNN.jsonl files in a folder)",
}

STATES: tuple[str, ...] = tuple(s.value for s in TurnState)
ERRORS: tuple[str, ...] = tuple(e.value for e in FormatError)


class UnknownRunLayout(ValueError):
    """No known run layout at ``path``; the message lists what was looked for."""

    def __init__(self, path: str | os.PathLike[str], detail: str = "", formats: Sequence[str] = FORMATS) -> None:
        self.path = Path(path)
        self.looked_for = [f"{f}: {LOOKED_FOR[f]}" for f in formats]
        head = f"{self.path}: {detail or 'no known run layout found'}."
        super().__init__(head + " Looked for:\n" + "\n".join(f"  - {x}" for x in self.looked_for))


def _module(fmt: str):
    return importlib.import_module(_MODULES[fmt])


def detect_format(path: str | os.PathLike[str]) -> str | None:
    """The format of the run at ``path`` (a directory, or a single file), or None."""
    p = Path(path)
    try:
        if not p.exists():
            return None
    except OSError:
        return None
    for fmt in FORMATS:
        try:
            if _module(fmt).detect(p):
                return fmt
        except OSError:
            continue
    return None


def load_run(path: str | os.PathLike[str], format: str | None = None) -> RunSource:  # noqa: A002
    """Load the run at ``path`` as a `RunSource`, auto-detecting its format unless ``format``
    (one of `FORMATS`) is given. Raises `UnknownRunLayout` when nothing matches."""
    p = Path(path)
    if format is not None and format not in FORMATS:
        raise ValueError(f"unknown run format {format!r}; expected one of {', '.join(FORMATS)}")
    try:
        exists = p.exists()
    except OSError as e:
        raise UnknownRunLayout(p, f"cannot access ({e})") from None
    if not exists:
        raise UnknownRunLayout(p, "no such file or directory", [format] if format else FORMATS)
    fmt = format or detect_format(p)
    if fmt is None:
        raise UnknownRunLayout(p)
    mod = _module(fmt)
    if format is not None and not mod.detect(p) and not mod.has_candidates(p):
        raise UnknownRunLayout(p, f"nothing in the {fmt} layout found", [fmt])
    return mod.load(p)


# ======================================================================================
# Helpers shared by the adapters
# ======================================================================================


class IssueLog:
    """Issues of one load, without duplicates, in the order found. At most ``per_file`` issues
    are kept per file (a binary file has a bad "line" every few hundred bytes); the rest are
    counted and summarised in one issue by `finish`."""

    def __init__(self, per_file: int = 10) -> None:
        self.items: list[SourceIssue] = []
        self.per_file = per_file
        self._seen: set[tuple[str, int | None, str]] = set()
        self._count: dict[str, int] = {}
        self._dropped: dict[str, int] = {}

    def add(self, path: str | os.PathLike[str], line: int | None, message: str) -> None:
        key = (str(path), line or None, message)
        if key in self._seen:
            return
        self._seen.add(key)
        n = self._count.get(key[0], 0)
        if n >= self.per_file:
            self._dropped[key[0]] = self._dropped.get(key[0], 0) + 1
            return
        self._count[key[0]] = n + 1
        self.items.append(SourceIssue(key[0], key[1], message))

    def line_error(self, e: LineError, suffix: str = "line skipped") -> None:
        msg = e.message if not suffix or e.line == 0 else f"{e.message}; {suffix}"
        self.add(e.path, e.line or None, msg)

    def finish(self) -> list[SourceIssue]:
        for path, n in self._dropped.items():
            self.items.append(SourceIssue(path, None, f"{n} more problem(s) in this file not listed"))
        self._dropped.clear()
        return list(self.items)


class NonFinite:
    """Counts non-finite values per (file, field) so that each gets one issue, not one per row."""

    def __init__(self) -> None:
        self._seen: dict[tuple[str, str], list[Any]] = {}

    def check(self, path: str | os.PathLike[str], field: str, value: Any, line: int | None) -> None:
        if isinstance(value, float) and not math.isfinite(value):
            entry = self._seen.setdefault((str(path), field), [0, line, repr(value)])
            entry[0] += 1

    def add(self, path: str | os.PathLike[str], field: str, n: int, first: float, line: int | None) -> None:
        entry = self._seen.setdefault((str(path), field), [0, line, repr(first)])
        entry[0] += n

    def flush(self, issues: IssueLog, what: str = "kept as is") -> None:
        for (path, field), (n, line, first) in self._seen.items():
            where = f" (first: {first}" + (f" at line {line})" if line else ")")
            issues.add(path, None, f"{n} non-finite value(s) in {field!r}{where}; {what}")
        self._seen.clear()


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def as_float(v: Any) -> float | None:
    """A JSON scalar as float (bools as 0/1), else None."""
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        try:
            return float(v)
        except OverflowError:
            return math.inf if v > 0 else -math.inf
    return None


def as_step(v: Any) -> int | None:
    """A JSON value as a step number (non-negative int; integral floats accepted), else None."""
    if isinstance(v, bool):
        return None
    if isinstance(v, float) and math.isfinite(v) and v.is_integer():
        v = int(v)
    if isinstance(v, int) and v >= 0:
        return v
    return None


def visible_files(directory: Path) -> list[Path]:
    """Plain files in ``directory`` (sorted), without dot/temp files; [] if unreadable."""
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError:
        return []
    out = []
    for e in entries:
        if e.name.startswith(".") or e.name.endswith(".tmp"):
            continue
        try:
            if e.is_file():
                out.append(Path(e.path))
        except OSError:
            continue
    return out


def subdirs(directory: Path) -> list[Path]:
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError:
        return []
    out = []
    for e in entries:
        if e.name.startswith("."):
            continue
        try:
            if e.is_dir():
                out.append(Path(e.path))
        except OSError:
            continue
    return out


def first_object(path: Path, max_lines: int = 20) -> dict[str, Any] | None:
    """The first good JSON-object line of a JSONL file (looking at ``max_lines`` lines at most)."""
    try:
        for n, (_, obj) in enumerate(iter_jsonl(path, max_line_bytes=8 * 1024 * 1024)):
            if isinstance(obj, dict):
                return obj
            if n + 1 >= max_lines:
                return None
    except OSError:
        return None
    return None


def fingerprint(fmt: str, root: Path, files: Iterable[Path]) -> dict[str, Any]:
    """``{"format", "path", "files": {relative path: [size, mtime_ns]}}`` for the scan cache."""
    out: dict[str, list[int]] = {}
    for f in files:
        try:
            st = f.stat()
        except OSError:
            continue
        try:
            rel = str(f.relative_to(root)) if root.is_dir() else f.name
        except ValueError:
            rel = str(f)
        out[rel] = [st.st_size, st.st_mtime_ns]
    return {"format": fmt, "path": str(root), "files": dict(sorted(out.items()))}


# ---- parquet ------------------------------------------------------------------------


def check_parquet(path: Path) -> tuple[pl.Schema | None, str | None]:
    """Cheap validation of a parquet file (footer, column-chunk bounds): ``(schema, None)`` or
    ``(None, why it is unreadable)``. A file cut short fails here without reading its data."""
    import pyarrow.parquet as pq

    try:
        size = path.stat().st_size
        md = pq.read_metadata(path)
        schema = pl.Schema(pl.read_parquet_schema(path))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - incl. a Rust panic: any footer error means unreadable
        return None, f"unreadable parquet file (truncated or corrupt): {_short(e)}"
    try:
        for r in range(md.num_row_groups):
            rg = md.row_group(r)
            for j in range(rg.num_columns):
                cc = rg.column(j)
                start = cc.dictionary_page_offset if cc.has_dictionary_page else cc.data_page_offset
                if start is not None and start + cc.total_compressed_size > size:
                    return None, "column data extends past the end of the file (truncated)"
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001
        return None, f"corrupt parquet metadata: {_short(e)}"
    return schema, None


def read_parquet(path: Path, columns: Sequence[str] | None = None) -> tuple[pl.DataFrame | None, str | None]:
    """Read a (pre-checked) parquet file; ``(None, why)`` if the data pages turn out corrupt."""
    try:
        return pl.read_parquet(path, columns=list(columns) if columns is not None else None), None
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001
        return None, f"unreadable parquet data: {_short(e)}"


def _short(e: BaseException, n: int = 200) -> str:
    s = f"{type(e).__name__}: {e}"
    return s if len(s) <= n else s[: n - 3] + "..."


# ---- turns --------------------------------------------------------------------------

_CHATML_BOUNDARY = re.compile(re.escape(IM_END) + r"\s*" + re.escape(IM_START))
_LEADING_ASSISTANT = re.compile(r"\A\s*" + re.escape(IM_START) + r"assistant(?:\n|\Z)")
_CHAT_ROLES = frozenset({"system", "user", "tool", "ipython", "function", "observation"})
# decoded with skip_special_tokens: "<|im_end|>\n<|im_start|>user\n" became "\nuser\n"
_STRIPPED_SIGNAL = re.compile(r"\n(?:user|tool)\n<tool_response>|</tool_response>\s*\nassistant\n")
_STRIPPED_SPLIT = re.compile(r"\n(user|tool|assistant)\n")


def split_assistant_turns(text: str | None) -> list[str]:
    """Assistant turns of a completion (the text after the prompt), in order.

    * ChatML transcripts (``<|im_end|>`` + ``<|im_start|>role``): one turn per assistant
      segment; user/tool segments (observations) are dropped. The text before the first
      boundary is the first assistant turn (the prompt ended with ``<|im_start|>assistant``);
      a leading ``<|im_start|>assistant`` header is skipped. A segment with an unknown role
      header stays a turn (with its ``<|im_start|>``, so it shows up as a stray control token).
    * Transcripts decoded with special tokens skipped (verl dumps), recognised by tool
      responses framed by bare ``user``/``assistant`` lines: split on those role lines.
    * Anything else is one turn (an empty completion is one empty turn).
    """
    if not text:
        return [""]
    if IM_START in text:
        m = _LEADING_ASSISTANT.match(text)
        s = text[m.end():] if m else text
        parts = _CHATML_BOUNDARY.split(s)
        turns = [parts[0]]
        for seg in parts[1:]:
            role, _, body = seg.partition("\n")
            role = role.strip()
            if role == "assistant":
                turns.append(body)
            elif role in _CHAT_ROLES:
                continue
            else:
                turns.append(IM_START + seg)
        return turns
    if "<tool_response>" in text and _STRIPPED_SIGNAL.search(text):
        pieces = _STRIPPED_SPLIT.split(text)
        turns = [pieces[0]]
        for role, body in zip(pieces[1::2], pieces[2::2]):
            if role == "assistant":
                turns.append(body)
        return turns
    return [text]


class TurnClassifier:
    """`classify_turn` with memoisation: each unique turn text (and each unique completion) is
    classified once. Completions of a collapsed run repeat a lot, so this is what makes
    classifying millions of rollouts cheap."""

    def __init__(self, syntax: CallSyntax = CallSyntax.HERMES) -> None:
        self.syntax = CallSyntax(syntax)
        self._turns: dict[tuple[str, tuple[str, ...] | None], tuple[str, tuple[str, ...]]] = {}
        self._completions: dict[str, tuple[list[str], list[str]]] = {}

    def turn(self, text: str, tool_names: tuple[str, ...] | None = None) -> tuple[str, tuple[str, ...]]:
        """``(state, errors)`` of one assistant turn."""
        key = (text, tool_names)
        hit = self._turns.get(key)
        if hit is None:
            tools = None if tool_names is None else [{"name": n} for n in tool_names]
            c = classify_turn(text, tools, self.syntax)
            hit = (c.state.value, tuple(e.value for e in c.errors))
            self._turns[key] = hit
        return hit

    def turns(self, texts: Sequence[str], tool_names: tuple[str, ...] | None = None) -> tuple[list[str], list[str]]:
        """``(states, errors)`` of a list of assistant turns; errors of all turns concatenated."""
        states: list[str] = []
        errors: list[str] = []
        for t in texts:
            s, e = self.turn(t, tool_names)
            states.append(s)
            errors.extend(e)
        return states, errors

    def completion(self, text: str | None) -> tuple[list[str], list[str]]:
        """``(turn states, error types)`` of a completion, split with `split_assistant_turns`."""
        key = text or ""
        hit = self._completions.get(key)
        if hit is None:
            hit = self.turns(split_assistant_turns(key))
            self._completions[key] = hit
        return hit


def tool_names_of(tools: Any) -> tuple[str, ...] | None:
    """Sorted tool names of OpenAI/Qwen schemas (or bare ``{"name"}``), None if no tools given."""
    if not isinstance(tools, list) or not tools:
        return None
    names = set()
    for t in tools:
        fn = t.get("function", t) if isinstance(t, Mapping) else None
        if isinstance(fn, Mapping) and isinstance(fn.get("name"), str):
            names.add(fn["name"])
    return tuple(sorted(names))


# ---- rollouts -----------------------------------------------------------------------

STR_LIST = pl.List(pl.String)

ROLLOUT_CONTRACT: dict[str, pl.DataType] = {
    "step": pl.Int64(),
    "sample_id": pl.Int64(),
    "group_id": pl.Int64(),
    "prompt": pl.String(),
    "completion": pl.String(),
    "reward": pl.Float64(),
    "accuracy": pl.Float64(),
    "n_turns": pl.Int32(),
    "turn_states": STR_LIST,
    "error_types": STR_LIST,
}


def empty_rollouts(accuracy: bool = False) -> pl.DataFrame:
    schema = {k: v for k, v in ROLLOUT_CONTRACT.items() if accuracy or k != "accuracy"}
    return pl.DataFrame(schema=schema)


def json_scalar_column(name: str, values: list[Any]) -> pl.Series:
    """An extra column from JSON values: numbers -> Float64 (ints stay Int64), bools -> Boolean,
    strings -> String, anything else (lists, objects, mixed types) -> JSON text."""
    kinds = {type(v) for v in values if v is not None}
    if kinds and kinds <= {bool}:
        return pl.Series(name, values, dtype=pl.Boolean)
    if kinds and kinds <= {int}:
        try:
            return pl.Series(name, values, dtype=pl.Int64)
        except (OverflowError, pl.exceptions.PolarsError):
            pass
    if kinds and kinds <= {int, float}:
        return pl.Series(name, [None if v is None else as_float(v) for v in values], dtype=pl.Float64)
    if not kinds or kinds <= {str}:
        return pl.Series(name, values, dtype=pl.String)
    return pl.Series(
        name,
        [None if v is None else (v if isinstance(v, str) else json.dumps(v, ensure_ascii=False, default=str))
         for v in values],
        dtype=pl.String,
    )


def rollouts_frame(cols: Mapping[str, list[Any] | pl.Series], extras: Mapping[str, pl.Series | list[Any]] = ()) -> pl.DataFrame:
    """Contract columns (those present in ``cols``, in contract order, with contract dtypes)
    followed by ``extras`` (Series, or JSON value lists typed with `json_scalar_column`)."""
    series = []
    for name, dtype in ROLLOUT_CONTRACT.items():
        if name in cols:
            v = cols[name]
            if isinstance(v, pl.Series):
                series.append(v.alias(name).cast(dtype))
            else:
                series.append(pl.Series(name, v, dtype=dtype, strict=False))
    for name, values in dict(extras).items():
        if name in ROLLOUT_CONTRACT:
            continue
        s = values if isinstance(values, pl.Series) else json_scalar_column(name, list(values))
        series.append(s.alias(name))
    return pl.DataFrame(series)


def concat_frames(frames: list[pl.DataFrame], empty: pl.DataFrame) -> pl.DataFrame:
    frames = [f for f in frames if f.width]
    if not frames:
        return empty
    try:
        return pl.concat(frames, how="diagonal_relaxed")
    except pl.exceptions.PolarsError:
        # incompatible extra columns across files: stringify the extras that clash
        names: dict[str, set] = {}
        for f in frames:
            for k, v in f.schema.items():
                names.setdefault(k, set()).add(v)
        clash = [k for k, v in names.items() if len(v) > 1 and k not in ROLLOUT_CONTRACT]
        return pl.concat([f.with_columns([_as_text(f.get_column(k)) for k in clash if k in f.columns])
                          for f in frames], how="diagonal_relaxed")


def _as_text(s: pl.Series) -> pl.Series:
    if s.dtype.is_nested() or s.dtype == pl.Object:
        return pl.Series(s.name, [None if v is None else json.dumps(v, default=str) for v in s.to_list()],
                         dtype=pl.String)
    return s.cast(pl.String, strict=False)


class ListColumn:
    """A list[str] column built from many repeated lists: each distinct list is converted once,
    then gathered (building millions of small Python lists into polars is the slow part)."""

    def __init__(self) -> None:
        self._ids: dict[tuple[str, ...] | None, int] = {}
        self._uniques: list[list[str] | None] = []
        self.keys: list[int] = []

    def append(self, value: Sequence[str] | None) -> None:
        k = None if value is None else tuple(value)
        i = self._ids.get(k)
        if i is None:
            i = self._ids[k] = len(self._uniques)
            self._uniques.append(None if value is None else list(value))
        self.keys.append(i)

    def series(self, name: str) -> pl.Series:
        uniques = pl.Series(name, self._uniques, dtype=STR_LIST)
        return uniques.gather(pl.Series(self.keys, dtype=pl.UInt32)) if self.keys else uniques.head(0)


def turn_columns(classifier: TurnClassifier, completions: Sequence[str | None]) -> dict[str, Any]:
    """``turn_states``, ``error_types`` (Series) and ``n_turns`` for a list of completions
    (a null completion gets nulls)."""
    states, errors, n = ListColumn(), ListColumn(), []
    for c in completions:
        if c is None:
            states.append(None)
            errors.append(None)
            n.append(None)
            continue
        s, e = classifier.completion(c)
        states.append(s)
        errors.append(e)
        n.append(len(s))
    return {"turn_states": states.series("turn_states"), "error_types": errors.series("error_types"), "n_turns": n}


def groups_by_key(keys: Sequence[Any]) -> list[int]:
    """Group ids by first appearance of each key (None: a group of its own)."""
    ids: dict[Any, int] = {}
    out = []
    nxt = 0
    for k in keys:
        if k is None:
            out.append(nxt)
            nxt += 1
            continue
        g = ids.get(k)
        if g is None:
            g = ids[k] = nxt
            nxt += 1
        out.append(g)
    return out


def groups_consecutive(keys: Sequence[Any]) -> list[int]:
    """Group ids for runs of equal consecutive keys (TRL logs a group's rows together)."""
    out = []
    g = -1
    prev: Any = object()
    for k in keys:
        if k is None or k != prev:
            g += 1
        prev = k
        out.append(g)
    return out


# ---- metrics ------------------------------------------------------------------------


def flatten(prefix: str, d: Mapping[str, Any], out: dict[str, Any]) -> None:
    for k, v in d.items():
        key = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            flatten(key, v, out)
        else:
            out[key] = v


def metrics_frame(records: Mapping[int, Mapping[str, Any]]) -> pl.DataFrame:
    """``{step: {name: value}}`` -> one row per step (sorted), ``step`` (Int64) first, every
    numeric/bool metric as Float64 (non-numeric values are dropped)."""
    steps = sorted(records)
    names: dict[str, None] = {}
    for s in steps:
        for k, v in records[s].items():
            if k != "step" and as_float(v) is not None:
                names.setdefault(k, None)
    cols = [pl.Series("step", steps, dtype=pl.Int64)]
    for k in names:
        cols.append(pl.Series(k, [as_float(records[s].get(k)) for s in steps], dtype=pl.Float64))
    return pl.DataFrame(cols) if steps else pl.DataFrame(schema={"step": pl.Int64})


def map_names(df: pl.DataFrame, mapping: Mapping[str, str]) -> pl.DataFrame:
    """Add our name for each mapped column (originals are kept). The first source present wins
    when several map to one name; a name already present is never overwritten."""
    add = []
    taken = set(df.columns)
    for src, dst in mapping.items():
        if src in df.columns and dst not in taken:
            add.append(pl.col(src).alias(dst))
            taken.add(dst)
    return df.with_columns(add) if add else df


def derived_metrics(rollouts: pl.DataFrame, reward_columns: Sequence[str] = ()) -> pl.DataFrame:
    """Per-step metrics computed from the rollouts, with native names:

    ``reward``/``reward_std`` (mean/std over finite rewards), ``accuracy`` (mean, if the column
    exists), ``rewards/<col>/mean`` per reward column, ``turn_state/<state>`` (share of assistant
    turns in that state), ``format_error/<type>`` (turns with that error / turns; types seen in
    the run) and ``rollouts/count``.
    """
    if rollouts.height == 0:
        return pl.DataFrame(schema={"step": pl.Int64})
    finite = pl.when(pl.col("reward").is_finite()).then(pl.col("reward"))
    aggs: list[pl.Expr] = [
        finite.mean().alias("reward"),
        finite.std(ddof=0).alias("reward_std"),
        pl.len().cast(pl.Float64).alias("rollouts/count"),
    ]
    if "accuracy" in rollouts.columns:
        aggs.append(pl.col("accuracy").fill_nan(None).mean().alias("accuracy"))
    for c in reward_columns:
        if c in rollouts.columns:
            aggs.append(pl.when(pl.col(c).is_finite()).then(pl.col(c)).mean().alias(f"rewards/{c}/mean"))
    has_states = rollouts.get_column("turn_states").drop_nulls().len() > 0
    if has_states:
        n_turns = pl.col("turn_states").list.len().sum()
        for s in STATES:
            aggs.append((pl.col("turn_states").list.eval(pl.element() == s).list.sum().sum() / n_turns)
                        .alias(f"turn_state/{s}"))
        seen = set(rollouts.get_column("error_types").explode().drop_nulls().unique().to_list())
        for e in ERRORS:
            if e in seen:
                aggs.append((pl.col("error_types").list.eval(pl.element() == e).list.sum().sum() / n_turns)
                            .alias(f"format_error/{e}"))
    out = rollouts.group_by("step").agg(aggs).sort("step")
    cast = [pl.col(c).cast(pl.Float64) for c in out.columns if c != "step"]
    return out.with_columns(cast)


def merge_metrics(primary: pl.DataFrame, derived: pl.DataFrame) -> pl.DataFrame:
    """``primary`` with the columns of ``derived`` it lacks (outer join on step, sorted)."""
    if derived.height == 0 or derived.width <= 1:
        return primary
    extra = [c for c in derived.columns if c == "step" or c not in primary.columns]
    if len(extra) <= 1:
        return primary
    if primary.height == 0:
        out = derived.select(extra)
        for c in primary.columns:
            if c not in out.columns:
                out = out.with_columns(pl.lit(None, dtype=primary.schema[c]).alias(c))
        return out.sort("step")
    return primary.join(derived.select(extra), on="step", how="full", coalesce=True).sort("step")


def nonfinite_metric_issues(df: pl.DataFrame, path: str, issues: IssueLog) -> None:
    """One issue per metric column holding NaN/inf (value kept: a NaN loss is a signal)."""
    for c in df.columns:
        if c == "step" or df.schema[c] not in (pl.Float64, pl.Float32):
            continue
        bad = df.filter(pl.col(c).is_not_null() & ~pl.col(c).is_finite())
        if bad.height:
            first = bad.row(0, named=True)
            issues.add(path, None, f"metric {c!r} is non-finite at {bad.height} step(s) "
                                   f"(first: step {first['step']}, {first[c]}); kept")


def make_source(
    path: Path,
    fmt: str,
    *,
    metrics: pl.DataFrame,
    rollouts: pl.DataFrame | None,
    tokens: pl.LazyFrame | None = None,
    probe: pl.LazyFrame | None = None,
    control_tokens: list[dict[str, Any]] | None = None,
    issues: IssueLog,
    notes: list[str],
    files: Iterable[Path],
) -> RunSource:
    return RunSource(
        path=path,
        format=fmt,
        metrics=metrics.lazy(),
        rollouts=None if rollouts is None else rollouts.lazy(),
        tokens=tokens,
        probe=probe,
        control_tokens=list(control_tokens or []),
        issues=issues.finish(),
        notes=list(notes),
        _fingerprint=fingerprint(fmt, path, files),
    )
