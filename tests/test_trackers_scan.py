"""``load_run`` / ``diagnose scan`` on runs whose evidence lives in trackers (tests/fixtures/tracker_runs.py,
written by the trackers' own code): read from the launch folder and from the tracker folder itself,
merged with the trainer layout's rollouts on the trainer's step, each source named with what it
lacks; the collapse found within one step, no episode in the stable twins; the bad input of issue 21
as named issues with partial results."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from diagnose.adapters import AmbiguousRun, load_run
from diagnose.scan.run import scan_run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("DIAGNOSE_HOME", str(tmp_path / "home"))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _onsets(result) -> list[int]:  # noqa: ANN001
    return [e.onset_step for e in result.episodes]


# ---- the collapse and its twin, from the launch folder and from the tracker folder -----------------


@pytest.mark.parametrize(("collapse", "stable"), [("trl_collapse", "trl_stable"), ("verl_collapse", "verl_stable"),
                                                  ("oi_collapse", "oi_stable")])
def test_collapse_found_from_the_launch_folder_and_no_episode_in_the_twin(tracker_runs, tmp_path, collapse, stable):
    res = scan_run(_copy(tracker_runs[collapse], tmp_path / "c"), use_cache=False)
    assert res.verdict == "collapse" and res.episodes, res.notes
    assert abs(_onsets(res)[0] - 15) <= 1, _onsets(res)
    for name in ("entropy", "kl", "grad_norm"):
        assert name in res.signals.columns, (name, res.signals.columns)
    twin = scan_run(_copy(tracker_runs[stable], tmp_path / "s"), use_cache=False)
    assert not twin.episodes and twin.verdict != "collapse", _onsets(twin)


@pytest.mark.parametrize(("case", "fmt"), [("trl_default", "trl"), ("oi_collapse", "open_instruct")])
def test_a_wandb_folder_alone_of_trl_and_open_instruct(tracker_runs, tmp_path, case, fmt):
    launch = _copy(tracker_runs[case], tmp_path / "w")
    src = load_run(launch / "wandb")
    assert src.format == fmt and {"reward", "entropy", "kl", "grad_norm"} <= set(src.metrics.collect().columns)
    res = scan_run(launch / "wandb", use_cache=False)
    assert res.verdict == "collapse" and abs(_onsets(res)[0] - 15) <= 1


def test_a_launch_folder_scan_is_cached_and_redone_when_a_tracker_grows(tracker_runs, tmp_path):
    launch = _copy(tracker_runs["verl_stable"], tmp_path / "v")
    first = scan_run(launch)
    again = scan_run(launch)
    assert again.cache.hit and again.verdict == first.verdict
    log = launch / "train.log"
    log.write_text(log.read_text() + "step:31 - actor/entropy:0.5 - critic/score/mean:0.6\n")
    grown = scan_run(launch)
    assert not grown.cache.hit and grown.signals["step"].max() == 31


@pytest.mark.parametrize("where", ["wandb", "wandb/latest-run", "run-folder", "train.log"])
def test_the_tracker_folder_itself_is_a_run(tracker_runs, tmp_path, where):
    launch = _copy(tracker_runs["verl_collapse"], tmp_path / "v")
    path = {"wandb": launch / "wandb", "wandb/latest-run": launch / "wandb" / "latest-run", "train.log": launch / "train.log",
            "run-folder": next((launch / "wandb").glob("offline-run-*"))}[where]
    src = load_run(path)
    assert src.format == "verl"
    m = src.metrics.collect()
    assert m["step"].max() == 30 and {"reward", "entropy", "kl", "grad_norm"} <= set(m.columns)
    res = scan_run(path, use_cache=False)
    assert res.verdict == "collapse" and abs(_onsets(res)[0] - 15) <= 1


def test_tensorboard_folder_alone(tracker_runs, tmp_path):
    launch = _copy(tracker_runs["trl_collapse"], tmp_path / "t")
    (tb,) = (launch / "out" / "runs").iterdir()
    src = load_run(tb)
    assert src.format == "trl"
    assert {"reward", "entropy", "kl", "grad_norm"} <= set(src.metrics.collect().columns)
    res = scan_run(tb, use_cache=False)
    assert res.verdict == "collapse" and abs(_onsets(res)[0] - 15) <= 1


def test_trl_launch_folder_merges_rollouts_and_tracker_metrics_on_the_step(tracker_runs, tmp_path):
    """The rollouts from out/completions, entropy/KL/grad-norm from W&B (no trainer_state.json)."""
    launch = _copy(tracker_runs["trl_collapse"], tmp_path / "t")
    src = load_run(launch)
    assert src.format == "trl" and src.path == launch / "out"
    ro = src.rollouts.collect()
    m = src.metrics.collect()
    assert ro["step"].unique().sort().to_list() == list(range(1, 31))
    assert {"entropy", "kl", "grad_norm", "turn_state/healthy_call"} <= set(m.columns)
    assert m["step"].to_list() == list(range(1, 31))
    text = "\n".join(src.sources)
    assert src.sources[0].startswith(f"trl layout {launch / 'out'}: rollouts")
    assert "W&B run" in text and "TensorBoard events" in text and "console log" in text and "lacks" in text
    assert src.info == {"model": "Qwen/Qwen2.5-1.5B-Instruct", "lr": 1e-6, "seed": 3}
    # the trainer's output alone still reads (and finds transformers' TensorBoard run in it)
    alone = load_run(launch / "out")
    assert "entropy" in alone.metrics.collect().columns


def test_wandb_tables_are_the_rollouts_when_the_trainer_kept_none(tracker_runs, tmp_path):
    """TRL's W&B completions tables, read when no parquet file is there (the W&B folder alone)."""
    launch = _copy(tracker_runs["trl_collapse"], tmp_path / "t")
    src = load_run(launch / "wandb")
    ro = src.rollouts.collect()
    assert ro["step"].unique().sort().to_list() == list(range(1, 31)) and ro.height == 30 * 16
    parquet = load_run(launch / "out").rollouts.collect()
    key = ["step", "sample_id"]
    j = ro.select(*key, "turn_states", "reward").join(parquet.select(*key, "turn_states", "reward"), on=key)
    assert j.height == ro.height
    assert (j["turn_states"] == j["turn_states_right"]).all() and (j["reward"] == j["reward_right"]).all()


def test_sparse_runs_say_which_switch_would_log_rollouts(tracker_runs, tmp_path):
    src = load_run(_copy(tracker_runs["verl_collapse"], tmp_path / "v"))
    assert src.rollouts is None or src.rollouts.collect().height == 0
    text = "\n".join(src.sources)
    assert "trainer.rollout_data_dir" in text and "log_val_generations" in text
    assert any("val/generations" in n and "kept apart" in n for n in src.notes)
    val = src.validation.collect()  # verl's validation generations, with turn states, apart from the rollouts
    assert val.height == 28 and val["step"].unique().sort().to_list() == [0, 5, 10, 15, 20, 25, 30]
    collapsed = val.group_by("step").agg(pl.col("turn_states").list.contains("collapsed").sum()).sort("step")
    assert collapsed["turn_states"].to_list()[:3] == [0, 0, 0] and min(collapsed["turn_states"].to_list()[3:]) >= 2
    assert any(n.startswith("validation samples with a collapsed turn") and "step 15: " in n for n in src.notes)
    src = load_run(_copy(tracker_runs["trl_default"], tmp_path / "d"))
    assert "log_completions=True" in "\n".join(src.sources)
    res = scan_run(tmp_path / "d", use_cache=False)
    assert res.verdict == "collapse" and abs(_onsets(res)[0] - 15) <= 1


# ---- --metrics and --run ------------------------------------------------------------------------


def test_metrics_option_takes_a_tracker(tracker_runs, tmp_path):
    launch = _copy(tracker_runs["trl_collapse"], tmp_path / "t")
    shutil.rmtree(launch / "out" / "runs")
    run_dir = next((launch / "wandb").glob("offline-run-*"))
    src = load_run(launch / "out", metrics=run_dir)
    assert "entropy" in src.metrics.collect().columns and any("W&B run" in n for n in src.sources)
    src = load_run(launch / "out", metrics=launch / "train.log")
    assert "entropy" in src.metrics.collect().columns and any("console log" in n for n in src.sources)


def test_two_wandb_runs_are_listed_never_merged(tracker_runs, tmp_path):
    launch = _copy(tracker_runs["trl_collapse"], tmp_path / "t")
    other = next((tracker_runs["trl_stable"] / "wandb").glob("offline-run-*"))
    shutil.copytree(other, launch / "wandb" / other.name)
    ids = sorted(p.name.rsplit("-", 1)[1] for p in (launch / "wandb").glob("offline-run-*"))
    src = load_run(launch)
    issue = next(i for i in src.issues if "W&B runs here" in i.message)
    assert all(i in issue.message for i in ids) and "--run" in issue.message
    assert src.rollouts.collect().height > 0  # partial: the trainer layout is read
    assert not any(n.startswith("W&B run") for n in src.sources)
    mine = next(i for i in ids if i in next((tracker_runs["trl_collapse"] / "wandb").glob("offline-run-*")).name)
    picked = load_run(launch, run=mine)
    assert any(n.startswith(f"W&B run {mine}") for n in picked.sources)
    other = next(i for i in ids if i != mine)
    assert any(f"W&B run {mine} read (--run)" in n and other in n for n in picked.notes)
    # the W&B folder alone, with nothing else: choose, or the runs are listed
    with pytest.raises(AmbiguousRun, match="--run"):
        load_run(launch / "wandb")
    assert load_run(launch / "wandb", run=mine).metrics.collect().height == 30


# ---- bad input ----------------------------------------------------------------------------------


def test_a_cut_wandb_file_scans_with_a_named_issue(tracker_runs, tmp_path):
    launch = _copy(tracker_runs["verl_collapse"], tmp_path / "v")
    f = next((launch / "wandb").glob("offline-run-*/run-*.wandb"))
    f.write_bytes(f.read_bytes()[: int(f.stat().st_size * 0.7)])
    shutil.rmtree(launch / "tensorboard_log")
    (launch / "train.log").unlink()
    res = scan_run(launch, use_cache=False)
    assert any("ends mid-record" in i.message and i.path == str(f) for i in res.issues), res.issues
    assert 10 < res.signals.height < 31


def test_a_cut_events_file_and_a_garbled_console_log(tracker_runs, tmp_path):
    launch = _copy(tracker_runs["verl_collapse"], tmp_path / "v")
    shutil.rmtree(launch / "wandb")
    ev = next((launch / "tensorboard_log").rglob("events.out.tfevents.*"))
    ev.write_bytes(ev.read_bytes()[: ev.stat().st_size // 2])
    log = launch / "train.log"
    log.write_bytes(log.read_bytes() + b"\x00\xff garbage\nstep:40 - actor/entropy:np.float64(0.5 - critic/score/mean:1\n")
    src = load_run(launch)
    msgs = [str(i) for i in src.issues]
    assert any("truncated or corrupt record" in m and str(ev) in m for m in msgs), msgs
    assert any(m.startswith(f"{log}:") and "unreadable item" in m for m in msgs), msgs
    m = src.metrics.collect()
    assert m["step"].max() == 40  # the console's steps fill what the cut events file lost


def test_the_trl_tools_crash_reads_what_it_left(tracker_runs, tmp_path):
    launch = _copy(tracker_runs["trl_tools_crash"], tmp_path / "c")
    src = load_run(launch)
    assert src.rollouts.collect()["step"].unique().to_list() == [1]
    assert any("exit code 1" in i.message and "Data row contained incompatible types" in i.message for i in src.issues)
    assert 1 in src.metrics.collect()["step"].to_list()


def test_the_cli_never_shows_a_traceback_on_bad_tracker_input(tracker_runs, tmp_path):
    launch = _copy(tracker_runs["verl_collapse"], tmp_path / "v")
    f = next((launch / "wandb").glob("offline-run-*/run-*.wandb"))
    f.write_bytes(b"\x00not a transaction log\xff" * 50)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    res = subprocess.run([sys.executable, "-m", "diagnose.cli", "scan", str(launch), "--json", "--no-cache"],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert "Traceback" not in res.stderr + res.stdout and res.returncode in (0, 1), res.stderr[-2000:]
    out = json.loads(res.stdout)
    assert any("could not read it" in i["message"] for i in out["issues"])
    assert out["n_steps"] == 31  # the console and TensorBoard still give every step


def test_the_report_names_each_source_and_the_run_config(tracker_runs, tmp_path):
    launch = _copy(tracker_runs["trl_collapse"], tmp_path / "t")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "250"}
    cli = [sys.executable, "-m", "diagnose.cli", "scan", str(launch), "--no-cache"]
    res = subprocess.run(cli + ["--report", str(tmp_path / "r.html")], capture_output=True, text=True, env=env)
    assert res.returncode == 1, res.stderr[-2000:]  # collapse
    out = res.stdout
    assert "model Qwen/Qwen2.5-1.5B-Instruct, lr 1e-06, seed 3" in out
    assert "sources" in out and "W&B run" in out and "TensorBoard events" in out and "lacks" in out
    html = (tmp_path / "r.html").read_text()
    assert "<h2>Sources</h2>" in html and "Qwen/Qwen2.5-1.5B-Instruct" in html
    js = json.loads(subprocess.run(cli + ["--json"], capture_output=True, text=True, env=env).stdout)
    assert js["source"]["info"] == {"model": "Qwen/Qwen2.5-1.5B-Instruct", "lr": 1e-6, "seed": 3}
    assert js["sources"][0].startswith("trl layout") and any(s.startswith("W&B run") for s in js["sources"])
