"""`diagnose.figures`: the one figures module of the reports, the dashboard and the notebooks."""

from __future__ import annotations

from pathlib import Path

import pytest

from diagnose import figures
from diagnose.scan.run import scan_run
from diagnose.synth import write_synthetic_run

SMALL = {"steps": 40, "samples_per_step": 8, "tokens_per_sample": 48}


@pytest.fixture(scope="module")
def collapse(tmp_path_factory):
    run = tmp_path_factory.mktemp("figs") / "run"
    write_synthetic_run(run, collapse_at=24, seed=1, **SMALL)
    return scan_run(run, use_cache=False)


def test_token_chart_shows_only_the_implicated_series(collapse):
    assert collapse.episodes and collapse.episodes[0].implicated
    fig = figures.token_figure(collapse)
    implicated = {c.signal for e in collapse.episodes for t in e.implicated for c in t.contexts}
    shown = [t for t in fig.data if t.visible is True]
    hidden = [t for t in fig.data if t.visible == "legendonly"]
    assert len(shown) == len(implicated) and len(shown) + len(hidden) == len(fig.data)
    assert {t.hovertemplate.split("<br>")[0] for t in shown} == implicated
    assert len(hidden) > len(shown) and all(t.legendgroup == "more" for t in hidden)
    # the signature rise is listed first
    first = fig.data[0].hovertemplate.split("<br>")[0]
    sig = [c.signal for e in collapse.episodes for t in e.implicated for c in t.contexts if c.signature]
    if sig:
        assert first == sig[0]


def test_episode_shading_is_one_function(collapse):
    fig = figures.overview_figure(collapse)
    (e,) = collapse.episodes
    rects = [s for s in fig.layout.shapes if s.type == "rect"]
    assert rects and rects[0].x0 == e.onset_step - 0.5
    assert any(a.text == f"episode 1: onset {e.onset_step}" for a in fig.layout.annotations)


def test_escapes():
    assert figures.esc('<a href="x">') == "&lt;a href=&quot;x&quot;&gt;"
    assert figures.plot_text('<b>"q"</b>') == '&lt;b&gt;"q"&lt;/b&gt;'
    assert figures.esc(None) == ""


def test_nothing_draws_figures_elsewhere():
    """One figures module: no plotly figure is built in the report, the dashboard or the notebooks."""
    root = Path(__file__).resolve().parents[1]
    assert not (root / "dashboards" / "figures.py").exists()
    for f in [root / "diagnose" / "scan" / "html.py", *sorted((root / "dashboards").rglob("*.py")),
              *sorted((root / "notebooks").glob("*.ipynb"))]:
        text = f.read_text()
        assert "go.Scatter(" not in text and "add_vrect(" not in text and "def esc(" not in text, f
