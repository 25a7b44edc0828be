"""Every plotly figure of the toolkit, in one place: the HTML reports (`diagnose.scan.html`), the
dashboard (`dashboards/`) and the notebooks draw with these.

No streamlit and no HTML page here: each function takes a scan result (or frames) and returns a
`plotly.graph_objects.Figure` (None when there is nothing to draw). Conventions shared by all:
episodes are shaded from onset to recovery (or the end of the run) with a dashed onset line
(`add_episode_bands`); control-token probabilities are on a log axis, fixed probe solid and
rollout tokens dotted; every text from the run that ends up in a label is escaped with
`plot_text` (plotly renders a subset of HTML in names, titles and hover text). `esc` is the one
HTML escape of the reports' page text.

Scan figures: `overview_figure` (reward / accuracy and the four turn-state shares),
`token_figure` (control-token probabilities at the key contexts: the implicated series shown,
the rest one click away in the legend), `onset_order_figure` (what moved, in order),
`scan_figures` (the report's list). Comparison: `compare_figure`, `signals_overlay_figure` (any number of runs). Dashboard pages:
`key_signals_figure`, `control_token_figure`, `attribution_figure`, `token_strip_figure`,
`capability_figure`, `capability_measures_figure`.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import plotly.graph_objects as go
import polars as pl
from plotly.subplots import make_subplots

from diagnose.control_tokens import KEY_CONTEXTS
from diagnose.rundir.schema import ctrl_column
from diagnose.scan.formatting import fmt_num, token_label
from diagnose.scan.names import (
    ALL_POSITIONS,
    ATTRIBUTION_PARTS,
    CTRL,
    CTX,
    PROBE,
    TokenSignal,
    attribution_signal,
    rollout_twin,
    signal_token,
)
from diagnose.scan.result import CollapseEpisode, ScanResult
from diagnose.scan.series import finite_series

if TYPE_CHECKING:
    from diagnose.scan.compare import Comparison

__all__ = [
    # shared pieces
    "EPISODE_COLOR", "KEY_SIGNALS", "RUN_COLORS", "STATE_COLORS", "add_episode_bands", "esc", "last_step", "plot_text",
    # a scan
    "overview_figure", "token_figure", "onset_order_figure", "scan_figures",
    # a comparison
    "compare_figure", "signals_overlay_figure",
    # dashboard pages
    "key_signals_figure", "control_token_names", "control_token_figure", "attribution_figure", "token_values",
    "ctrl_probs", "token_strip_figure", "capability_figure", "capability_measures_figure",
]

STATE_COLORS = {
    "turn_state/healthy_call": "#2ca02c",
    "turn_state/healthy_response": "#1f77b4",
    "turn_state/polluted": "#ff7f0e",
    "turn_state/collapsed": "#d62728",
}
EPISODE_COLOR = "#d62728"
RUN_COLORS = ("#1f77b4", "#d62728")
MAX_TOKEN_TRACES = 80
MAX_ORDER_SIGNALS = 40
#: Without an implicated token, the control-token chart shows this many series (largest spread).
DEFAULT_TOKEN_SERIES = 6
#: Line style of a control-token probability by where it is measured (fixed probe, rollout
#: tokens at a key context, rollout tokens at every generated position).
_FAMILY_DASH = {PROBE: "solid", CTX: "dot", CTRL: "dash"}
KEY_SIGNALS: tuple[tuple[str, str], ...] = (
    ("entropy", "entropy (nats)"),
    ("kl", "KL to the reference"),
    ("grad_norm", "gradient norm"),
    ("group_reward_std", "group reward std"),
)


# ---------------------------------------------------------------------------------------------
# shared pieces
# ---------------------------------------------------------------------------------------------


def esc(v: Any) -> str:
    """HTML text and attribute values of a report page (quotes escaped too)."""
    return html.escape("" if v is None else str(v), quote=True)


def plot_text(v: Any) -> str:
    """Text for plotly labels (names, titles, hover). Plotly renders a subset of HTML there, so
    ``<``, ``>`` and ``&`` are escaped; quotes are not: plotly shows ``&quot;`` literally."""
    return html.escape("" if v is None else str(v), quote=False)


def last_step(result: ScanResult) -> int | None:
    """The run's last step (None: no signals)."""
    if "step" not in result.signals.columns or result.signals.height == 0:
        return None
    return int(result.signals.get_column("step").max())


def add_episode_bands(fig: go.Figure, episodes: Sequence[CollapseEpisode], last: int | None, *,
                      color: str = EPISODE_COLOR, label: str | None = None, grid: bool = False,
                      opacity: float = 0.10) -> None:
    """Shade each episode from its onset to its recovery (or the end of the run), onset dashed;
    ``label``: annotate each onset ("<label> i: onset N"); ``grid``: on every subplot of a
    make_subplots figure."""
    kw: dict[str, Any] = {"row": "all", "col": "all"} if grid else {}
    for i, e in enumerate(episodes, start=1):
        end = (e.recovery_step - 0.5) if e.recovery_step is not None else (
            (last if last is not None else e.end_step) + 0.5)
        fig.add_vrect(x0=e.onset_step - 0.5, x1=end, fillcolor=color, opacity=opacity, line_width=0, layer="below",
                      **kw)
        fig.add_vline(x=e.onset_step, line_dash="dash", line_color=color, line_width=1, **kw)
        if label is not None:
            fig.add_annotation(x=e.onset_step, y=1.0, yref="paper", xanchor="left", yanchor="bottom", showarrow=False,
                               text=plot_text(f"{label} {i}: onset {e.onset_step}"), font={"color": color, "size": 11})


# ---------------------------------------------------------------------------------------------
# a scan
# ---------------------------------------------------------------------------------------------


def overview_figure(result: ScanResult) -> go.Figure:
    """Reward / accuracy (top) and the turn-state shares as a stacked area (bottom)."""
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.06, row_heights=[0.5, 0.5])
    for name, color in (("reward", "#111111"), ("accuracy", "#9467bd")):
        s, v = finite_series(result.signals, name)
        if v.size:
            fig.add_trace(go.Scatter(x=s, y=v, mode="lines+markers", name=name, line={"color": color},
                                     marker={"size": 4}), row=1, col=1)
    any_state = False
    for name, color in STATE_COLORS.items():
        s, v = finite_series(result.signals, name)
        if v.size:
            any_state = True
            fig.add_trace(go.Scatter(x=s, y=v, mode="lines", stackgroup="states", name=name.split("/", 1)[1],
                                     line={"color": color, "width": 0.5}, fillcolor=color), row=2, col=1)
    if not any_state:
        fig.add_annotation(text="no turn states in this run", xref="x2 domain", yref="y2 domain", x=0.5, y=0.5,
                           showarrow=False)
    add_episode_bands(fig, result.episodes, last_step(result), label="episode", grid=True)
    fig.update_yaxes(title_text="reward / accuracy", row=1, col=1)
    fig.update_yaxes(title_text="turn states (share)", range=[0, 1.0], row=2, col=1)
    fig.update_xaxes(title_text="step", row=2, col=1)
    fig.update_layout(height=620, margin={"t": 60, "l": 60, "r": 20, "b": 50}, hovermode="x unified",
                      legend={"orientation": "h", "y": -0.12})
    return fig


def _context_signals(result: ScanResult) -> list[TokenSignal]:
    """The control-token probabilities at key contexts (fixed probe and rollout tokens)."""
    parsed = (TokenSignal.parse(c) for c in result.signals.columns)
    return [sig for sig in parsed if sig is not None and sig.at_key_context]


def token_figure(result: ScanResult) -> go.Figure | None:
    """Control-token probabilities at the key contexts over steps (log y), or None when the
    run has none. Only the series that matter are drawn and listed first: those of the
    implicated tokens at the contexts where they rose (the collapse signature first); without
    an implicated token, the `DEFAULT_TOKEN_SERIES` series that moved most. Every other series
    is in the legend's "more" group, hidden until clicked (``visible="legendonly"``)."""
    signals = {sig.name: sig for sig in _context_signals(result)}
    if not signals:
        return None
    texts = {t.token: t.text for e in result.episodes for t in e.implicated if t.text}
    rises = [c for e in result.episodes for t in e.implicated for c in t.contexts]
    implicated = [c.signal for c in sorted(rises, key=lambda c: not c.signature)]  # stable: signature first
    stats = []
    for c in signals:
        s, v = finite_series(result.signals, c)
        pos = v[v > 0]
        spread = float(pos.max() / max(pos.min(), 1e-12)) if pos.size else 0.0
        stats.append((c, s, v, spread))
    rank = {c: i for i, c in enumerate(dict.fromkeys(implicated))}
    stats.sort(key=lambda x: (x[0] not in rank, rank.get(x[0], 0), -x[3]))
    shown = set(rank) if rank else {c for c, *_ in stats[:DEFAULT_TOKEN_SERIES]}
    fig = go.Figure()
    for c, s, v, _ in stats[:MAX_TOKEN_TRACES]:
        y = [float(x) if x > 0 else None for x in v]
        more = c not in shown
        fig.add_trace(go.Scatter(
            x=s, y=y, mode="lines+markers", marker={"size": 3},
            name=plot_text(signals[c].label(texts.get(signals[c].token))),
            line={"dash": _FAMILY_DASH[signals[c].family]},
            visible="legendonly" if more else True,
            legendgroup="more" if more else "key",
            legendgrouptitle_text="more (click to show)" if more else None,
            hovertemplate=plot_text(c) + "<br>step %{x}: %{y:.3g}<extra></extra>"))
    add_episode_bands(fig, result.episodes, last_step(result), label="episode")
    fig.update_yaxes(type="log", title_text="probability (log)")
    fig.update_xaxes(title_text="step")
    fig.update_layout(height=520, margin={"t": 40, "l": 60, "r": 20, "b": 50},
                      legend={"font": {"size": 10}, "groupclick": "toggleitem"},
                      title=plot_text("control-token probabilities at key contexts "
                                      "(solid: fixed probe, dotted: rollout tokens)"))
    return fig


def onset_order_figure(e: CollapseEpisode, index: int = 1) -> go.Figure | None:
    """Each moved signal's change step relative to the onset (negative: before the drop)."""
    moves = e.moves[:MAX_ORDER_SIGNALS]
    if not moves:
        return None
    names = [plot_text(m.signal) for m in moves]
    rel = [m.step - e.onset_step for m in moves]
    colors = ["#d62728" if m.concern and m.direction == "up" else "#1f77b4" if m.concern else "#999999" for m in moves]
    hover = [plot_text(f"{m.signal}: {m.direction} at step {m.step} (lead {m.lead}); {fmt_num(m.before, 3)} -> "
                 f"{fmt_num(m.after, 3)}; {m.method}, {fmt_num(m.score, 1)} sigma") for m in moves]
    fig = go.Figure()
    fig.add_trace(go.Bar(x=rel, y=names, orientation="h", marker={"color": colors}, width=0.15, showlegend=False,
                         hoverinfo="skip"))
    fig.add_trace(go.Scatter(x=rel, y=names, mode="markers", marker={"color": colors, "size": 10,
                             "symbol": ["triangle-up" if m.direction == "up" else "triangle-down" for m in moves]},
                             text=hover, hovertemplate="%{text}<extra></extra>", showlegend=False))
    fig.add_vline(x=0, line_dash="dash", line_color="#d62728")
    fig.add_annotation(x=0, y=1.0, yref="paper", yanchor="bottom", showarrow=False,
                       text=plot_text(f"{e.signal} onset (step {e.onset_step})"), font={"color": "#d62728"})
    fig.update_yaxes(autorange="reversed", automargin=True)
    fig.update_xaxes(title_text="change step − onset step (negative: moved before the drop)", zeroline=False)
    fig.update_layout(height=max(260, 26 * len(moves) + 120), margin={"t": 50, "l": 20, "r": 20, "b": 50},
                      title=plot_text(f"episode {index}: onset ordering (▲ up, ▼ down; red/blue: direction of concern, "
                                "grey: not)"))
    return fig


def scan_figures(result: ScanResult) -> list[tuple[str, go.Figure]]:
    """(section title, figure) of a scan report."""
    out = [("Reward, accuracy and turn states", overview_figure(result))]
    tf = token_figure(result)
    if tf is not None:
        out.append(("Control-token probabilities", tf))
    for i, e in enumerate(result.episodes, start=1):
        f = onset_order_figure(e, i)
        if f is not None:
            out.append((f"Episode {i}: what moved, in order", f))
    return out


# ---------------------------------------------------------------------------------------------
# a comparison
# ---------------------------------------------------------------------------------------------


def compare_figure(cmp: Comparison) -> go.Figure:
    """Overlay of the two runs: primary signal, collapsed-turn share, collapse-token probability."""
    tok_signal = cmp.token_signal
    rows = 3 if tok_signal else 2
    titles = ["reward" if cmp.primary == "reward" else cmp.primary, "collapsed turns (share)"]
    if tok_signal:
        titles.append(plot_text(f"collapse token: {cmp.token_title}"))
    fig = make_subplots(rows=rows, cols=1, shared_xaxes=True, vertical_spacing=0.07, subplot_titles=titles)
    for k, (label, res) in enumerate(zip(cmp.labels, (cmp.a, cmp.b))):
        color = RUN_COLORS[k]
        series = [cmp.primary, "turn_state/collapsed"] + ([tok_signal] if tok_signal else [])
        for r, name in enumerate(series, start=1):
            s, v = finite_series(res.signals, name)
            twin = rollout_twin(name) if name == tok_signal and not v.size else None
            if twin is not None:
                s, v = finite_series(res.signals, twin)
            if not v.size:
                continue
            y = [float(x) if (name != tok_signal or x > 0) else None for x in v]
            fig.add_trace(go.Scatter(x=s, y=y, mode="lines", name=plot_text(label), legendgroup=label, showlegend=r == 1,
                                     line={"color": color}), row=r, col=1)
        add_episode_bands(fig, res.episodes, last_step(res), color=color, grid=True, opacity=0.08)
    if tok_signal:
        fig.update_yaxes(type="log", row=3, col=1)
    fig.update_xaxes(title_text="step", row=rows, col=1)
    fig.update_layout(height=300 * rows, margin={"t": 50, "l": 60, "r": 20, "b": 50}, hovermode="x unified")
    return fig


def signals_overlay_figure(results: Mapping[str, ScanResult], signals: Sequence[str], *,
                           log_signals: Sequence[str] = ()) -> go.Figure:
    """Several runs' signals overlaid, one panel per signal (a fixed-probe signal a run lacks
    falls back to its rollout-token twin ``ctx/...``); ``log_signals`` on a log axis."""
    fig = make_subplots(rows=len(signals), cols=1, shared_xaxes=True, vertical_spacing=0.06,
                        subplot_titles=[plot_text(x) for x in signals])
    for name, r in results.items():
        for row, sig in enumerate(signals, start=1):
            s, v = finite_series(r.signals, sig)
            twin = rollout_twin(sig) if not v.size else None
            if twin is not None:
                s, v = finite_series(r.signals, twin)
            fig.add_trace(go.Scatter(x=s, y=v, mode="lines", name=plot_text(name), legendgroup=name,
                                     showlegend=row == 1), row=row, col=1)
    for row, sig in enumerate(signals, start=1):
        if sig in log_signals:
            fig.update_yaxes(type="log", row=row, col=1)
    fig.update_layout(height=240 * len(signals), hovermode="x unified")
    return fig


# ---------------------------------------------------------------------------------------------
# dashboard pages
# ---------------------------------------------------------------------------------------------


def key_signals_figure(result: ScanResult, signals: Sequence[tuple[str, str]] = KEY_SIGNALS) -> go.Figure:
    """A 2-column grid of training signals over steps (missing ones say so), episodes shaded."""
    rows = math.ceil(len(signals) / 2)
    fig = make_subplots(rows=rows, cols=2, shared_xaxes=True, vertical_spacing=0.12, horizontal_spacing=0.08,
                        subplot_titles=[plot_text(t) for _, t in signals])
    for i, (name, _) in enumerate(signals):
        r, c = i // 2 + 1, i % 2 + 1
        s, v = finite_series(result.signals, name)
        if v.size:
            fig.add_trace(go.Scatter(x=s, y=v, mode="lines+markers", marker={"size": 3}, name=plot_text(name),
                                     showlegend=False, hovertemplate=plot_text(name) + " at step %{x}: %{y:.4g}<extra></extra>"),
                          row=r, col=c)
        else:
            k = i + 1
            fig.add_annotation(text="not logged in this run", xref=f"x{k if k > 1 else ''} domain",
                               yref=f"y{k if k > 1 else ''} domain", x=0.5, y=0.5, showarrow=False,
                               font={"color": "#888"})
    add_episode_bands(fig, result.episodes, last_step(result), grid=True)
    fig.update_xaxes(title_text="step", row=rows)
    fig.update_layout(height=260 * rows + 60, margin={"t": 40, "l": 50, "r": 20, "b": 40}, hovermode="x unified")
    return fig


def control_token_names(result: ScanResult) -> list[str]:
    """Control tokens with a probability or attribution signal in the run (probe, rollout
    contexts, all positions, logit attribution), implicated ones first."""
    implicated = [t.token for e in result.episodes for t in e.implicated]
    measured = [signal_token(c) for c in result.signals.columns]
    return list(dict.fromkeys(t for t in implicated + measured if t is not None))


def control_token_figure(result: ScanResult, token: str, text: str | None = None) -> go.Figure | None:
    """One control token's probability over steps at each key context: the fixed probe (solid),
    the rollouts' tokens at that context (dotted) and over all generated positions (grey); log y."""
    wanted = [TokenSignal(family, ctx, token) for ctx in KEY_CONTEXTS for family in (PROBE, CTX)]
    wanted.append(TokenSignal(CTRL, ALL_POSITIONS, token))
    traces = [(sig, *finite_series(result.signals, sig.name)) for sig in wanted]
    traces = [(sig, s, v) for sig, s, v in traces if v.size]
    if not traces:
        return None
    fig = go.Figure()
    for sig, s, v in traces:
        fig.add_trace(go.Scatter(x=s, y=[float(x) if x > 0 else None for x in v], mode="lines+markers",
                                 marker={"size": 3}, name=plot_text(sig.label(text)),
                                 line={"dash": _FAMILY_DASH[sig.family], **({"color": "#999"} if sig.family == CTRL else {})},
                                 hovertemplate=plot_text(sig.name) + "<br>step %{x}: %{y:.3g}<extra></extra>"))
    add_episode_bands(fig, result.episodes, last_step(result))
    fig.update_yaxes(type="log", title_text="probability (log)")
    fig.update_xaxes(title_text="step")
    fig.update_layout(height=460, margin={"t": 40, "l": 60, "r": 20, "b": 40}, legend={"font": {"size": 10}},
                      title=plot_text(f"p({token_label(token, text)}) at its key contexts "
                                      "(solid: fixed probe, dotted: rollout tokens)"))
    return fig


def attribution_figure(result: ScanResult, token: str, text: str | None = None) -> go.Figure | None:
    """Logit-gradient attribution of one control token over steps: the push from samples where
    it was sampled (self), from the others (other) and the total; None when not logged."""
    parts = [(k, attribution_signal(token, k)) for k in ATTRIBUTION_PARTS]
    series = [(k, *finite_series(result.signals, n)) for k, n in parts]
    if not any(v.size for _, _, v in series):
        return None
    colors = {"self": "#1f77b4", "other": "#ff7f0e", "total": "#111111"}
    fig = go.Figure()
    for k, s, v in series:
        if v.size:
            fig.add_trace(go.Scatter(x=s, y=v, mode="lines+markers", marker={"size": 3}, name=k,
                                     line={"color": colors[k], "width": 2 if k == "total" else 1.5,
                                           "dash": "solid" if k != "total" else "dot"}))
    fig.add_hline(y=0, line_color="#aaa", line_width=1)
    add_episode_bands(fig, result.episodes, last_step(result))
    fig.update_xaxes(title_text="step")
    fig.update_yaxes(title_text="logit push (advantage-weighted)")
    fig.update_layout(height=380, margin={"t": 40, "l": 60, "r": 20, "b": 40}, hovermode="x unified",
                      title=plot_text(f"logit-gradient attribution of {token_label(token, text)}: self vs other"))
    return fig


def _finite_values(rows: pl.DataFrame, column: str, exp: bool) -> list[float | None]:
    """A column's values as floats (``exp``: of log-probs, probabilities); None where it is
    missing, null or not finite."""
    if column not in rows.columns:
        return [None] * rows.height
    return [(math.exp(x) if exp else float(x)) if x is not None and math.isfinite(x) else None
            for x in rows.get_column(column).to_list()]


def token_values(rows: pl.DataFrame, color_by: str) -> list[float | None]:
    """Per-row value a token is coloured by: ``probability`` (exp of ``logprob``) or ``entropy``."""
    return _finite_values(rows, "entropy", exp=False) if color_by == "entropy" else _finite_values(rows, "logprob", exp=True)


def ctrl_probs(rows: pl.DataFrame, control_tokens: Sequence[Mapping[str, Any]]) -> dict[str, list[float | None]]:
    """name -> probability of that control token at each row (from ``lp_ctrl_<name>``)."""
    return {t["name"]: _finite_values(rows, ctrl_column(t["name"]), exp=True) for t in control_tokens
            if ctrl_column(t["name"]) in rows.columns}


def token_strip_figure(rows: pl.DataFrame, texts: Mapping[int, str], control_tokens: Sequence[Mapping[str, Any]],
                       color_by: str = "probability", highlight: Sequence[str] = ()) -> go.Figure | None:
    """One rollout's tokens along their positions: the value each is coloured by (probability
    of the sampled token, or entropy), control tokens as diamonds, tool-output rows grey, and the
    control tokens' probabilities at every position (``highlight`` shown, the rest in the legend).
    Hovering a point shows the token and every control token's probability there."""
    if rows.height == 0 or "position" not in rows.columns:
        return None
    pos = rows.get_column("position").to_list()
    ids = rows.get_column("token_id").to_list()
    gen = rows.get_column("is_generated").to_list() if "is_generated" in rows.columns else [True] * rows.height
    vals = token_values(rows, color_by)
    probs = ctrl_probs(rows, control_tokens)
    ctrl_ids = {int(t["token_id"]): t["name"] for t in control_tokens if "token_id" in t}
    label = {t["name"]: token_label(t["name"], t.get("text")) for t in control_tokens}
    hover = []
    for i in range(rows.height):
        tok = texts.get(int(ids[i]), f"⟨{ids[i]}⟩")
        lines = [f"pos {pos[i]}: {tok!r} (id {ids[i]}){'' if gen[i] else ' [tool output / template]'}",
                 f"{color_by}: {vals[i]:.3g}" if vals[i] is not None else f"{color_by}: n/a"]
        top = sorted(((p[i], n) for n, p in probs.items() if p[i] is not None), reverse=True)[:6]
        lines += [f"p({label[n]}) = {p:.3g}" for p, n in top]
        hover.append(plot_text("\n".join(lines)).replace("\n", "<br>"))
    is_ctrl = [int(t) in ctrl_ids for t in ids]
    fig = go.Figure()
    fig.add_trace(go.Scatter(
        x=pos, y=vals, mode="lines+markers", name=plot_text(f"sampled token: {color_by}"), line={"color": "#bbb", "width": 1},
        marker={"size": [9 if c else 5 for c in is_ctrl], "symbol": ["diamond" if c else "circle" for c in is_ctrl],
                "color": [("#6a1b7a" if c else "#1f77b4") if g else "#bbbbbb" for c, g in zip(is_ctrl, gen)]},
        text=hover, hovertemplate="%{text}<extra></extra>"))
    shown = set(highlight)
    for n, p in probs.items():
        if not any(x is not None for x in p):
            continue
        fig.add_trace(go.Scatter(x=pos, y=p, mode="lines", name=plot_text(f"p({label[n]})"), line={"width": 1},
                                 visible=True if n in shown else "legendonly", hoverinfo="skip"))
    fig.update_xaxes(title_text="position in the completion")
    if color_by == "probability":
        fig.update_yaxes(title_text="probability", range=[-0.02, 1.02])
    else:
        fig.update_yaxes(title_text="entropy (nats)")
    fig.update_layout(height=360, margin={"t": 30, "l": 60, "r": 20, "b": 40}, hovermode="closest",
                      legend={"font": {"size": 10}, "orientation": "h", "y": -0.25})
    return fig


def _checkpoint_x(df: pl.DataFrame) -> tuple[list[Any], str]:
    if "step" in df.columns and df.get_column("step").null_count() == 0 and df.height:
        return df.get_column("step").to_list(), "step"
    return df.get_column("checkpoint").to_list(), "checkpoint"


def capability_figure(summary: pl.DataFrame) -> go.Figure | None:
    """Format score (native accuracy) vs capability score (best score with the format out of
    the way) per checkpoint; the gap between them is what a broken format hides."""
    if summary.height == 0:
        return None
    df = summary.sort(["step", "checkpoint"], nulls_last=True)
    x, xtitle = _checkpoint_x(df)
    fig = go.Figure()
    for col, name, color in (("capability_score", "capability", "#2ca02c"), ("format_score", "format (native)",
                                                                            "#d62728")):
        fig.add_trace(go.Scatter(x=x, y=df.get_column(col).to_list(), mode="lines+markers", name=name,
                                 line={"color": color}, marker={"size": 7},
                                 text=[plot_text(v) for v in df.get_column("verdict").to_list()],
                                 hovertemplate=name + " %{y:.3f}<br>%{text}<extra></extra>",
                                 fill="tonexty" if col == "format_score" else None,
                                 fillcolor="rgba(214,39,40,0.08)"))
    fig.update_xaxes(title_text=xtitle)
    fig.update_yaxes(title_text="accuracy", range=[-0.02, 1.02])
    fig.update_layout(height=380, margin={"t": 40, "l": 60, "r": 20, "b": 40}, hovermode="x unified",
                      title="format vs capability per checkpoint (shaded: the format gap)")
    return fig


def capability_measures_figure(results: pl.DataFrame) -> go.Figure | None:
    """Accuracy of every probe measure per checkpoint."""
    if results.height == 0:
        return None
    df = results.sort(["step", "checkpoint"], nulls_last=True)
    fig = go.Figure()
    for (measure,), part in df.group_by("measure", maintain_order=True):
        x, xtitle = _checkpoint_x(part)
        fig.add_trace(go.Scatter(x=x, y=part.get_column("accuracy").to_list(), mode="lines+markers",
                                 name=plot_text(measure), marker={"size": 6}))
    fig.update_xaxes(title_text="checkpoint step")
    fig.update_yaxes(title_text="accuracy", range=[-0.02, 1.02])
    fig.update_layout(height=360, margin={"t": 40, "l": 60, "r": 20, "b": 40}, hovermode="x unified",
                      title="accuracy per probe measure")
    return fig
