"""Console logs: the metrics lines trainers print, from a tee'd file or W&B's ``files/output.log``.

Two printers, read in their source:

* verl ``LocalLogger.log`` (``verl/utils/logger/aggregate_logger.py``, the ``console`` backend of
  ``Tracking``, on by default): ``print(concat_dict_to_str(data, step))`` = ``step:N - k:v - ...``
  with every ``numbers.Number`` value as ``pprint.pformat(v)``: ``0.53``, ``nan``, ``True`` and,
  under numpy 2, ``np.float64(0.53)`` (verl's ``reduce_metrics`` returns numpy scalars). Under
  Ray the driver prefixes worker output (``(TaskRunner pid=12) step:1 - ...``).
* transformers ``ProgressCallback.on_log`` (``trainer_callback.py``; ``PrinterCallback`` when
  tqdm is off): ``str(logs)`` with every float formatted ``f"{v:.4g}"`` (``{'loss': '0.1234',
  'reward': '0.5', 'epoch': '0.25'}``), written through ``tqdm.write`` between progress-bar
  updates. ``Trainer.log`` passes the callbacks the logs *without* the step, so the step is the
  training bar's counter (``| 12/300 [``) just before the dict (``on_step_end`` moves the bar to
  ``global_step`` before ``_maybe_log_save_evaluate`` logs); without bars, the dicts' order.

Everything else on the console (warnings, other progress bars, tracebacks, binary garbage) is
skipped; a metrics line that is cut or garbled becomes an issue naming the file and line, with
the values of it that could be read kept. Values are never evaluated as code:
``ast.literal_eval`` reads the dicts, ``float`` the numbers.
"""

from __future__ import annotations

import ast
import re
from collections import Counter
from pathlib import Path
from typing import Any

import polars as pl

from diagnose.adapters._common.io import visible_files
from diagnose.adapters._common.issues import IssueLog
from diagnose.adapters.trackers.run import TrackerRun, empty_metrics

__all__ = ["SUFFIXES", "find_logs", "looks_like_console", "parse_dict_text", "parse_value", "read_log"]

#: files sniffed as console logs in a launch folder
SUFFIXES = (".log", ".txt", ".out", ".err")
VERL_LINE = re.compile(r"(?:^|[\s)\]>|])step:(\d+) - (.*)$")
_BAR = re.compile(r"^\s*(?:([^|\r]*?):\s*)?\d+%\|[^|]*\|\s*(\d+)/(\d+) \[")
_NUMPY = re.compile(r"^np\.[a-z]+\d*\((.*)\)$")
#: the start of a printed log dict: a key, then a number or a quoted number (``'0.5'``, ``'nan'``)
_DICT_START = re.compile(r"^\{'[^'\n]{1,200}': (?:'[-+.\deinfa]*'|[-+]?[\d.]+(?:e[-+]?\d+)?|nan|inf|True|False)[,}]")
_MAX_LINE = 1 << 20
_SNIFF_BYTES = 8 << 20
#: log files sniffed per folder (a launch folder may be a repository checkout full of text files)
_MAX_SNIFFED = 64


def parse_value(text: str) -> float | None:
    """A printed number (``0.5``, ``nan``, ``-inf``, ``True``, ``np.float64(0.5)``, ``'1e-06'``), else None."""
    s = text.strip().strip("'\"")
    m = _NUMPY.match(s)
    if m:
        s = m.group(1).strip("'\"")
    if s in ("True", "False"):
        return float(s == "True")
    try:
        return float(s)
    except ValueError:
        return None


def looks_like_console(f: Path) -> bool:
    """Whether the first 8 MiB of ``f`` hold a verl metrics line or a transformers log dict."""
    try:
        with f.open("rb") as fh:
            head = fh.read(_SNIFF_BYTES).decode("utf-8", "replace")
    except OSError:
        return False
    return bool(re.search(r"(?:^|[\s)\]>|])step:\d+ - \S+:\S", head, re.MULTILINE)) or \
        bool(re.search(r"(?:^|\r)\{'(?:loss|reward|train_runtime|learning_rate|grad_norm)': ", head, re.MULTILINE))


def find_logs(p: Path) -> list[Path]:
    """Console logs at ``p`` (a file, or the ``*.log``/``*.txt``/``*.out``/``*.err`` files of a
    folder and of its ``logs/``) that hold metrics lines."""
    if p.is_file():
        return [p] if looks_like_console(p) else []
    cands = [f for d in (p, p / "logs") if d.is_dir() for f in visible_files(d) if f.suffix in SUFFIXES
             or f.name == "nohup.out"]
    return [f for f in cands[:_MAX_SNIFFED] if looks_like_console(f)]


class _Parse:
    """One pass over a log: verl lines and transformers dicts, with the training bar's counter."""

    def __init__(self, f: Path, issues: IssueLog) -> None:
        self.f, self.issues = f, issues
        self.rows: dict[int, dict[str, float]] = {}
        self.order: list[int] = []
        self.kinds: Counter[str] = Counter()
        self.bars: list[tuple[int, int]] = []  # (counter, total) of description-less bars, in order
        self.dicts: list[tuple[int, int, dict[str, float]]] = []  # (bar index, line, values)
        self.repeated = 0

    def line(self, no: int, text: str) -> None:
        for seg in text.split("\r") if "\r" in text else (text,):
            if "step:" in seg:
                m = VERL_LINE.search(seg)
                if m:
                    self.verl(no, int(m.group(1)), m.group(2))
                    continue
            s = seg.strip()
            if s.startswith("{'") and _DICT_START.match(s):
                self.hf(no, s)
                continue
            b = _BAR.match(seg)
            if b and not b.group(1):
                self.bars.append((int(b.group(2)), int(b.group(3))))

    def verl(self, no: int, step: int, rest: str) -> None:
        vals: dict[str, float] = {}
        bad: list[str] = []
        for part in rest.split(" - "):
            key, sep, raw = part.rpartition(":")
            v = parse_value(raw) if sep else None
            if not key or v is None:
                bad.append(part[:40])
                continue
            vals[key.strip()] = v
        if bad:
            self.issues.add(self.f, no, f"verl metrics line with {len(bad)} unreadable item(s) (e.g. {bad[0]!r}); "
                                        f"the {len(vals)} readable value(s) kept")
        self.kinds["verl"] += 1
        if step in self.rows:
            self.repeated += 1
        self.rows.setdefault(step, {}).update(vals)

    def hf(self, no: int, text: str) -> None:
        obj = parse_dict_text(text)
        if obj is None:
            self.issues.add(self.f, no, "a printed log dict that is cut or garbled; skipped")
            return
        vals = {str(k): v for k, v in ((k, parse_value(str(x))) for k, x in obj.items()
                                       if isinstance(x, (int, float, str))) if v is not None}
        if vals:
            self.kinds["transformers"] += 1
            self.dicts.append((len(self.bars), no, vals))

    def hf_rows(self, notes: list[str]) -> None:
        """Steps of the transformers dicts: the training bar's counter before each (the bar whose
        total is the one the final ``train_runtime`` dict follows, else the commonest total)."""
        if not self.dicts:
            return
        total = None
        for i, _, vals in self.dicts:
            if "train_runtime" in vals and i:
                total = self.bars[i - 1][1]
        if total is None and self.bars:
            total = Counter(t for _, t in self.bars).most_common(1)[0][0]
        counters = [n if t == total else None for n, t in self.bars]
        last: list[int | None] = []
        cur = None
        for c in counters:
            cur = c if c is not None else cur
            last.append(cur)
        by_order = total is None
        for k, (i, no, vals) in enumerate(self.dicts):
            if "train_runtime" in vals:
                continue  # the end-of-training summary, not a step
            step = (last[i - 1] if i else None) if not by_order else k + 1
            if step is None:
                self.issues.add(self.f, no, "a printed log dict before any training progress bar: its step is "
                                            "unknown; skipped")
                continue
            self.rows.setdefault(step, {}).update(vals)
        if by_order:
            notes.append(f"{self.f.name}: no training progress bar in the log (disable_tqdm?): the printed log dicts "
                         "are numbered 1, 2, ... in order; their optimizer steps are that times logging_steps")


def read_log(f: Path, name: str | None = None) -> TrackerRun:
    """The metrics lines of the console log ``f``, one row per step (a step printed twice, as
    after a resume: the later values win)."""
    issues = IssueLog()
    notes: list[str] = []
    parse = _Parse(f, issues)
    try:
        with f.open("rb") as fh:
            for no, raw in enumerate(fh, 1):
                if len(raw) > _MAX_LINE:
                    continue
                if b"step:" in raw or b"{'" in raw or b"%|" in raw:
                    parse.line(no, raw.decode("utf-8", "replace").rstrip("\n"))
    except OSError as e:
        issues.add(f, None, f"unreadable ({e.strerror or e}); the lines before it kept")
    parse.hf_rows(notes)
    if parse.repeated:
        notes.append(f"{f.name}: {parse.repeated} step(s) printed more than once (a restart or resume): the later "
                     "values win")
    if parse.kinds["verl"] and parse.kinds["transformers"]:
        notes.append(f"{f.name} holds both verl metrics lines and transformers log dicts; both read")
    frame = _frame(parse.rows)
    trainer = "verl" if parse.kinds["verl"] >= parse.kinds["transformers"] and parse.kinds["verl"] else \
        ("trl" if parse.kinds["transformers"] else None)
    step_from = "verl's step:N prefix" if trainer == "verl" else "the training progress bar's counter"
    return TrackerRun("console", f, name or f.name, frame, step_from=step_from, trainer=trainer,
                      issues=issues.finish(), notes=notes, files=[f])


def _frame(rows: dict[int, dict[str, float]]) -> pl.DataFrame:
    if not rows:
        return empty_metrics()
    steps = sorted(rows)
    names: dict[str, None] = {}
    for s in steps:
        names.update(dict.fromkeys(rows[s]))
    cols = {"step": pl.Series(steps, dtype=pl.Int64)}
    for k in names:
        cols[k] = pl.Series([rows[s].get(k) for s in steps], dtype=pl.Float64)
    return pl.DataFrame(cols)


def parse_dict_text(text: str) -> dict[str, Any] | None:
    """A printed dict (``{'loss': '0.5'}``) as a dict, or None; never evaluated as code."""
    try:
        obj = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None
