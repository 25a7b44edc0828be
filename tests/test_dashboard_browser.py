"""End to end in a real headless browser: `diagnose dashboard` serves a generated run on a free
localhost port, Chromium (driven by Playwright's sync API) opens the overview, the token viewer
and the episode explorer, and checks that the plotly figures are drawn and no exception box
appears. Screenshots land in the test's tmp_path.

Chromium: $DIAGNOSE_CHROMIUM, else ``chromium`` / ``chromium-browser`` / ``google-chrome`` on
PATH (scripts/setup.sh installs Debian's ``chromium`` where apt is available), else a
browser Playwright downloaded itself. Skipped, with the reason, when none is found.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("streamlit")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')")

from _live_writers import LiveWriter  # noqa: E402
from diagnose.synth import write_synthetic_run  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _dashboard_runs import make_demo_like_root  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
STARTUP_S = 90
PAGE_MS = 45_000


def chromium_path() -> str | None:
    env = os.environ.get("DIAGNOSE_CHROMIUM")
    if env:
        return env if Path(env).is_file() else None
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        p = shutil.which(name)
        if p:
            return p
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``collapse`` (40 steps), and ``growing``: 12 of the 15 steps of ``growing-src`` (beside
    the root), which `test_live_run_refreshes_itself` writes on while the page is open."""
    root = tmp_path_factory.mktemp("browser") / "runs"
    write_synthetic_run(root / "collapse", steps=40, collapse_at=22, samples_per_step=16, tokens_per_sample=48)
    write_synthetic_run(root.parent / "growing-src", steps=15, collapse_at=None, samples_per_step=8,
                        tokens_per_sample=48)
    grow = LiveWriter(root.parent / "growing-src", root / "growing", "native", pause=0)
    grow.start()
    for s in range(12):
        grow.write_step(s)
    return root


@pytest.fixture(scope="module")
def server(runs_root: Path, tmp_path_factory: pytest.TempPathFactory):
    yield from serve(runs_root, tmp_path_factory)


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory: pytest.TempPathFactory):
    yield from serve(make_demo_like_root(tmp_path_factory.mktemp("browser_demo") / "runs"), tmp_path_factory)


def serve(root: Path, tmp_path_factory: pytest.TempPathFactory):
    """`diagnose dashboard ROOT` on a free port until the module's tests are done; yields its URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("browser_log") / "streamlit.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "diagnose.cli", "dashboard", str(root), "--port", str(port),
                                 "--no-browser"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            try:
                with urllib.request.urlopen(base + "/_stcore/health", timeout=2) as r:
                    if r.read().strip() == b"ok":
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"dashboard did not start (exit {proc.poll()}):\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.3)
        yield base
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # our own session: streamlit and nothing else
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


@pytest.fixture(scope="module")
def browser():
    exe = chromium_path()
    with sync_api.sync_playwright() as p:
        if exe is None:
            try:
                b = p.chromium.launch(headless=True)  # a browser `playwright install` put in place, if any
            except Exception as e:  # noqa: BLE001
                pytest.skip(f"no Chromium found (apt-get install chromium, or set DIAGNOSE_CHROMIUM): {e}".splitlines()[0])
        else:
            b = p.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


def settle(page, n_plots: int) -> None:
    page.wait_for_function(f"document.querySelectorAll('.js-plotly-plot .main-svg').length >= {n_plots}",
                           timeout=PAGE_MS)
    # the script run is over when streamlit's status widget is gone
    page.wait_for_function("!document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=PAGE_MS)


def no_exception(page) -> None:
    boxes = page.locator('[data-testid="stException"]')
    assert boxes.count() == 0, boxes.first.inner_text()[:2000]


def test_dashboard_in_browser(server, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1400, "height": 1800})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))

    page.goto(server + "/?run=collapse")
    settle(page, 2)
    no_exception(page)
    assert page.get_by_text("COLLAPSE at step", exact=False).count() >= 1
    assert page.locator(".js-plotly-plot").count() == 2
    page.screenshot(path=str(tmp_path / "overview.png"))

    page.goto(server + "/tokens?run=collapse")
    settle(page, 1)
    page.wait_for_selector("div.dg-tokens span.t", timeout=PAGE_MS)
    no_exception(page)
    ctrl = page.locator("div.dg-tokens span.c")
    assert ctrl.count() >= 1
    assert "p(<|im_end|>) = " in (ctrl.first.get_attribute("title") or "")  # the hover text
    page.screenshot(path=str(tmp_path / "tokens.png"))

    page.goto(server + "/episodes?run=collapse")
    settle(page, 1)
    no_exception(page)
    page.get_by_role("button", name="open in the token viewer").last.click()
    page.wait_for_url("**/tokens**", timeout=PAGE_MS)
    page.wait_for_selector("div.dg-tokens span.t", timeout=PAGE_MS)
    settle(page, 1)
    no_exception(page)
    page.screenshot(path=str(tmp_path / "episode_to_tokens.png"))
    assert not errors, errors


# --- every page of a demo-like run, as a newcomer sees it (issue 22) ---------------------------

PAGES = ("", "control-tokens", "episodes", "tokens", "probe", "compare")

#: Line traces (in order of drawing) whose points all coincide with a later one that is not wider
#: and not dashed: the earlier one is invisible under it.
HIDDEN_SERIES_JS = """() => {
  const out = [];
  for (const gd of document.querySelectorAll('.js-plotly-plot')) {
    const d = (gd._fullData || []).filter(t => t.type === 'scatter' && t.visible === true && !t.stackgroup
                                                && String(t.mode).includes('lines') && t.x && t.y);
    for (let i = 0; i < d.length; i++) for (let j = i + 1; j < d.length; j++) {
      const a = d[i], b = d[j];
      if (a.xaxis !== b.xaxis || a.yaxis !== b.yaxis || a.x.length !== b.x.length || a.y.length !== b.y.length) continue;
      let same = true;
      for (let k = 0; k < a.y.length && same; k++) same = a.x[k] === b.x[k] && Math.abs(a.y[k] - b.y[k]) < 1e-12;
      const dashed = (b.line.dash || 'solid') !== 'solid';
      if (same && !dashed && !(a.line.width > b.line.width)) out.push(a.name + ' under ' + b.name);
    }
  }
  return out;
}"""

#: Dataframes taller than their rows (empty rows below the last one): [rows, height in px].
EMPTY_ROWS_JS = """() => Array.from(document.querySelectorAll('[data-testid="stDataFrame"]')).map(el => {
  const g = el.querySelector('table'); const rows = g ? Number(g.getAttribute('aria-rowcount')) : 0;
  return [rows, el.getBoundingClientRect().height];
}).filter(([rows, h]) => rows > 0 && h > Math.min(400, 36 * rows + 24) + 2)"""

#: Metric tiles whose label is cut (an ellipsis): their text.
CUT_LABELS_JS = """() => Array.from(document.querySelectorAll('[data-testid="stMetricLabel"] .stMarkdownEllipsis'))
  .filter(el => el.scrollWidth > el.clientWidth + 1).map(el => el.textContent)"""


def test_every_page_of_a_demo_like_run(demo_server, browser, tmp_path):
    """Every page of the run `scripts/demo.sh` leaves, in Chromium: no exception, no page error, no
    table with empty rows, no line hidden under another, no cut tile label; the flat-zero KL panel
    says why it is flat; the probe's results are on the overview and the probe page in words; the
    cache details are not in the overview header; tool output is grey, not coloured by probability."""
    page = browser.new_page(viewport={"width": 1400, "height": 2400})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    for name in PAGES:
        page.goto(f"{demo_server}/{name}?run=collapse")
        settle(page, 1)
        no_exception(page)
        page.screenshot(path=str(tmp_path / f"demo_{name or 'overview'}.png"), full_page=True)
        assert page.evaluate(HIDDEN_SERIES_JS) == [], name
        assert page.evaluate(EMPTY_ROWS_JS) == [], name
        assert page.evaluate(CUT_LABELS_JS) == [], name
        text = page.inner_text("body")
        if name == "":
            assert "no KL penalty" in page.evaluate(
                "() => Array.from(document.querySelectorAll('.js-plotly-plot')).flatMap("
                "gd => (gd.layout.annotations || []).map(a => a.text)).join(' ')")
            assert "capability:" in text and "what broke:" in text and "first to move:" in text
            caption = page.locator('[data-testid="stCaptionContainer"]').first.inner_text()
            assert "cache" not in caption and "computed" not in caption, caption
        if name == "probe":
            assert "the evidence supports" in text and "by generation, not by knowledge" in text
        if name == "tokens":
            page.wait_for_selector("div.dg-tokens span.t", timeout=PAGE_MS)
            tool = page.locator("div.dg-tokens span.t.o")
            assert tool.count() > 0
            assert {tool.nth(i).evaluate("e => getComputedStyle(e).backgroundColor") for i in range(min(20, tool.count()))} \
                == {"rgba(0, 0, 0, 0)"}
        if name == "episodes":
            assert "What broke" in text
    assert not errors, errors


def test_hidden_series_check_catches_a_line_under_another(browser, tmp_path):
    """The check above fails on two equal lines of equal width (the probe page before issue 22)."""
    import plotly.graph_objects as go

    fig = go.Figure([go.Scatter(x=[1, 2], y=[0.5, 0.1], mode="lines", name="capability"),
                     go.Scatter(x=[1, 2], y=[0.5, 0.1], mode="lines", name="format")])
    html = tmp_path / "fig.html"
    html.write_text(fig.to_html(include_plotlyjs=True, full_html=True))
    page = browser.new_page()
    page.goto(html.as_uri())
    settle(page, 1)
    assert page.evaluate(HIDDEN_SERIES_JS) == ["capability under format"]
    from diagnose.figures import keep_overlaps_visible

    html.write_text(keep_overlaps_visible(fig).to_html(include_plotlyjs=True, full_html=True))
    page.goto(html.as_uri())
    settle(page, 1)
    assert page.evaluate(HIDDEN_SERIES_JS) == []


def test_live_run_refreshes_itself(server, browser, runs_root):
    """A run still being written is marked live and its page follows new steps without a reload
    (the sidebar's timer fragment reruns the app when the run's files change)."""
    from dashboards.data import REFRESH_SECONDS

    page = browser.new_page(viewport={"width": 1400, "height": 1400})
    page.goto(server + "/?run=growing")
    settle(page, 2)
    no_exception(page)
    steps = page.locator('[data-testid="stMetricValue"]').first
    assert steps.inner_text().strip() == "12"
    assert page.get_by_text("live", exact=True).count() >= 1
    grow = LiveWriter(runs_root.parent / "growing-src", runs_root / "growing", "native", pause=0)
    for s in range(12, 15):
        grow.write_step(s)
    page.wait_for_function("document.querySelector('[data-testid=\"stMetricValue\"]').innerText.trim() === '15'",
                           timeout=(REFRESH_SECONDS * 3 + 30) * 1000)
    settle(page, 2)
    no_exception(page)
