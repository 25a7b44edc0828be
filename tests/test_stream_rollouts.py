"""Rollouts read file by file (`diagnose.adapters.verl.rollouts`, `diagnose.adapters._common.stream`)
are the rollouts read all at once: same rows, ids, groups, turn states and column types, serially
and on the process pool; texts come back when asked for, one step's files at a time; sampling keeps
the seeded subset of each step, whatever the file order."""

from __future__ import annotations

import json

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from diagnose.adapters import load_run
from diagnose.adapters._common import stream as _stream
from diagnose.adapters._common.issues import IssueLog
from diagnose.adapters.verl.layout import step_files
from diagnose.adapters.verl.rollouts import read_in_memory, read_rollouts
from diagnose.synth.foreign import Sampling, write_verl_run
from diagnose.turn_batch import sample_mask, sampling


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return write_verl_run(tmp_path_factory.mktemp("verl") / "launch", 8, 5, seed=3,
                          sampling=Sampling(group_size=4, prompts_per_step=6))


def files_of(path):
    return step_files(path / "rollout_data")


def check_same(files):
    issues_a, issues_b = IssueLog(), IssueLog()
    small, lazy = read_rollouts(files, issues_a)
    want = read_in_memory(files, issues_b)
    got = lazy.collect()
    assert got.drop("completion_chars", strict=False).equals(want), "streamed rollouts differ from the in-memory read"
    assert [str(i) for i in issues_a.finish()] == [str(i) for i in issues_b.finish()]
    if "completion_chars" in got.columns:
        assert got.get_column("completion_chars").to_list() == got.get_column("completion").str.len_chars().to_list()
    return small, lazy


def test_streamed_equals_in_memory(run):
    check_same(files_of(run.path))


def test_batch_turn_states_equal_the_reference(run):
    """The batch classification (fast split, fast path) gives what `TurnClassifier.completion`
    (`split_turns` in the verl dialect, then `classify_turn` turn by turn) gives, row by row."""
    from diagnose.adapters._common.turns import TurnClassifier
    from diagnose.adapters.verl.dumps import prompt_tool_names
    from diagnose.transcripts import Dialect

    df = load_run(run.path).rollouts.collect()
    ref = TurnClassifier(dialect=Dialect.VERL)
    for prompt, text, states, errors in df.select("prompt", "completion", "turn_states", "error_types").iter_rows():
        assert (states, errors) == ref.completion(text, prompt_tool_names(prompt)), repr(text)
    assert df.get_column("turn_states").list.len().max() > 1  # multi-turn texts were split


def test_pool_equals_serial(run, monkeypatch):
    monkeypatch.setattr(_stream, "POOL_MIN_BYTES", 0)
    small, _ = check_same(files_of(run.path))
    monkeypatch.setattr(_stream, "POOL_MIN_BYTES", 1 << 60)
    serial, _ = read_rollouts(files_of(run.path), IssueLog())
    assert small.equals(serial)


def test_bad_lines_and_other_steps(run, tmp_path):
    import shutil

    d = tmp_path / "rollout_data"
    shutil.copytree(run.path / "rollout_data", d)
    lines = (d / "2.jsonl").read_text().splitlines()
    lines[1] = "{not json"
    obj = json.loads(lines[2])
    obj["score"] = "high"
    obj["extra_num"] = 1.5
    lines[2] = json.dumps(obj)
    (d / "2.jsonl").write_text("\n".join(lines) + "\n")
    check_same(step_files(d))  # a bad line, a bad score, an extra key in one file
    obj = json.loads(lines[3])
    obj["step"] = 7
    lines[3] = json.dumps(obj)
    (d / "2.jsonl").write_text("\n".join(lines) + "\n")
    check_same(step_files(d))  # a line of another step: the whole run is read in memory


def test_texts_come_back_for_one_step(run):
    src = load_run(run.path)
    one = src.rollouts.filter(pl.col("step") == 3).select("sample_id", "completion").collect()
    all_rows = src.rollouts.collect()
    assert one.equals(all_rows.filter(pl.col("step") == 3).select("sample_id", "completion"))
    assert src.rollouts.select("step").collect().height == all_rows.height
    assert "completion_chars" in all_rows.columns


def test_sample_mask_is_per_step_and_seeded():
    steps = [1] * 10 + [2] * 3 + [1] * 5
    a = sample_mask(steps, 4, seed=7)
    assert sum(a[:10] + a[13:]) == 4 and all(a[10:13])
    assert a == sample_mask(steps, 4, seed=7)
    assert a != sample_mask(steps, 4, seed=8) or a != sample_mask(steps, 4, seed=9)
    # the draw of a step does not depend on the other steps' rows
    b = sample_mask([2] * 3 + [1] * 15, 4, seed=7)
    assert [i for i, k in enumerate(b[3:]) if k] == [i for i, k in enumerate(a[:10] + a[13:]) if k]


def test_sampled_load_classifies_the_sample_only(run):
    with sampling(5, 1):
        src = load_run(run.path)
    df = src.rollouts.collect()
    per = df.group_by("step").agg(pl.col("turn_states").is_not_null().sum().alias("n"), pl.len().alias("N"))
    assert (per.get_column("n") == 5).all() and (per.get_column("N") == 24).all()
    exact = load_run(run.path).rollouts.collect()
    kept = df.filter(pl.col("turn_states").is_not_null())
    ref = exact.join(kept.select("step", "sample_id"), on=["step", "sample_id"]).sort("step", "sample_id")
    assert kept.sort("step", "sample_id").get_column("turn_states").equals(ref.get_column("turn_states"))


@pytest.mark.parametrize("completions", ["messages", "text"])
def test_trl_texts_read_back_as_read_file_reads_them(tmp_path, completions, monkeypatch):
    from diagnose.adapters.trl.completions import read_file
    from diagnose.adapters._common.turns import TurnClassifier
    from diagnose.synth.foreign import write_trl_run

    r = write_trl_run(tmp_path / "trl", 6, 4, seed=2, sampling=Sampling(group_size=3, prompts_per_step=4),
                      completions=completions)
    got = load_run(r.path).rollouts.collect()
    log = IssueLog()
    want = pl.concat([read_file(s, f, log, TurnClassifier()).frame
                      for s, f in sorted((int(f.stem.split("_")[-1]), f) for f in (r.path / "completions").glob("*.parquet"))])
    assert got.get_column("completion").to_list() == want.get_column("completion").to_list()
    assert got.get_column("prompt").to_list() == want.get_column("prompt").to_list()
    assert got.get_column("turn_states").to_list() == want.get_column("turn_states").to_list()
    assert got.columns.index("prompt") == 3 and got.columns.index("completion") == 4
    monkeypatch.setattr(_stream, "POOL_MIN_BYTES", 0)
    assert load_run(r.path).rollouts.collect().equals(got)


def test_rescan_reads_only_the_new_step_file(run, tmp_path, monkeypatch):
    import shutil

    from diagnose.adapters.verl import rollouts as _verl_rollouts
    from diagnose.scan.run import scan_run

    copy = tmp_path / "launch"
    shutil.copytree(run.path, copy)
    first = scan_run(copy)
    dumps = copy / "rollout_data"
    last = max(int(f.stem) for f in dumps.glob("*.jsonl"))
    lines = [json.loads(x) for x in (dumps / f"{last}.jsonl").read_text().splitlines()]
    (dumps / f"{last + 1}.jsonl").write_text("".join(json.dumps({**o, "step": last + 1}) + "\n" for o in lines))
    read = []
    real = _verl_rollouts._rows
    monkeypatch.setattr(_verl_rollouts, "_rows", lambda fstep, f, issues: read.append(f.name) or real(fstep, f, issues))
    again = scan_run(copy)
    assert read == [f"{last + 1}.jsonl"]
    assert again.cache.signals == "incremental" and again.cache.steps_recomputed == [last + 1]
    fresh = scan_run(copy, use_cache=False)
    # equal up to the order polars sums groups in (group_reward_std differs in the last bit run to run)
    assert_frame_equal(again.signals, fresh.signals, check_exact=False)
    assert [str(i) for i in again.issues] == [str(i) for i in fresh.issues]
    assert first.signals.height + 1 == again.signals.height


def test_sampled_scan_reports_intervals(run):
    from diagnose.scan.run import scan_run

    exact = scan_run(run.path, use_cache=False)
    est = scan_run(run.path, use_cache=False, sample=8, sample_seed=3)
    assert not any(c.endswith("/ci95") for c in exact.signals.columns)
    rows = est.signals.filter(pl.col("turn_state/collapsed").is_not_null())  # steps with rollouts
    ci = rows.get_column("turn_state/collapsed/ci95")
    assert ci.null_count() == 0 and (ci > 0).any()
    assert any("random sample of 8 rollout(s) per step" in n and "±" in n for n in est.notes)
    both = exact.signals.select("step", "turn_state/collapsed").join(
        rows.select("step", pl.col("turn_state/collapsed").alias("e"), ci.alias("ci")), on="step")
    inside = both.select(((pl.col("turn_state/collapsed") - pl.col("e")).abs() <= pl.col("ci") + 1e-12).mean()).item()
    assert inside >= 0.75  # 95% intervals; 8 steps


def test_memo_kept_in_process_reads_no_entry_twice(run, tmp_path, monkeypatch):
    """With `keep_in_process` (diagnose watch), a re-scan reads from disk only the memo entries of
    files it has not seen: none for an unchanged run, and the signals are those of a fresh scan;
    a changed file is read again, not taken from the kept copy."""
    import shutil

    from diagnose.scan.run import scan_run

    monkeypatch.setattr(_stream, "_KEPT", None)
    _stream.keep_in_process()
    copy = tmp_path / "launch"
    shutil.copytree(run.path, copy)
    scan_run(copy)  # builds the memo (and keeps its entries)
    read = []
    real = pl.read_parquet
    monkeypatch.setattr(_stream.pl, "read_parquet", lambda f, *a, **k: read.append(str(f)) or real(f, *a, **k))
    (copy / "rollout_data" / "0.jsonl").touch()  # any change makes the scan load the run again
    again = scan_run(copy)
    assert not [f for f in read if "-steps" in f]
    fresh = scan_run(copy, use_cache=False)
    assert_frame_equal(again.signals, fresh.signals, check_exact=False)
    dump = copy / "rollout_data" / "1.jsonl"
    rows = [json.loads(x) for x in dump.read_text().splitlines()]
    dump.write_text("".join(json.dumps({**o, "score": -1.0}) + "\n" for o in rows))
    changed = scan_run(copy)
    assert changed.signals.filter(pl.col("step") == 1).get_column("reward").item() == -1.0
