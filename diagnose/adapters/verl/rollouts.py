"""verl rollout dumps (``<step>.jsonl``, `diagnose.adapters.verl.dumps`) read file by file:
each file's rows are typed, grouped and classified as soon as it is read, and only their small
columns are kept (the ``input``/``output`` texts are read again when a query asks for them,
`diagnose.adapters._common.stream.lazy_rollouts`). Files are read on a process pool when the
dumps are large (`diagnose.adapters._common.stream.map_files`).

The result is the one `diagnose.adapters.verl` always gave (same rows, ids, groups, turn
states, issues in the same order): a dump file holds one ``global_steps`` (``_dump_generations``),
so sample and group ids are per file. A file whose lines name other steps, or extra keys whose
JSON types differ between files, make the whole run read the old way, in memory
(`read_in_memory`), where ids and column types are decided over all rows at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from diagnose.adapters._common.issues import IssueLog, NonFinite
from diagnose.adapters._common.rollouts import ROLLOUT_CONTRACT, empty_rollouts, groups_by_key, json_scalar_column, \
    rollouts_frame, turn_columns
from diagnose.adapters._common.stream import RecordedIssues, TextPart, lazy_rollouts, memo_map
from diagnose.adapters._common.turns import TurnClassifier
from diagnose.adapters._common.values import as_float, as_step
from diagnose.adapters.verl.dumps import prompt_tool_names
from diagnose.jsonl import LineError, iter_jsonl
from diagnose.transcripts import Dialect
from diagnose.turn_batch import current_sampling, sampling

__all__ = ["read_rollouts"]

CORE = ("input", "output", "score", "step")
ACCURACY_KEYS = ("acc", "accuracy")
TEXT = {"prompt": pl.String(), "completion": pl.String()}

Row = tuple[int, "str | None", str, "float | None", dict[str, Any], int]  # step, input, output, reward, extra, line


def _rows(fstep: int, f: Path, issues: RecordedIssues) -> tuple[list[Row], set[int]]:
    """The rollout lines of one dump, as `diagnose.adapters.verl` has always read them."""
    rows: list[Row] = []
    nonfinite = issues.nonfinite
    n_good = bad_step = missing_input = missing_score = 0
    first: dict[str, int] = {}  # the first line of each counted problem: the issue names it
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
            first.setdefault("step", line_no)
            step = fstep
        elif step != fstep:
            other_steps.add(step)
        inp = obj.get("input")
        if not isinstance(inp, str):
            missing_input += 1
            first.setdefault("input", line_no)
            inp = None
        score = obj.get("score")
        reward = as_float(score)
        if reward is None:
            if score is None:
                missing_score += 1
            else:
                issues.add(f, line_no, f"'score' is not a number ({type(score).__name__}); reward set to null")
        nonfinite.check(f, "score", reward, line_no)
        extra = {k: v for k, v in obj.items() if k not in CORE}
        for k, v in extra.items():
            if isinstance(v, float):
                nonfinite.check(f, k, v, line_no)
        rows.append((step, inp, output, reward, extra, line_no))
        n_good += 1
    if bad_step:
        issues.add(f, first["step"], f"{bad_step} line(s) without a valid 'step' (this the first); the file "
                   f"name's step {fstep} used")
    if other_steps:
        issues.step_mismatch(f, "lines", sorted(other_steps)[:5], fstep, "the 'step' key")
    if missing_input:
        issues.add(f, first["input"], f"{missing_input} line(s) without an 'input' string (this the first): each "
                   "is its own group")
    if missing_score:
        issues.add(f, None, f"{missing_score} line(s) without 'score': reward is null")
    if n_good == 0:
        issues.add(f, None, "no readable rollout lines in this file")
    return rows, other_steps


def _kinds(values: list[Any]) -> frozenset[str]:
    return frozenset(type(v).__name__ for v in values if v is not None)


def _frame(rows: list[Row], classifier: TurnClassifier, tools: dict[str | None, Any],
           with_text: bool) -> tuple[pl.DataFrame, dict[str, frozenset[str]]]:
    """Rows of one step (or of the whole run) in the contract columns, ``completion_chars`` and
    the extras; the texts only ``with_text``. Also the JSON types of each extra key."""
    by_step: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        by_step.setdefault(r[0], []).append(i)
    sample_ids = [0] * len(rows)
    group_ids = [0] * len(rows)
    for idx in by_step.values():  # ids within each step in line order; groups: identical prompt
        gs = groups_by_key([rows[i][1] for i in idx])
        for k, i in enumerate(idx):
            sample_ids[i], group_ids[i] = k, gs[k]
    completions = [r[2] for r in rows]
    cols: dict[str, Any] = {"step": [r[0] for r in rows], "sample_id": sample_ids, "group_id": group_ids,
                            "reward": [r[3] for r in rows]}
    if with_text:
        cols.update(prompt=[r[1] for r in rows], completion=completions)
    keys: dict[str, None] = {}
    for r in rows:
        for k in r[4]:
            keys.setdefault(k, None)
    raw = {k: [r[4].get(k) for r in rows] for k in keys}
    extras = {k: json_scalar_column(k, v) for k, v in raw.items()}
    for k in ACCURACY_KEYS:
        if k in extras and extras[k].dtype in (pl.Float64, pl.Int64, pl.Boolean):
            cols["accuracy"] = extras[k].cast(pl.Float64).to_list()
            break
    for r in rows:
        if r[1] not in tools:
            tools[r[1]] = prompt_tool_names(r[1])
    cols.update(turn_columns(classifier, completions, [tools[r[1]] for r in rows], cols["step"]))
    frame = rollouts_frame(cols, extras)
    if not with_text:
        frame = frame.with_columns(pl.Series("completion_chars", [len(c) for c in completions], dtype=pl.Int64),
                                   pl.Series("_line", [r[5] for r in rows], dtype=pl.Int64))
    return frame, {k: _kinds(v) for k, v in raw.items()}


@dataclass
class _FileRead:
    issues: RecordedIssues
    frame: pl.DataFrame | None  # None: the file holds other steps (read in memory)
    kinds: dict[str, frozenset[str]]
    keys: list[str]


_WORKER: dict[str, Any] = {}


def _read_file(job: tuple[int, Path, tuple[int, int] | None]) -> _FileRead:
    """One dump, typed and classified (in a pool worker or here). Runs under the load's
    sampling setting (``job[2]``), with one classifier and tool-name memo per process."""
    fstep, f, sample = job
    issues = RecordedIssues()
    rows, other = _rows(fstep, f, issues)
    if other:
        return _FileRead(issues, None, {}, [])
    with sampling(*sample) if sample is not None else _nothing():
        key = ("classifier", sample)
        if key not in _WORKER:
            _WORKER.clear()
            _WORKER[key] = TurnClassifier(dialect=Dialect.VERL)
            _WORKER["tools"] = {}
        frame, kinds = _frame(rows, _WORKER[key], _WORKER["tools"], with_text=False)
    keys = list(dict.fromkeys(k for r in rows for k in r[4]))
    return _FileRead(issues, frame, kinds, keys)


def _encode(r: _FileRead) -> tuple[pl.DataFrame | None, dict[str, Any]]:
    return r.frame, {"issues": r.issues.to_json(), "kinds": {k: sorted(v) for k, v in r.kinds.items()}, "keys": r.keys}


def _decode(frame: pl.DataFrame | None, meta: dict[str, Any]) -> _FileRead:
    return _FileRead(RecordedIssues.from_json(meta["issues"]), frame,
                     {k: frozenset(v) for k, v in meta["kinds"].items()}, list(meta["keys"]))


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: Any) -> None:
        return None


def _texts(f: Path, lines: list[int]) -> pl.DataFrame:
    """``prompt`` and ``completion`` of the given lines of a dump, read again."""
    want = set(lines)
    got: dict[int, tuple[str | None, str]] = {}
    for line_no, obj in iter_jsonl(f):
        if line_no in want and not isinstance(obj, LineError):
            inp = obj.get("input")
            got[line_no] = (inp if isinstance(inp, str) else None, obj.get("output"))
    return pl.DataFrame({"prompt": [got[n][0] for n in lines], "completion": [got[n][1] for n in lines]},
                        schema=TEXT)


def read_rollouts(files: list[tuple[int, Path]], issues: IssueLog) -> tuple[pl.DataFrame, pl.LazyFrame]:
    """The rollouts of the dumps: ``(small, rollouts)``, the small columns in memory (for the
    adapter's own bookkeeping) and the full table, texts read on demand."""
    if not files:
        empty = empty_rollouts()
        return empty, empty.lazy()
    if len({s for s, _ in files}) < len(files):  # two files of one step: ids run across both
        frame = read_in_memory(files, issues)
        return frame, frame.lazy()
    _WORKER.clear()
    sample = current_sampling()
    size = sum(f.stat().st_size for _, f in files if f.exists())
    reads = memo_map(_read_file, [(s, f, sample) for s, f in files], [f for _, f in files], size,
                     _encode, _decode, extra=["verl", sample])
    nonfinite = NonFinite()
    for r in reads:
        r.issues.replay(issues, nonfinite)
    nonfinite.flush(issues)
    if any(r.frame is None for r in reads) or not _same_types(reads):
        frame = read_in_memory(files)
        return frame, frame.lazy()
    frames = [r.frame for r in reads if r.frame is not None and r.frame.height]
    if not frames:
        empty = empty_rollouts()
        return empty, empty.lazy()
    small = pl.concat(frames, how="diagonal_relaxed")
    order = [c for c in ROLLOUT_CONTRACT if c in small.columns or c in TEXT]
    order += list(dict.fromkeys(k for r in reads for k in r.keys if k not in ROLLOUT_CONTRACT))
    parts, offset = [], 0
    for (step, f), r in zip(files, reads):
        n = r.frame.height if r.frame is not None else 0
        if n:
            lines = r.frame.get_column("_line").to_list()
            parts.append(TextPart(offset, n, step, lambda f=f, lines=lines: _texts(f, lines)))
        offset += n
    small = small.drop("_line")
    return small.select([c for c in order if c in small.columns] + ["completion_chars"]), \
        lazy_rollouts(small, parts, TEXT, order + ["completion_chars"])


def _same_types(reads: list[_FileRead]) -> bool:
    """Whether typing each file's extras alone gives the types typing them all at once would
    (`json_scalar_column` decides a column's type from every value's JSON type)."""
    union: dict[str, set[str]] = {}
    for r in reads:
        for k, v in r.kinds.items():
            union.setdefault(k, set()).update(v)
    return all(v == union[k] for r in reads for k, v in r.kinds.items())


def read_in_memory(files: list[tuple[int, Path]], issues: IssueLog | None = None) -> pl.DataFrame:
    """All dumps in memory, ids and types decided over every row (files holding other steps);
    ``issues``: record what reading finds (None: the file-by-file pass recorded it)."""
    found = RecordedIssues()
    rows: list[Row] = []
    for fstep, f in files:
        rows.extend(_rows(fstep, f, found)[0])
    if issues is not None:
        nonfinite = NonFinite()
        found.replay(issues, nonfinite)
        nonfinite.flush(issues)
    if not rows:
        return empty_rollouts()
    return _frame(rows, TurnClassifier(dialect=Dialect.VERL), {}, with_text=True)[0]
