"""`diagnose scan` / `diagnose compare`: exit codes, messages, --json, the HTML report."""

from __future__ import annotations

import json
import re
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from diagnose.cli import app
from diagnose.synth import write_synthetic_run

runner = CliRunner()

COLLAPSE_AT = 24
PAYLOAD = '<script>alert("pwn-7f3a")</script>[bold red]literal-markup[/bold red] '
SMALL = {"steps": 40, "samples_per_step": 16, "tokens_per_sample": 48}


def inject_completions(run: Path, prefix: str) -> None:
    """Prefix every rollout completion of a native run (schema unchanged)."""
    for f in sorted((run / "rollouts").glob("step-*.parquet")):
        df = pl.read_parquet(f)
        df.with_columns((pl.lit(prefix) + pl.col("completion")).alias("completion")).write_parquet(f)


pytestmark = pytest.mark.usefixtures("diagnose_home")  # tests/conftest.py


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("scan_cli")
    collapse = root / "collapse"
    write_synthetic_run(collapse, collapse_at=COLLAPSE_AT, seed=1, **SMALL)
    inject_completions(collapse, PAYLOAD)
    stable = root / "stable"
    write_synthetic_run(stable, collapse_at=None, seed=2, **SMALL)
    sick = root / "sick"
    write_synthetic_run(sick, collapse_at=None, seed=3, nan_logprobs_at=(20, 21), **SMALL)
    return {"collapse": collapse, "stable": stable, "sick": sick, "root": root}


def invoke(*args: str):
    res = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in res.output, res.output
    return res


def test_collapse_exits_1_with_verdict_first(runs):
    res = invoke("scan", runs["collapse"])
    assert res.exit_code == 1, res.output
    lines = [ln for ln in res.stdout.splitlines() if ln.strip()]
    verdict = next(ln for ln in lines if ln.startswith(("COLLAPSE", "HEALTHY", "PATHOLOGY", "INSUFFICIENT")))
    assert lines.index(verdict) <= 2  # after the header (and cache) line
    m = re.match(r"COLLAPSE at step (\d+) \(reward [\d.]+ -> [\d.e-]+, \d+% turns collapsed at trough", verdict)
    assert m and abs(int(m.group(1)) - COLLAPSE_AT) <= 2, verdict
    out = res.stdout
    assert "signals that moved" in out and "control tokens implicated" in out
    assert "p(<|im_end|> | after_call_open)" in out
    assert "rollouts before the onset" in out and "rollouts at the trough" in out
    # run text is printed literally, never as rich markup
    assert "[bold red]literal-markup[/bold red]" in out


def test_stable_exits_0(runs):
    res = invoke("scan", runs["stable"])
    assert res.exit_code == 0, res.output
    assert "HEALTHY: no collapse in 40 steps" in res.stdout


def test_fail_on(runs):
    assert invoke("scan", runs["collapse"], "--fail-on", "never").exit_code == 0
    assert invoke("scan", runs["collapse"], "--fail-on", "pathology").exit_code == 1
    sick = invoke("scan", runs["sick"], "--json")
    assert json.loads(sick.stdout)["verdict"] == "pathology"
    assert sick.exit_code == 0
    assert invoke("scan", runs["sick"], "--fail-on", "pathology").exit_code == 1
    assert invoke("scan", runs["stable"], "--fail-on", "pathology").exit_code == 0
    bad = invoke("scan", runs["stable"], "--fail-on", "sometimes")
    assert bad.exit_code == 2


def test_unknown_layout_exits_2_naming_the_path(tmp_path):
    d = tmp_path / "not_a_run"
    d.mkdir()
    (d / "notes.txt").write_text("hello\n")
    res = invoke("scan", d)
    assert res.exit_code == 2
    assert res.stdout == ""
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1 and str(d) in err and "no known run layout" in err
    assert not (d / ".diagnose").exists()


def test_missing_path_exits_2(tmp_path):
    p = tmp_path / "nope"
    res = invoke("scan", p, "--json")
    assert res.exit_code == 2 and res.stdout == ""
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1 and str(p) in err and "no such file" in err


def test_forced_format_without_its_files_exits_2(runs):
    res = invoke("scan", runs["stable"], "--format", "trl")
    assert res.exit_code == 2 and str(runs["stable"]) in res.stderr and "trl" in res.stderr


def test_internal_error_exits_3_without_traceback(runs, monkeypatch):
    import diagnose.scan.run as scan_run_mod

    def boom(*a, **k):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(scan_run_mod, "scan_run", boom)
    res = invoke("scan", runs["stable"])
    assert res.exit_code == 3 and "kaboom" in res.stderr and "internal error" in res.stderr


def test_json_is_the_only_stdout(runs):
    res = invoke("scan", runs["collapse"], "--json", "--no-cache")
    assert res.exit_code == 1
    data = json.loads(res.stdout)  # the whole of stdout is one JSON document
    assert data["schema_version"] == 1
    assert data["verdict"] == "collapse"
    assert data["source"]["format"] == "native"
    assert len(data["episodes"]) == 1
    ep = data["episodes"][0]
    assert abs(ep["onset_step"] - COLLAPSE_AT) <= 2
    for key in ("detected_step", "trough_step", "recovery_step", "end_step", "severity", "moves", "implicated",
                "examples_before", "examples_after"):
        assert key in ep
    assert ep["implicated"][0]["token"] == "im_end"
    assert isinstance(data["issues"], list) and isinstance(data["notes"], list)
    assert {"config", "signal_columns", "pathologies", "n_steps"} <= set(data)


def test_html_report_has_figures_and_escapes_rollouts(runs, tmp_path):
    out = tmp_path / "reports" / "collapse.html"
    res = invoke("scan", runs["collapse"], "--report", out, "--json")
    assert res.exit_code == 1
    json.loads(res.stdout)  # the report message went to stderr
    assert str(out) in res.stderr
    html = out.read_text(encoding="utf-8")
    assert html.count('class="plotly-graph-div"') >= 3  # overview, token probabilities, onset ordering
    assert html.count("Plotly.newPlot") >= 3
    assert len(re.findall(r"plotly\.js v\d", html)) == 1  # plotly.js embedded once, no CDN
    assert re.search(r"<script[^>]*\bsrc=", html) is None
    assert '<script>alert("pwn-7f3a")' not in html
    assert "&lt;script&gt;alert(&quot;pwn-7f3a&quot;)&lt;/script&gt;" in html
    assert '<span class="ctl">&lt;|im_end|&gt;</span>' in html
    assert not list(out.parent.glob(".*.tmp"))


def test_report_to_unwritable_place_exits_2(runs, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = invoke("scan", runs["stable"], "--report", blocker / "sub" / "r.html")
    assert res.exit_code == 2 and "cannot write the report" in res.stderr


def test_compare(runs, tmp_path):
    out = tmp_path / "cmp.html"
    res = invoke("compare", runs["collapse"], runs["stable"], "--json", "--report", out)
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["schema_version"] == 1
    ka, kb = data["key_numbers"]["a"], data["key_numbers"]["b"]
    assert abs(ka["onset_step"] - COLLAPSE_AT) <= 2 and kb["onset_step"] is None
    assert ka["implicated_token"] == "im_end" and kb["implicated_token"] is None
    assert data["collapse_token"]["token"] == "im_end"
    assert ka["max_token_prob"] > 0.5 > kb["max_token_prob"]
    assert ka["collapsed_share_end"] > 0.3 > kb["collapsed_share_end"]
    assert ka["peak"] is not None and ka["final"] < kb["final"]
    assert {r["signal"] for r in data["signals"]} >= {"reward", "turn_state/collapsed"}
    html = out.read_text(encoding="utf-8")
    assert 'class="plotly-graph-div"' in html and "Key numbers" in html
    text = invoke("compare", runs["collapse"], runs["stable"])
    assert text.exit_code == 0 and "key numbers" in text.stdout and "collapse onset" in text.stdout


def test_compare_missing_run_exits_2(runs, tmp_path):
    res = invoke("compare", runs["stable"], tmp_path / "missing")
    assert res.exit_code == 2 and str(tmp_path / "missing") in res.stderr


def test_synth_command_writes_a_run_that_scan_reads(tmp_path):
    import json as _json

    from typer.testing import CliRunner as _Runner

    from diagnose.cli import app as _app

    r = _Runner()
    out = tmp_path / "syn"
    res = r.invoke(_app, ["synth", str(out), "--steps", "36", "--collapse-at", "18"])
    assert res.exit_code == 0, res.output
    scanned = r.invoke(_app, ["scan", str(out), "--json"])
    assert scanned.exit_code == 1  # collapse found
    d = _json.loads(scanned.stdout)
    assert abs(d["episodes"][0]["onset_step"] - 18) <= 2
    again = r.invoke(_app, ["synth", str(out)])
    assert again.exit_code == 2 and "already exists" in again.stderr
