"""verl adapter on runs laid out exactly as verl 0.8.0.dev writes them (tests/fixtures/verl_layout.py,
real Qwen2.5 token ids): turn splitting, metrics discovery and mapping, validation dumps kept apart,
several experiments in one folder, resume truncation, bad input; and the synthetic writer
(`diagnose.synth.foreign.write_verl_run`) against the same code path."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from diagnose.adapters import AmbiguousRun, detect_format, load_run
from diagnose.adapters import verl as verl_adapter
from diagnose.cli import app
from diagnose.scan import scan_source
from diagnose.scan.names import signal_direction
from diagnose.scan.signals import step_signals
from diagnose.synth.foreign import _trajectories, write_verl_run as write_synthetic_verl
from diagnose.synth.verl import ToolLoopConfig, verl_dump_text

from fixtures.verl_layout import PROJECT, _prompt, decode_batch, episode_ids, write_verl_run

STEPS = 16
ONSET = 9


@pytest.fixture(scope="module")
def collapse(tok, tmp_path_factory):
    return write_verl_run(tmp_path_factory.mktemp("verl") / "launch", STEPS, ONSET, seed=1, tokenizer=tok)


@pytest.fixture(scope="module")
def stable(tok, tmp_path_factory):
    return write_verl_run(tmp_path_factory.mktemp("verl") / "launch", STEPS, None, seed=2, tokenizer=tok)


def issues_text(src) -> str:
    return "\n".join(str(i) for i in src.issues)


# ---- what verl writes -------------------------------------------------------------------------


def test_dumped_response_reads_as_verl_decodes_it(collapse):
    line = json.loads((collapse.rollout_dir / "1.jsonl").read_text().splitlines()[0])
    assert list(line)[:5] == ["input", "output", "gts", "score", "step"] and line["step"] == 1
    out = line["output"]
    # the tool round starts at <|im_start|>user: stripped, no newline before "user"
    assert "</tool_call>user\n<tool_response>\n" in out and "\n</tool_response>\nassistant\n" in out
    assert "<|im_" not in out and "<|endoftext|>" not in out
    assert line["input"].startswith("system\n") and line["input"].endswith("\nassistant\n")


def test_text_writer_matches_real_token_ids(tok):
    """`diagnose.synth.verl.verl_dump_text` (no tokenizer) gives exactly what verl's ids decode to."""
    cfg = ToolLoopConfig(response_length=4096)
    n = 0
    for task, gold, obs in _trajectories(10, 3):
        for turns in (gold, ["<tool_call>"], [""], [gold[0], "<tool_call>"], [gold[0] + "\nI will wait.", *gold[1:]]):
            p, r, mask, nt, _ = episode_ids(tok, _prompt(task), task.tools, turns, obs, cfg)
            (i,), (o,) = decode_batch(tok, [p], [r], 4096, 4096)
            assert verl_dump_text(_prompt(task), task.tools, turns, obs) == (i, o, nt)
            # mask 0: the tool rounds, which start at <|im_start|>user once the system prompt is cut
            tool_ids = [t for t, m in zip(r, mask) if m == 0]
            if tool_ids:
                assert tok.decode(tool_ids).startswith("<|im_start|>user\n<tool_response>\n")
                assert tok.decode(tool_ids).endswith("<|im_end|>\n<|im_start|>assistant\n")
            assert r[len(tok.encode(turns[0], add_special_tokens=False))] == tok.convert_tokens_to_ids("<|im_end|>")
            n += 1
    assert n == 50


def test_file_logger_lines(collapse):
    lines = collapse.metrics_path.read_bytes().splitlines()
    first = json.loads(lines[0])
    assert first["step"] == 0 and all(k.startswith("val-") for k in first["data"])  # val_before_train
    assert [json.loads(x)["step"] for x in lines] == list(range(0, STEPS + 1))
    assert collapse.metrics_path == collapse.cwd / collapse.project / f"{collapse.experiment}.jsonl"
    assert (collapse.checkpoint_dir / "latest_checkpointed_iteration.txt").read_text() == str(STEPS)


# ---- the adapter ----------------------------------------------------------------------------


def test_collapse_found_within_one_step(collapse):
    src = load_run(collapse.cwd)
    assert src.format == "verl" and not src.issues, issues_text(src)
    res = scan_source(src)
    assert res.verdict == "collapse" and len(res.episodes) == 1
    assert abs(res.episodes[0].onset_step - ONSET) <= 1
    assert any(p.kind == "mismatch_growth" and p.signal == "mismatch/abs_prob_diff" for p in res.pathologies)


def test_stable_twin_has_no_episode(stable):
    res = scan_source(load_run(stable.cwd))
    assert res.episodes == [] and res.verdict == "healthy", res.notes


def _agreement(run, src, steps) -> tuple[float, float]:
    ro = src.rollouts.collect().sort("step", "sample_id")
    read = {s: ro.filter(pl.col("step") == s).get_column("turn_states").to_list() for s in steps}
    healthy = same = total = 0
    for s in steps:
        assert len(read[s]) == len(run.states[s])
        for got, want in zip(read[s], run.states[s]):
            assert len(got) == len(want), (got, want)
            for g, w in zip(got, want):
                total += 1
                same += g == w
                healthy += w.startswith("healthy") and g == w
    n_healthy = sum(w.startswith("healthy") for s in steps for x in run.states[s] for w in x)
    return healthy / n_healthy, same / total


def test_pre_onset_turns_read_as_written(collapse, stable):
    for run, steps in ((collapse, range(1, ONSET)), (stable, range(1, STEPS + 1))):
        healthy, same = _agreement(run, load_run(run.cwd), list(steps))
        assert healthy >= 0.9 and same >= 0.9, (healthy, same)
    # measured: every turn (healthy_call, healthy_response, polluted) reads as written
    assert _agreement(collapse, load_run(collapse.cwd), list(range(1, ONSET))) == (1.0, 1.0)


def test_metrics_found_from_the_run_folder_and_mapped(collapse):
    for path in (collapse.cwd, collapse.rollout_dir, collapse.checkpoint_dir):
        src = load_run(path, format="verl")
        m = src.metrics.collect()
        assert "actor/entropy" in m.columns, path
        assert path == collapse.cwd or any(str(collapse.metrics_path) in n for n in src.notes)
    m = load_run(collapse.cwd).metrics.collect()
    pairs = {"actor/entropy": "entropy", "actor/pg_clipfrac": "clip_ratio", "actor/kl_loss": "kl",
             "actor/grad_norm": "grad_norm", "actor/lr": "lr", "response_length/clip_ratio": "completions/clipped_ratio",
             "critic/score/mean": "reward", "training/rollout_probs_diff_mean": "mismatch/abs_prob_diff"}
    for src_name, ours in pairs.items():
        assert m.get_column(src_name).to_list() == m.get_column(ours).to_list(), src_name
    assert m.filter(pl.col("step") == 3).get_column("reward").item() == pytest.approx(collapse.reward[3])
    assert "num_turns/mean" in m.columns and "rollout_corr/kl" in m.columns
    # multi-turn: response_length/* include the tool responses, so they are not the generated length
    assert "completions/mean_length" not in m.columns
    sig = step_signals(load_run(collapse.cwd))
    for name in ("mismatch/abs_prob_diff", "num_turns/mean", "rollout_corr/k3_kl", "actor/ppo_kl", "kl"):
        assert name in sig.columns
    assert signal_direction("mismatch/abs_prob_diff") == "up" and signal_direction("rollout_corr/chi2_token") == "up"
    assert signal_direction("training/rollout_actor_probs_pearson_corr") == "down"


def test_metrics_option(collapse, tmp_path):
    alone = tmp_path / "dumps"
    shutil.copytree(collapse.rollout_dir, alone)
    elsewhere = tmp_path / "logs" / "verl" / "copies" / "metrics.jsonl"  # not where verl puts it
    elsewhere.parent.mkdir(parents=True)
    shutil.copy(collapse.metrics_path, elsewhere)
    src = load_run(alone)
    assert "entropy" not in src.metrics.collect().columns
    assert any("--metrics" in n for n in src.notes)
    src = load_run(alone, metrics=elsewhere)
    assert "entropy" in src.metrics.collect().columns and str(elsewhere) in src.fingerprint()["files"]
    missing = load_run(alone, metrics=tmp_path / "nope.jsonl")
    assert "nope.jsonl" in issues_text(missing)
    res = CliRunner().invoke(app, ["scan", "--help"])
    if "--metrics" in res.output:
        out = CliRunner().invoke(app, ["scan", str(alone), "--metrics", str(elsewhere), "--json"])
        assert "Traceback" not in out.output
        assert json.loads(out.stdout)["episodes"][0]["onset_step"] in (ONSET - 1, ONSET, ONSET + 1)


def test_validation_dumps_kept_apart(collapse):
    src = load_run(collapse.cwd)
    ro = src.rollouts.collect()
    assert sorted(ro.get_column("step").unique().to_list()) == list(range(1, STEPS + 1))
    assert ro.height == STEPS * collapse.samples_per_step and "reward_extra" not in ro.columns
    assert any("validation_data" in n and "kept apart" in n for n in src.notes)
    assert not any("validation_data" in f for f in src.fingerprint()["files"])
    # pointed at the validation folder itself: read, and said so
    val = load_run(collapse.validation_dir)
    assert sorted(val.rollouts.collect().get_column("step").unique().to_list()) == collapse.validation_steps
    assert any("validation dumps" in n for n in val.notes)


def test_resume_truncates_the_metrics_file(tok, tmp_path):
    run = write_verl_run(tmp_path / "launch", 12, 8, seed=3, tokenizer=tok, resume_from=5, test_freq=0)
    steps = [json.loads(x)["step"] for x in run.metrics_path.read_bytes().splitlines()]
    assert steps == [5] + list(range(6, 13))  # validation at the resumed step, then training
    src = load_run(run.cwd)
    text = issues_text(src)
    assert "'wb'" in text and "5 step(s)" in text and "start at step 6" in text
    assert any("launched 2 times" in n for n in src.notes)  # Hydra's outputs/ of each start
    m = src.metrics.collect()
    assert m.filter(pl.col("step") == 2).get_column("reward").item() == pytest.approx(run.reward[2])  # from dumps
    assert m.filter(pl.col("step") == 2).get_column("entropy").item() is None
    assert abs(scan_source(src).episodes[0].onset_step - 8) <= 1


def test_two_experiments_in_one_folder_are_not_merged(tok, tmp_path):
    cwd = tmp_path / "launch"
    a = write_verl_run(cwd, 10, 6, seed=4, tokenizer=tok, experiment="exp_a", rollout_dir="rollouts/exp_a",
                       validation_dir="val/exp_a")
    b = write_verl_run(cwd, 12, None, seed=5, tokenizer=tok, experiment="exp_b", rollout_dir="rollouts/exp_b",
                       validation_dir="val/exp_b")
    assert verl_adapter.runs(cwd) == [a.name, b.name]
    with pytest.raises(AmbiguousRun, match="exp_a"):
        load_run(cwd)
    for run in (a, b):
        src = load_run(cwd, run=run.name)
        ro = src.rollouts.collect()
        assert ro.get_column("step").max() == run.steps[-1] and ro.height == len(run.steps) * run.samples_per_step
        assert src.metrics.collect().get_column("step").max() == run.steps[-1]
        assert any(f"val/{run.experiment}" in n for n in src.notes)
        # the experiment name alone names the run too, resolved in load_run (verl's run_alias)
        assert load_run(cwd, run=run.experiment).rollouts.collect().equals(ro)
    with pytest.raises(AmbiguousRun, match="no verl run named 'nope'") as e:
        load_run(cwd, run="nope")
    assert e.value.runs == [a.name, b.name]
    with pytest.raises(ValueError, match="load_run"):  # the adapter never chooses (no "newest" guess)
        verl_adapter.load(cwd)


def test_an_experiment_name_of_two_projects_names_no_run(tok, tmp_path):
    cwd = tmp_path / "launch"
    a = write_verl_run(cwd, 3, None, seed=4, tokenizer=tok, project="p1", experiment="same", rollout_dir="r1",
                       validation_dir=None, prompts_per_step=2, n=2)
    b = write_verl_run(cwd, 3, None, seed=5, tokenizer=tok, project="p2", experiment="same", rollout_dir="r2",
                       validation_dir=None, prompts_per_step=2, n=2)
    assert verl_adapter.runs(cwd) == ["p1/same", "p2/same"] and verl_adapter.run_alias(cwd, "same") == "same"
    with pytest.raises(AmbiguousRun, match="p1/same, p2/same"):
        load_run(cwd, run="same")
    assert load_run(cwd, run="p2/same").rollouts.collect().height == len(b.steps) * b.samples_per_step
    assert a.name == "p1/same"


def test_bad_input_is_named_and_the_rest_read(collapse, tmp_path):
    cwd = tmp_path / "launch"
    shutil.copytree(collapse.cwd, cwd)
    rd = cwd / "rollout_data"
    data = (rd / "3.jsonl").read_bytes()
    (rd / "3.jsonl").write_bytes(data[:-60])  # the last line cut mid-object
    (rd / "5.jsonl").write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    mpath = cwd / collapse.project / f"{collapse.experiment}.jsonl"
    lines = mpath.read_text().splitlines()
    d4 = json.loads(lines[4])
    d4["data"]["actor/grad_norm"] = None  # what orjson wrote for a NaN
    lines[4] = json.dumps(d4)
    lines[6] = lines[6].replace('"actor/pg_loss":', '"actor/pg_loss":NaN,"x":')  # a NaN literal
    lines.insert(8, "{not json")
    mpath.write_text("\n".join(lines) + "\n")
    src = load_run(cwd)
    text = issues_text(src)
    assert f"{rd / '3.jsonl'}:{collapse.samples_per_step}: truncated JSON" in text
    assert "5.jsonl" in text and "not valid UTF-8" in text
    assert f"{mpath}:5: metric 'actor/grad_norm' is null" in text and "NaN" in text
    assert f"{mpath}:9: invalid JSON" in text and "'actor/pg_loss' is non-finite" in text
    ro = src.rollouts.collect()
    assert ro.filter(pl.col("step") == 3).height == collapse.samples_per_step - 1
    assert 5 not in ro.get_column("step").to_list()
    m = src.metrics.collect()
    assert math.isnan(m.filter(pl.col("step") == 4).get_column("grad_norm").item())
    res = scan_source(src)
    assert abs(res.episodes[0].onset_step - ONSET) <= 1
    assert any(p.kind == "nonfinite_metrics" and p.signal == "grad_norm" for p in res.pathologies)
    out = CliRunner().invoke(app, ["scan", str(cwd), "--json"])
    assert "Traceback" not in out.output and out.exit_code == 1
    names = [Path(i["path"]).name for i in json.loads(out.stdout)["issues"]]
    assert "3.jsonl" in names and "5.jsonl" in names and mpath.name in names


def test_unknown_options_are_ignored(collapse):
    src = load_run(collapse.rollout_dir, tokenizer="whatever")
    assert src.rollouts.collect().height == STEPS * collapse.samples_per_step
    assert any("option tokenizer=whatever is not used by the verl adapter" in n for n in src.notes)


def test_step_of_file():
    f = verl_adapter.step_of_file
    assert f("rollout_data/12.jsonl", False) == 12 and f("12.jsonl", True) == 12
    assert f("verl_grpo_tooluse/qwen2.5.jsonl", False) == "metrics" and f("/abs/p/e.jsonl", False) == "metrics"
    assert f("notes.txt", False) == "global"


# ---- the synthetic writer (diagnose.synth.foreign) follows the same layout ----------------


def test_synthetic_writer_layout(tmp_path):
    fr = write_synthetic_verl(tmp_path / "run", 8, collapse_at=5, seed=2)
    assert (fr.path / "rollout_data" / "1.jsonl").is_file() and not (fr.path / "rollout_data" / "0.jsonl").exists()
    assert (fr.path / "validation_data" / "0.jsonl").is_file()
    assert (fr.path / "verl_grpo_tooluse" / "qwen2.5_grpo_tooluse.jsonl").is_file()
    src = load_run(fr.path)
    assert src.format == "verl" and not src.issues, issues_text(src)
    ro = src.rollouts.collect()
    assert sorted(ro.get_column("step").unique().to_list()) == fr.steps
    assert {"gts", "acc", "pred", "accuracy"} <= set(ro.columns)
    for step in fr.steps:
        got = ro.filter(pl.col("step") == step).get_column("turn_states").explode().value_counts()
        assert dict(got.iter_rows()) == dict(fr.turn_states[step]), step
    m = src.metrics.collect()
    assert dict(m.filter(pl.col("step") >= 1).select("step", "reward").iter_rows()) == pytest.approx(fr.reward)
    assert detect_format(fr.path / "rollout_data") == "verl"


def test_bad_dump_lines_and_metrics_lines(tmp_path):
    """Moved from test_adapters.py: every kind of bad line in dumps and in the file logger's JSONL."""
    fr = write_synthetic_verl(tmp_path / "run", 8, collapse_at=5, seed=3)
    rd = fr.path / "rollout_data"
    (rd / "3.jsonl").write_bytes(b"")
    (rd / "4.jsonl").unlink()
    lines = (rd / "5.jsonl").read_text().splitlines()
    a, b, c = (json.loads(x) for x in lines[:3])
    a["score"] = float("nan")
    del b["output"]
    c["score"] = "high"
    lines[:3] = [json.dumps(a), json.dumps(b), json.dumps(c)]
    lines.append("[1, 2, 3]")
    (rd / "5.jsonl").write_text("\n".join(lines) + "\n")
    mpath = fr.path / "verl_grpo_tooluse" / "qwen2.5_grpo_tooluse.jsonl"
    mlines = mpath.read_text().splitlines()
    m6 = json.loads(mlines[6])
    m6["data"]["actor/grad_norm"] = float("inf")  # written by a json writer, not orjson
    mlines[6] = json.dumps(m6)
    mlines.insert(3, json.dumps({"step": 99}))
    mpath.write_text("\n".join(mlines) + "\n")
    src = load_run(fr.path)
    text = issues_text(src)
    assert f"{rd / '3.jsonl'}: no readable rollout lines" in text
    assert f"{rd / '5.jsonl'}:2: no 'output'" in text
    assert f"{rd / '5.jsonl'}:3: 'score' is not a number" in text
    assert f"{rd / '5.jsonl'}:{len(lines)}: expected a JSON object" in text
    assert "non-finite" in text and "'score'" in text
    assert f"{mpath}:4: not a" in text and "actor/grad_norm" in text
    ro = src.rollouts.collect()
    assert sorted(ro.get_column("step").unique().to_list()) == [1, 2, 5, 6, 7, 8]
    r5 = ro.filter(pl.col("step") == 5).sort("sample_id")
    assert r5.height == fr.samples_per_step - 1
    assert math.isnan(r5.get_column("reward")[0]) and r5.get_column("reward")[1] is None
    m = src.metrics.collect()
    assert math.isinf(m.filter(pl.col("step") == 6).get_column("grad_norm")[0])


def test_dumps_in_the_checkpoint_folder(tok, tmp_path):
    """trainer.rollout_data_dir under trainer.default_local_dir: found from the launch folder and
    from the checkpoint folder, with the file logger of the launch folder."""
    exp = "ck_exp"
    run = write_verl_run(tmp_path / "launch", 10, 6, seed=6, tokenizer=tok, experiment=exp,
                         rollout_dir=f"checkpoints/{PROJECT}/{exp}/rollout_data", validation_dir=None)
    for path in (run.cwd, run.checkpoint_dir, run.rollout_dir):
        src = load_run(path)
        assert src.format == "verl", path
        assert src.rollouts.collect().height == 10 * run.samples_per_step, path
        assert "entropy" in src.metrics.collect().columns, path
        assert abs(scan_source(src).episodes[0].onset_step - 6) <= 1


def test_hydra_configs_attribute_dumps(tok, tmp_path):
    """Dump folders that name no experiment: the Hydra config of each start says whose they are
    (and where, also outside the launch folder); without it they are left out, never merged."""
    cwd = tmp_path / "launch"
    outside = tmp_path / "elsewhere" / "dumps"
    a = write_verl_run(cwd, 8, 5, seed=7, tokenizer=tok, experiment="exp_a", rollout_dir="dumps_1",
                       validation_dir="v1")
    b = write_verl_run(cwd, 9, None, seed=8, tokenizer=tok, experiment="exp_b", rollout_dir=outside,
                       validation_dir="v2")
    assert verl_adapter.runs(cwd) == [a.name, b.name]
    for run, n in ((a, 8), (b, 9)):
        src = load_run(cwd, run=run.name)
        ro = src.rollouts.collect()
        assert ro.height == n * run.samples_per_step and ro.get_column("step").max() == n
        val = cwd / ("v1" if run is a else "v2")
        assert any(str(val) in x and "kept apart" in x for x in src.notes)
    shutil.rmtree(cwd / "outputs")
    src = load_run(cwd, run=a.name)
    assert src.rollouts.collect().height == 0 and any("dumps_1" in n and "not read" in n for n in src.notes)
