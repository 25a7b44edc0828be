"""The watch loop: poll, show, act, sleep, until stopped (Ctrl-C, SIGTERM, ``stop``) or, with
``exit_on_collapse``, after the first collapse's hook."""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from diagnose.watch.actions import EventLog, hook_env, report_dir, run_hook, write_report
from diagnose.watch.display import Display, hook_line
from diagnose.watch.watcher import Event, Watcher, WatchTarget

__all__ = ["EXIT_COLLAPSE", "EXIT_OK", "WatchConfig", "WatchSetupError", "run_watch"]

EXIT_OK, EXIT_COLLAPSE = 0, 1


class WatchSetupError(ValueError):
    """The watch cannot start as asked (e.g. its event log inside the run)."""


@dataclass
class WatchConfig:
    """How the watch runs (what it watches is the `WatchTarget`).

    ``interval``: seconds between polls (an idle poll is a stat walk of the run);
    ``on_collapse``: a shell command run once per new episode (variables in
    `diagnose.watch.actions`); ``exit_on_collapse``: stop after the first episode's command, exit
    code 1; ``json_events``: append one JSON line per event there; ``reports``: where episode
    reports go (default `diagnose.watch.actions.report_dir`, outside the run); ``settle``:
    seconds a file must stay unchanged before its issues are reported; ``hook_timeout``: seconds
    the command may run; ``max_polls``: stop after this many polls (None: never)."""

    interval: float = 5.0
    on_collapse: str | None = None
    exit_on_collapse: bool = False
    json_events: Path | None = None
    reports: Path | None = None
    settle: float = 30.0
    hook_timeout: float = 600.0
    max_polls: int | None = None
    max_cpu: float = 0.02


def _report(ev: Event, cfg: WatchConfig, target: WatchTarget, display: Display) -> Path | None:
    """An episode's JSON report (outside the run), its path also in the event."""
    folder = cfg.reports or report_dir(target.path, target.run)
    report = None
    try:
        report = write_report(folder, ev)
    except OSError as e:
        display.line(f"cannot write the report to {folder}: {e.strerror or e}", style="yellow")
    ev.data["report"] = str(report) if report is not None else None
    return report


def _hook(ev: Event, report: Path | None, cfg: WatchConfig, display: Display) -> None:
    """The user's command, after the alert is on screen; its exit code in the event."""
    with display.paused():
        ev.data["hook"] = hook = run_hook(cfg.on_collapse, hook_env(ev, report), cfg.hook_timeout)
    display.line(hook_line(hook), style=None if hook["returncode"] == 0 else "yellow")


def run_watch(target: WatchTarget, cfg: WatchConfig, display: Display, stop: threading.Event | None = None) -> int:
    """Follow ``target`` until stopped; returns the exit code (``EXIT_COLLAPSE`` when
    ``exit_on_collapse`` ended it). Ctrl-C and SIGTERM (main thread) end it cleanly with a
    ``stopped`` event."""
    stop = stop or threading.Event()
    _outside_run(target, cfg)
    watcher = Watcher(target, settle=cfg.settle, max_cpu=cfg.max_cpu)
    try:
        log = EventLog(cfg.json_events)
    except OSError as e:
        raise WatchSetupError(f"cannot open --json-events {cfg.json_events}: {e.strerror or e}") from None
    code, reason = EXIT_OK, "stopped"
    restore = _on_sigterm(stop)
    log.write(Event("started", {"run": str(target.path), "interval": cfg.interval, "pid": os.getpid()}))
    polls = 0
    try:
        with display:
            while not stop.is_set():
                t0 = time.monotonic()
                events = watcher.poll()
                polls += 1
                for ev in events:
                    report = _report(ev, cfg, target, display) if ev.kind == "episode" else None
                    display.show(ev)
                    if ev.kind == "episode" and cfg.on_collapse:
                        _hook(ev, report, cfg, display)
                    log.write(ev)
                    if ev.kind == "episode" and cfg.exit_on_collapse:
                        code, reason = EXIT_COLLAPSE, "collapse"
                        stop.set()
                display.refresh(_note(watcher))
                if cfg.max_polls is not None and polls >= cfg.max_polls:
                    reason = "max_polls"
                    break
                while not stop.wait(min(1.0, max(0.0, cfg.interval - (time.monotonic() - t0)))):
                    if time.monotonic() - t0 >= cfg.interval:
                        break
                    display.tick()
    except KeyboardInterrupt:
        reason = "interrupted"
    finally:
        restore()
        log.write(Event("stopped", {"reason": reason, "polls": polls, "scans": watcher.scans,
                                    "step": watcher.last_step, "episodes": len(watcher.known)}))
        log.close()
    return code


def _outside_run(target: WatchTarget, cfg: WatchConfig) -> None:
    """The event log and the reports must not be written in the run: the watch would see its
    own writes as the run changing (and an adapter might read them)."""
    from diagnose.scan import cache

    root = cache.run_root(cache.abs_path(target.path))
    for what, p in (("--json-events", cfg.json_events), ("the reports folder", cfg.reports)):
        if p is not None and root.is_dir() and cache.abs_path(p).is_relative_to(root):
            raise WatchSetupError(f"{what} {p} is inside the run {target.path}: write it elsewhere "
                                  "(the watch writes nothing in the run but the scan cache)")


def _note(w: Watcher) -> str | None:
    if w.waiting:
        return f"waiting: {w.waiting}"
    if w.error:
        return f"retrying ({w.error[:120]})"
    wait = w.next_scan - time.monotonic()
    if wait > 1 and w.tree is not None:
        return f"next re-scan in {wait:.0f}s at most (--max-cpu)"
    return None


def _on_sigterm(stop: threading.Event):
    """SIGTERM (a job scheduler ending the watch) stops it like Ctrl-C; returns the undo."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    old = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    return lambda: signal.signal(signal.SIGTERM, old)
