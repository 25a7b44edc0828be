"""The dashboard's loaders without a page: run discovery under the root, the path checks, the
cache stamp, step/sample-filtered token reads, token decoding, and `diagnose dashboard`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("streamlit")

from dashboards import data  # noqa: E402
from diagnose.cli import app as cli_app  # noqa: E402
from diagnose.synth import write_synthetic_run  # noqa: E402
from diagnose.synth.foreign import write_open_instruct_run, write_trl_run, write_verl_run  # noqa: E402

SMALL = {"steps": 6, "collapse_at": None, "samples_per_step": 8, "tokens_per_sample": 48}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    r = tmp_path_factory.mktemp("dash_data") / "runs"
    write_synthetic_run(r / "a", **SMALL)
    write_synthetic_run(r / "group" / "b", seed=1, **SMALL)
    write_trl_run(r / "adapters" / "trl", steps=4)  # two runs one folder down: a container, not a run
    write_open_instruct_run(r / "adapters" / "oi", steps=4)
    write_verl_run(r / "verl", steps=4)  # metrics JSONL + rollout_data/: one run
    write_synthetic_run(r / ".hidden", **SMALL)
    (r / "notes").mkdir()
    (r / "notes" / "readme.txt").write_text("not a run")
    return r


def test_discover_runs(root, tmp_path):
    runs = data.discover_runs(root)
    assert [(r.rel, r.format) for r in runs] == [
        ("a", "native"), ("adapters/oi", "open_instruct"), ("adapters/trl", "trl"), ("group/b", "native"),
        ("verl", "verl")]
    assert all(r.path.is_relative_to(root.resolve()) for r in runs)
    # the root itself may be a run
    assert [r.rel for r in data.discover_runs(root / "a")] == ["."]
    assert data.discover_runs(tmp_path / "missing") == []


def test_discovery_skips_symlinks_leading_outside(root, tmp_path):
    outside = tmp_path / "outside"
    write_synthetic_run(outside / "x", **SMALL)
    link = root / "link_out"
    link.symlink_to(outside, target_is_directory=True)
    try:
        assert "link_out/x" not in [r.rel for r in data.discover_runs(root)]
        with pytest.raises(data.OutsideRoot):
            data.resolve_run(root, "link_out/x")
    finally:
        link.unlink()


@pytest.mark.parametrize("rel", ["..", "../x", "/etc", "a/../../x", "", "missing"])
def test_resolve_run_refuses_paths_outside_or_missing(root, rel):
    with pytest.raises(data.OutsideRoot):
        data.resolve_run(root, rel)


def test_resolve_run(root):
    assert data.resolve_run(root, "group/b") == (root / "group" / "b").resolve()
    assert data.resolve_run(root / "a", ".") == (root / "a").resolve()


def test_runs_root_precedence(tmp_path):
    env = {data.ROOT_ENV: str(tmp_path / "env")}
    assert data.runs_root(["dashboards/app.py", "--", str(tmp_path / "arg")], env) == (tmp_path / "arg").resolve()
    assert data.runs_root(["dashboards/app.py"], env) == (tmp_path / "env").resolve()
    assert data.runs_root(["pytest", str(tmp_path / "arg")], env) == (tmp_path / "env").resolve()  # not our script
    assert data.runs_root(["x"], {}) == Path("runs").resolve()


def test_run_stamp_tracks_new_steps_not_the_scan_cache(tmp_path):
    run = tmp_path / "r"
    write_synthetic_run(run, **SMALL)
    s0 = data.run_stamp(run)
    (run / ".diagnose").mkdir()
    (run / ".diagnose" / "x").write_text("cache")
    assert data.run_stamp(run) == s0
    os.utime(run / "tokens", ns=(1, 1))  # a new step file changes the folder's mtime
    assert data.run_stamp(run) != s0
    assert data.run_stamp(tmp_path / "missing") == ()


def test_token_rows_are_one_rollout(root):
    src = data.source(root / "a").value
    assert data.table_steps(src, "tokens") == list(range(6))
    rows = data.token_rows(src, 3, 2)
    assert rows.height > 0
    assert set(rows.get_column("step").to_list()) == {3} and set(rows.get_column("sample_id").to_list()) == {2}
    assert rows.get_column("position").is_sorted()
    assert data.token_rows(src, 3, 2, limit=5).height == 5
    counts = data.token_counts_at(src, 3)
    assert counts.height == 8
    roll = data.rollouts_at(src, 3, [2], with_text=True)
    assert roll.get_column("sample_id").to_list() == [2] and "completion" in roll.columns


def test_adapter_tables(root):
    src = data.source(root / "adapters" / "oi").value
    steps = data.table_steps(src, "tokens")
    assert steps
    sid = data.token_counts_at(src, steps[0]).get_column("sample_id")[0]
    rows = data.token_rows(src, steps[0], sid)
    assert rows.height > 0 and set(rows.get_column("sample_id").to_list()) == {sid}
    trl = data.source(root / "adapters" / "trl").value
    assert data.table_steps(trl, "tokens") == [] and data.token_rows(trl, 0, 0).height == 0
    assert data.rollouts_at(trl, 1).height > 0  # TRL's first logged global step is 1


def test_loaders_return_messages_not_exceptions(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    assert not data.scan(bad).ok and "no known run layout" in data.scan(bad).error
    assert not data.source(tmp_path / "missing").ok
    assert data.capability(bad).ok and data.capability(bad).value is None
    (bad / "capability").mkdir()
    (bad / "capability" / "summary.parquet").write_bytes(b"garbage")
    assert not data.capability(bad).ok and "summary.parquet" in data.capability(bad).error


def test_decode_tokens(tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    tok = Tokenizer(WordLevel({"hello": 0, "world": 1, "[UNK]": 2}, unk_token="[UNK]"))
    run = tmp_path / "run"
    (run / "checkpoints" / "step-000002").mkdir(parents=True)
    tok.save(str(run / "checkpoints" / "step-000002" / "tokenizer.json"))
    f = data.find_tokenizer_file(run)
    assert f == run / "checkpoints" / "step-000002" / "tokenizer.json"
    texts = data.decode_tokens(f, [0, 1, 7, 99], [{"name": "im_end", "text": "<|im_end|>", "token_id": 99}])
    assert texts == {0: "hello", 1: "world", 7: "⟨7⟩", 99: "<|im_end|>"}
    assert data.decode_tokens(None, [5]) == {5: "⟨5⟩"}
    assert data.find_tokenizer_file(tmp_path) is None


# ---------------------------------------------------------------------------------------------
# diagnose dashboard
# ---------------------------------------------------------------------------------------------


def test_dashboard_command_line(tmp_path):
    from diagnose.dashboard_launch import app_path, streamlit_command

    cmd = streamlit_command(tmp_path, port=8600, open_browser=False)
    assert cmd[1:4] == ["-m", "streamlit", "run"] and Path(cmd[4]) == app_path() and app_path().is_file()
    i = cmd.index("--server.address")
    assert cmd[i + 1] == "127.0.0.1"
    assert cmd[cmd.index("--server.port") + 1] == "8600"
    assert cmd[cmd.index("--server.headless") + 1] == "true"
    assert cmd[cmd.index("--browser.gatherUsageStats") + 1] == "false"
    assert cmd[-2:] == ["--", str(tmp_path)]


def test_dashboard_cli_launches_streamlit_on_localhost(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import diagnose.dashboard_launch as dl

    calls = []
    real = dl.launch
    monkeypatch.setattr(dl, "launch", lambda root, **kw: real(root, exec_fn=lambda *a: calls.append(a), **kw))
    res = CliRunner().invoke(cli_app, ["dashboard", str(tmp_path), "--port", "8611", "--no-browser"])
    assert res.exit_code == 0, res.output
    (exe, argv, env), = calls
    assert argv[argv.index("--server.address") + 1] == "127.0.0.1"
    assert env[dl.ROOT_ENV] == str(tmp_path.resolve())
    assert argv[-1] == str(tmp_path.resolve())


def test_dashboard_cli_errors(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import diagnose.dashboard_launch as dl

    res = CliRunner().invoke(cli_app, ["dashboard", str(tmp_path / "missing")])
    assert res.exit_code == 2 and "no such directory" in res.output
    monkeypatch.setattr(dl, "launch", lambda root, **kw: None)
    res = CliRunner().invoke(cli_app, ["dashboard", str(tmp_path), "--host", "0.0.0.0"])
    assert res.exit_code == 0 and "readable from the network" in res.output
    assert dl.is_loopback("127.0.0.1") and dl.is_loopback("::1") and dl.is_loopback("localhost")
    assert not dl.is_loopback("0.0.0.0") and not dl.is_loopback("example.com")
