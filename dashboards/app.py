"""The collapse-diagnostics dashboard: ``diagnose dashboard [RUNS_ROOT]`` (or
``streamlit run dashboards/app.py -- RUNS_ROOT``).

Entry script of a multipage app (``st.navigation``): the sidebar picks one run among the run
directories found under the runs root (never a path typed into the page), the pages in
``dashboards/views/`` show it. See docs/dashboard.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import dashboards  # noqa: F401 - installed with the package (pip install -e .)
except ImportError:  # streamlit run from a source checkout without installing: the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import streamlit as st

from dashboards import data, ui

PAGES = (
    ("views/overview.py", "Overview", "overview", ":material/monitoring:"),
    ("views/control_tokens.py", "Control tokens", "control-tokens", ":material/token:"),
    ("views/episodes.py", "Episode explorer", "episodes", ":material/timeline:"),
    ("views/tokens.py", "Token viewer", "tokens", ":material/text_fields:"),
    ("views/probe.py", "Probe", "probe", ":material/science:"),
    ("views/compare.py", "Compare", "compare", ":material/compare_arrows:"),
)

st.set_page_config(page_title="collapse diagnostics", layout="wide")
ui.css()


def follow(path: Path, stamp: tuple) -> None:
    """The live marker of the selected run, and the app rerun when the run changed on disk
    (a fragment on a timer: only a listing of the run's top-level entries per tick)."""
    now = data.run_stamp(path)
    if now != stamp:
        st.rerun(scope="app")
    age = data.last_write_age(now)
    st.caption(f":green-badge[live] written {age:.0f}s ago; refreshes every {data.REFRESH_SECONDS}s")


root = ui.root()
entries = ui.runs()
with st.sidebar:
    st.markdown("**collapse diagnostics**")
    if entries:
        formats = {e.rel: e.format for e in entries}
        rel = st.selectbox("run", list(formats), key=ui.RUN_KEY, bind="query-params",
                           help=f"run directories found under {root} (also ?run=NAME in the URL)")
        st.caption(f"format: {formats.get(rel, '?')}")
        chosen = next((e for e in entries if e.rel == rel), None)
        stamp = data.run_stamp(chosen.path) if chosen is not None else ()
        if chosen is not None and data.is_live(stamp):
            st.fragment(follow, run_every=data.REFRESH_SECONDS)(chosen.path, stamp)
    else:
        st.warning(f"No run found under `{root}`.")
    if st.button("reload", help="look for new runs and re-read the selected one"):
        data.clear_caches()
        st.rerun()
    st.caption(f"runs root: `{root}`")

nav = st.navigation([st.Page(path, title=title, url_path=url, icon=icon, default=(i == 0))
                     for i, (path, title, url, icon) in enumerate(PAGES)])
with ui.page(st.session_state.get(ui.RUN_KEY)):  # one run a page cannot read: a one-line error, not a traceback
    nav.run()
