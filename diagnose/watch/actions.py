"""What the watch does with an event besides showing it: the JSON event log, the episode's JSON
report, and the user's ``--on-collapse`` command.

The command gets the facts in environment variables (never interpolated into the command line
by us: token texts are model output):

* ``DIAGNOSE_RUN``: the run path as given; ``DIAGNOSE_ONSET_STEP``, ``DIAGNOSE_DETECTED_STEP``;
  ``DIAGNOSE_SEEN_AT_STEP``: the run's last step when the watch saw the collapse;
* ``DIAGNOSE_FIRST_MOVER`` (and ``DIAGNOSE_FIRST_MOVER_LEAD``): the signal that moved first and
  how many steps before the onset (the primary signal and 0 when nothing moved earlier);
* ``DIAGNOSE_SIGNAL``: the primary signal that dropped; ``DIAGNOSE_IMPLICATED``: the implicated
  control tokens' texts, comma-separated;
* ``DIAGNOSE_REPORT``: the episode's JSON report (the scan result, ``diagnose scan --json``'s
  schema, plus a ``watch`` object), written outside the run (`report_dir`).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import IO, Any

from diagnose.atomic import atomic_write_json
from diagnose.scan import cache
from diagnose.watch.watcher import Event

__all__ = ["EventLog", "hook_env", "report_dir", "run_hook", "write_report"]


class EventLog:
    """``--json-events FILE``: one JSON object per line, appended and flushed per event (a
    reader tailing the file never sees half an event for long; the file is the user's, so it
    is appended to, never truncated)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.fh: IO[str] | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.fh = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def write(self, event: Event) -> None:
        if self.fh is not None:
            self.fh.write(json.dumps(event.to_json(), ensure_ascii=False, default=str) + "\n")
            self.fh.flush()

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None


def report_dir(path: Path, run: str | None = None) -> Path:
    """Where episode reports go by default: ``$DIAGNOSE_HOME/watch/<hash>/`` (else
    ``~/.cache/collapse-diagnostics/watch/<hash>/``), never inside the run."""
    return cache.home_cache_dir(cache.run_root(cache.abs_path(path)), run, kind="watch")


def write_report(folder: Path, event: Event) -> Path:
    """The episode's JSON report: the scan result and the watch's view of the episode."""
    assert event.result is not None and event.episode is not None
    data = {**event.result.to_json(), "watch": event.data}
    return atomic_write_json(folder / f"episode-onset-{event.episode.onset_step}.json", data, fsync=False)


def hook_env(event: Event, report: Path | None) -> dict[str, str]:
    """The ``DIAGNOSE_*`` variables of an ``episode`` event (see the module docstring)."""
    d = event.data
    texts = [t["text"] or t["token"] for t in d.get("implicated", [])]
    return {
        "DIAGNOSE_RUN": str(d["run"]), "DIAGNOSE_ONSET_STEP": str(d["onset_step"]),
        "DIAGNOSE_DETECTED_STEP": str(d["detected_step"]), "DIAGNOSE_SEEN_AT_STEP": str(d["seen_at_step"]),
        "DIAGNOSE_FIRST_MOVER": str(d["first_mover"]), "DIAGNOSE_FIRST_MOVER_LEAD": str(d["first_mover_lead"]),
        "DIAGNOSE_SIGNAL": str(d["signal"]), "DIAGNOSE_IMPLICATED": ",".join(texts),
        "DIAGNOSE_REPORT": str(report) if report is not None else "",
    }


def run_hook(cmd: str, env: dict[str, str], timeout: float) -> dict[str, Any]:
    """Run the user's command through the shell (it is their command line: ``scancel $JOB``),
    with ``env`` added; returns ``{cmd, returncode}`` (-1 and ``error`` when it could not run
    or timed out). Its output goes to the watch's own stdout/stderr."""
    try:
        proc = subprocess.run(cmd, shell=True, env={**os.environ, **env}, timeout=timeout, check=False)  # noqa: S602
    except subprocess.TimeoutExpired:
        return {"cmd": cmd, "returncode": -1, "error": f"timed out after {timeout:g} s"}
    except OSError as e:
        return {"cmd": cmd, "returncode": -1, "error": str(e.strerror or e)}
    return {"cmd": cmd, "returncode": proc.returncode}
