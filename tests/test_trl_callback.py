"""`DiagnoseCallback` in a real `trl.GRPOTrainer` run (examples/trl_grpo_tool_use.py) and its
stop-on-collapse rule."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import polars as pl
import pytest

pytest.importorskip("trl", reason="the callback runs inside a real trl.GRPOTrainer: needs the trl extra")
pytest.importorskip("datasets", reason="trl's datasets dependency")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # examples/ is not installed with the package
from examples.trl_grpo_tool_use import build_trainer  # noqa: E402




@pytest.fixture(scope="module")
def trl_run(tmp_path_factory):
    """4 real GRPO steps on the embedded tiny model with the callback probing every 2 steps."""
    out = tmp_path_factory.mktemp("trl") / "run"
    trainer = build_trainer(out, max_steps=4, n_tasks=16, probe_every=2)
    trainer.train()
    return out, trainer


def test_example_run_writes_trl_layout_and_probe_tables(trl_run):
    out, trainer = trl_run
    assert sorted(p.name for p in (out / "completions").iterdir())[:1] == ["completions_00001.parquet"]
    assert (out / "checkpoint-4" / "model.safetensors").is_file()
    probe_steps = sorted(int(p.stem.split("-")[1]) for p in (out / "diagnose" / "probe").glob("step-*.parquet"))
    assert probe_steps == [1, 2, 4]
    lines = [json.loads(x) for x in (out / "diagnose" / "metrics.jsonl").read_text().splitlines()]
    assert any(k.startswith("probe/") for row in lines for k in row)
    assert any("reward" in row for row in lines)  # TRL's own logs, via on_log
    steps = [row["step"] for row in lines]
    assert steps == sorted(set(steps))  # one line per step: probe, TRL's log and its summary merged


def test_scan_of_the_example_has_control_token_probe_signals(trl_run):
    from diagnose.scan import scan_run

    out, _ = trl_run
    res = scan_run(out, use_cache=False)
    assert res.source_format == "trl"
    probe_cols = [c for c in res.signals.columns if c.startswith("probe/")]
    assert probe_cols, res.signals.columns
    # p(<|im_end|> | <tool_call>\n) is measured at every probe step
    ctx = [c for c in probe_cols if "im_end" in c]
    assert ctx and res.signals.filter(pl.col(ctx[0]).is_not_null()).height == 3
    assert any("live probe (DiagnoseCallback)" in n for n in res.notes)
    assert not res.issues, res.issues


def _synth_collapse(path: Path) -> Path:
    from diagnose.synth import write_synthetic_run

    write_synthetic_run(path, steps=40, collapse_at=20, seed=0)
    return path


def test_stop_on_collapse_stops_with_a_checkpoint_and_says_why(tmp_path):
    """The stop rule on a run whose scan finds a collapse (a labelled synthetic run stands in for
    the trainer's output dir; the probe part is exercised by the real run above)."""
    from diagnose.integrations.trl import STOP_FILE, DiagnoseCallback
    from diagnose.rundir.writer import RunWriter

    run = _synth_collapse(tmp_path / "run")
    cb = DiagnoseCallback(stop_on_collapse=True, probe_every=5)
    cb._output_dir = run
    cb._writer = RunWriter(tmp_path / "side", config={}, model={}, tokenizer={}, control_tokens=[], seeds={})
    control = SimpleNamespace(should_save=False, should_training_stop=False)
    cb._maybe_stop(40, control)
    assert control.should_training_stop and control.should_save
    info = json.loads((tmp_path / "side" / STOP_FILE).read_text())
    assert abs(info["onset_step"] - 20) <= 2 and "collapse onset" in info["reason"]


def test_stable_run_is_not_stopped(tmp_path):
    from diagnose.integrations.trl import DiagnoseCallback
    from diagnose.synth import write_synthetic_run

    write_synthetic_run(tmp_path / "run", steps=40, collapse_at=None, seed=0)
    cb = DiagnoseCallback(stop_on_collapse=True)
    cb._output_dir = tmp_path / "run"
    control = SimpleNamespace(should_save=False, should_training_stop=False)
    cb._maybe_stop(40, control)
    assert not control.should_training_stop and cb.stop_reason is None


def test_config_rejects_bad_intervals():
    from diagnose.integrations.trl import DiagnoseCallback

    with pytest.raises(ValueError, match="probe_every"):
        DiagnoseCallback(probe_every=0)


def test_probe_on_the_runs_own_completions(tmp_path):
    """``probe_on="completions"``: from the first probe step after TRL logged completions, the
    probe runs on the run's own early healthy completions, re-rendered, and stays fixed."""
    from diagnose.integrations.trl import DiagnoseCallback

    cb = DiagnoseCallback(probe_every=2, probe_tasks=6, probe_on="completions")
    out = tmp_path / "run"
    build_trainer(out, max_steps=4, n_tasks=16, probe_every=2, callbacks=[cb]).train()
    steps = sorted(int(p.stem.split("-")[1]) for p in (out / "diagnose" / "probe").glob("step-*.parquet"))
    assert steps == [2, 4]  # step 1: nothing logged yet
    rendered, _ = cb._probe_set
    assert 0 < len(rendered) <= 6 and {r.step for r in rendered} == {1}
    frames = [pl.read_parquet(out / "diagnose" / "probe" / f"step-{s:06d}.parquet") for s in steps]
    assert frames[0].select("probe_id", "position").equals(frames[1].select("probe_id", "position"))
    assert frames[0].filter(pl.col("context") != "").height > 0
