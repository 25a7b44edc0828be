"""`diagnose watch` poll by poll (`diagnose.watch.Watcher`, deterministic: no timing) and its
command line: idle polls read nothing, files mid-write are neither reported nor fatal, a
truncated file that stays truncated is reported, a run not there yet is waited for, an episode
and its recovery are each reported once; the CLI's exit codes, hook, event log and signals.
The live tests (a trainer writing while the watch runs) are in tests/test_watch_live.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from io import StringIO
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from _live_writers import LiveWriter
from diagnose.cli import app
from diagnose.watch import Watcher, WatchTarget
from diagnose.watch import watcher as watcher_mod
from diagnose.watch.display import Display, alert_lines, hook_line, status_text
from diagnose.watch.watcher import Event

pytestmark = pytest.mark.usefixtures("diagnose_home")


@pytest.fixture(scope="module")
def collapsed_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished native run, collapse at step 14, recovery at 20 (read-only for tests)."""
    from diagnose.synth.native import write_synthetic_run

    path = tmp_path_factory.mktemp("watch") / "src"
    write_synthetic_run(path, steps=30, collapse_at=14, recover_at=20, samples_per_step=16, tokens_per_sample=48)
    return path


@pytest.fixture(scope="module")
def verl_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from diagnose.synth.foreign import write_verl_run

    path = tmp_path_factory.mktemp("watch") / "verl"
    write_verl_run(path, steps=8)
    return path


def _grown(src: Path, run: Path, steps, style: str = "native") -> LiveWriter:
    """``run`` started and written up to ``steps`` (an iterable of steps) from ``src``."""
    w = LiveWriter(src, run, style, pause=0)
    w.start()
    for s in steps:
        w.write_step(s)
    return w


def _age(path: Path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_idle_polls_scan_nothing_and_new_steps_rescan_incrementally(tmp_path: Path, collapsed_run: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import diagnose.scan.run as scan_mod

    calls = []
    real = scan_mod.scan_run
    monkeypatch.setattr(scan_mod, "scan_run", lambda *a, **k: calls.append(1) or real(*a, **k))
    w = _grown(collapsed_run, tmp_path / "run", range(12))
    watcher = Watcher(WatchTarget(tmp_path / "run"))
    events = watcher.poll()
    assert [e.kind for e in events] == ["step"] and events[0].data["step"] == 11
    assert watcher.poll() == [] and watcher.poll() == [] and len(calls) == 1  # idle: a stat walk only
    w.write_step(12)
    assert [e.data["step"] for e in watcher.poll()] == [12]
    assert len(calls) == 2 and watcher.result.cache.signals == "incremental"
    assert watcher.result.cache.steps_recomputed == [12]


def test_episode_and_recovery_each_reported_once(tmp_path: Path, collapsed_run: Path) -> None:
    w = LiveWriter(collapsed_run, tmp_path / "run", "native", pause=0)
    w.start()
    watcher = Watcher(WatchTarget(tmp_path / "run"))
    seen = []
    for s in w.steps:
        w.write_step(s)
        seen += [(s, e) for e in watcher.poll() if e.kind in ("episode", "recovered")]
    assert [e.kind for _, e in seen] == ["episode", "recovered"]
    (at, ep), (at_rec, rec) = seen
    assert at == ep.data["seen_at_step"] <= 16 and abs(ep.data["onset_step"] - 14) <= 1
    assert rec.data["onset_step"] == ep.data["onset_step"] and rec.data["recovery_step"] >= 20
    assert ep.data["first_mover"] and ep.data["implicated"], ep.data


def test_half_written_metrics_line_is_pending_then_read(tmp_path: Path, verl_src: Path) -> None:
    """A verl file-logger line cut mid-write: no issue, no crash; once complete, its step is read.
    The same line left cut (a crashed writer) is reported once the file has settled."""
    w = _grown(verl_src, tmp_path / "run", range(4), "verl")
    log = next((tmp_path / "run").rglob("qwen2.5_grpo_tooluse.jsonl"))
    line = w.lines[log.relative_to(tmp_path / "run")][4][0]
    with open(log, "ab") as fh:
        fh.write(line[: len(line) // 2])
    watcher = Watcher(WatchTarget(tmp_path / "run"), settle=30)
    assert watcher.poll() == []  # mid-write (just modified): the scan is not shown
    _age(log, 10)  # no longer mid-write, not yet settled: pending, not reported
    events = watcher.poll()
    assert [e.kind for e in events] == ["step"] and not watcher.reported_issues and watcher.pending
    with open(log, "ab") as fh:
        fh.write(line[len(line) // 2:])
    events = watcher.poll()
    assert not [e for e in events if e.kind == "issue"] and not watcher.pending
    # left cut for good: reported once settled, once only
    with open(log, "ab") as fh:
        fh.write(b'{"step": 5, "da')
    _age(log, 60)
    events = watcher.poll()
    issues = [e for e in events if e.kind == "issue"]
    assert len(issues) == 1 and issues[0].data["path"].endswith("qwen2.5_grpo_tooluse.jsonl"), events
    assert "truncated" in issues[0].data["message"]
    assert watcher.poll() == []


def test_half_written_trl_parquet_is_retried(tmp_path: Path) -> None:
    """TRL writes completions Parquet in place (pandas ``to_parquet``): half a file, no footer."""
    from diagnose.synth.foreign import write_trl_run

    write_trl_run(tmp_path / "src", steps=6)
    w = LiveWriter(tmp_path / "src", tmp_path / "run", "trl", pause=0)
    w.start()
    for s in range(1, 5):
        w.write_step(s)
    watcher = Watcher(WatchTarget(tmp_path / "run"))
    assert watcher.poll()[-1].data["step"] == 4
    rel = Path("completions/completions_00005.parquet")
    data = (tmp_path / "src" / rel).read_bytes()
    (tmp_path / "run" / rel).write_bytes(data[: len(data) // 2])
    assert watcher.poll() == [] and watcher.retry  # mid-write: retried, nothing shown
    (tmp_path / "run" / rel).write_bytes(data)
    events = watcher.poll()
    assert [e.data["step"] for e in events if e.kind == "step"] == [5]
    assert not watcher.result.issues


def test_waits_for_a_run_not_yet_written(tmp_path: Path, collapsed_run: Path) -> None:
    watcher = Watcher(WatchTarget(tmp_path / "run"))
    events = watcher.poll()
    assert [e.kind for e in events] == ["waiting"] and "run" in events[0].data["reason"]
    _grown(collapsed_run, tmp_path / "run", range(3))
    assert [e.kind for e in watcher.poll()] == ["step"]


def test_display_escapes_and_shows_the_alert() -> None:
    out = StringIO()
    d = Display(Console(file=out, width=300), "runs/x", live=False)
    step = {"step": 7, "n_steps": 8, "signal": "reward", "value": 0.5, "verdict": "healthy", "issues": 0,
            "moving": [{"signal": "ctrl/[bold]x[/bold]/p", "z": 1e9, "value": 1.0}]}
    d.show(Event("step", step))
    ep = {"run": "runs/x", "onset_step": 14, "detected_step": 14, "seen_at_step": 15, "signal": "reward",
          "pre_level": 0.8, "trough_value": 0.1, "first_mover": "ctx/after_call_open/im_end", "first_mover_lead": 2,
          "leading": [{"signal": "ctx/after_call_open/im_end", "lead": 2, "direction": "up"}],
          "implicated": [{"token": "im_end", "text": "<|im_end|>", "context": "after_call_open", "score": 2.0}],
          "report": "/r/episode-onset-14.json"}
    d.show(Event("episode", ep))
    d.line(hook_line({"cmd": "kill 1", "returncode": 0}))
    text = out.getvalue()
    assert "ctrl/[bold]x[/bold]/p ↑>99σ" in text and "step 7 (8 steps)" in text
    assert alert_lines(Event("episode", ep))[0] in text
    assert "ctx/after_call_open/im_end (up, 2 step(s) before)" in text and "<|im_end|> at after_call_open" in text
    assert "ran: kill 1 (exit 0)" in text
    assert "waiting" in status_text("runs/x", None, "waiting: no run yet")


def _env() -> dict[str, str]:
    root = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}


HOOK = "printf '%s %s %s\\n' \"$DIAGNOSE_ONSET_STEP\" \"$DIAGNOSE_FIRST_MOVER\" \"$DIAGNOSE_REPORT\" >> {out}"


def test_cli_exit_on_collapse_runs_the_hook_once(tmp_path: Path, collapsed_run: Path) -> None:
    events, hook_out = tmp_path / "events.jsonl", tmp_path / "hook.txt"
    r = CliRunner().invoke(app, ["watch", str(collapsed_run), "--interval", "0.01", "--exit-on-collapse",
                                 "--json-events", str(events), "--on-collapse", HOOK.format(out=hook_out)])
    assert r.exit_code == 1, r.output
    kinds = [json.loads(ln)["event"] for ln in events.read_text().splitlines()]
    assert kinds == ["started", "step", "episode", "stopped"]
    ep = json.loads(events.read_text().splitlines()[2])
    onset, mover, report = hook_out.read_text().split()
    assert (int(onset), mover) == (ep["onset_step"], ep["first_mover"])
    assert json.loads(Path(report).read_text())["verdict"] == "collapse"
    assert not Path(report).is_relative_to(collapsed_run)
    assert f"COLLAPSE in {collapsed_run}" in r.output


def test_cli_several_runs_without_run_is_a_usage_error(tmp_path: Path) -> None:
    from diagnose.synth.foreign import write_trl_run

    for name in ("a", "b"):
        write_trl_run(tmp_path / "runs" / name, steps=3)
    r = CliRunner().invoke(app, ["watch", str(tmp_path / "runs"), "--interval", "0.01"])
    assert r.exit_code == 2 and "--run" in r.output


@pytest.mark.parametrize("sig, reason", [(signal.SIGINT, "interrupted"), (signal.SIGTERM, "stopped")])
def test_ctrl_c_and_sigterm_end_it_cleanly(tmp_path: Path, collapsed_run: Path, sig: int, reason: str) -> None:
    events = tmp_path / "events.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", "from diagnose.cli import main; main()", "watch",
                             str(collapsed_run), "--interval", "0.05", "--json-events", str(events)],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        end = time.monotonic() + 60
        while time.monotonic() < end and not (events.exists() and '"episode"' in events.read_text()):
            time.sleep(0.05)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    last = json.loads(events.read_text().splitlines()[-1])
    assert last["event"] == "stopped" and last["reason"] == reason
    assert last["episodes"] == 1 and "COLLAPSE in" in out


def test_mid_write_hold_is_bounded(tmp_path: Path, verl_src: Path) -> None:
    """A file that looks mid-write for long (a writer stuck mid-line) does not silence the
    watch: scans are held back for at most MID_WRITE_S; an issue already shown (a bad line in a
    log that goes on growing) holds nothing back."""
    w = _grown(verl_src, tmp_path / "run", range(4), "verl")
    log = next((tmp_path / "run").rglob("qwen2.5_grpo_tooluse.jsonl"))
    good = log.read_bytes()
    log.write_bytes(good + b'{"step": 4, "da')
    watcher = Watcher(WatchTarget(tmp_path / "run"))
    assert watcher.poll() == [] and watcher.retry  # a new issue in a file just written: held back
    os.utime(log)
    assert watcher.poll() == []
    watcher.held_since -= watcher_mod.MID_WRITE_S  # ... for MID_WRITE_S already
    os.utime(log)
    assert [e.kind for e in watcher.poll()] == ["step"]
    # a bad line that stays (not the last one): shown once settled, then the log grows on
    log.write_bytes(good + b"garbage, not a JSON line\n")  # longer than the cut line: the file grows
    _age(log, 10)
    assert [e.kind for e in watcher.poll()] == []  # nothing new to show; not held (old file)
    assert [i.line for i in watcher.result.issues] == [5]
    w.write_step(4)  # appended now: the file is fresh, its issue is the same
    assert [e.data["step"] for e in watcher.poll() if e.kind == "step"] == [4]


def test_cpu_budget_spaces_rescans_out(tmp_path: Path, collapsed_run: Path) -> None:
    """With ``max_cpu``, a change waits until the last re-scan's CPU time fits the budget; the
    first scan (building the cache) is not counted."""
    w = _grown(collapsed_run, tmp_path / "run", range(5))
    watcher = Watcher(WatchTarget(tmp_path / "run"), max_cpu=1e-6)
    assert watcher.poll()[0].data["step"] == 4
    w.write_step(5)
    assert watcher.poll()[0].data["step"] == 5  # the first re-scan: not held back by the first scan
    w.write_step(6)
    assert watcher.poll() == [] and watcher.scans == 2  # held back: ~days at 1e-6 of a core
    watcher.next_scan = 0.0
    assert watcher.poll()[0].data["step"] == 6


def test_event_log_inside_the_run_is_refused(tmp_path: Path, collapsed_run: Path) -> None:
    r = CliRunner().invoke(app, ["watch", str(collapsed_run), "--json-events", str(collapsed_run / "events.jsonl")])
    assert r.exit_code == 2 and "inside the run" in r.output
    assert not (collapsed_run / "events.jsonl").exists()


def test_a_failing_scan_is_said_once_and_retried(tmp_path: Path, collapsed_run: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import diagnose.scan.run as scan_mod

    real, fails = scan_mod.scan_run, [2]

    def flaky(*a, **k):
        if fails[0]:
            fails[0] -= 1
            raise OSError("a file vanished under the reader")
        return real(*a, **k)

    monkeypatch.setattr(scan_mod, "scan_run", flaky)
    _grown(collapsed_run, tmp_path / "run", range(3))
    watcher = Watcher(WatchTarget(tmp_path / "run"))
    first = watcher.poll()
    assert [e.kind for e in first] == ["error"] and "vanished" in first[0].data["error"]
    assert watcher.poll() == []  # the same failure again: retried, not said again
    assert [e.kind for e in watcher.poll()] == ["step"]  # nothing changed on disk, yet retried


def test_terminal_status_line_and_paused_hook(tmp_path: Path, collapsed_run: Path) -> None:
    """On a terminal the status line is a rich Live line: the alert prints above it, the hook
    runs with it stopped, and it is gone (transient) when the watch ends."""
    from diagnose.watch import WatchConfig, run_watch

    out = StringIO()
    console = Console(file=out, force_terminal=True, width=160, color_system=None)
    cfg = WatchConfig(interval=0.01, exit_on_collapse=True, on_collapse="true", reports=tmp_path / "r")
    code = run_watch(WatchTarget(collapsed_run), cfg, Display(console, "runs/x"))
    text = out.getvalue()
    assert code == 1
    assert "watching runs/x · step 29 (30 steps)" in text and "COLLAPSE in" in text and "ran: true (exit 0)" in text


def test_follows_a_growing_tensorboard_log(tmp_path: Path) -> None:
    """A launch folder whose only record is TensorBoard (verl ``Tracking`` with ``tensorboard``:
    ``tensorboard_log/<project>/<experiment>/``, ``add_scalar(key, value, step)``, flushed each
    step): the watch follows the growing events file and alerts within 2 steps of the onset."""
    tb_mod = pytest.importorskip("torch.utils.tensorboard", reason="the events are written by torch's SummaryWriter (model extra)")
    from diagnose.synth.foreign import write_verl_run

    write_verl_run(tmp_path / "src", steps=18, collapse_at=14, rollouts=False, validation=False)
    lines = [json.loads(ln) for ln in next((tmp_path / "src").rglob("*.jsonl")).read_text().splitlines()]
    writer = tb_mod.SummaryWriter(str(tmp_path / "launch" / "tensorboard_log" / "proj" / "exp"))
    watcher = Watcher(WatchTarget(tmp_path / "launch"))
    alerts = []
    for rec in lines:
        for k, v in rec["data"].items():
            writer.add_scalar(k, v, rec["step"])
        writer.flush()
        events = watcher.poll()
        assert [e.data["step"] for e in events if e.kind == "step"] == [rec["step"]]
        alerts += [e.data for e in events if e.kind == "episode"]
    writer.close()
    assert len(alerts) == 1 and alerts[0]["onset_step"] == 14 and alerts[0]["seen_at_step"] <= 16
    assert watcher.result.cache.signals in ("cached", "incremental")
