"""Kill -9 loses nothing and duplicates nothing: a real `train-minimal run` process,
SIGKILLed at seeded random moments and resumed with `--resume` each time; after the last resume
every step is logged exactly once (metrics lines and step files), every checkpoint loads, the
result equals an uninterrupted run, and `diagnose scan` reports no issue.

Also `diagnose probe` killed midway: never a partial capability table under its final name.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import polars as pl
import pytest

# the smoke preset, shrunk to its smallest settings: 12 SFT + 12 GRPO steps, about 5 s of training
STEPS = 24
SETTINGS = ["sft.steps=12", "grpo.steps=12", "rollout.prompts_per_step=1", "rollout.group_size=2",
            "rollout.max_turns=2", "rollout.max_new_tokens=8", "sft.batch_size=2", "grpo.micro_batch_size=4",
            "log.eval_every=0", "log.checkpoint_every=3", "log.probe_tasks=1", "data.train_tasks=4"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _cmd(out: Path, resume: bool) -> list[str]:
    sets = [a for s in SETTINGS for a in ("--set", s)]
    return [sys.executable, "-m", "train_minimal.cli", "run", "--preset", "smoke", "--out", str(out), *sets,
            *(["--resume"] if resume else [])]


def _logged_steps(run: Path) -> int:
    try:
        return (run / "metrics.jsonl").read_bytes().count(b"\n")
    except OSError:
        return 0


def _run_killed(out: Path, rng: random.Random, kills: int) -> list[str]:
    """Start / resume the run, SIGKILL it when a random number of steps is logged (plus a random
    delay, so kills land inside steps, step-file writes and checkpoint writes alike)."""
    moments, resume = [], False
    while True:
        proc = subprocess.Popen(_cmd(out, resume), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, env=ENV, start_new_session=True)
        if len(moments) < kills:
            # the first kill after the first checkpoint (step 3): before it there is nothing to resume
            # (once most steps are logged, the kill lands in the resumed process's start-up)
            target = rng.randint(min(max(4, _logged_steps(out) + 1), STEPS - 1), STEPS - 1)
            delay = rng.uniform(0.0, 0.4)
            while proc.poll() is None and _logged_steps(out) < target:
                time.sleep(0.02)
            time.sleep(delay)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                moments.append(f"after {_logged_steps(out)} lines (+{delay:.2f} s)")
                resume = True
                continue
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode(errors="replace")[-3000:]
        return moments


def _check_run(run: Path, reference: Path | None) -> None:
    from diagnose.model.resolve import load_model_and_tokenizer
    from diagnose.rundir import RunReader

    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    counts = Counter(r["step"] for r in lines)
    assert sorted(counts) == list(range(1, STEPS + 1)), sorted(counts)
    assert set(counts.values()) == {1}, {s: n for s, n in counts.items() if n != 1}
    expected = {"rollouts": set(range(13, STEPS + 1)), "tokens": set(range(13, STEPS + 1)),
                "probe": {1} | set(range(2, STEPS + 1, 2))}
    reader = RunReader(run)
    for kind, steps in expected.items():
        assert set(reader.steps(kind)) == steps, kind
        frame = reader.scan(kind).select("step").collect()
        assert frame.height and set(frame["step"].unique()) == steps, kind
    assert not [i for i in reader.issues if "step" in str(i)], reader.issues
    ckpts = reader.checkpoints()
    assert [s for s, _ in ckpts] == [18, 21, 24]
    for step, path in ckpts:
        assert json.loads((path / "trainer_state.json").read_text())["step"] == step
        load_model_and_tokenizer(str(path), device="cpu")
    if reference is not None:  # resuming gives the run an uninterrupted one gives
        cols = ["step", "phase", "reward", "sft_loss", "grad_norm"]
        got = pl.read_ndjson(run / "metrics.jsonl").sort("step")
        want = pl.read_ndjson(reference / "metrics.jsonl").sort("step")
        cols = [c for c in cols if c in want.columns]
        assert got.select(cols).equals(want.select(cols))
    scan = subprocess.run([sys.executable, "-m", "diagnose.cli", "scan", str(run), "--json", "--no-cache"],
                          capture_output=True, env=ENV, timeout=300)
    assert scan.returncode in (0, 1), scan.stderr.decode(errors="replace")
    assert json.loads(scan.stdout)["issues"] == []


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    done = subprocess.run(_cmd(out, False), capture_output=True, env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]
    return out


def test_kill9_twice_then_resume(tmp_path: Path, reference: Path) -> None:
    moments = _run_killed(tmp_path / "run", random.Random(1), kills=2)
    assert len(moments) == 2, moments
    _check_run(tmp_path / "run", reference)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 7])
def test_kill9_at_random_moments_then_resume(tmp_path: Path, reference: Path, seed: int) -> None:
    moments = _run_killed(tmp_path / "run", random.Random(seed), kills=6)
    assert len(moments) >= 6, moments
    _check_run(tmp_path / "run", reference)


def test_truncate_after_drops_later_steps_only(tmp_path: Path) -> None:
    """RunWriter.truncate_after: metrics lines and step files after the step go, the rest (and
    lines it cannot parse) stay; the writer appends after it."""
    from diagnose.rundir import RunReader, RunWriter

    ctrl = [{"name": "im_end", "text": "<|im_end|>", "token_id": 2, "role": "turn_end"}]
    w = RunWriter(tmp_path / "r", config={}, model={}, tokenizer={}, control_tokens=ctrl, seeds={}, fsync=False)
    for s in range(10):
        w.log_metrics(s, {"reward": float(s)})
    with open(tmp_path / "r" / "metrics.jsonl", "ab") as f:
        f.write(b"not json\n")
    (tmp_path / "r" / "custom").mkdir()
    for s in (4, 7):
        (tmp_path / "r" / "custom" / f"step-{s:06d}.parquet").write_bytes(b"x")
    for s in (3, 6, 9):
        with w.checkpoint(s) as d:
            (d / "w.bin").write_bytes(b"w")
    dropped = w.truncate_after(5)
    assert dropped == {"metrics_lines": 4, "step_files": 1, "checkpoints": 2}
    w.log_metrics(6, {"reward": 60.0})
    w.close()
    lines = (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines if x != "not json"] == [0, 1, 2, 3, 4, 5, 6]
    assert "not json" in lines
    assert sorted(p.name for p in (tmp_path / "r" / "custom").iterdir()) == ["step-000004.parquet"]
    assert [s for s, _ in RunReader(tmp_path / "r").checkpoints()] == [3]
    assert w.truncate_after(5) == {"metrics_lines": 1, "step_files": 0, "checkpoints": 0}


def _capability_state(run: Path) -> tuple[str, set[str]] | None:
    """("ok", checkpoints) for a consistent capability set, ("refused", {}) for a mixed one."""
    from diagnose.capability.results import CapabilityReadError, read_capability

    try:
        cap = read_capability(run)
    except CapabilityReadError as e:
        assert "different probe runs" in str(e), e
        return ("refused", set())
    if cap is None:
        return None
    names = set(cap.summary["checkpoint"])
    assert set(cap.results["checkpoint"]) == names, "results and summary name the same checkpoints"
    assert set(cap.meta.get("checkpoints", {})) >= names
    return ("ok", names)


def _probe(run: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "diagnose.cli", "probe", str(run), "--tasks", "2", "--max-new-tokens", "8",
            "--device", "cpu", *args]


@pytest.mark.slow
def test_probe_killed_midway_leaves_no_partial_table(tmp_path: Path, reference: Path) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    first = subprocess.run(_probe(run, "--checkpoints", "18"), capture_output=True, env=ENV, timeout=300)
    assert first.returncode == 0, first.stderr.decode(errors="replace")
    assert _capability_state(run) == ("ok", {"step-000018"})
    rng = random.Random(3)
    for _ in range(3):  # killed while loading, probing or writing
        proc = subprocess.Popen(_probe(run, "--all"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=ENV, start_new_session=True)
        time.sleep(rng.uniform(1.0, 8.0))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert _capability_state(run) in (("ok", {"step-000018"}), ("ok", {"step-000018", "step-000021",
                                                                             "step-000024"}))
    again = subprocess.run(_probe(run, "--all"), capture_output=True, env=ENV, timeout=300)
    assert again.returncode == 0, again.stderr.decode(errors="replace")
    assert _capability_state(run) == ("ok", {"step-000018", "step-000021", "step-000024"})


def test_capability_files_of_two_writes_are_never_mixed(tmp_path: Path) -> None:
    """A kill between the three files (simulated: the process exits after the first one) leaves
    a set the reader refuses, naming the directory; the next probe replaces it."""
    from diagnose.capability.results import merge_and_write, read_capability, write_capability

    row = {"checkpoint": "a", "step": 1, "measure": "native", "accuracy": 0.5, "n": 2}
    write_capability(tmp_path, [row], [{"checkpoint": "a", "step": 1, "format_score": 0.5}], {"v": 1})
    code = ("import os, sys; import diagnose.capability.results as r\n"
            "real = r.atomic_write_bytes\n"
            "def once(*a, **k):\n    real(*a, **k); os._exit(9)\n"
            "r.atomic_write_bytes = once\n"
            f"r.write_capability({str(tmp_path)!r}, [dict({row!r}, checkpoint='b')], [{{'checkpoint': 'b'}}], {{}})\n")
    assert subprocess.run([sys.executable, "-c", code], env=ENV).returncode == 9
    assert _capability_state(tmp_path) == ("refused", set())
    meta = {"tasks": {"fingerprint": "f"}, "config": {}, "checkpoints": {"c": {}}}
    _, note = merge_and_write(tmp_path, [dict(row, checkpoint="c")], [{"checkpoint": "c", "step": 1}], meta)
    assert note and "unreadable" in note
    assert set(read_capability(tmp_path).summary["checkpoint"]) == {"c"}
