"""The tracker readers on runs written by the trackers' own code (tests/fixtures/tracker_runs.py):
W&B run folders through ``wandb leet inspect --json``, TensorBoard events through
``EventAccumulator``, console logs; and the bad input each can hold."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import polars as pl
import pytest

from diagnose.adapters.trackers import console, tensorboard, wandb
from diagnose.adapters.trackers.names import guess_trainer, signal_names

SIGNALS = ("reward", "entropy", "kl", "grad_norm", "clip_ratio")


def _wandb(launch: Path):
    refs = wandb.find_runs(launch)
    assert len(refs) == 1, refs
    return wandb.read_run(refs[0])


def _signals(run) -> pl.DataFrame:  # noqa: ANN001
    return signal_names(run.metrics, run.trainer or guess_trainer(run.metrics.columns, run.config), run.config)


def _drop_at(df: pl.DataFrame, at: int) -> tuple[float, float]:
    before = df.filter((pl.col("step") < at) & (pl.col("step") >= 1))["reward"].mean()
    after = df.filter(pl.col("step") >= at)["reward"].mean()
    return before, after


# ---- W&B ------------------------------------------------------------------------------------


def test_trl_wandb_run_is_read_on_the_trainer_step(tracker_runs):
    """WandbCallback's x-axis is train/global_step; TRL's completions tables and profiling rows
    are rows of their own, merged into the step they belong to."""
    run = _wandb(tracker_runs["trl_collapse"])
    assert run.step_from == "train/global_step" and run.state == "finished" and run.exit_code == 0
    assert run.aliases[0] == "grpo-qwen-tools"  # TrainingArguments.run_name
    assert run.config["learning_rate"] == 1e-6 and run.config["_name_or_path"] == "Qwen/Qwen2.5-1.5B-Instruct"
    sig = _signals(run)
    assert sig["step"].to_list() == list(range(1, 31))
    assert set(SIGNALS) <= set(sig.columns)
    before, after = _drop_at(sig, 15)
    assert before > after + 0.3
    stable = _signals(_wandb(tracker_runs["trl_stable"]))
    assert abs(_drop_at(stable, 15)[0] - _drop_at(stable, 15)[1]) < 0.3
    # GRPOTrainer.log's completions table: one per logging step, its `step` column the trainer step
    tables = [t for t in run.tables if t.key == "completions"]
    assert [t.step for t in tables][:30] == list(range(1, 31))
    for t in tables[:30]:
        steps = {r[t.columns.index("step")] for r in t.rows}
        assert steps == {t.step} and len(t.rows) == 16


def test_the_same_metrics_from_wandb_tensorboard_and_the_console(tracker_runs):
    """Three readers of one TRL run agree step by step (the console rounds to 4 digits)."""
    launch = tracker_runs["trl_collapse"]
    w = _signals(_wandb(launch))
    (tb_dir,) = tensorboard.find_runs(launch)
    assert tb_dir.parent.name == "runs" and tb_dir.parent.parent.name == "out"  # <output_dir>/runs/<date>_<host>
    tb = tensorboard.read_run(tb_dir, launch)
    t = _signals(tb)
    (log,) = console.find_logs(launch)
    c = console.read_log(log)
    assert c.trainer == "trl" and c.step_from == "the training progress bar's counter"
    cs = _signals(c)
    for name in ("reward", "entropy", "kl", "grad_norm"):
        a, b, d = (f.select("step", name).sort("step") for f in (w, t, cs))
        assert a["step"].to_list() == b["step"].to_list() == d["step"].to_list() == list(range(1, 31))
        assert (a[name] - b[name]).abs().max() < 1e-6  # TensorBoard stores float32
        assert ((a[name] - d[name]).abs() <= 1e-3 * a[name].abs().clip(lower_bound=1.0)).all()


def test_verl_run_steps_tables_and_console(tracker_runs):
    """verl logs wandb.log(data, step=global_steps): the step is _step; the console prints numpy
    scalars as np.float64(...); ValidationGenerationsLogger's table grows by one row per validation."""
    launch = tracker_runs["verl_collapse"]
    run = _wandb(launch)
    assert run.step_from == "_step" and run.aliases[0] == "qwen2.5-1.5b-grpo"
    assert run.config["actor_rollout_ref"]["actor"]["optim"]["lr"] == 1e-6
    sig = _signals(run)
    assert sig["step"].min() == 0 and sig["step"].max() == 30  # step 0: the validation before training
    assert set(SIGNALS) <= set(sig.columns) and "actor/entropy" in sig.columns
    assert _drop_at(sig, 15)[0] > _drop_at(sig, 15)[1] + 0.3
    val = [t for t in run.tables if t.key == "val/generations"]
    assert [t.step for t in val] == [0, 5, 10, 15, 20, 25, 30]
    last = val[-1]
    assert last.columns[:4] == ["step", "input_1", "output_1", "score_1"] and [r[0] for r in last.rows] == [0, 5, 10, 15, 20, 25, 30]
    (log,) = console.find_logs(launch)
    assert "np.float64(" in log.read_text()
    c = _signals(console.read_log(log))
    j = sig.join(c, on="step", suffix="_c")
    assert j.height == 31 and (j["entropy"] - j["entropy_c"]).abs().max() < 1e-12
    (tb_dir,) = tensorboard.find_runs(launch)
    assert tb_dir.relative_to(launch).parts == ("tensorboard_log", "fcl_eval", "qwen2.5-1.5b-grpo")


def test_open_instruct_run(tracker_runs):
    """grpo_fast.py: training_step is the x-axis; scores -> reward, objective/kl2_avg -> kl (the
    default kl_estimator); global_step (episodes) is not a step; histograms are not metrics."""
    run = _wandb(tracker_runs["oi_collapse"])
    assert run.step_from == "training_step"
    assert guess_trainer(run.metrics.columns, run.config) == "open_instruct"
    sig = _signals(run)
    assert sig["step"].to_list() == list(range(1, 31))
    assert (sig["kl"] == sig["objective/kl2_avg"]).all() and (sig["reward"] == sig["scores"]).all()
    assert "val/advantages_hist" not in sig.columns and any("val/advantages_hist" in n for n in run.notes)
    assert _drop_at(sig, 15)[0] > _drop_at(sig, 15)[1] + 0.3
    assert [t.step for t in run.tables if t.key == "sample_completions"] == [10, 20, 30]


def test_a_run_folder_a_wandb_folder_and_a_wandb_file_find_the_same_run(tracker_runs):
    launch = tracker_runs["verl_stable"]
    (ref,) = wandb.find_runs(launch)
    assert wandb.find_runs(launch / "wandb")[0].id == ref.id
    assert wandb.find_runs(ref.path)[0].id == ref.id
    assert wandb.find_runs(wandb.run_file(ref.path))[0].id == ref.id
    assert ref.path.name.startswith("offline-run-") and ref.offline


def test_a_synced_layout_is_read_the_same(tracker_runs, tmp_path):
    """An online run's folder is ``run-<date>-<id>`` with the same ``run-<id>.wandb``."""
    (ref,) = wandb.find_runs(tracker_runs["verl_stable"])
    online = tmp_path / "wandb" / ref.path.name.removeprefix("offline-")
    shutil.copytree(ref.path, online)
    (got,) = wandb.find_runs(tmp_path)
    assert not got.offline and got.id == ref.id
    assert wandb.read_run(got).metrics.equals(wandb.read_run(ref).metrics)


def test_a_resumed_run_is_one_run(tracker_runs, tmp_path):
    """W&B resumes a run id into a new folder per launch: one run, the later launch winning."""
    (ref,) = wandb.find_runs(tracker_runs["trl_stable"])
    base = tmp_path / "wandb"
    shutil.copytree(ref.path, base / ref.path.name)
    later = ref.path.name.replace(ref.path.name.split("-")[2], "20991231_000000")
    shutil.copytree(ref.path, base / later)
    (got,) = wandb.find_runs(tmp_path)
    assert len(got.dirs) == 2 and got.path.name == later
    run = wandb.read_run(got)
    assert run.metrics.height == 30 and any("resumed" in n for n in run.notes)


# ---- bad input ----------------------------------------------------------------------------------


def test_a_wandb_file_cut_mid_record_gives_what_was_written(tracker_runs, tmp_path):
    (ref,) = wandb.find_runs(tracker_runs["verl_collapse"])
    cut = tmp_path / "wandb" / ref.path.name
    shutil.copytree(ref.path, cut)
    f = wandb.run_file(cut)
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * 0.6) + 7])
    run = wandb.read_run(wandb.find_runs(tmp_path)[0])
    assert run.state == "incomplete"
    assert any("ends mid-record" in i.message and i.path == str(f) for i in run.issues), run.issues
    assert 5 < run.metrics.height < 31


def test_a_wandb_file_of_garbage_is_an_issue(tmp_path):
    d = tmp_path / "wandb" / "offline-run-20260101_000000-abc123"
    d.mkdir(parents=True)
    (d / "run-abc123.wandb").write_bytes(b"\x00garbage\xff" * 100)
    run = wandb.read_run(wandb.find_runs(tmp_path)[0])
    assert run.metrics.height == 0
    (issue,) = run.issues
    assert "could not read it" in issue.message and issue.path.endswith("run-abc123.wandb")


def test_a_run_folder_without_its_wandb_file(tmp_path):
    d = tmp_path / "wandb" / "run-20260101_000000-abc123" / "files"
    d.mkdir(parents=True)
    run = wandb.read_run(wandb.find_runs(tmp_path)[0])
    assert run.metrics.height == 0 and "no run-<id>.wandb" in run.issues[0].message


def test_the_trl_tools_crash_keeps_the_step_it_logged(tracker_runs):
    """TRL 1.16 + tools + log_completions: wandb.Table raises at the first log; the W&B run holds
    that step's metrics and says how it ended."""
    launch = tracker_runs["trl_tools_crash"]
    assert "TypeError: Data row contained incompatible types" in (launch / "train.log").read_text()
    run = _wandb(launch)
    assert run.state == "failed" and run.exit_code == 1
    assert any("exit code 1" in i.message and "TypeError: Data row contained incompatible types" in i.message
               for i in run.issues), run.issues
    sig = _signals(run)
    assert sig["step"].to_list() == [1] and {"reward", "entropy"} <= set(sig.columns)
    assert not run.tables
    assert sorted(p.name for p in (launch / "out" / "completions").iterdir()) == ["completions_00001.parquet"]


def test_an_events_file_cut_in_half(tracker_runs, tmp_path):
    (d,) = tensorboard.find_runs(tracker_runs["verl_collapse"])
    cut = tmp_path / "tb"
    shutil.copytree(d, cut)
    (f,) = tensorboard.events_files(cut)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    run = tensorboard.read_run(cut)
    assert any("truncated or corrupt record" in i.message and i.path == str(f) for i in run.issues), run.issues
    assert 3 < run.metrics.height < 31


def test_every_tensorboard_point_is_kept(tmp_path):
    """EventAccumulator keeps a random 10,000 points per tag by default; the reader keeps all."""
    pytest.importorskip("torch")
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(tmp_path / "runs" / "x"))
    for s in range(12_000):
        w.add_scalar("train/reward", s % 7, s)
    w.close()
    run = tensorboard.read_run(tmp_path / "runs" / "x")
    assert run.metrics.height == 12_000 and run.metrics["train/reward"].to_list()[:8] == [0, 1, 2, 3, 4, 5, 6, 0]


def test_a_console_log_with_garbage_lines(tracker_runs, tmp_path):
    src = next(iter(console.find_logs(tracker_runs["verl_collapse"])))
    log = tmp_path / "train.log"
    lines = src.read_bytes().splitlines(keepends=True)
    bad = [b"\x00\xff\xfe binary \x80garbage\n", b"step:31 - actor/entropy:np.float64(0.5 - critic/score/mean:0.25\n",
           b"(TaskRunner pid=77) step:32 - actor/entropy:0.1 - critic/score/mean:0.0\n",
           b"Traceback (most recent call last):\n", b"  File \"x.py\", line 3, in <module>\n"]
    log.write_bytes(b"".join(lines[:10] + bad + lines[10:]))
    run = console.read_log(log)
    assert run.metrics["step"].to_list() == list(range(0, 33))
    (issue,) = run.issues
    assert issue.line == 12 and "1 unreadable item" in issue.message
    row = run.metrics.filter(pl.col("step") == 31)
    assert row["critic/score/mean"].item() == 0.25 and row["actor/entropy"].item() is None
    assert run.metrics.filter(pl.col("step") == 32)["actor/entropy"].item() == 0.1  # a Ray worker prefix


def test_console_values(tmp_path):
    assert console.parse_value("np.float64(0.25)") == 0.25 and console.parse_value("np.int64(3)") == 3.0
    assert console.parse_value("'1e-06'") == 1e-6 and console.parse_value("True") == 1.0
    assert str(console.parse_value("nan")) == "nan" and console.parse_value("-inf") == float("-inf")
    assert console.parse_value("__import__('os')") is None
    f = tmp_path / "x.log"
    f.write_text("{'loss': '0.5', 'reward': __import__('os').system('echo hi'), 'epoch': '0.1'}\n")
    run = console.read_log(f)
    assert run.metrics.height == 0 and "cut or garbled" in run.issues[0].message


def test_printed_dicts_without_a_progress_bar_are_numbered(tmp_path):
    f = tmp_path / "x.log"
    f.write_text("".join(json.dumps({"loss": 0.5, "reward": r}).replace('"', "'") + "\n" for r in (1.0, 0.5, 0.0)))
    run = console.read_log(f)
    assert run.metrics["step"].to_list() == [1, 2, 3] and any("numbered" in n for n in run.notes)


# ---- discovery and merging --------------------------------------------------------------------


def test_every_tracker_of_a_launch_folder_is_found(tracker_runs):
    from diagnose.adapters.trackers.discover import find_trackers, is_tracker_path

    trl = {(r.kind, r.name) for r in find_trackers(tracker_runs["trl_collapse"])}
    kinds = sorted(k for k, _ in trl)
    assert kinds == ["console", "tensorboard", "wandb"] and ("console", "train.log") in trl
    assert any(k == "tensorboard" and n.startswith("out/runs/") for k, n in trl)
    verl = {(r.kind, r.name) for r in find_trackers(tracker_runs["verl_collapse"])}
    assert ("tensorboard", "tensorboard_log/fcl_eval/qwen2.5-1.5b-grpo") in verl
    # the output_dir alone: transformers' runs/ only
    out = find_trackers(tracker_runs["trl_collapse"] / "out")
    assert [r.kind for r in out] == ["tensorboard"]
    assert is_tracker_path(tracker_runs["trl_collapse"] / "wandb")
    assert not is_tracker_path(tracker_runs["trl_collapse"] / "out")


def test_fill_metrics_keeps_the_primary_values():
    from diagnose.adapters.trackers.merge import fill_metrics

    a = pl.DataFrame({"step": [1, 2], "reward": [1.0, None], "kl": [float("nan"), 0.1]})
    b = pl.DataFrame({"step": [2, 3], "reward": [0.5, 0.2], "entropy": [0.3, 0.4], "kl": [9.0, 0.2]})
    got = fill_metrics(a, b)
    assert got["step"].to_list() == [1, 2, 3]
    assert got["reward"].to_list() == [1.0, 0.5, 0.2] and got["entropy"].to_list() == [None, 0.3, 0.4]
    kl = got["kl"].to_list()
    assert str(kl[0]) == "nan" and kl[1:] == [0.1, 0.2]  # a NaN the trainer logged is data


def test_combined_metrics_prefer_wandb_and_use_the_trainers_names(tracker_runs):
    from diagnose.adapters.trackers.discover import find_trackers
    from diagnose.adapters.trackers.merge import combined_metrics, describe, run_info

    runs = [r.read() for r in find_trackers(tracker_runs["trl_collapse"])]
    m = combined_metrics(runs, "trl")
    assert m["step"].to_list() == list(range(1, 31)) and "reward" in m.columns and "train/reward" not in m.columns
    w = next(r for r in runs if r.kind == "wandb").metrics
    assert m["reward"].to_list() == w["train/reward"].to_list()  # full precision: W&B wins over the console
    assert run_info(runs) == {"model": "Qwen/Qwen2.5-1.5B-Instruct", "lr": 1e-6, "seed": 3}
    lines = {r.kind: describe(r, "completions parquet") for r in runs}
    assert "W&B run" in lines["wandb"] and "steps 1..30" in lines["wandb"] and "tables completions (31)" in lines["wandb"]
    assert "lacks config" in lines["tensorboard"] and "4 significant digits" in lines["console"]


def test_sparse_runs_are_told_which_switch_logs_rollouts(tracker_runs):
    from diagnose.adapters.trackers.merge import describe, sparse_help

    run = _wandb(tracker_runs["verl_collapse"])
    (text,) = sparse_help("verl", [run])
    assert "trainer.rollout_data_dir" in text and "log_val_generations" in text and "28 such validation generations" in text  # 7 validations x 4
    assert "lacks rollouts" in describe(run, None)
    (trl,) = sparse_help("trl", [_wandb(tracker_runs["trl_default"])])
    assert "log_completions=True" in trl and "Data row contained incompatible types" in trl


def test_without_the_trackers_extra_the_files_are_named(tracker_runs, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    run = _wandb(tracker_runs["verl_stable"])
    assert run.metrics.height == 0 and "pip install 'collapse-diagnostics[trackers]'" in run.issues[0].message


def test_a_corrupt_block_inside_a_wandb_file_is_named(tracker_runs, tmp_path):
    """wandb-core skips a block whose checksum fails and says so; the steps in it are lost."""
    (ref,) = wandb.find_runs(tracker_runs["verl_stable"])
    d = tmp_path / "wandb" / ref.path.name
    shutil.copytree(ref.path, d)
    f = wandb.run_file(d)
    b = bytearray(f.read_bytes())
    for i in range(len(b) // 2, len(b) // 2 + 200):
        b[i] ^= 0x5A
    f.write_bytes(bytes(b))
    run = wandb.read_run(wandb.find_runs(tmp_path)[0])
    assert any("corrupt data" in i.message and "checksum" in i.message for i in run.issues), run.issues
    assert 10 < run.metrics.height < 31 and run.metrics["step"].max() == 30


@pytest.mark.slow  # wandb writes a 10,050-row table (~10 s)
def test_a_table_cut_at_wandb_max_rows_is_named(tmp_path):
    import os
    import subprocess
    import sys

    code = ("import wandb\nr = wandb.init(project='p', mode='offline')\n"
            "t = wandb.Table(columns=['step', 'prompt', 'completion'], data=[[1, 'p', f'c{i}'] for i in range(10_050)])\n"
            "wandb.log({'completions': t, 'train/global_step': 1})\nr.finish()\n")
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, env={**os.environ, "WANDB_SILENT": "true"})
    (t,) = wandb.read_run(wandb.find_runs(tmp_path)[0]).tables
    assert len(t.rows) == 10_000 and t.logged_rows == 10_050
    run = wandb.read_run(wandb.find_runs(tmp_path)[0])
    assert any("MAX_ROWS" in i.message and "10050 rows" in i.message for i in run.issues)
