"""Plotly figures of the dashboard that `diagnose.scan.html` does not offer.

The scan report's figures (`overview_figure`, `token_figure`, `onset_order_figure`,
`compare_figure`) are used as they are; this module adds the shapes only the dashboard needs:
key training signals on a grid, one control token across its key contexts, logit-gradient
attribution, one rollout's tokens, and the capability probe. No streamlit here: every function
takes data and returns a `plotly.graph_objects.Figure` (or None when there is nothing to draw).
Text from the run that ends up in plotly labels is HTML-escaped (plotly renders a subset of
HTML in names, titles and hover text).
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from typing import Any

import plotly.graph_objects as go
import polars as pl
from plotly.subplots import make_subplots

from diagnose.control_tokens import KEY_CONTEXTS
from diagnose.rundir import ctrl_column
from diagnose.scan.result import CollapseEpisode, ScanResult
from diagnose.scan.report import finite_series, token_label

KEY_SIGNALS: tuple[tuple[str, str], ...] = (
    ("entropy", "entropy (nats)"),
    ("kl", "KL to the reference"),
    ("grad_norm", "gradient norm"),
    ("group_reward_std", "group reward std"),
)
EPISODE_COLOR = "#d62728"


def esc(s: Any) -> str:
    return html.escape("" if s is None else str(s), quote=False)


def _last_step(result: ScanResult) -> int | None:
    if "step" not in result.signals.columns or result.signals.height == 0:
        return None
    return int(result.signals.get_column("step").max())


def add_episode_bands(fig: go.Figure, episodes: Sequence[CollapseEpisode], last_step: int | None,
                      *, grid: bool = False, color: str = EPISODE_COLOR) -> None:
    """Shade each episode from its onset to its recovery (or the end of the run), onset dashed;
    ``grid``: on every subplot of a make_subplots figure."""
    kw: dict[str, Any] = {"row": "all", "col": "all"} if grid else {}
    for e in episodes:
        end = (e.recovery_step - 0.5) if e.recovery_step is not None else (
            (last_step if last_step is not None else e.end_step) + 0.5)
        fig.add_vrect(x0=e.onset_step - 0.5, x1=end, fillcolor=color, opacity=0.10, line_width=0, layer="below", **kw)
        fig.add_vline(x=e.onset_step, line_dash="dash", line_color=color, line_width=1, **kw)


def key_signals_figure(result: ScanResult, signals: Sequence[tuple[str, str]] = KEY_SIGNALS) -> go.Figure:
    """A 2-column grid of training signals over steps (missing ones say so), episodes shaded."""
    rows = math.ceil(len(signals) / 2)
    fig = make_subplots(rows=rows, cols=2, shared_xaxes=True, vertical_spacing=0.12, horizontal_spacing=0.08,
                        subplot_titles=[esc(t) for _, t in signals])
    for i, (name, _) in enumerate(signals):
        r, c = i // 2 + 1, i % 2 + 1
        s, v = finite_series(result.signals, name)
        if v.size:
            fig.add_trace(go.Scatter(x=s, y=v, mode="lines+markers", marker={"size": 3}, name=esc(name),
                                     showlegend=False, hovertemplate=esc(name) + " at step %{x}: %{y:.4g}<extra></extra>"),
                          row=r, col=c)
        else:
            k = i + 1
            fig.add_annotation(text="not logged in this run", xref=f"x{k if k > 1 else ''} domain",
                               yref=f"y{k if k > 1 else ''} domain", x=0.5, y=0.5, showarrow=False,
                               font={"color": "#888"})
    add_episode_bands(fig, result.episodes, _last_step(result), grid=True)
    fig.update_xaxes(title_text="step", row=rows)
    fig.update_layout(height=260 * rows + 60, margin={"t": 40, "l": 50, "r": 20, "b": 40}, hovermode="x unified")
    return fig


def control_token_names(result: ScanResult) -> list[str]:
    """Control tokens with a probability or attribution signal in the run (probe, rollout
    contexts, all positions, logit attribution), implicated ones first."""
    seen: dict[str, None] = {}
    for e in result.episodes:
        for t in e.implicated:
            seen.setdefault(t.token)
    for c in result.signals.columns:
        parts = c.split("/")
        if len(parts) == 3 and parts[0] in ("probe", "ctx") and parts[2] not in ("gold", "n"):
            seen.setdefault(parts[2])
        elif len(parts) == 3 and parts[0] in ("ctrl", "attribution") and parts[2] in ("p", "self", "other", "total"):
            seen.setdefault(parts[1])
    return list(seen)


def control_token_figure(result: ScanResult, token: str, text: str | None = None) -> go.Figure | None:
    """One control token's probability over steps at each key context: the fixed probe (solid),
    the rollouts' tokens at that context (dotted) and over all generated positions (grey); log y."""
    label = token_label(token, text)
    traces = []
    for ctx in KEY_CONTEXTS:
        for kind, dash in (("probe", "solid"), ("ctx", "dot")):
            name = f"{kind}/{ctx}/{token}"
            s, v = finite_series(result.signals, name)
            if v.size:
                traces.append((name, f"{'probe' if kind == 'probe' else 'rollouts'}: p({label} | {ctx})", s, v, dash))
    s, v = finite_series(result.signals, f"ctrl/{token}/p")
    if v.size:
        traces.append((f"ctrl/{token}/p", f"rollouts: p({label}), all generated positions", s, v, "dash"))
    if not traces:
        return None
    fig = go.Figure()
    for name, title, s, v, dash in traces:
        fig.add_trace(go.Scatter(x=s, y=[float(x) if x > 0 else None for x in v], mode="lines+markers",
                                 marker={"size": 3}, name=esc(title),
                                 line={"dash": dash, **({"color": "#999"} if name.startswith("ctrl/") else {})},
                                 hovertemplate=esc(name) + "<br>step %{x}: %{y:.3g}<extra></extra>"))
    add_episode_bands(fig, result.episodes, _last_step(result))
    fig.update_yaxes(type="log", title_text="probability (log)")
    fig.update_xaxes(title_text="step")
    fig.update_layout(height=460, margin={"t": 40, "l": 60, "r": 20, "b": 40}, legend={"font": {"size": 10}},
                      title=esc(f"p({label}) at its key contexts (solid: fixed probe, dotted: rollout tokens)"))
    return fig


def attribution_figure(result: ScanResult, token: str, text: str | None = None) -> go.Figure | None:
    """Logit-gradient attribution of one control token over steps: the push from samples where
    it was sampled (self), from the others (other) and the total; None when not logged."""
    parts = [(k, f"attribution/{token}/{k}") for k in ("self", "other", "total")]
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
    add_episode_bands(fig, result.episodes, _last_step(result))
    fig.update_xaxes(title_text="step")
    fig.update_yaxes(title_text="logit push (advantage-weighted)")
    fig.update_layout(height=380, margin={"t": 40, "l": 60, "r": 20, "b": 40}, hovermode="x unified",
                      title=esc(f"logit-gradient attribution of {token_label(token, text)}: self vs other"))
    return fig


def token_values(rows: pl.DataFrame, color_by: str) -> list[float | None]:
    """Per-row value a token is coloured by: ``probability`` (exp of ``logprob``) or ``entropy``."""
    if rows.height == 0:
        return []
    if color_by == "entropy":
        col = rows.get_column("entropy") if "entropy" in rows.columns else pl.Series([None] * rows.height)
        return [float(x) if x is not None and math.isfinite(x) else None for x in col.to_list()]
    col = rows.get_column("logprob") if "logprob" in rows.columns else pl.Series([None] * rows.height)
    return [math.exp(x) if x is not None and math.isfinite(x) else None for x in col.to_list()]


def ctrl_probs(rows: pl.DataFrame, control_tokens: Sequence[Mapping[str, Any]]) -> dict[str, list[float | None]]:
    """name -> probability of that control token at each row (from ``lp_ctrl_<name>``)."""
    out = {}
    for t in control_tokens:
        col = ctrl_column(t["name"])
        if col in rows.columns:
            out[t["name"]] = [math.exp(x) if x is not None and math.isfinite(x) else None
                              for x in rows.get_column(col).to_list()]
    return out


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
        hover.append(esc("\n".join(lines)).replace("\n", "<br>"))
    is_ctrl = [int(t) in ctrl_ids for t in ids]
    fig = go.Figure()
    fig.add_trace(go.Scatter(
        x=pos, y=vals, mode="lines+markers", name=esc(f"sampled token: {color_by}"), line={"color": "#bbb", "width": 1},
        marker={"size": [9 if c else 5 for c in is_ctrl], "symbol": ["diamond" if c else "circle" for c in is_ctrl],
                "color": [("#6a1b7a" if c else "#1f77b4") if g else "#bbbbbb" for c, g in zip(is_ctrl, gen)]},
        text=hover, hovertemplate="%{text}<extra></extra>"))
    shown = set(highlight)
    for n, p in probs.items():
        if not any(x is not None for x in p):
            continue
        fig.add_trace(go.Scatter(x=pos, y=p, mode="lines", name=esc(f"p({label[n]})"), line={"width": 1},
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
                                 text=[esc(v) for v in df.get_column("verdict").to_list()],
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
                                 name=esc(measure), marker={"size": 6}))
    fig.update_xaxes(title_text="checkpoint step")
    fig.update_yaxes(title_text="accuracy", range=[-0.02, 1.02])
    fig.update_layout(height=360, margin={"t": 40, "l": 60, "r": 20, "b": 40}, hovermode="x unified",
                      title="accuracy per probe measure")
    return fig
