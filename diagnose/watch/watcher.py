"""`Watcher`: one poll of a run that is still being written, as a list of events.

Why a poll is cheap: the watch compares a stat walk of the run (`diagnose.scan.cache.run_tree`,
sizes and modification times, no file opened) with the last one and calls `scan_run` only when
something changed; `scan_run` then recomputes only the changed files' steps from its cache
(docs/scan.md, "Incremental"). So an idle poll costs a directory walk, a poll after a new step
one incremental re-scan, and nothing read is read again.

What a run being written looks like, and what the watcher does about it:

* a half-written last JSONL line, a Parquet file still being written: the adapter reports the
  file as an issue. A scan with a *new* issue (not in the last scan shown) in a file modified
  less than ``MID_WRITE_S`` ago is not shown at all, for at most ``MID_WRITE_S`` (the file is mid-write: a half line can make an adapter read the run
  differently, e.g. verl's dumps past its metrics' last step look abandoned); it is redone at
  the next poll. An issue in a file modified less than ``settle`` seconds ago is *pending*,
  never shown; the file is re-read when it changes (its size or mtime moves);
* a restart or resume (verl opens its file logger with ``"wb"``: the file shrinks; a native run
  resumed truncates its metrics and drops the steps after its checkpoint): a file that shrank,
  or a last step that went back while files were removed, is a ``restarted`` event; the changed
  files are re-read like any other change;
* a run not yet there (the trainer has not written its first file): ``waiting``, retried;
* anything else that fails mid-write (a file renamed away between the walk and the read): the
  poll is retried next time, the error kept for the status line.

Episodes are matched across polls by their span (the onset is refined as steps arrive), so one
collapse gives one ``episode`` event however often it is re-detected.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from diagnose.scan import cache
from diagnose.scan.detect import DetectConfig, robust_zscores
from diagnose.scan.names import is_bookkeeping, is_context_count
from diagnose.scan.result import CollapseEpisode, RunScanResult
from diagnose.source import SourceIssue

__all__ = ["Event", "Watcher", "WatchTarget", "first_mover", "moving_signals"]

#: a signal is "moving" when its last value is this many robust sigmas off its trailing baseline
MOVING_Z = 3.0
MAX_MOVING = 3
#: a scan with a new issue in a file modified this recently is not shown (the file is mid-write),
#: for at most this long
MID_WRITE_S = 2.0


@dataclass(frozen=True)
class WatchTarget:
    """What to watch and how to scan it (the options of `diagnose.scan.run.scan_run`)."""

    path: Path
    format: str | None = None
    metrics: Path | None = None
    run: str | None = None
    tokenizer: str | None = None
    cfg: DetectConfig = field(default_factory=DetectConfig)

    def scan_kwargs(self) -> dict[str, Any]:
        return {"format": self.format, "cfg": self.cfg, "metrics": self.metrics, "run": self.run,
                "tokenizer": self.tokenizer}


@dataclass
class Event:
    """One thing the watch saw: ``kind`` in ``started``, ``step``, ``episode``, ``recovered``,
    ``restarted``, ``issue``, ``waiting`` (the run is not there yet), ``error`` (a scan failed: retried
    at the next poll), ``stopped``; ``data``: its JSON fields. ``waiting`` and ``error`` are
    raised once per new reason."""

    kind: str
    data: dict[str, Any]
    episode: CollapseEpisode | None = None  # ``episode`` / ``recovered``
    result: RunScanResult | None = None  # the scan that raised it

    def to_json(self) -> dict[str, Any]:
        return {"event": self.kind, "time": round(time.time(), 3), **self.data}


def moving_signals(result: RunScanResult, cfg: DetectConfig, n: int = MAX_MOVING) -> list[dict[str, Any]]:
    """The signals whose last value is ``MOVING_Z`` robust sigmas or more off their trailing
    baseline (``cfg.window`` points before it), largest first: ``{signal, z, value}``."""
    sig = result.signals
    if sig.height < cfg.min_periods + 1:
        return []
    names = [c for c, t in sig.schema.items() if c != "step" and t.is_numeric() and not is_bookkeeping(c)
             and not is_context_count(c)]
    tail = sig.tail(cfg.window + 1).select(names).cast(pl.Float64).to_numpy()  # one conversion, all columns
    out = []
    for j, name in enumerate(names):
        v = tail[:, j]
        if not np.isfinite(v[-1]) or np.isfinite(v).sum() < cfg.min_periods + 1:
            continue
        z = float(robust_zscores(v, cfg)[-1])
        if np.isfinite(z) and abs(z) >= MOVING_Z:
            out.append({"signal": name, "z": round(z, 2), "value": float(v[-1])})
    out.sort(key=lambda m: -abs(m["z"]))
    return out[:n]


def first_mover(e: CollapseEpisode) -> tuple[str, int]:
    """The signal that moved first before the episode's onset (the scan's `leading` order:
    earliest first) and its lead in steps; the primary signal itself (lead 0) when nothing moved
    before it."""
    lead = e.leading
    return (lead[0].signal, lead[0].lead) if lead else (e.signal, 0)


def _same_episode(a: CollapseEpisode, b: CollapseEpisode, cfg: DetectConfig) -> bool:
    """Whether two detections are one collapse: their spans (the onset widened by the refine
    window, since the onset is refined as steps arrive) overlap."""
    return a.onset_step - cfg.refine_window <= b.end_step and b.onset_step - cfg.refine_window <= a.end_step


def cpu_seconds() -> float:
    """CPU seconds of this process and of the child processes it has waited for: a scan's readers
    run on a process pool (`diagnose.adapters._common.stream`) whose workers end with the load, so
    their CPU counts against ``max_cpu`` too."""
    try:
        import resource
    except ImportError:  # not Unix: this process only
        return time.process_time()
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

class Watcher:
    """Follows one run; `poll` returns what changed since the last poll (see the module
    docstring). ``settle``: seconds a file must stay unchanged before an issue in it is
    reported (shorter-lived ones are files being written). ``max_cpu``: a share of one core;
    after a scan that took ``c`` CPU seconds, changes wait ``c / max_cpu`` seconds before the
    next (idle polls go on: a stat walk); None or 0: scan at every change."""

    def __init__(self, target: WatchTarget, settle: float = 30.0, max_cpu: float | None = None) -> None:
        self.target = target
        from diagnose.adapters._common.stream import keep_in_process

        keep_in_process()  # a re-scan reads from disk only the memo entries of step files it has not seen
        self.settle = settle
        self.max_cpu = max_cpu or None
        self.next_scan = 0.0  # monotonic time before which a change waits (the CPU budget)
        self.root = cache.run_root(cache.abs_path(target.path))
        self.extra: list[str] = [str(cache.abs_path(target.metrics))] if target.metrics is not None else []
        self.tree: dict[str, list[int]] | None = None  # the walk of the last scan shown
        self.result: RunScanResult | None = None
        self.last_step: int | None = None
        self.known: list[CollapseEpisode] = []  # episodes alerted, latest detection of each
        self.reported_issues: set[tuple[str, int | None, str]] = set()
        self.pending: list[SourceIssue] = []
        self.error: str | None = None  # the last poll's failure, retried
        self.waiting: str | None = None  # the run is not there yet
        self.scans = 0
        self.held_since: float | None = None  # since when scans are held back: a file was mid-write
        self.shown_issues: set[tuple[str, int | None, str]] = set()  # the issues of the last scan shown
        self.retry = False  # re-scan at the next poll even if nothing changed

    # -- one poll ------------------------------------------------------------------------------

    def poll(self) -> list[Event]:
        """Walk the run; re-scan it if anything changed; return the events."""
        tree = cache.run_tree(self.root, self.extra)
        if (tree is not None and tree == self.tree and not self.retry) or time.monotonic() < self.next_scan:
            return self._settled_issues()
        cpu = cpu_seconds()
        before = (self.waiting, self.error)
        result = self._scan()
        if self.max_cpu is not None and (self.scans or self.error):  # the next scan waits until this one's
            # CPU fits the budget (not after the first: building the cache is paid once)
            self.next_scan = time.monotonic() + (cpu_seconds() - cpu) / self.max_cpu
        if result is None:  # waiting: rescan when the folder changes; an error: retry at the next poll
            self.retry = self.waiting is None
            if self.waiting:
                self.tree = tree
            if (self.waiting, self.error) == before:
                return []  # said already
            return [Event("waiting", {"reason": self.waiting}) if self.waiting else Event("error", {"error": self.error})]
        self.scans += 1
        if self._mid_write(result):
            self.retry = True  # redo at the next poll
            return []
        self.held_since, self.retry = None, False
        self.shown_issues = {self._key(i) for i in result.issues}
        shrunk = self._shrunk(tree)
        removed = self.tree is not None and tree is not None and bool(set(self.tree) - set(tree))
        self.tree, self.result = tree, result
        events = self._step_events(result, shrunk, removed)
        events += self._episode_events(result)
        self.pending = [i for i in result.issues if self._key(i) not in self.reported_issues]
        events += self._settled_issues()
        return events

    def _mid_write(self, result: RunScanResult) -> bool:
        """Whether to hold the scan back: a new issue in a file just modified (a half line, a
        Parquet file without its footer yet), for at most ``MID_WRITE_S`` in a row. An issue
        already shown (a file that stays bad while it grows) holds nothing back."""
        now = time.monotonic()
        if self.held_since is not None and now - self.held_since >= MID_WRITE_S:
            return False
        if any(self._key(i) not in self.shown_issues and self._age(i) < MID_WRITE_S for i in result.issues):
            self.held_since = self.held_since if self.held_since is not None else now
            return True
        return False

    def _scan(self) -> RunScanResult | None:
        from diagnose.adapters import AmbiguousRun, UnknownRunLayout
        from diagnose.rundir.schema import RunFormatError
        from diagnose.scan.run import scan_run

        try:
            result = scan_run(self.target.path, **self.target.scan_kwargs())
        except AmbiguousRun:
            raise  # the user must choose a run: no point in retrying
        except UnknownRunLayout as e:
            self.waiting = str(e).splitlines()[0].split(" Looked for:")[0]
            return None
        except RunFormatError:
            raise
        except Exception as e:  # noqa: BLE001 - a file changed under the reader: retry next poll
            self.error = f"{type(e).__name__}: {e}"
            return None
        self.waiting = self.error = None
        return result

    def _shrunk(self, tree: dict[str, list[int]] | None) -> list[str]:
        """Files that got smaller since the last walk (a trainer that truncated its log on restart)."""
        if self.tree is None or tree is None:
            return []
        return sorted(k for k, (size, _) in tree.items() if k in self.tree and 0 <= size < self.tree[k][0])

    # -- what the scan says --------------------------------------------------------------------

    def _step_events(self, result: RunScanResult, shrunk: list[str], removed: bool) -> list[Event]:
        steps = result.signals.get_column("step") if "step" in result.signals.columns else None
        last = int(steps.max()) if steps is not None and len(steps) else None
        events = []
        went_back = removed and last is not None and self.last_step is not None and last < self.last_step
        if shrunk or went_back:
            events.append(Event("restarted", {"previous_step": self.last_step, "step": last, "shrunk_files": shrunk}))
        if last is not None and last != self.last_step:
            events.append(Event("step", self.status(result, last), result=result))
        self.last_step = last
        return events

    def status(self, result: RunScanResult, last: int) -> dict[str, Any]:
        """The one-line status as data: step, primary signal's last value, moving signals."""
        name = result.primary_signal or "reward"
        value = None
        if name in result.signals.columns:
            col = result.signals.filter(result.signals["step"] == last).get_column(name)
            value = float(col[0]) if len(col) and col[0] is not None and np.isfinite(col[0]) else None
        return {"step": last, "n_steps": int(result.signals.height), "signal": name, "value": value,
                "verdict": result.verdict, "moving": moving_signals(result, self.target.cfg),
                "issues": len(self.reported_issues), "scan": result.cache.signals}

    def _episode_events(self, result: RunScanResult) -> list[Event]:
        events = []
        cfg = self.target.cfg
        for e in result.episodes:
            match = next((i for i, k in enumerate(self.known) if _same_episode(k, e, cfg)), None)
            if match is None:
                self.known.append(e)
                events.append(Event("episode", self.episode_data(e), episode=e, result=result))
                continue
            old = self.known[match]
            self.known[match] = e
            if e.recovery_step is not None and old.recovery_step is None:
                events.append(Event("recovered", {"onset_step": e.onset_step, "recovery_step": e.recovery_step,
                                                  "step": self.last_step}, episode=e, result=result))
        return events

    def episode_data(self, e: CollapseEpisode) -> dict[str, Any]:
        mover, lead = first_mover(e)
        return {
            "run": str(self.target.path), "onset_step": e.onset_step, "detected_step": e.detected_step,
            "seen_at_step": self.last_step, "signal": e.signal, "pre_level": e.pre_level,
            "trough_value": e.trough_value, "first_mover": mover, "first_mover_lead": lead,
            "leading": [{"signal": m.signal, "lead": m.lead, "direction": m.direction} for m in e.leading],
            "implicated": [{"token": t.token, "text": t.text, "context": t.context, "score": t.score}
                           for t in e.implicated],
        }

    # -- issues: pending while their file is being written --------------------------------------

    @staticmethod
    def _key(i: SourceIssue) -> tuple[str, int | None, str]:
        return (str(i.path), i.line, i.message)

    def _age(self, i: SourceIssue) -> float:
        """Seconds since the issue's file was modified (inf: gone)."""
        p = Path(i.path) if os.path.isabs(i.path) else self.root / i.path
        try:
            return time.time() - p.stat().st_mtime
        except OSError:
            return float("inf")

    def _settled_issues(self) -> list[Event]:
        """The pending issues whose file has not changed for ``settle`` seconds (or is gone)."""
        if not self.pending:
            return []
        out, still = [], []
        for i in self.pending:
            if self._age(i) < self.settle:
                still.append(i)
                continue
            self.reported_issues.add(self._key(i))
            out.append(Event("issue", {"path": str(i.path), "line": i.line, "message": i.message}))
        self.pending = still
        return out
