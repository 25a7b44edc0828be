"""Shared page pieces: the selected run, guarded sections, verdict box, rollout and token HTML.

Everything that comes from the run is HTML-escaped before it reaches ``st.html`` (which
sanitises on top and runs no scripts); control strings are highlighted after escaping
(`diagnose.scan.html.highlight`).
"""

from __future__ import annotations

import contextlib
import html
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
import polars as pl
import streamlit as st

from dashboards import data
from diagnose.error_line import error_line
from diagnose.figures import ctrl_probs, token_values
from diagnose.scan.html import highlight
from diagnose.scan.formatting import token_label

RUN_KEY = "run"  # the run picker's widget key (and its URL query parameter)
TOKEN_TARGET_KEY = "token_target"  # (run rel, step, sample_id) set by "open in the token viewer"
PLOT_CONFIG = {"displaylogo": False}

CSS = """
<style>
.dg-verdict { font-size: 1.05em; font-weight: 600; padding: 8px 12px; border-radius: 6px; margin: 4px 0 12px 0; }
.dg-collapse { background: #fde2e1; color: #8b0000; } .dg-pathology { background: #fff4d6; color: #7a5200; }
.dg-healthy { background: #e3f5e1; color: #1d5e1d; } .dg-insufficient_data { background: #e4ecfa; color: #1c3d7a; }
pre.dg-rollout { background: #f7f7f7; border: 1px solid #e3e3e3; padding: 8px; white-space: pre-wrap;
                 word-break: break-word; font-size: 0.8em; max-height: 360px; overflow: auto; margin: 0; }
span.ctl { background: #f3d9f7; color: #6a1b7a; font-weight: bold; border-radius: 3px; padding: 0 2px; }
div.dg-tokens { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 0.85em; line-height: 1.9;
                white-space: pre-wrap; word-break: break-word; border: 1px solid #e3e3e3; padding: 8px;
                max-height: 520px; overflow: auto; }
div.dg-tokens span.t { border-radius: 2px; padding: 1px 0; }
div.dg-tokens span.t:hover { outline: 1px solid #333; }
div.dg-tokens span.c { outline: 2px solid #6a1b7a; font-weight: bold; }
div.dg-tokens span.o { color: #888; }
.dg-legend span { display: inline-block; padding: 0 6px; margin-right: 4px; border-radius: 2px; font-size: 0.8em; }
</style>
"""


def css() -> None:
    st.html(CSS)


def root() -> Path:
    return data.runs_root()


def runs() -> list[data.RunEntry]:
    return data.cached_runs(str(root()))


def selected_run() -> data.RunEntry | None:
    """The run chosen in the sidebar picker, re-checked to stay under the root; None (and a
    message) when there is none."""
    rel = st.session_state.get(RUN_KEY)
    entries = {r.rel: r for r in runs()}
    if rel is None or rel not in entries:
        st.info(f"No run selected. Runs are looked for under `{root()}` (up to {data.MAX_DEPTH} levels down); "
                "write one with `diagnose synth runs/syn` or point `diagnose dashboard RUNS_ROOT` elsewhere.")
        return None
    try:
        data.resolve_run(root(), rel)
    except data.OutsideRoot as e:
        st.error(f"refused: {e}")
        return None
    return entries[rel]


def selected_run_or_stop() -> data.RunEntry:
    """The selected run; stops the page (after saying why) when there is none."""
    entry = selected_run()
    if entry is None:
        st.stop()
    return entry


def value_or_stop(loaded: data.Loaded, what: str, then: str = "") -> Any:
    """What a cached loader loaded; when it failed, stops the page after a warning: ``what``,
    the error, ``then`` (what to do about it)."""
    if not loaded.ok:
        st.warning(f"{what}: {loaded.error}{then}")
        st.stop()
    return loaded.value


def scan_or_stop(entry: data.RunEntry, what: str = "This run could not be scanned") -> Any:
    """The run's scan result; stops the page after saying why it cannot be had."""
    return value_or_stop(data.load_scan(entry.path), what)


def run_and_scan_or_stop() -> tuple[data.RunEntry, Any]:
    """The selected run and its scan result; stops the page (after saying why) when either is
    missing -- the preamble of every page that plots scan signals."""
    entry = selected_run_or_stop()
    return entry, scan_or_stop(entry)


@contextlib.contextmanager
def section(what: str) -> Iterator[None]:
    """A part of a page that shows a one-line message instead of a traceback if it fails."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - streamlit's own control flow derives from BaseException
        st.error(f"{what} could not be drawn: {error_line(e, limit=None)}")


def plot(fig: go.Figure | None, missing: str, key: str | None = None) -> None:
    if fig is None:
        st.info(missing)
    else:
        st.plotly_chart(fig, config=PLOT_CONFIG, key=key)


def verdict_box(result: Any, text: str) -> None:
    st.html(f'<div class="dg-verdict dg-{html.escape(result.verdict)}">{html.escape(text)}</div>')


def rollout_html(row: Mapping[str, Any], extra: Sequence[str] = ()) -> str:
    head = (f"step {row.get('step')} · sample {row.get('sample_id')} · group {row.get('group_id')} · "
            f"reward {_num(row.get('reward'))} · turns: {', '.join(row.get('turn_states') or []) or '—'}")
    return (f'<div style="font-size:0.85em;color:#555;margin:6px 0 2px 0">{html.escape(head)}</div>'
            f'<pre class="dg-rollout">{highlight(row.get("completion"), extra)}</pre>')


def _num(v: Any) -> str:
    try:
        return f"{float(v):.3g}"
    except (TypeError, ValueError):
        return "—"


def open_in_token_viewer(entry: data.RunEntry, step: int, sample_id: int, key: str) -> None:
    """A button that opens this rollout in the token viewer."""
    if st.button("open in the token viewer", key=key):
        st.session_state[TOKEN_TARGET_KEY] = (entry.rel, int(step), int(sample_id))
        st.switch_page("views/tokens.py")


def _color(v: float | None, color_by: str, vmax: float) -> str:
    if v is None:
        return "transparent"
    if color_by == "entropy":  # white -> orange with entropy
        a = max(0.0, min(1.0, v / vmax if vmax > 0 else 0.0))
        return f"rgba(255,127,14,{0.08 + 0.82 * a:.2f})"
    a = max(0.0, min(1.0, v))  # red (unlikely) -> green (likely)
    r, g = int(220 * (1 - a) + 60 * a), int(60 * (1 - a) + 170 * a)
    return f"rgba({r},{g},70,{0.18 + 0.5 * (1 - a) if a < 0.5 else 0.25:.2f})"


def token_html(rows: pl.DataFrame, texts: Mapping[int, str], control_tokens: Sequence[Mapping[str, Any]],
               color_by: str = "probability") -> str:
    """One rollout's tokens as escaped HTML spans, coloured by probability or entropy, control
    tokens outlined, tool-output tokens grey; each span's tooltip lists the control tokens'
    probabilities at that position."""
    vals = token_values(rows, color_by)
    finite = [v for v in vals if v is not None]
    vmax = max(finite) if finite else 1.0
    probs = ctrl_probs(rows, control_tokens)
    label = {t["name"]: token_label(t["name"], t.get("text")) for t in control_tokens}
    ctrl_ids = {int(t["token_id"]) for t in control_tokens if "token_id" in t}
    ids = rows.get_column("token_id").to_list()
    pos = rows.get_column("position").to_list()
    gen = rows.get_column("is_generated").to_list() if "is_generated" in rows.columns else [True] * rows.height
    out = []
    for i in range(rows.height):
        tid = int(ids[i])
        text = texts.get(tid, f"⟨{tid}⟩")
        tip = [f"pos {pos[i]} · id {tid}" + ("" if gen[i] else " · tool output / template"),
               f"{color_by}: {vals[i]:.3g}" if vals[i] is not None else f"{color_by}: n/a"]
        top = sorted(((p[i], n) for n, p in probs.items() if p[i] is not None), reverse=True)
        tip += [f"p({label[n]}) = {p:.3g}" for p, n in top]
        cls = "t" + (" c" if tid in ctrl_ids else "") + ("" if gen[i] else " o")
        shown = text.replace("\n", "↵\n") if tid in ctrl_ids and text.strip() == "" else text
        out.append(f'<span class="{cls}" style="background:{_color(vals[i], color_by, vmax)}" '
                   f'title="{html.escape(chr(10).join(tip), quote=True)}">{html.escape(shown)}</span>')
    legend = ('<div class="dg-legend" style="margin-bottom:6px">'
              + ('<span style="background:rgba(220,60,70,0.68)">p≈0</span><span style="background:rgba(140,115,70,0.43)">'
                 'p≈0.5</span><span style="background:rgba(60,170,70,0.25)">p≈1</span>' if color_by == "probability"
                 else f'<span style="background:rgba(255,127,14,0.08)">0 nats</span><span style="background:'
                      f'rgba(255,127,14,0.9)">{vmax:.2g} nats</span>')
              + '<span style="outline:2px solid #6a1b7a">control token</span><span style="color:#888">tool output'
                '</span> · hover a token for the control-token probabilities there</div>')
    return legend + f'<div class="dg-tokens">{"".join(out)}</div>'
