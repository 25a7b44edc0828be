"""How the watch shows itself: one status line that stays at the bottom of a terminal (rich
`Live`), or, without a terminal (a log file, a CI job), one plain line per new step; and the
alert, the same in both. Everything from the run (signal and token names, paths, errors) goes
through `rich.text.Text`, never markup."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.text import Text

from diagnose.scan.formatting import fmt_num, token_label
from diagnose.watch.watcher import Event

__all__ = ["Display", "alert_lines", "hook_line", "status_text"]


def _moving(moving: list[dict[str, Any]]) -> str:
    """``name ↑5.2σ``; beyond 99 sigmas (a flat baseline) ``>99σ``."""
    return ", ".join(f"{m['signal']} {'↑' if m['z'] > 0 else '↓'}"
                     f"{'>99' if abs(m['z']) > 99 else format(abs(m['z']), '.1f')}σ" for m in moving)


def _ago(seconds: float) -> str:
    return f"{seconds:.0f}s" if seconds < 120 else f"{seconds / 60:.0f}min" if seconds < 7200 else f"{seconds / 3600:.0f}h"


def status_text(run: str, step: dict[str, Any] | None, note: str | None = None, age: float | None = None) -> str:
    """The status line: run, last step (and how long ago it came, ``age``), the primary
    signal's value, the signals moving."""
    parts = [f"watching {run}"]
    if step is not None:
        parts.append(f"step {step['step']} ({step['n_steps']} steps" + (f", {_ago(age)} ago)" if age else ")"))
        parts.append(f"{step['signal']} {fmt_num(step['value'])}")
        if step["moving"]:
            parts.append("moving: " + _moving(step["moving"]))
        if step["verdict"] == "collapse":
            parts.append("COLLAPSED")
        if step.get("issues"):
            parts.append(f"{step['issues']} input problem(s)")
    if note:
        parts.append(note)
    return " · ".join(parts)


def alert_lines(ev: Event) -> list[str]:
    """The alert of an ``episode`` event: onset, what moved first and by how much earlier, the
    implicated control tokens, the report and the hook."""
    d = ev.data
    lines = [f"COLLAPSE in {d['run']}: {d['signal']} {fmt_num(d['pre_level'])} -> {fmt_num(d['trough_value'])} "
             f"from step {d['onset_step']} (detected at step {d['detected_step']}, seen at step {d['seen_at_step']})"]
    if d["leading"]:
        lines.append("  moved first: " + ", ".join(
            f"{m['signal']} ({m['direction']}, {m['lead']} step(s) before)" for m in d["leading"][:5]))
    else:
        lines.append(f"  moved first: nothing before {d['signal']} itself")
    if d["implicated"]:
        lines.append("  implicated control tokens: " + ", ".join(
            f"{token_label(t['token'], t['text'])} at {t['context']}" for t in d["implicated"][:5]))
    if d.get("report"):
        lines.append(f"  report: {d['report']}")
    return lines


def hook_line(hook: dict[str, Any]) -> str:
    """What the ``--on-collapse`` command did (printed after it ran)."""
    err = f", {hook['error']}" if hook.get("error") else ""
    return f"  ran: {hook['cmd']} (exit {hook['returncode']}{err})"


class Display:
    """``live``: a rich status line (a terminal); else plain lines."""

    def __init__(self, console: Console, run: str, live: bool | None = None) -> None:
        self.console = console
        self.run = run
        self.live_mode = console.is_terminal if live is None else live
        self.live: Live | None = None
        self.step: dict[str, Any] | None = None
        self.polled = time.monotonic()
        self.step_at = time.monotonic()  # when the last new step was seen
        self.note: str | None = None

    def __enter__(self) -> Display:
        if self.live_mode:
            self.live = Live(self._render(), console=self.console, transient=True, auto_refresh=False)
            self.live.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None

    def _render(self) -> Text:
        ago = time.monotonic() - self.polled
        note = self.note or (f"polled {ago:.0f}s ago" if ago >= 1 else None)
        age = time.monotonic() - self.step_at
        return Text(status_text(self.run, self.step, note, age if age >= 1 else None), overflow="ellipsis",
                    no_wrap=True)

    def refresh(self, note: str | None = None) -> None:
        """After a poll: the status line with ``note`` (waiting / retrying), if any."""
        self.polled, self.note = time.monotonic(), note
        if self.live is not None:
            self.live.update(self._render(), refresh=True)

    def tick(self) -> None:
        if self.live is not None:
            self.live.update(self._render(), refresh=True)

    def show(self, ev: Event) -> None:
        """An event: a step updates the status (plain: prints it), the others print lines."""
        if ev.kind == "step":
            self.step, self.step_at = ev.data, time.monotonic()
            if self.live is None:
                self.line(status_text(self.run, self.step))
        elif ev.kind == "episode":
            for i, s in enumerate(alert_lines(ev)):
                self.line(s, style="bold red" if i == 0 else None)
        elif ev.kind == "recovered":
            self.line(f"recovered: the collapse from step {ev.data['onset_step']} recovered at step "
                      f"{ev.data['recovery_step']}", style="green")
        elif ev.kind == "restarted":
            self.line(f"restarted: the run went back from step {ev.data['previous_step']} to {ev.data['step']}"
                      + (f" ({', '.join(ev.data['shrunk_files'])} shrank)" if ev.data["shrunk_files"] else "")
                      + "; re-read", style="yellow")
        elif ev.kind == "waiting":
            self.line(f"waiting: {ev.data['reason']}", style="dim")
        elif ev.kind == "error":
            self.line(f"scan failed, retrying: {ev.data['error']}", style="yellow")
        elif ev.kind == "issue":
            where = f"{ev.data['path']}:{ev.data['line']}" if ev.data["line"] else ev.data["path"]
            self.line(f"skipped {where}: {ev.data['message']}", style="yellow")

    def line(self, s: str, style: str | None = None) -> None:
        self.console.print(Text(s, style=style or ""), soft_wrap=True, highlight=False)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """The status line off while a hook writes to the terminal."""
        if self.live is None:
            yield
            return
        self.live.stop()
        try:
            yield
        finally:
            self.live.start()
