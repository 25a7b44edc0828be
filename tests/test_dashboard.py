"""Every dashboard page under Streamlit's AppTest, against generated runs: native runs with token
traces, a native run with missing parts, adapter-format runs (TRL: text only; open-instruct:
log-probs without control tokens) and an unreadable run. No page may raise or show an error
box; each shows its key elements, or a message where a part of the run is missing."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from _dashboard_runs import make_runs_root  # noqa: E402

APP = Path(__file__).resolve().parent.parent / "dashboards" / "app.py"
PAGES = {
    "overview": "views/overview.py",
    "control_tokens": "views/control_tokens.py",
    "episodes": "views/episodes.py",
    "tokens": "views/tokens.py",
    "probe": "views/probe.py",
    "compare": "views/compare.py",
}
TIMEOUT = 120  # first scans of a run happen inside the page; generous for a loaded CI machine


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_runs_root(tmp_path_factory.mktemp("dash") / "runs")


@pytest.fixture
def app(runs_root: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("DIAGNOSE_RUNS_ROOT", str(runs_root))

    def open_page(run: str | None, page: str = "overview") -> AppTest:
        at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
        if run is not None:
            at.session_state["run"] = run
        at.run()
        if page != "overview":
            at.switch_page(PAGES[page]).run()
        return at

    return open_page


def clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def plots(at: AppTest) -> int:
    return len(at.get("plotly_chart"))


def texts(elements) -> str:
    return "\n".join(str(e.value) for e in elements)


def html(at: AppTest) -> str:
    return "\n".join(h.proto.body for h in at.html)


# ---------------------------------------------------------------------------------------------
# the run picker
# ---------------------------------------------------------------------------------------------


def test_picker_lists_runs_under_root(app):
    at = app(None)
    clean(at)
    picker = at.selectbox(key="run")
    assert set(picker.options) == {"adapters/oi", "adapters/trl", "broken", "collapse", "partial", "stable"}
    assert [t.value for t in at.title] == ["Overview"]


def test_picker_ignores_names_not_found_under_root(app):
    at = app("../../etc")
    clean(at)
    assert at.selectbox(key="run").value in at.selectbox(key="run").options
    assert "../../etc" not in texts(at.markdown) + texts(at.caption)


def test_empty_root_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("DIAGNOSE_RUNS_ROOT", str(tmp_path))
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    clean(at)
    assert "No run found" in texts(at.warning)
    assert "No run selected" in texts(at.info)


# ---------------------------------------------------------------------------------------------
# pages on a complete native run
# ---------------------------------------------------------------------------------------------


def test_overview_collapse(app):
    at = app("collapse")
    clean(at)
    assert plots(at) == 2  # reward/turn states, key signals
    assert "COLLAPSE at step" in html(at)
    labels = [m.label for m in at.metric]
    assert "collapse onset" in labels and at.metric[labels.index("collapse onset")].value.startswith("step ")
    assert len(at.dataframe) >= 1  # the episode table


def test_control_tokens_collapse(app):
    at = app("collapse", "control_tokens")
    clean(at)
    assert plots(at) == 3  # all tokens, the implicated token at its contexts, attribution
    assert at.selectbox(key="ctrl_token").value == "im_end"  # implicated first
    assert len(at.dataframe) == 1


def test_episodes_collapse_and_jump_to_token_viewer(app):
    at = app("collapse", "episodes")
    clean(at)
    assert plots(at) == 1  # onset ordering
    body = html(at)
    assert "dg-rollout" in body and "healthy_call" in body and "collapsed" in body  # before / after
    buttons = [b for b in at.button if b.label == "open in the token viewer"]
    assert len(buttons) == 6  # 3 rollouts per side, all steps have token traces
    after = [b for b in buttons if b.key.startswith("ep_after_0_open_")][0]
    _, step, sample = after.key.rsplit("_", 2)
    after.click().run()
    assert at.session_state["token_target"] == ("collapse", int(step), int(sample))
    at.switch_page(PAGES["tokens"]).run()  # AppTest does not follow st.switch_page itself
    clean(at)
    assert at.selectbox(key="tok_step").value == int(step)
    assert at.selectbox(key="tok_sample").value == int(sample)


def test_token_viewer_collapse(app):
    at = app("collapse", "tokens")
    clean(at)
    assert plots(at) == 1
    body = html(at)
    assert 'class="dg-tokens"' in body
    assert "&lt;|im_end|&gt;" in body  # control token text, escaped
    assert "p(&lt;|im_end|&gt;) = " in body  # hover: control-token probabilities
    assert "collapsed" in at.selectbox(key="tok_sample").format_func(at.selectbox(key="tok_sample").value)
    at.radio(key="tok_color").set_value("entropy").run()
    clean(at)
    assert "entropy: " in html(at)


def test_probe_collapse(app):
    at = app("collapse", "probe")
    clean(at)
    assert plots(at) == 2
    assert {m.label for m in at.metric} >= {"format score", "capability score", "gap"}
    assert "capability intact, format broken" in texts(at.markdown)


def test_compare_collapse_vs_stable(app):
    at = app("collapse", "compare")
    at.selectbox(key="compare_b").set_value("stable").run()
    clean(at)
    assert plots(at) == 1
    body = html(at)
    assert "COLLAPSE at step" in body and "HEALTHY" in body
    assert len(at.dataframe) == 2


# ---------------------------------------------------------------------------------------------
# runs with missing parts: a message in place, never a traceback
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("page", list(PAGES))
@pytest.mark.parametrize("run", ["partial", "adapters/trl", "adapters/oi", "broken"])
def test_every_page_on_every_run(app, run, page):
    at = app(run, page)
    clean(at)
    assert [t.value for t in at.title]


def test_missing_parts_are_messages(app, runs_root):
    at = app("partial", "tokens")
    clean(at)
    assert "no token traces" in texts(at.info)
    at = app("partial", "probe")
    assert f"diagnose probe {(runs_root / 'partial').resolve()}" in texts(at.info)
    at = app("partial", "control_tokens")
    assert "no token probabilities" in texts(at.info)
    assert plots(at) == 1  # the attribution metrics are still there


def test_adapter_run_without_logprobs(app):
    at = app("adapters/trl", "overview")
    clean(at)
    assert plots(at) == 2
    assert "trl" in texts(at.caption)
    at = app("adapters/trl", "tokens")
    assert "no token traces" in texts(at.info) and "TRL" in texts(at.info)
    at = app("adapters/trl", "control_tokens")
    assert "no token probabilities" in texts(at.info)


def test_adapter_run_with_logprobs_but_no_control_tokens(app):
    at = app("adapters/oi", "tokens")
    clean(at)
    assert "No control tokens are known" in texts(at.info)
    assert plots(at) == 1 and 'class="dg-tokens"' in html(at)


def test_stable_run_has_no_episode(app):
    at = app("stable", "episodes")
    clean(at)
    assert "No collapse episode in this run (verdict: healthy)" in texts(at.info)
    at = app("stable", "tokens")
    clean(at)
    assert plots(at) == 1


def test_unreadable_run(app):
    at = app("broken", "overview")
    clean(at)
    assert "Nothing readable" in texts(at.warning)


def test_unreadable_capability_results(app, runs_root):
    cap = runs_root / "stable" / "capability"
    cap.mkdir()
    (cap / "summary.parquet").write_bytes(b"not parquet")
    try:
        at = app("stable", "probe")
        clean(at)
        assert "cannot be read" in texts(at.warning)
    finally:
        (cap / "summary.parquet").unlink()
        cap.rmdir()
