"""TensorBoard event files, read with tensorboard's own ``EventAccumulator``, every point kept.

What writes them (read in the source):

* transformers ``TensorBoardCallback`` (``integrations/integration_utils.py``): a
  ``torch.utils.tensorboard.SummaryWriter`` at ``$TENSORBOARD_LOGGING_DIR``, else
  ``<output_dir>/runs/<%b%d_%H-%M-%S>_<host>/``; ``on_log`` writes every number of the logs as
  ``add_scalar(rewrite_logs(k), v, state.global_step)`` (``train/<k>``, ``eval/<k>``), strings as
  ``add_text`` (``args`` and ``model_config`` at ``on_train_begin``).
* verl ``Tracking`` with ``tensorboard`` (``verl/utils/tracking.py`` ``_TensorboardAdapter``):
  ``$TENSORBOARD_DIR``, else ``tensorboard_log/<project>/<experiment>/``,
  ``add_scalar(key, value, global_steps)`` under verl's raw keys; ``val/generations`` as text.

``EventAccumulator`` keeps a deterministic random sample of 10,000 points per scalar tag by
default (``DEFAULT_SIZE_GUIDANCE``, reservoir sampling, ``event_accumulator.py``); here
``size_guidance={SCALARS: 0, TENSORS: 0}`` keeps them all. The reader swallows a truncated or
corrupt record at the end of a file (``event_file_loader.py``: ``DataLossError`` logged at debug
level, reading stops there) and purges the points of an earlier launch past a restart's first
step (``purge_orphaned_data``, a warning): both are caught from its logger and named here.
"""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from collections.abc import Iterator
from pathlib import Path

import polars as pl

from diagnose.adapters._common.io import subdirs, visible_files
from diagnose.adapters._common.issues import IssueLog
from diagnose.adapters.trackers.run import TrackerRun, empty_metrics

__all__ = ["EVENTS", "find_runs", "is_events_dir", "read_run"]

EVENTS = re.compile(r"^events\.out\.tfevents\.")
#: where trainers put their event folders, below a launch or output folder
_ROOTS = ("runs", "tensorboard_log")
_MAX_DEPTH = 3


def events_files(d: Path) -> list[Path]:
    return [f for f in visible_files(d) if EVENTS.match(f.name)]


def is_events_dir(d: Path) -> bool:
    return d.is_dir() and bool(events_files(d))


def find_runs(p: Path) -> list[Path]:
    """Folders holding event files at ``p``: ``p`` itself, or below ``p`` (``runs/<date>_<host>``
    of transformers, ``tensorboard_log/<project>/<experiment>`` of verl, the same under an output
    folder one level down), at most three levels deep. An events file: its folder."""
    if p.is_file():
        return [p.parent] if EVENTS.match(p.name) else []
    if is_events_dir(p):
        return [p]
    out: list[Path] = []
    todo = [(p, 0)]
    while todo:
        d, depth = todo.pop()
        for s in subdirs(d):
            if is_events_dir(s):
                out.append(s)
            elif depth + 1 < _MAX_DEPTH and (depth > 0 or s.name in _ROOTS or any((s / r).is_dir() for r in _ROOTS)):
                todo.append((s, depth + 1))
    return sorted(out)


class _Catch(logging.Handler):
    """Collects what tensorboard's loader says about lost data."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lost: list[str] = []
        self.purged: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if msg.startswith("Truncated record in"):
            self.lost.append(msg)
        elif "Purging" in msg or "out of order" in msg:
            self.purged.append(msg)


@contextmanager
def _listening() -> Iterator[_Catch]:
    log = logging.getLogger("tensorboard")
    handler, level, propagate = _Catch(), log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    log.propagate = False
    try:
        yield handler
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        log.propagate = propagate


def accumulator(d: Path):  # noqa: ANN201 - tensorboard's type, imported lazily
    """``EventAccumulator`` over ``d`` keeping every scalar and tensor point."""
    from tensorboard.backend.event_processing import event_accumulator as ea

    return ea.EventAccumulator(str(d), size_guidance={ea.SCALARS: 0, ea.TENSORS: 0, ea.IMAGES: 1, ea.AUDIO: 1,
                                                      ea.HISTOGRAMS: 1, ea.COMPRESSED_HISTOGRAMS: 1})


def _scalar_series(acc, tag: str, kind: str) -> tuple[list[int], list[float]]:  # noqa: ANN001
    if kind == "scalars":
        events = acc.Scalars(tag)
        return [e.step for e in events], [float(e.value) for e in events]
    from tensorboard.util import tensor_util

    steps, values = [], []
    for e in acc.Tensors(tag):
        arr = tensor_util.make_ndarray(e.tensor_proto)
        if arr.size == 1 and arr.dtype.kind in "fiub":
            steps.append(e.step)
            values.append(float(arr.reshape(-1)[0]))
    return steps, values


def read_run(d: Path, root: Path | None = None) -> TrackerRun:
    """Every scalar point of the event files in ``d`` (several files: one per launch, read in
    order), one row per step (a step written twice: the later point wins). ``root``: the folder
    the run was found from (its name is ``d`` relative to it)."""
    issues = IssueLog()
    notes: list[str] = []
    files = events_files(d)
    name = str(d.relative_to(root)) if root is not None and d != root and d.is_relative_to(root) else d.name
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        issues.add(d, None, "TensorBoard event files, but tensorboard is not installed: "
                            "pip install 'collapse-diagnostics[trackers]'; not read")
        return TrackerRun("tensorboard", d, name, empty_metrics(), issues=issues.finish(), files=files)
    series: dict[str, tuple[list[int], list[float]]] = {}
    with _listening() as heard:
        acc = accumulator(d)
        try:
            acc.Reload()
        except Exception as e:  # noqa: BLE001 - a reader error on a user file: report, keep what was read
            issues.add(d, None, f"tensorboard's reader stopped ({type(e).__name__}: {str(e)[:200]}); points before "
                                "it kept")
        tags = acc.Tags()
        for kind in ("scalars", "tensors"):
            for tag in tags.get(kind, []):
                if tag not in series:
                    s = _scalar_series(acc, tag, kind)
                    if s[0]:
                        series[tag] = s
        texts = [t for t in tags.get("tensors", []) if t.endswith("/text_summary")]
    for msg in heard.lost:
        f = next((x for x in files if str(x) in msg), d)
        issues.add(f, None, "the events file ends in a truncated or corrupt record (cut, or still being written): "
                            "the points before it are read, the rest of the file is lost")
    if heard.purged:
        notes.append(f"{d}: a restart wrote steps again; tensorboard purged the earlier launch's points past the "
                     "restart step (purge_orphaned_data)")
    if texts:
        notes.append(f"TensorBoard text logged under {', '.join(sorted(t.rsplit('/', 1)[0] for t in texts)[:5])} is not "
                     "read (transformers' args / model_config, verl's val/generations as text)")
    return TrackerRun("tensorboard", d, name, _frame(series), step_from="the event step (global_step)",
                      issues=issues.finish(), notes=notes, files=files)


def _frame(series: dict[str, tuple[list[int], list[float]]]) -> pl.DataFrame:
    """One row per step, one column per tag (the last point of a step wins)."""
    if not series:
        return empty_metrics()
    frames = [pl.DataFrame({"step": pl.Series(s, dtype=pl.Int64), tag: pl.Series(v, dtype=pl.Float64)})
              .unique("step", keep="last", maintain_order=True) for tag, (s, v) in series.items()]
    out = frames[0]
    for f in frames[1:]:
        out = out.join(f, on="step", how="full", coalesce=True)
    return out.sort("step").filter(pl.col("step") >= 0)
