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

Each format is a module satisfying `Adapter` (``OPTIONS``, ``detect``, ``has_candidates``,
``runs``, ``run_alias``, ``load``, ``step_of_file``; a format whose path is always one run takes
``runs`` and ``run_alias`` from ``_common.hooks``), listed once in ``ADAPTERS``. ``load_run``
chooses the run (`choose_run`), passes the options the adapter declares in ``OPTIONS`` and
notes the ones it does not take.

Bad input never raises: every unreadable file, line or value becomes a `SourceIssue` naming the
file (and line) and the rest is read. `UnknownRunLayout` is raised only when no layout matches
(or the path does not exist); `AmbiguousRun` (a subclass) when a folder holds several runs and
none was chosen.

Each format is a package, ``diagnose/adapters/<format>/`` (its ``__init__`` is the adapter
module, its other modules the format's own helpers); what the formats share (issues, values,
file reading, rollouts and metrics frames, turn classification, the source and its sidecar)
is in ``diagnose/adapters/_common/``; how a completion splits into turns is
`diagnose.transcripts`. Trackers (W&B, TensorBoard, console logs: metrics, no rollouts) belong
in ``diagnose/adapters/trackers/``, their frames built with ``_common.metrics`` like a trainer's.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, cast, runtime_checkable

from diagnose.adapters._common.sidecar import attach_sidecar
from diagnose.adapters._common.turns import TurnClassifier
from diagnose.source import RunSource

__all__ = [
    "ADAPTERS",
    "FORMATS",
    "LOOKED_FOR",
    "Adapter",
    "AmbiguousRun",
    "UnknownRunLayout",
    "adapter",
    "choose_run",
    "detect_format",
    "load_run",
    "require_path",
    "step_of_file",
    "TurnClassifier",
]

#: The adapter module of each format, in detection order (the one table of formats).
ADAPTERS: dict[str, str] = {
    "native": "diagnose.adapters.native",
    "trl": "diagnose.adapters.trl",
    "open_instruct": "diagnose.adapters.open_instruct",
    "verl": "diagnose.adapters.verl",
    "conversations": "diagnose.adapters.conversations",
}
#: Supported formats, in detection order.
FORMATS: tuple[str, ...] = tuple(ADAPTERS)
#: The ``load_run`` options an adapter may take (besides ``file_checks``), as in ``diagnose scan``:
#: ``metrics`` (a trainer metrics file, verl), ``run`` (which run of several in one folder),
#: ``tokenizer`` (to decode token-id traces, open-instruct).
LOAD_OPTIONS: tuple[str, ...] = ("metrics", "run", "tokenizer")


@runtime_checkable
class Adapter(Protocol):
    """What each format module provides (every hook; ``_common.hooks`` has the defaults of
    ``runs`` and ``run_alias`` for a format whose path is always one run)."""

    #: The keyword arguments its ``load`` takes: some of `LOAD_OPTIONS`, and ``file_checks``
    #: if it validates files up front. ``load_run`` passes only these and notes the others.
    OPTIONS: tuple[str, ...]

    def detect(self, path: Path) -> bool:
        """Whether ``path`` is a run in this format (cheap: file names and a first line)."""
        ...

    def has_candidates(self, path: Path) -> bool:
        """Whether ``path`` holds files this format would read (for a forced ``format``)."""
        ...

    def runs(self, path: Path) -> list[str]:
        """The names of the runs the folder ``path`` holds, for ``run=``; [] when ``path`` is
        one run itself."""
        ...

    def run_alias(self, path: Path, name: str) -> str:
        """The run (one of `runs`) that ``name`` names, where a run has other names; else
        ``name`` unchanged."""
        ...

    def load(self, path: Path, **options: Any) -> RunSource:
        """The run as a `RunSource`; bad input becomes issues, never an exception. ``options``:
        those in ``OPTIONS`` that were given; ``run`` is the name `load_run` chose."""
        ...

    def step_of_file(self, rel: str, single_file: bool) -> int | str:
        """What a fingerprint file (``/``-separated, relative to the run) holds, for the scan
        cache: its step, ``"metrics"`` (only the metrics layer depends on it) or ``"global"``."""
        ...


#: What detection looks for, per format (quoted in `UnknownRunLayout`).
LOOKED_FOR: dict[str, str] = {
    "native": "run.json (our run directory, docs/run-format.md)",
    "trl": "completions/completions_<step>.parquet (TRL GRPOTrainer log_completions) or "
           "trainer_state.json with 'log_history' (also in checkpoint-*/), or several such output folders "
           "one folder down (--run NAME)",
    "open_instruct": "<run_name>_rollouts_<shard>.jsonl traces in the folder (open-instruct --save_traces, "
                     "rollouts_save_path: step, prompt_idx, response_tokens, logprobs, reward)",
    "verl": "<step>.jsonl rollout dumps with input/output/score (verl trainer.rollout_data_dir, here or one "
            "folder down), a *.jsonl of {\"step\": N, \"data\": {...}} metrics lines here or at "
            "<project>/<experiment>.jsonl (verl file logger), or latest_checkpointed_iteration.txt (a checkpoint folder)",
    "conversations": "conversation JSONL with 'messages' (one file, or <step>.jsonl / step_<step>.jsonl / "
                     "step-NNNNNN.jsonl files in a folder)",
}

class UnknownRunLayout(ValueError):
    """No known run layout at ``path``; the message lists what was looked for."""

    def __init__(self, path: str | os.PathLike[str], detail: str = "", formats: Sequence[str] = FORMATS) -> None:
        self.path = Path(path)
        self.looked_for = [f"{f}: {LOOKED_FOR[f]}" for f in formats]
        head = f"{self.path}: {detail or 'no known run layout found'}."
        super().__init__(head + " Looked for:\n" + "\n".join(f"  - {x}" for x in self.looked_for))


class AmbiguousRun(UnknownRunLayout):
    """The folder holds several runs (or not the one asked for); the message lists them and how
    to choose one (``run=`` / ``--run NAME``). Runs are never merged."""

    def __init__(self, path: str | os.PathLike[str], fmt: str, runs: Sequence[str], asked: str | None = None) -> None:
        self.path, self.format, self.runs = Path(path), fmt, list(runs)
        self.looked_for = [f"{fmt}: {LOOKED_FOR[fmt]}"]
        listed = ", ".join(self.runs)
        if asked is None:
            msg = f"{self.path}: {len(self.runs)} {fmt} runs in this folder ({listed}); choose one with --run NAME"
        else:
            msg = f"{self.path}: no {fmt} run named {asked!r} here (runs: {listed}); choose one with --run NAME"
        ValueError.__init__(self, msg)


def adapter(fmt: str) -> Adapter:
    """The adapter module of format ``fmt`` (one of `FORMATS`)."""
    return cast(Adapter, importlib.import_module(ADAPTERS[fmt]))


def step_of_file(fmt: str, rel: str, single_file: bool) -> int | str:
    """What a fingerprint file of a ``fmt`` run holds (the adapter's ``step_of_file``): a step,
    ``"metrics"`` or ``"global"``."""
    return adapter(fmt).step_of_file(rel.replace(os.sep, "/"), single_file)


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
            if adapter(fmt).detect(p):
                return fmt
        except OSError:
            continue
    return None


def require_path(p: Path, format: str | None = None) -> None:  # noqa: A002
    """``p`` exists and can be looked at; else `UnknownRunLayout` naming it, with the formats that
    were asked for (the first thing `load_run` and ``diagnose scan`` say about a bad path)."""
    try:
        exists = p.exists()
    except OSError as e:
        raise UnknownRunLayout(p, f"cannot access ({e})") from None
    if not exists:
        raise UnknownRunLayout(p, "no such file or directory", [format] if format else FORMATS)


def choose_run(path: Path, fmt: str, asked: str | None) -> str | None:
    """The run of the ``fmt`` folder ``path`` to read (the one place a run is chosen): ``asked``
    (``run=``, ``--run NAME``), resolved through the adapter's ``run_alias`` (verl: the
    experiment name alone; open-instruct: the run name of a resumed start) to one of its
    ``runs(path)``; without it the only run. None when ``path`` is one run itself (``runs`` is
    empty). Raises `AmbiguousRun` when the folder holds several runs and none was asked for, or
    the name is none of them: runs are never merged, and never picked by a guess (newest,
    first)."""
    mod = adapter(fmt)
    names = list(mod.runs(path))
    if not names:
        return None
    if asked is None:
        if len(names) > 1:
            raise AmbiguousRun(path, fmt, names)
        return names[0]
    name = mod.run_alias(path, str(asked))
    if name not in names:
        raise AmbiguousRun(path, fmt, names, str(asked))
    return name


def load_run(path: str | os.PathLike[str], format: str | None = None, *,  # noqa: A002
             metrics: str | os.PathLike[str] | None = None, run: str | None = None, tokenizer: Any = None,
             file_checks: Any = None) -> RunSource:
    """Load the run at ``path`` as a `RunSource`, auto-detecting its format unless ``format``
    (one of `FORMATS`) is given. Raises `UnknownRunLayout` when nothing matches, `AmbiguousRun`
    when the folder holds several runs of the format and ``run`` does not name one of them.

    Options (`LOAD_OPTIONS`; None = not given): ``metrics`` (a trainer metrics file, verl),
    ``run`` (which run of several in one folder, chosen here by `choose_run`: the adapter's
    ``load`` gets the name of the run it reads), ``tokenizer`` (decode token-id traces,
    open-instruct). Each goes to the adapter's ``load`` if its ``OPTIONS`` name it; one it does
    not take is named in the source's notes as unused.

    ``file_checks``: ``RunSource.file_checks`` of an earlier load of the same run (the scan
    cache keeps it): files it lists as validated, unchanged since, are not validated again.
    Formats that validate nothing up front ignore it."""
    p = Path(path)
    if format is not None and format not in FORMATS:
        raise ValueError(f"unknown run format {format!r}; expected one of {', '.join(FORMATS)}")
    require_path(p, format)
    fmt = format or detect_format(p)
    if fmt is None:
        raise UnknownRunLayout(p)
    mod = adapter(fmt)
    if format is not None and not mod.detect(p) and not mod.has_candidates(p):
        raise UnknownRunLayout(p, f"nothing in the {fmt} layout found", [fmt])
    notes: list[str] = []
    chosen = choose_run(p, fmt, run)
    if run is not None and chosen is None:
        notes.append(f"option run={run!s} is not used: {p} is one {fmt} run, not a folder of runs; ignored")
    given = {k: v for k, v in (("metrics", metrics), ("run", chosen), ("tokenizer", tokenizer),
                               ("file_checks", file_checks or None)) if v is not None}
    src = mod.load(p, **{k: v for k, v in given.items() if k in mod.OPTIONS})
    if fmt != "native" and p.is_dir():  # the native reader names its own
        from diagnose.adapters._common.io import unreachable
        from diagnose.source import SourceIssue

        named = {i.path for i in src.issues}
        src.issues += [SourceIssue(str(f), None, why) for f, why in unreachable(p) if str(f) not in named]
    src.notes += notes + [f"option {k}={v!s} is not used by the {fmt} adapter; ignored"
                          for k, v in given.items() if k not in mod.OPTIONS and k != "file_checks"]
    from diagnose.rescore.tables import attach_rescored  # torch-free; lazy: it imports the scan cache

    # control-token signals from outside the trainer: the live probe's tables beside a foreign
    # trainer's output (DiagnoseCallback), then `diagnose rescore`'s tables where still missing
    return attach_rescored(attach_sidecar(src))

