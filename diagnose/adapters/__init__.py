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

import polars as pl

from diagnose.adapters._common.sidecar import attach_sidecar
from diagnose.adapters._common.turns import TurnClassifier
from diagnose.regular_file import DIRECTORY, not_regular
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

    #: The keyword arguments its ``load`` takes: some of `LOAD_OPTIONS`, ``file_checks`` if it
    #: validates files up front, ``trackers`` if its metrics may live in an experiment tracker
    #: (`TRACKED_FORMATS`). ``load_run`` passes only these and notes the others.
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
    # experiment trackers (diagnose/adapters/trackers/): a run's metrics when the trainer's files lack them
    "trackers": "experiment trackers: wandb/{run,offline-run}-<date>-<id>/run-<id>.wandb (W&B), "
                "events.out.tfevents.* (TensorBoard: runs/, tensorboard_log/<project>/<experiment>/), console logs "
                "(*.log, *.txt, *.out) with verl 'step:N - k:v' lines or transformers' printed log dicts",
    "wandb": "W&B run folders (wandb/{run,offline-run}-<date>-<id>/)",
    "tensorboard": "TensorBoard event folders",
    "console": "console logs with metrics lines",
}
#: The formats whose metrics may live in an experiment tracker (their ``load`` takes ``trackers``).
TRACKED_FORMATS: tuple[str, ...] = ("trl", "open_instruct", "verl")
#: What `UnknownRunLayout` lists by default: every format, then the trackers.
LOOKED: tuple[str, ...] = (*FORMATS, "trackers")

class UnknownRunLayout(ValueError):
    """No known run layout at ``path``; the message lists what was looked for."""

    def __init__(self, path: str | os.PathLike[str], detail: str = "", formats: Sequence[str] = LOOKED) -> None:
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
    ``"metrics"`` or ``"global"``. A tracker's file: a W&B ``.wandb`` log or an events file holds
    metrics only (``"metrics"``); a W&B table may hold any step's rollouts (``"global"``)."""
    from diagnose.adapters.trackers.discover import tracker_file_kind

    rel = rel.replace(os.sep, "/")
    kind = tracker_file_kind(rel) if fmt != "native" else None
    return kind if kind is not None else adapter(fmt).step_of_file(rel, single_file)


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
    """``p`` exists and can be looked at, and is a folder or a regular file; else `UnknownRunLayout`
    naming it, with the formats that were asked for (the first thing `load_run` and ``diagnose
    scan`` say about a bad path; a named pipe is never opened: `diagnose.regular_file`)."""
    try:
        exists = p.exists()
    except OSError as e:
        raise UnknownRunLayout(p, f"cannot access ({e})") from None
    if not exists:
        raise UnknownRunLayout(p, "no such file or directory", [format] if format else FORMATS)
    why = not_regular(p)
    if why is not None and why != DIRECTORY:
        raise UnknownRunLayout(p, why, [format] if format else FORMATS)


def _holdings(p: Path, limit: int = 8) -> str:
    """What is at ``p``, for an error: the folder's visible entries (folders with ``/``), or the file."""
    if not p.is_dir():
        return f"it is one file, {p.name}"
    try:
        names = sorted(e.name + ("/" if e.is_dir() else "") for e in os.scandir(p) if not e.name.startswith("."))
    except OSError as e:
        return f"the folder cannot be listed ({e.strerror or e})"
    if not names:
        return "the folder is empty"
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"the folder holds {', '.join(names[:limit])}{more}"


def _forced_found_nothing(p: Path, fmt: str, src: RunSource | None = None) -> UnknownRunLayout:
    """The error of a forced ``format`` that finds nothing to read at ``p``: what the format looks
    for, what is there instead (and the format that is, when one is detected), and the first
    problem the adapter named."""
    other = detect_format(p)
    parts = [f"--format {fmt} found nothing to read (it looks for {LOOKED_FOR[fmt]}); {_holdings(p)}"]
    if other is not None and other != fmt:
        parts.append(f"it is in the {other} layout: use --format {other}, or leave --format out")
    if src is not None and src.issues:
        parts.append(f"{len(src.issues)} problem(s) named, the first: {src.issues[0]}")
    return UnknownRunLayout(p, "; ".join(parts), [fmt])


def _nothing_read(src: RunSource) -> bool:
    """Whether a loaded source holds no step at all (no metrics row, no rollout)."""
    frames = [lf for lf in (src.metrics, src.rollouts) if lf is not None]
    return all(lf.select(pl.len()).collect().item() == 0 for lf in frames)


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

    ``path``: a trainer layout (a folder, or a single file of a known layout), a launch folder
    holding one beside its experiment trackers (``wandb/``, ``runs/``, ``tensorboard_log/``,
    console logs; the trainer's output up to three folders down), or a tracker's own output (a
    ``wandb/`` or W&B run folder, an events folder, a console log). The trackers' metrics and
    logged tables are merged with the trainer layout on the trainer's step
    (`diagnose.adapters.trackers`); ``RunSource.sources`` names each source and what it lacks.

    Options (`LOAD_OPTIONS`; None = not given): ``metrics`` (a trainer metrics file, verl; or a
    tracker: a W&B run folder or ``wandb/`` folder, an events folder, a console log), ``run``
    (which run of several in one folder: the trainer's, chosen here by `choose_run`, the adapter's
    ``load`` gets the name of the run it reads; or a tracker's: a W&B run id or run folder, an
    events folder, a log file; runs are never merged), ``tokenizer`` (decode token-id traces,
    open-instruct). Each goes to the adapter's ``load`` if its ``OPTIONS`` name it; one it does
    not take is named in the source's notes as unused.

    ``file_checks``: ``RunSource.file_checks`` of an earlier load of the same run (the scan
    cache keeps it): files it lists as validated, unchanged since, are not validated again.
    Formats that validate nothing up front ignore it."""
    from diagnose.adapters.trackers import attach

    p = Path(path)
    if format is not None and format not in FORMATS:
        raise ValueError(f"unknown run format {format!r}; expected one of {', '.join(FORMATS)}")
    require_path(p, format)
    given = {k: v for k, v in (("metrics", metrics), ("run", run), ("tokenizer", tokenizer)) if v is not None}
    if format is not None and (adapter(format).detect(p) or adapter(format).has_candidates(p)):
        from diagnose.adapters.trackers.discover import find_trackers

        launch = attach.Launch(p, format, find_trackers(p))
    else:
        launch = attach.launch_layout(p, lambda d: detect_format(d) if format is None else
                                      (format if adapter(format).detect(d) else None))
    refs, tracker_issues = _tracker_refs(p, launch, given)
    chosen, issues, skipped = attach.choose_trackers(refs, given.get("run"), p)
    tracker_issues += issues
    if launch.trainer is None and not chosen:
        several = [r for r in refs if sum(x.kind == r.kind for x in refs) > 1]
        if several:
            raise AmbiguousRun(p, several[0].kind, [r.name for r in several if r.kind == several[0].kind],
                               given.get("run"))
        if format is None:
            raise UnknownRunLayout(p)
        raise _forced_found_nothing(p, format)
    target = launch.trainer if launch.trainer is not None else p
    known = launch.format or format
    if known in TRACKED_FORMATS or known is None:
        data = attach.read_trackers(chosen, known)
    else:  # our own runs and conversation dumps hold their metrics themselves
        data = None
        if chosen:
            skipped.append(f"{len(chosen)} experiment tracker run(s) here ({', '.join(r.title for r in chosen)}) not "
                           f"read: a {known} run's metrics are its own")
    fmt = format or launch.format or (data.trainer if data is not None else None) or "trl"
    mod = adapter(fmt)
    asked = given.pop("run", None)
    names_tracker = asked is not None and any(r.answers_to(str(asked)) for r in refs)
    trainer_run = _trainer_run(target, fmt, asked, names_tracker)
    notes = list(skipped)
    if asked is not None and trainer_run is None and not names_tracker:
        notes.append(f"option run={asked!s} is not used: {target} is one {fmt} run, not a folder of runs; ignored")
    call = {**given, "run": trainer_run, "trackers": data, "file_checks": file_checks or None}
    call = {k: v for k, v in call.items() if v is not None}
    src = mod.load(target, **{k: v for k, v in call.items() if k in mod.OPTIONS})
    if format is not None and not mod.detect(target) and _nothing_read(src):  # a forced format that reads nothing
        raise _forced_found_nothing(target, fmt, src)                           # is no scan of the run
    if target.is_dir():  # what the listings skip (broken links, pipes, unreadable files): named, once
        from diagnose.adapters._common.io import unreachable
        from diagnose.source import SourceIssue

        named = {str(i.path) for i in src.issues}
        src.issues += [SourceIssue(str(f), None, why) for f, why in unreachable(target) if str(f) not in named]
    src.notes += [f"option {k}={v!s} is not used by the {fmt} adapter; ignored"
                  for k, v in call.items() if k not in mod.OPTIONS and k not in ("file_checks", "trackers")]
    _add_trackers(src, data, tracker_issues)
    src.notes += notes
    from diagnose.rescore.tables import attach_rescored  # torch-free; lazy: it imports the scan cache

    # control-token signals from outside the trainer: the live probe's tables beside a foreign
    # trainer's output (DiagnoseCallback), then `diagnose rescore`'s tables where still missing
    return attach_rescored(attach_sidecar(src))

def _tracker_refs(p: Path, launch: Any, given: dict[str, Any]) -> tuple[list[Any], list[Any]]:
    """The tracker runs to choose from: those at ``p``, and a tracker given as ``metrics`` (it
    replaces the ones of its kind found at ``p``; a verl metrics file stays the adapter's)."""
    from diagnose.adapters.trackers.discover import find_trackers
    from diagnose.source import SourceIssue

    refs = list(launch.trackers)
    m = given.get("metrics")
    if m is None:
        return refs, []
    mp = Path(m)
    try:
        found = find_trackers(mp) if mp.exists() else []
    except OSError:
        found = []
    if not found:
        if not mp.exists():
            return refs, [SourceIssue(str(mp), None, "--metrics: no such file or folder")]
        return refs, []
    given.pop("metrics")
    kinds = {r.kind for r in found}
    return [r for r in refs if r.kind not in kinds] + found, []


def _trainer_run(target: Path, fmt: str, asked: str | None, names_tracker: bool) -> str | None:
    """The trainer layout's run (`choose_run`); when ``asked`` names a tracker run rather than
    one of the layout's, the layout's only run (`AmbiguousRun` if it holds several)."""
    try:
        return choose_run(target, fmt, asked)
    except AmbiguousRun:
        if not names_tracker:
            raise
        return choose_run(target, fmt, None)


def _add_trackers(src: RunSource, data: Any, issues: list[Any]) -> None:
    """The trackers' issues, notes, files (for the scan cache), config and the sources' lines (none
    when no tracker was read: the trainer layout is then the only source)."""
    from diagnose.adapters._common.source import fingerprint
    from diagnose.adapters.trackers.attach import describe_sources
    from diagnose.adapters.trackers.tables import validation_note, validation_rollouts, validation_states_note

    src.issues += issues
    if data is None:
        return
    has_rollouts = src.rollouts is not None and src.rollouts.select(pl.len()).collect().item() > 0
    src.issues += data.issues
    src.notes += data.notes
    src.info = data.info()
    src._fingerprint.setdefault("files", {}).update(fingerprint(src.format, src.path, data.files)["files"])
    val = validation_rollouts(data.tables)
    if val is not None:
        src.validation = val.lazy()
        src.notes += [n for n in (validation_note(data.tables), validation_states_note(val)) if n]
    layout = f"{src.format} layout {src.path}: " + ("rollouts" if has_rollouts else "no rollouts")
    src.sources = describe_sources(data, layout, "the trainer layout" if has_rollouts else None, has_rollouts)
