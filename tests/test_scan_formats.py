"""Scanning each foreign layout: collapse found at the injected step, none in a stable run, and
corrupt files inside a run reported as issues naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from diagnose.adapters import load_run
from diagnose.cli import app
from diagnose.scan import scan_source
from diagnose.scan.run import scan_run
from diagnose.synth import write_synthetic_run
from diagnose.synth.foreign import (
    write_conversation_run,
    write_open_instruct_run,
    write_trl_run,
    write_verl_run,
)

from _scan_helpers import json_close

STEPS = 36
K = 20


pytestmark = pytest.mark.usefixtures("diagnose_home")  # tests/conftest.py


WRITERS = {
    "trl": lambda p, **kw: write_trl_run(p, **kw),
    "verl": lambda p, **kw: write_verl_run(p, **kw),
    "open_instruct": lambda p, **kw: write_open_instruct_run(p, **kw),
    "conversations": lambda p, **kw: write_conversation_run(p, **kw),
    "conversations_file": lambda p, **kw: write_conversation_run(p.with_suffix(".jsonl"), layout="file", **kw),
}


@pytest.mark.parametrize("layout", list(WRITERS))
def test_collapse_found_at_the_injected_step(tmp_path, layout):
    fr = WRITERS[layout](tmp_path / "run", steps=STEPS, collapse_at=K, seed=7)
    src = load_run(fr.path)
    assert src.format == fr.format
    res = scan_source(src)
    assert res.verdict == "collapse", res.notes
    assert len(res.episodes) == 1
    assert abs(res.episodes[0].onset_step - K) <= 2
    via_cli_api = scan_run(fr.path, use_cache=False)
    json_close(via_cli_api.to_json()["episodes"], res.to_json()["episodes"])
    assert via_cli_api.source_format == fr.format


@pytest.mark.parametrize("layout", list(WRITERS))
def test_stable_run_has_no_episode(tmp_path, layout):
    fr = WRITERS[layout](tmp_path / "run", steps=STEPS, collapse_at=None, seed=8)
    res = scan_source(load_run(fr.path))
    assert res.episodes == []
    assert res.verdict in ("healthy", "pathology")


def test_text_only_formats_say_they_have_no_token_probabilities(tmp_path):
    fr = write_verl_run(tmp_path / "run", steps=STEPS, collapse_at=K, seed=7)
    data = scan_run(fr.path, use_cache=False).to_json()
    assert data["episodes"][0]["implicated"] == []
    assert any("no token probabilities" in n for n in data["notes"])


def _issue_paths(data: dict) -> list[str]:
    return [Path(i["path"]).name for i in data["issues"]]


def test_parquet_cut_in_half_is_an_issue(tmp_path):
    fr = write_trl_run(tmp_path / "trl", steps=STEPS, collapse_at=K, seed=7)
    victim = fr.path / "completions" / "completions_00005.parquet"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    res = CliRunner().invoke(app, ["scan", str(fr.path), "--json"])
    assert "Traceback" not in res.output
    assert res.exit_code == 1  # the collapse is still found
    out = json.loads(res.stdout)
    assert victim.name in _issue_paths(out)
    assert abs(out["episodes"][0]["onset_step"] - K) <= 2
    text = CliRunner().invoke(app, ["scan", str(fr.path)])
    assert "issues (" in text.stdout and victim.name in text.stdout


def test_native_token_file_cut_in_half_is_an_issue(tmp_path):
    run = tmp_path / "native"
    write_synthetic_run(run, steps=STEPS, collapse_at=K, seed=9, samples_per_step=8, tokens_per_sample=48)
    victim = run / "tokens" / "step-000007.parquet"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    res = scan_run(run)
    out = res.to_json()
    assert victim.name in _issue_paths(out)
    assert out["n_steps"] == STEPS  # the step is still there (rollouts, probe, metrics) ...
    n_tokens = dict(zip(res.signals["step"].to_list(), res.signals["n_tokens"].to_list()))
    assert n_tokens[7] is None and all(v is not None for k, v in n_tokens.items() if k != 7)  # ... without tokens


@pytest.mark.parametrize("layout", ["verl", "conversations"])
def test_truncated_jsonl_is_an_issue(tmp_path, layout):
    fr = WRITERS[layout](tmp_path / "run", steps=STEPS, collapse_at=K, seed=7)
    victim = next(f for f in fr.files if f.name in ("12.jsonl", "step-000012.jsonl"))
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 40])  # the last line cut mid-object
    out = scan_run(fr.path).to_json()
    assert victim.name in _issue_paths(out)
    assert any(i["line"] is not None for i in out["issues"] if Path(i["path"]).name == victim.name)
    assert abs(out["episodes"][0]["onset_step"] - K) <= 2
