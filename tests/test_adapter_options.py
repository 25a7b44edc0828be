"""The adapter table: `Adapter` protocol, `step_of_file`, `load_run` options (``metrics``,
``run``, ``tokenizer``), several runs in one folder (`AmbiguousRun`), and the CLI flags that
carry them (`diagnose scan --metrics/--run/--tokenizer`, ``--format`` from the table)."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
from typer.testing import CliRunner

import diagnose.adapters as adapters
from diagnose.adapters import FORMATS, Adapter, AmbiguousRun, UnknownRunLayout, load_run, step_of_file
from diagnose.adapters import native as native_adapter
from diagnose.cli import RunFormat, app
from diagnose.scan.run import scan_run
from diagnose.synth import write_synthetic_run

runner = CliRunner()
SMALL = {"steps": 12, "samples_per_step": 4, "tokens_per_sample": 48}


pytestmark = pytest.mark.usefixtures("diagnose_home")  # tests/conftest.py


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("opts") / "run"
    write_synthetic_run(run, collapse_at=None, seed=5, **SMALL)
    return run


@pytest.fixture
def multi(monkeypatch):
    """A fake ``conversations`` adapter whose folders hold two runs, ``a`` and ``b``; it reads the
    folder as our own format and records the options its ``load`` was given."""
    calls: list[dict] = []
    mod = types.ModuleType("fake_multi_adapter")
    mod.detect = lambda p: True
    mod.has_candidates = lambda p: True
    mod.runs = lambda p: ["a", "b"]
    mod.run_alias = lambda p, name: name
    mod.step_of_file = lambda rel, single_file: "global"
    mod.OPTIONS = ("run", "metrics")

    def load(p, run=None, metrics=None):
        calls.append({"run": run, "metrics": metrics})
        src = native_adapter.load(p)
        src.format = "conversations"
        return src

    mod.load = load
    monkeypatch.setitem(sys.modules, "fake_multi_adapter", mod)
    monkeypatch.setitem(adapters.ADAPTERS, "conversations", "fake_multi_adapter")
    return calls


def test_every_format_module_is_an_adapter():
    from diagnose.adapters._common import hooks

    for fmt in FORMATS:
        mod = adapters.adapter(fmt)
        assert isinstance(mod, Adapter), fmt
        assert set(mod.OPTIONS) <= {*adapters.LOAD_OPTIONS, "file_checks", "trackers"}, fmt
        # the trackers' data goes to the formats whose metrics may live in a tracker, and only those
        assert ("trackers" in mod.OPTIONS) == (fmt in adapters.TRACKED_FORMATS), fmt
        # a format that lists runs takes run=, and only such a format
        assert ("run" in mod.OPTIONS) == (mod.runs is not hooks.runs), fmt


@pytest.mark.parametrize(("fmt", "rel", "single", "want"), [
    ("native", "tokens/step-000012.parquet", False, 12),
    ("native", "rollouts/step-000003.parquet", False, 3),
    ("native", "metrics.jsonl", False, "metrics"),
    ("native", "run.json", False, "global"),
    ("trl", "out/completions/completions_00040.parquet", False, 40),
    ("trl", "checkpoint-10/trainer_state.json", False, "global"),  # names the reward columns (trl.py)
    ("trl", "README.md", False, "global"),
    ("verl", "rollout_data/7.jsonl", False, 7),
    ("verl", "logs/grpo.jsonl", False, "metrics"),
    ("open_instruct", "x_rollouts_3.jsonl", False, "global"),
    ("conversations", "dumps/step_5.jsonl", False, 5),
    ("conversations", "step-000006.jsonl", False, 6),
    ("conversations", "chats.jsonl", False, "global"),
    ("conversations", "7.jsonl", True, "global"),
])
def test_step_of_file(fmt, rel, single, want):
    assert step_of_file(fmt, rel, single) == want


def test_an_unused_option_is_named_in_the_notes(run_dir):
    src = load_run(run_dir, tokenizer="some/tokenizer")
    assert any("tokenizer=some/tokenizer" in n and "not used by the native adapter" in n for n in src.notes)
    assert not any("not used" in n for n in load_run(run_dir).notes)


def test_several_runs_need_a_name(run_dir, multi):
    with pytest.raises(AmbiguousRun) as e:
        load_run(run_dir, format="conversations")
    assert isinstance(e.value, UnknownRunLayout) and e.value.runs == ["a", "b"]
    assert "a, b" in str(e.value) and "--run NAME" in str(e.value)
    with pytest.raises(AmbiguousRun, match="no conversations run named 'zz'"):
        load_run(run_dir, format="conversations", run="zz")
    assert multi == []  # never loaded, never merged
    src = load_run(run_dir, format="conversations", run="b", metrics=run_dir / "metrics.jsonl", tokenizer="t")
    assert multi == [{"run": "b", "metrics": run_dir / "metrics.jsonl"}]
    assert any("tokenizer=t" in n for n in src.notes)


def test_load_run_is_the_one_place_a_run_is_chosen(run_dir, multi):
    """The adapter's ``load`` gets the name of the run to read: an alias resolved (the
    adapter's ``run_alias``), the only run of a folder named, a name of no run refused."""
    mod = sys.modules["fake_multi_adapter"]
    mod.run_alias = lambda p, name: {"A": "a"}.get(name, name)
    load_run(run_dir, format="conversations", run="A")
    assert multi[-1]["run"] == "a"
    with pytest.raises(AmbiguousRun, match="no conversations run named 'zz'"):
        load_run(run_dir, format="conversations", run="zz")
    mod.runs = lambda p: ["only"]
    load_run(run_dir, format="conversations")
    assert multi[-1]["run"] == "only"


def test_run_of_a_folder_that_is_one_run_is_noted(run_dir):
    src = load_run(run_dir, run="x")
    assert any("option run=x is not used" in n and "one native run" in n for n in src.notes)


def test_cli_scan_lists_the_runs_and_takes_run(run_dir, multi):
    res = runner.invoke(app, ["scan", str(run_dir), "--format", "conversations", "--no-cache"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1 and "a, b" in err and "--run NAME" in err
    res = runner.invoke(app, ["scan", str(run_dir), "--format", "conversations", "--run", "a", "--no-cache",
                              "--metrics", str(run_dir / "metrics.jsonl"), "--json"])
    assert res.exit_code in (0, 1), res.output
    assert multi[-1] == {"run": "a", "metrics": run_dir / "metrics.jsonl"}


def test_format_choices_come_from_the_adapter_table():
    assert [f.value for f in RunFormat] == ["auto", *FORMATS]


def test_the_cache_keys_on_the_options(run_dir, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    scan_run(run)
    assert scan_run(run).cache.hit
    r = scan_run(run, tokenizer="some/tokenizer")
    assert not r.cache.hit and "load options" in r.cache.reason and r.cache.signals == "full"
    assert scan_run(run, tokenizer="some/tokenizer").cache.hit
    assert not scan_run(run).cache.hit


def test_a_step_mismatch_is_one_kind_of_issue(run_dir, tmp_path):
    """Native: a step file holding another step's rows is a STEP_MISMATCH issue (not text the
    cache must recognise), and the cache then recomputes every step."""
    import shutil

    from diagnose.adapters._common.issues import IssueLog
    from diagnose.source import STEP_MISMATCH

    log = IssueLog()
    log.step_mismatch("f.jsonl", "lines", [3], 2, "the 'step' key")
    (issue,) = log.finish()
    assert issue.kind == STEP_MISMATCH and issue.message == (
        "lines have step(s) [3] but the file name says 2; the 'step' key is authoritative")

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    scan_run(run)
    tokens = run / "tokens"
    (tokens / "step-000011.parquet").rename(tokens / "step-000012.parquet")  # step 11's rows, named 12
    src = load_run(run)
    assert src.has_step_mismatch
    assert [i.kind for i in src.issues if "file name says 12" in i.message] == [STEP_MISMATCH]
    r = scan_run(run)
    assert r.cache.signals == "full" and "file/step mismatch" in r.cache.reason
