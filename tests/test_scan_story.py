"""What the scan tells a newcomer agrees with its own evidence (issue 22): what broke, the token
that rose judged against more than its first point, the turn that broke in the examples, the
probe's findings in the reports, the report's path after the report, tables at 80 columns."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from rich.console import Console

from diagnose.capability.reading import read_probe
from diagnose.capability.results import read_capability
from diagnose.scan.detect import DetectConfig
from diagnose.scan.episodes import find_episodes
from diagnose.scan.excerpts import broken_turn_excerpt, safe_cut
from diagnose.scan.failures import failure_modes
from diagnose.scan.html import scan_html
from diagnose.scan.formatting import fmt_shift, verdict_details
from diagnose.scan.report import render_scan
from diagnose.scan.run import scan_run
from diagnose.synth import write_synthetic_run

sys.path.insert(0, str(Path(__file__).parent))
from _dashboard_runs import make_demo_like_root  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_like_root(tmp_path_factory.mktemp("story") / "runs") / "collapse"


# ------------------------------------------------------------------------------------ what broke


def test_failure_modes_rank_what_grew_from_before_to_the_trough():
    steps = np.arange(1, 31)
    low, high = np.r_[np.full(15, 0.02), np.full(15, 0.30)], np.r_[np.full(15, 0.05), np.full(15, 0.08)]
    sig = pl.DataFrame({"step": steps, "format_error/invalid_json": low, "format_error/repeated_call": high,
                        "turn_state/collapsed": np.r_[np.full(15, 0.01), np.full(15, 0.12)],
                        "calls_right": np.r_[np.full(15, 0.9), np.full(15, 0.5)]})
    modes = failure_modes(sig, onset=16, trough=20, end_step=30)
    assert [m.signal for m in modes] == ["calls_right", "format_error/invalid_json", "turn_state/collapsed"]
    assert modes[0].before == pytest.approx(0.1) and modes[0].at_trough == pytest.approx(0.5)
    assert modes[1].text() == "a call body that is not JSON 2% -> 30% of turns"
    # repeated_call grew by 3 points only: not a mode
    assert all("repeated" not in m.signal for m in modes)


# ------------------------------------------------------------- implicated tokens: the "before" level


def _token_signals(values_before: list[float], values_after: list[float], first_step: int) -> pl.DataFrame:
    """Reward healthy for 20 steps then 0; one rollout-token probability from ``first_step`` on."""
    n = 40
    reward = [0.6 + 0.05 * ((i * 7) % 3) for i in range(20)] + [0.0] * 20
    tok = [None] * (first_step - 1) + values_before + values_after
    tok += [None] * (n - len(tok))
    return pl.DataFrame({"step": list(range(1, n + 1)), "reward": reward, "ctx/after_call_close/im_end": tok[:n]},
                        schema={"step": pl.Int64, "reward": pl.Float64, "ctx/after_call_close/im_end": pl.Float64})


def test_a_series_that_rises_from_its_first_point_is_not_a_rise_around_the_onset():
    """From the collapse preset: a rollout-token probability at ~1e-5 on the first RL step and
    0.1-0.2 from the second on is not implicated against its one first point."""
    before = [1e-5] + [0.15, 1e-5, 0.12, 0.18, 0.1, 1e-5, 0.14, 0.16, 0.11] + [0.15] * 2
    sig = _token_signals(before, [0.17] * 19, first_step=9)
    (ep,) = find_episodes(sig, DetectConfig())
    assert ep.onset_step == 21 and not ep.implicated
    assert ep.token_note and "ctx/after_call_close/im_end" in ep.token_note and "points before the onset" in ep.token_note


def test_a_series_that_starts_late_still_implicates_a_real_rise():
    sig = _token_signals([1e-4] * 12, [0.2] * 19, first_step=9)
    (ep,) = find_episodes(sig, DetectConfig())
    assert [t.token for t in ep.implicated] == ["im_end"] and ep.implicated[0].contexts[0].before == pytest.approx(1e-4)


def test_too_few_points_before_the_onset_are_named_not_judged():
    sig = _token_signals([1e-4] * 2, [0.2] * 19, first_step=19)
    (ep,) = find_episodes(sig, DetectConfig())
    assert not ep.implicated and "not judged" in (ep.token_note or "")


# ---------------------------------------------------------------------------- the broken turn


def test_excerpt_shows_the_turn_that_broke_with_context_and_never_half_a_control_string():
    healthy = '<tool_call>\n{"name": "find_item", "arguments": {"name": "rug"}}\n</tool_call><|im_end|>\n'
    tool = '<|im_start|>user\n<tool_response>\n{"sku": "sku-1821"}\n</tool_response><|im_end|>\n'
    broken = '<|im_start|>assistant\n<tool_call>\n{"name": "restock", "arguments": {"sku": "acct-4066"}}\n<tool_call>'
    text = healthy + (tool + "<|im_start|>assistant\n" + healthy) * 2 + tool + broken + "<|im_end|>\n"
    ex = broken_turn_excerpt(text, ["healthy_call"] * 3 + ["polluted"], limit=200, context=60)
    assert ex.broken_turn == 3 and '"sku": "acct-4066"' in ex and ex.startswith("…")
    assert "</tool_response>" in ex[: ex.broken_at]  # context: the tool output before the broken turn
    for cut in range(len(text)):  # no cut position lands inside a control string
        i = safe_cut(text, cut, forward=False)
        for s in ("<tool_call>", "<|im_end|>", "</tool_response>", "<|im_start|>"):
            assert not any(j < i < j + len(s) for j in (m.start() for m in re.finditer(re.escape(s), text)))
    # no broken turn: the beginning
    assert broken_turn_excerpt(healthy + tool, ["healthy_call"], limit=40).broken_turn is None


def test_examples_are_distinct_and_cut_around_the_broken_turn(demo_run):
    r = scan_run(demo_run, use_cache=False)
    (ep,) = r.episodes
    after = ep.examples_after
    assert after and len({x.excerpt for x in after}) == len(after)
    assert all(x.broken_turn is not None for x in after if any(s in ("polluted", "collapsed")
                                                               for s in (x.turn_states or [])))


# -------------------------------------------------------------------- the verdict and the reports


def test_verdict_lines_say_what_broke_what_moved_first_and_what_the_probe_found(demo_run):
    r = scan_run(demo_run, use_cache=False)
    probe = read_probe(read_capability(demo_run))
    lines = verdict_details(r, probe)
    assert lines[0].startswith("what broke: ")
    assert any(x.startswith("first to move: ") for x in lines)
    assert any(x.startswith("control token: p(<|im_end|> | after_call_open)") for x in lines)
    assert lines[-1].startswith("capability: the right calls still recognised, no longer generated")
    not_probed = verdict_details(r, None, "run `diagnose probe RUN`")
    assert not_probed[-1] == "capability: not probed yet: run `diagnose probe RUN`"


def test_reports_hold_the_probe_and_labelled_numbers(demo_run):
    r = scan_run(demo_run, use_cache=False)
    probe = read_probe(read_capability(demo_run))
    html = scan_html(r, probe=probe)
    assert "Is the skill still there?" in html and "by generation, not by knowledge" in html
    assert "first / highest / last value (raw)" in html and "medians of 5 steps" in html
    assert "What broke" in html
    console = Console(width=80, record=True, color_system=None)
    render_scan(r, console, probe=probe)
    out = console.export_text()
    assert "is the skill still there?" in out and "the evidence supports:" in out
    # identifiers in table cells are never wrapped: every moved signal shown is whole on its line
    for m in r.episodes[0].moves[:15]:
        assert any(m.signal in line for line in out.splitlines()), m.signal
    assert not [line for line in out.splitlines() if "│" in line and "…" in line]  # no cell cut short
    assert "1,000σ" not in out and fmt_shift(1000.0) == ">100σ" and fmt_shift(5.44) == "5.4σ"


def test_report_path_comes_after_the_report_and_a_later_scan_reads_the_probe(demo_run, tmp_path):
    """`diagnose scan RUN --report F` as the demo calls it (a pipe, not a terminal): the verdict
    first, the probe's reading in it (capability/ exists), the report's path last."""
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "COLUMNS": "100"}
    res = subprocess.run([sys.executable, "-m", "diagnose.cli", "scan", str(demo_run), "--report",
                          str(tmp_path / "r.html"), "--fail-on", "never"], capture_output=False, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stdout
    lines = [x for x in res.stdout.splitlines() if x.strip()]
    first = next(i for i, x in enumerate(lines) if x.startswith("COLLAPSE at step"))
    assert lines[-1].startswith("report written to ") and first < len(lines) - 1
    assert "capability: the right calls still recognised" in res.stdout
    assert "diagnose probe" not in "\n".join(lines[first:first + 8])  # it was probed: no "run diagnose probe"
    assert "Is the skill still there?" in (tmp_path / "r.html").read_text()


def test_an_unprobed_collapse_says_how_to_probe(tmp_path):
    run = tmp_path / "syn"
    write_synthetic_run(run, steps=40, collapse_at=22, samples_per_step=16, tokens_per_sample=48)
    r = scan_run(run, use_cache=False)
    console = Console(width=100, record=True, color_system=None)
    render_scan(r, console, capability_hint=f"run `diagnose probe {run}`")
    words = " ".join(console.export_text().split())  # the line wraps between words, indented
    assert f"capability: not probed yet: run `diagnose probe {run}`" in words
