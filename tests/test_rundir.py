"""Run-directory format v1: writer, reader, schema, crash safety (docs/run-format.md)."""

from __future__ import annotations

import enum
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from diagnose.rundir import (
    PROBE_SCHEMA,
    ROLLOUTS_COLUMNS,
    ROLLOUTS_SCHEMA,
    RUN_FORMAT,
    RUN_FORMAT_VERSION,
    TOKENS_COLUMNS,
    TOKENS_SCHEMA,
    RunFormatError,
    RunReader,
    RunWriter,
    ctrl_column,
    probe_schema,
    rollouts_schema,
    tokens_schema,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from _kill_writer import CONTROL_TOKENS, expected_tokens  # noqa: E402

CTRL_NAMES = [t["name"] for t in CONTROL_TOKENS]


class State(enum.StrEnum):  # stands in for diagnose.turns.TurnState
    HEALTHY_CALL = "healthy_call"
    COLLAPSED = "collapsed"


def make_writer(run_dir: Path, **kw) -> RunWriter:
    return RunWriter(
        run_dir, config={"lr": 1e-6, "group_size": 4, "max_grad_norm": math.inf}, model={"name": "tiny"},
        tokenizer={"vocab_size": 100}, control_tokens=CONTROL_TOKENS, seeds={"seed": 0}, **kw,
    )


def rollout_rows(step: int, n: int = 3) -> list[dict]:
    return [
        {
            "sample_id": i, "group_id": i // 2, "task_id": f"task-{i}", "split": "train",
            "prompt": f"<|im_start|>user\nq{i}<|im_end|>", "completion": f"answer {i}\n{step}",
            "reward": float(i % 2) if i != 1 else math.nan, "accuracy": None if i == 2 else 0.5,
            "n_turns": 2, "turn_states": [State.HEALTHY_CALL, State.COLLAPSED], "error_types": [] if i else ["bad_json"],
            "is_hint": i == 0, "is_off_policy": False,
        }
        for i in range(n)
    ]


def expected_tokens_frame(step: int, n: int, *, with_sampler: bool = True) -> pl.DataFrame:
    a = expected_tokens(step, n)
    cols = {
        "step": pl.Series(np.full(n, step, dtype=np.int64)),
        "sample_id": pl.Series(a["sample_id"]),
        "turn": pl.Series(a["turn"]).cast(pl.Int32),
        "position": pl.Series(a["position"]).cast(pl.Int32),
        "token_id": pl.Series(a["token_id"]).cast(pl.Int32),
        "logprob": pl.Series(a["logprob"]),
        "sampler_logprob": pl.Series(a["sampler_logprob"]) if with_sampler else pl.Series([None] * n, dtype=pl.Float32),
        "entropy": pl.Series(a["entropy"]),
        "is_generated": pl.Series(a["is_generated"]),
        ctrl_column("im_end"): pl.Series(a["lp_ctrl"][:, 0]),
        ctrl_column("tool_call"): pl.Series(a["lp_ctrl"][:, 1]),
    }
    return pl.DataFrame(cols)


# --------------------------------------------------------------------------------------
# schema
# --------------------------------------------------------------------------------------


def test_schema_functions() -> None:
    assert ctrl_column("im_end") == "lp_ctrl_im_end"
    s = tokens_schema(["im_end", "tool_call"])
    assert list(s.names()) == list(TOKENS_SCHEMA.names()) + ["lp_ctrl_im_end", "lp_ctrl_tool_call"]
    assert s["lp_ctrl_im_end"] == pl.Float32 and s["token_id"] == pl.Int32 and s["step"] == pl.Int64
    assert rollouts_schema() == ROLLOUTS_SCHEMA
    assert rollouts_schema()["turn_states"] == pl.List(pl.String)
    assert probe_schema(["x"]).names() == PROBE_SCHEMA.names() + ["lp_ctrl_x"]
    with pytest.raises(ValueError, match="duplicate"):
        tokens_schema(["a", "a"])
    with pytest.raises(ValueError):
        ctrl_column("")


def test_spec_documents_every_column() -> None:
    spec = (ROOT / "docs" / "run-format.md").read_text()
    for col in ROLLOUTS_COLUMNS + TOKENS_COLUMNS:
        assert f"`{col.name}`" in spec, col.name
    for name in PROBE_SCHEMA.names():
        assert f"`{name}`" in spec, name


# --------------------------------------------------------------------------------------
# round trips
# --------------------------------------------------------------------------------------


def test_round_trip(tmp_path: Path) -> None:
    run = tmp_path / "run"
    n = 3000
    with make_writer(run) as w:
        for step in (0, 5, 12):
            arrays = expected_tokens(step, n)
            if step == 5:
                del arrays["sampler_logprob"]  # optional: becomes null
            w.write_tokens(step, arrays)
            w.write_rollouts(step, rollout_rows(step))
            w.log_metrics(step, {"reward": 0.1 * step, "completions/mean_length": 10 + step})
        w.write_probe(12, {"probe_id": np.array([0, 0, 1]), "position": np.array([3, 4, 3]),
                           "token_id": np.array([7, 8, 9]), "lp_gold": np.array([-0.1, np.nan, -2.0]),
                           "context": ["a", "ab", "c"], "lp_ctrl": np.full((3, 2), -5.0)})
        ckpt = w.checkpoint_dir(12)
    assert ckpt == run / "checkpoints" / "step-000012"
    assert sorted(p.name for p in (run / "tokens").iterdir()) == [
        "step-000000.parquet", "step-000005.parquet", "step-000012.parquet"]

    r = RunReader(run)
    assert r.issues == []
    assert r.info["format"] == RUN_FORMAT and r.info["format_version"] == RUN_FORMAT_VERSION
    assert r.info["config"]["max_grad_norm"] == "inf"
    assert set(r.info["versions"]) >= {"python", "torch", "transformers", "polars", "package"}
    assert r.control_tokens == CONTROL_TOKENS
    assert r.steps("tokens") == [0, 5, 12] and r.steps("rollouts") == [0, 5, 12] and r.steps("probe") == [12]

    tokens = r.tokens()
    assert isinstance(tokens, pl.LazyFrame)
    got = tokens.collect()
    want = pl.concat([expected_tokens_frame(s, n, with_sampler=s != 5) for s in (0, 5, 12)])
    assert_frame_equal(got, want)
    assert got.get_column("logprob").is_nan().sum() == 3 * (n // 1000)  # NaN survives, not null
    assert got.schema == tokens_schema(CTRL_NAMES)

    # step filter and pushdown-friendly laziness
    only = r.tokens(steps=[12]).filter(pl.col("sample_id") == 1).select("step", "position").collect()
    assert only.height == 1000 and only.get_column("step").unique().to_list() == [12]
    assert r.tokens(steps=99).collect().height == 0

    roll = r.rollouts(steps=5).collect()
    assert roll.schema == ROLLOUTS_SCHEMA
    assert roll.get_column("turn_states").to_list()[0] == ["healthy_call", "collapsed"]
    assert roll.get_column("accuracy").to_list() == [0.5, 0.5, None]
    assert math.isnan(roll.get_column("reward")[1])
    assert roll.get_column("is_hint").to_list() == [True, False, False]

    probe = r.probe().collect()
    assert probe.schema == probe_schema(CTRL_NAMES) and probe.height == 3
    assert probe.get_column("lp_ctrl_tool_call").to_list() == [-5.0] * 3

    m = r.metrics()
    assert m.get_column("step").to_list() == [0, 5, 12]
    assert m.get_column("completions/mean_length").to_list() == [10, 15, 22]


def test_tokens_from_dataframe_extra_columns_kept_and_cast(tmp_path: Path) -> None:
    with make_writer(tmp_path / "run") as w:
        df = expected_tokens_frame(3, 1000).drop("step").with_columns(
            pl.col("turn").cast(pl.Int64), pl.col("logprob").cast(pl.Float64), extra=pl.lit("x"))
        w.write_tokens(3, df)
    got = RunReader(tmp_path / "run").tokens().collect()
    assert got.columns[-1] == "extra" and got.schema["turn"] == pl.Int32 and got.schema["logprob"] == pl.Float32
    assert_frame_equal(got.drop("extra"), expected_tokens_frame(3, 1000))


def test_tokens_from_torch_tensors(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    a = expected_tokens(1, 1000)
    data = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in a.items()}
    data["entropy"] = data["entropy"].to(torch.bfloat16)
    with make_writer(tmp_path / "run") as w:
        w.write_tokens(1, data)
    got = RunReader(tmp_path / "run").tokens().collect()
    want = expected_tokens_frame(1, 1000)
    assert_frame_equal(got.drop("entropy"), want.drop("entropy"))
    assert got.schema["entropy"] == pl.Float32
    np.testing.assert_allclose(got["entropy"].to_numpy(), want["entropy"].to_numpy(), rtol=1e-2, atol=1e-2)


def test_metrics_nonfinite_round_trip(tmp_path: Path) -> None:
    with make_writer(tmp_path / "run") as w:
        w.log_metrics(0, {"reward": 1.0, "kl": math.nan, "grad_norm": math.inf, "lr": -math.inf,
                          "entropy": np.float32("nan"), "turn_state": {"collapsed": np.float64(0.25)},
                          "flag": True, "name": "x"})
        w.log_metrics(1, {"reward": 0.5, "kl": 0.1, "grad_norm": 2.0, "lr": 1e-6, "entropy": 1.0})
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    first = json.loads(lines[0], parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))
    assert first["kl"] is None and set(first["nonfinite"]) == {"kl", "grad_norm", "lr", "entropy"}
    m = RunReader(tmp_path / "run").metrics()
    assert m.columns[0] == "step"
    row = m.row(0, named=True)
    assert math.isnan(row["kl"]) and row["grad_norm"] == math.inf and row["lr"] == -math.inf
    assert math.isnan(row["entropy"]) and row["turn_state/collapsed"] == 0.25
    assert row["flag"] is True and row["name"] == "x" and row["reward"] == 1.0
    assert m.row(1, named=True)["kl"] == 0.1 and m.schema["kl"] == pl.Float64
    assert "nonfinite" not in m.columns


def test_log_metrics_rejects_bad_values(tmp_path: Path) -> None:
    with make_writer(tmp_path / "run") as w:
        with pytest.raises(TypeError, match="'hist'"):
            w.log_metrics(0, {"hist": [1, 2, 3]})
        with pytest.raises(ValueError, match="reserved"):
            w.log_metrics(0, {"nonfinite": 1})
        with pytest.raises(ValueError, match="step"):
            w.log_metrics(-1, {})
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == b""


def test_metrics_duplicate_steps_merge(tmp_path: Path) -> None:
    with make_writer(tmp_path / "run") as w:
        w.log_metrics(1, {"reward": 0.0, "train/x": 1})
        w.log_metrics(1, {"eval/acc": 0.3})
        w.log_metrics(0, {"reward": 0.9})
        w.log_metrics(1, {"reward": 0.7})
    m = RunReader(tmp_path / "run").metrics()
    assert m.to_dicts() == [{"step": 0, "reward": 0.9, "train/x": None, "eval/acc": None},
                            {"step": 1, "reward": 0.7, "train/x": 1, "eval/acc": 0.3}]


# --------------------------------------------------------------------------------------
# corrupt inputs
# --------------------------------------------------------------------------------------


def test_bad_metrics_lines_reported_rest_kept(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with make_writer(run) as w:
        w.log_metrics(0, {"reward": 0.0})
    path = run / "metrics.jsonl"
    with open(path, "ab") as f:
        f.write(b"\xff\xfe garbage \x00\n")                # line 2: not UTF-8
        f.write(b"[1, 2, 3]\n")                           # line 3: not an object
        f.write(b"{\"reward\": 1}\n")                     # line 4: no step
        f.write(b"\n")                                    # line 5: blank, ignored silently
        f.write(b"{\"step\": 2, \"reward\": 0.5}\n")      # line 6: fine
        f.write(b"{not json}\n")                          # line 7: invalid JSON
        f.write(b"{\"step\": 3, \"reward\": 0.")          # line 8: truncated last line
    r = RunReader(run)
    m = r.metrics()
    assert m.get_column("step").to_list() == [0, 2]
    assert m.get_column("reward").to_list() == [0.0, 0.5]
    by_line = {i.line: i for i in r.issues}
    assert sorted(by_line) == [2, 3, 4, 7, 8]
    assert all(i.path == path for i in r.issues)
    assert "UTF-8" in by_line[2].message and "object" in by_line[3].message
    assert "step" in by_line[4].message and "invalid JSON" in by_line[7].message
    assert "incomplete last line" in by_line[8].message
    assert str(by_line[8]).startswith(f"{path}:8: ")
    r.metrics()
    assert len(r.issues) == 5  # not duplicated by re-reading


def test_truncated_parquet_is_reported_and_skipped(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with make_writer(run) as w:
        for step in range(3):
            w.write_tokens(step, expected_tokens(step, 2000))
    bad = run / "tokens" / "step-000001.parquet"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    (run / "tokens" / ".step-000003.parquet.deadbeef.tmp").write_bytes(b"partial")  # ignored
    (run / "tokens" / "step-000004.parquet").write_bytes(b"")  # empty file: corrupt
    r = RunReader(run)
    assert r.steps("tokens") == [0, 2]
    issue_paths = sorted(i.path.name for i in r.issues)
    assert issue_paths == ["step-000001.parquet", "step-000004.parquet"]
    assert all("skipped" in i.message and i.line is None for i in r.issues)
    got = r.tokens().collect()
    assert_frame_equal(got, pl.concat([expected_tokens_frame(0, 2000), expected_tokens_frame(2, 2000)]))


def test_unreadable_run_json_but_data_readable(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with make_writer(run) as w:
        w.write_tokens(0, expected_tokens(0, 1000))
    (run / "run.json").write_text('{"format": "collapse-diag')
    r = RunReader(run)
    assert [i.path.name for i in r.issues] == ["run.json"]
    with pytest.raises(RunFormatError, match="run.json"):
        r.info
    assert [t["name"] for t in r.control_tokens] == CTRL_NAMES  # inferred from columns
    assert r.tokens().collect().height == 1000
    (run / "run.json").unlink()
    r = RunReader(run)
    with pytest.raises(RunFormatError, match="run.json.*missing"):
        r.info


def test_nothing_readable_raises_clear_error(tmp_path: Path) -> None:
    with pytest.raises(RunFormatError, match="no such run directory"):
        RunReader(tmp_path / "nope")
    run = tmp_path / "run"
    (run / "tokens").mkdir(parents=True)
    (run / "run.json").write_text("not json at all")
    (run / "tokens" / "step-000000.parquet").write_bytes(b"PAR1 garbage")
    with pytest.raises(RunFormatError, match="not a readable run") as e:
        RunReader(run)
    assert isinstance(e.value, ValueError)
    assert "run.json" in str(e.value) and "step-000000.parquet" in str(e.value)
    for i in range(1, 6):  # many unreadable files: the first three in the message, all of them in .issues
        (run / "tokens" / f"step-00000{i}.parquet").write_bytes(b"PAR1 garbage")
    with pytest.raises(RunFormatError, match=r"; and 4 more$") as e:
        RunReader(run)
    assert sum(f"step-00000{i}.parquet" in str(e.value) for i in range(6)) <= 3, str(e.value)
    assert len(e.value.issues) == 7 and any("step-000005.parquet" in str(i) for i in e.value.issues)


def test_newer_format_version_rejected(tmp_path: Path) -> None:
    run = tmp_path / "run"
    make_writer(run).close()
    info = json.loads((run / "run.json").read_text())
    info["format_version"] = RUN_FORMAT_VERSION + 1
    (run / "run.json").write_text(json.dumps(info))
    with pytest.raises(RunFormatError, match="newer"):
        RunReader(run)
    with pytest.raises(RunFormatError, match="format_version"):
        make_writer(run, resume=True)


def test_checkpoints(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with make_writer(run) as w:
        with w.checkpoint(10) as tmp:
            (tmp / "model.safetensors").write_bytes(b"x")
        (w.checkpoint_dir(20)).mkdir(parents=True)  # a crashed non-atomic save
    r = RunReader(run)
    assert r.checkpoints() == [(10, run / "checkpoints" / "step-000010")]
    assert json.loads((run / "checkpoints" / "step-000010" / "trainer_state.json").read_text()) == {"step": 10}
    assert [i.path.name for i in r.issues] == ["step-000020"]
    assert r.steps("checkpoints") == [10]


def test_empty_run_has_schemas(tmp_path: Path) -> None:
    make_writer(tmp_path / "run").close()
    r = RunReader(tmp_path / "run")
    assert r.tokens().collect().schema == tokens_schema(CTRL_NAMES)
    assert r.rollouts().collect().schema == rollouts_schema()
    assert r.metrics().height == 0 and r.steps("tokens") == [] and r.checkpoints() == []


# --------------------------------------------------------------------------------------
# writer validation
# --------------------------------------------------------------------------------------


def test_schema_validation_errors(tmp_path: Path) -> None:
    w = make_writer(tmp_path / "run")
    a = expected_tokens(0, 100)
    with pytest.raises(ValueError, match="'token_id'"):
        w.write_tokens(0, {k: v for k, v in a.items() if k != "token_id"})
    with pytest.raises(ValueError, match="lp_ctrl_tool_call"):
        w.write_tokens(0, {**{k: v for k, v in a.items() if k != "lp_ctrl"}, "lp_ctrl_im_end": a["logprob"]})
    with pytest.raises(ValueError, match="'lp_ctrl' has 1 columns"):
        w.write_tokens(0, {**a, "lp_ctrl": a["lp_ctrl"][:, :1]})
    with pytest.raises(ValueError, match="different lengths"):
        w.write_tokens(0, {**a, "turn": a["turn"][:5]})
    with pytest.raises(ValueError, match="'position'.*cannot be cast"):
        w.write_tokens(0, {**a, "position": a["position"] + 2**40})
    with pytest.raises(ValueError, match="'token_id' has dtype String"):
        w.write_tokens(0, {**a, "token_id": a["token_id"].astype(str)})
    with pytest.raises(ValueError, match="'step' column must equal 0"):
        w.write_tokens(0, {**a, "step": np.full(100, 1)})
    with pytest.raises(ValueError, match="'task_id'"):
        w.write_rollouts(0, [{k: v for k, v in r.items() if k != "task_id"} for r in rollout_rows(0)])
    with pytest.raises(ValueError, match="'sample_id' must not contain nulls"):
        w.write_rollouts(0, [{**r, "sample_id": None} for r in rollout_rows(0)])
    w.close()
    assert not (tmp_path / "run" / "tokens").exists() or list((tmp_path / "run" / "tokens").iterdir()) == []


def test_refuses_to_overwrite_existing_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with make_writer(run) as w:
        w.log_metrics(0, {"reward": 1.0})
    before = (run / "run.json").read_bytes()
    with pytest.raises(FileExistsError, match="resume=True"):
        make_writer(run)
    assert (run / "run.json").read_bytes() == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        make_writer(other)
    empty = tmp_path / "empty"
    empty.mkdir()
    make_writer(empty).close()  # an existing empty directory is fine


def test_resume_truncates_partial_line(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with make_writer(run) as w:
        w.log_metrics(0, {"reward": 0.0})
        w.log_metrics(1, {"reward": 0.1})
    path = run / "metrics.jsonl"
    with open(path, "ab") as f:
        f.write(b'{"step":2,"rew')  # killed mid-line
    created = json.loads((run / "run.json").read_text())["created"]
    with make_writer(run, resume=True) as w:
        assert w.truncated_bytes == len(b'{"step":2,"rew')
        w.log_metrics(2, {"reward": 0.2})
    assert path.read_bytes().endswith(b'{"step":2,"reward":0.2}\n')
    info = json.loads((run / "run.json").read_text())
    assert info["created"] == created and len(info["resumes"]) == 1
    r = RunReader(run)
    assert r.metrics().get_column("reward").to_list() == [0.0, 0.1, 0.2]
    assert r.issues == []
    # a complete object missing only its newline is kept
    with open(path, "ab") as f:
        f.write(b'{"step":3,"reward":0.3}')
    with make_writer(run, resume=True) as w:
        assert w.truncated_bytes == 0
        w.log_metrics(4, {"reward": 0.4})
    assert RunReader(run).metrics().get_column("step").to_list() == [0, 1, 2, 3, 4]


def test_resume_requires_same_control_tokens(tmp_path: Path) -> None:
    make_writer(tmp_path / "run").close()
    with pytest.raises(ValueError, match="control tokens"):
        RunWriter(tmp_path / "run", config={}, model={}, tokenizer={}, control_tokens=CONTROL_TOKENS[:1],
                  seeds={}, resume=True)


# --------------------------------------------------------------------------------------
# the kill test
# --------------------------------------------------------------------------------------


def test_sigkill_mid_write_leaves_only_complete_files(tmp_path: Path) -> None:
    run = tmp_path / "run"
    n_rows = 400_000
    tokens_dir = run / "tokens"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "_kill_writer.py"), str(run), str(n_rows)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 15
        killed_mid_write = False
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"writer exited early: {proc.stderr.read().decode()}")
            names = os.listdir(tokens_dir) if tokens_dir.is_dir() else []
            done = [n for n in names if n.endswith(".parquet") and not n.startswith(".")]
            in_flight = []
            for n in names:
                if n.endswith(".tmp"):
                    try:
                        in_flight.append(os.path.getsize(tokens_dir / n))
                    except OSError:  # renamed meanwhile
                        pass
            # kill while a step file is being written: temp file exists and has some bytes
            if len(done) >= 2 and any(size > 0 for size in in_flight):
                killed_mid_write = True
                break
            time.sleep(0.001)
        assert killed_mid_write, "writer did not produce 2 step files in time"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL

    parquet = sorted(p for p in tokens_dir.iterdir() if p.name.endswith(".parquet") and not p.name.startswith("."))
    assert len(parquet) >= 2
    for path in parquet:  # every file under a .parquet name is complete and correct
        step = int(path.stem.split("-")[1])
        assert_frame_equal(pl.read_parquet(path), expected_tokens_frame(step, n_rows))
    leftovers = [p.name for p in tokens_dir.iterdir() if p not in parquet]
    assert all(n.startswith(".") and n.endswith(".tmp") for n in leftovers), leftovers

    r = RunReader(run)
    steps = [int(p.stem.split("-")[1]) for p in parquet]
    assert r.steps("tokens") == steps == list(range(len(steps)))
    assert r.issues == []
    agg = r.tokens().group_by("step").agg(pl.len()).sort("step").collect()
    assert agg.get_column("len").to_list() == [n_rows] * len(steps)
    m = r.metrics()
    assert all(math.isnan(x) for x in m.get_column("kl").to_list())
    assert [i for i in r.issues] == []


# --------------------------------------------------------------------------------------
# property: any scalar metrics dict survives the JSONL round trip
# --------------------------------------------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_metric_keys = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_/0123456789", min_size=1, max_size=12).filter(
    lambda k: k not in ("step", "nonfinite") and not k.startswith("/") and not k.endswith("/") and "//" not in k)
_metric_values = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-2**62, 2**62),
                           st.booleans(), st.text(max_size=5))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(metrics=st.dictionaries(_metric_keys, _metric_values, max_size=6), step=st.integers(0, 10**7))
def test_metrics_round_trip_property(tmp_path_factory: pytest.TempPathFactory, metrics: dict, step: int) -> None:
    run = tmp_path_factory.mktemp("prop") / "run"
    with make_writer(run, fsync=False) as w:
        w.log_metrics(step, metrics)
    r = RunReader(run)
    row = r.metrics().row(0, named=True)
    assert r.issues == []
    assert row.pop("step") == step
    assert set(row) == set(metrics)
    for k, v in metrics.items():
        got = row[k]
        if isinstance(v, float) and math.isnan(v):
            assert isinstance(got, float) and math.isnan(got)
        else:
            assert got == v and type(got) is type(v), (k, v, got)


def test_file_checks_are_reused_for_unchanged_files_only(tmp_path: Path, monkeypatch) -> None:
    """A reader given an earlier reader's file_checks() opens only new or changed step files;
    files with issues are never recorded (their issues are reported again), and a malformed
    record is ignored."""
    run = tmp_path / "run"
    with make_writer(run) as w:
        for step in range(4):
            w.write_tokens(step, expected_tokens(step, 200))
    bad = run / "tokens" / "step-000003.parquet"
    bad.write_bytes(bad.read_bytes()[:100])
    first = RunReader(run)
    first_frame = first.tokens().collect()
    record = json.loads(json.dumps(first.file_checks()))  # survives JSON
    assert sorted(record["files"]) == [f"tokens/step-00000{i}.parquet" for i in range(3)]

    checked: list[str] = []
    orig = RunReader._check_file
    monkeypatch.setattr(RunReader, "_check_file",
                        lambda self, kind, step, path, size: checked.append(path.name) or orig(self, kind, step, path, size))
    again = RunReader(run, file_checks=record)
    assert_frame_equal(again.tokens().collect(), first_frame)
    assert checked == ["step-000003.parquet"]  # only the file with an issue
    assert [i.path.name for i in again.issues] == ["step-000003.parquet"]

    checked.clear()
    with make_writer(run, resume=True) as w:
        w.write_tokens(4, expected_tokens(4, 200))
    changed = run / "tokens" / "step-000001.parquet"
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 1_000_000))
    assert RunReader(run, file_checks=record).steps("tokens") == [0, 1, 2, 4]
    assert sorted(checked) == ["step-000001.parquet", "step-000003.parquet", "step-000004.parquet"]

    for junk in (None, [], {"files": 3}, {"schemas": [[["step", "Object"]]], "files": {"tokens/step-000000.parquet": [1, 2, 3, 0]}},
                 {"schemas": [], "files": {"../x": [1, 2, 3, 0]}}, {"schemas": "x", "files": {"tokens/a": "b"}}):
        assert RunReader(run, file_checks=junk).steps("tokens") == [0, 1, 2, 4]
