"""Self-contained HTML reports of `diagnose scan --report` and `diagnose compare --report`.

    from diagnose.scan.html import write_scan_html
    write_scan_html(result, "report.html")

One file, no network needed to view it: plotly.js is embedded once (``include_plotlyjs=True``
on the first figure), every figure is built with plotly's own API (``plotly.graph_objects``,
``make_subplots``). Everything that comes from the run (rollout text, signal and file names,
notes, issues) is HTML-escaped; control strings in rollout excerpts are highlighted after
escaping. Plotly itself escapes ``<`` in the figure JSON. Files are written atomically.

The figures come from `diagnose.figures` (`scan_figures`, `compare_figure`): (1) reward /
accuracy and the four turn-state rates (stacked area) over steps, episodes shaded from onset to
recovery (or end); (2) control-token probabilities over steps, fixed probe
``probe/<ctx>/<tok>`` and rollout tokens ``ctx/<ctx>/<tok>``, log y axis (implicated ones
shown, the rest one click away in the legend); (3) per episode, the onset ordering: each moved
signal's change step relative to the onset.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import plotly.graph_objects as go

from diagnose import __version__
from diagnose.atomic import atomic_write_text
from diagnose.figures import compare_figure, esc, scan_figures
from diagnose.scan.result import CollapseEpisode, RolloutExample, ScanResult, issues_summary
from diagnose.scan.formatting import (
    fmt_num,
    fmt_pct,
    fmt_prob,
    fmt_rise,
    highlight_strings,
    implicated_texts,
    run_info_text,
    token_label,
    verdict_line,
)
from diagnose.scan.names import has_token_probabilities, table_presence
from diagnose.scan.series import level, smoothed_peak

if TYPE_CHECKING:
    from diagnose.scan.compare import Comparison

__all__ = ["highlight", "write_compare_html", "write_scan_html"]

_PLOT_CONFIG = {"displaylogo": False, "responsive": True}

_CSS = """
body { font-family: -apple-system, BlinkMacSystemFont, "Segoe UI", Roboto, sans-serif; margin: 24px auto;
       max-width: 1200px; padding: 0 16px; color: #222; }
h1 { font-size: 1.4em; margin-bottom: 4px; } h2 { font-size: 1.2em; margin-top: 32px; border-bottom: 1px solid #ddd; }
h3 { font-size: 1.05em; }
.meta { color: #666; font-size: 0.9em; }
.verdict { font-size: 1.15em; font-weight: bold; padding: 10px 14px; border-radius: 6px; margin: 12px 0; }
.v-collapse { background: #fde2e1; color: #8b0000; } .v-pathology { background: #fff4d6; color: #7a5200; }
.v-healthy { background: #e3f5e1; color: #1d5e1d; } .v-insufficient_data { background: #e4ecfa; color: #1c3d7a; }
table { border-collapse: collapse; margin: 8px 0; font-size: 0.92em; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f5f5f5; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
pre.rollout { background: #f7f7f7; border: 1px solid #e3e3e3; padding: 8px; white-space: pre-wrap;
              word-break: break-word; font-size: 0.85em; max-height: 320px; overflow: auto; }
span.ctl { background: #f3d9f7; color: #6a1b7a; font-weight: bold; border-radius: 3px; padding: 0 2px; }
.issues li { color: #8a5a00; } .dim { color: #777; }
"""


# ---------------------------------------------------------------------------------------------
# text
# ---------------------------------------------------------------------------------------------


def highlight(text: str | None, extra: Iterable[str] = ()) -> str:
    """Escaped text with control strings wrapped in ``<span class="ctl">`` (after escaping,
    so nothing from the run is ever interpreted as HTML)."""
    if text is None:
        return '<span class="dim">(no text)</span>'
    strings = highlight_strings(extra)
    escaped = esc(text)
    if not strings:
        return escaped
    pat = re.compile("|".join(re.escape(esc(s)) for s in strings))
    return pat.sub(lambda m: f'<span class="ctl">{m.group(0)}</span>', escaped)


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]], numeric: Sequence[int] = ()) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for r in rows:
        cells = []
        for i, c in enumerate(r):
            cls = ' class="num"' if i in numeric else ""
            cells.append(f"<td{cls}>{c if isinstance(c, _Raw) else esc(c)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


class _Raw(str):
    """Already-escaped HTML for a table cell."""


class _FigureWriter:
    """plotly.js is embedded with the first figure only."""

    def __init__(self) -> None:
        self.first = True

    def __call__(self, fig: go.Figure) -> str:
        out = fig.to_html(full_html=False, include_plotlyjs=self.first, config=_PLOT_CONFIG)
        self.first = False
        return out


# ---------------------------------------------------------------------------------------------
# scan report
# ---------------------------------------------------------------------------------------------


def _key_numbers(result: ScanResult) -> str:
    name = result.primary_signal or "reward"
    rows: list[Sequence[Any]] = [
        ("run", result.source_path or "?"), ("format", result.source_format or "?"),
        ("steps", f"{result.signals.height}" + (f" ({result.signals.get_column('step').min()}.."
                                                f"{result.signals.get_column('step').max()})"
                                                if result.signals.height else "")),
        ("tables", ", ".join(k for k, ok in table_presence(result.signals.columns).items() if ok) or "none"),
        ("verdict", result.verdict),
        (f"{name}: start / peak / end", f"{fmt_num(level(result.signals, name, 'start'))} / "
                                        f"{fmt_num(smoothed_peak(result.signals, name))} / "
                                        f"{fmt_num(level(result.signals, name, 'end'))}"),
        ("collapsed turns: start / end", f"{fmt_pct(level(result.signals, 'turn_state/collapsed', 'start'))} / "
                                         f"{fmt_pct(level(result.signals, 'turn_state/collapsed', 'end'))}"),
        ("episodes", str(len(result.episodes))), ("pathologies", str(len(result.pathologies))),
    ]
    for i, e in enumerate(result.episodes, start=1):
        rows.append((f"episode {i}", f"onset {e.onset_step}, trough {e.trough_step}, "
                                     + (f"recovered at {e.recovery_step}" if e.recovery_step is not None
                                        else f"not recovered (end {e.end_step})")
                                     + f"; {e.signal} {fmt_num(e.pre_level)} -> {fmt_num(e.trough_value)} "
                                       f"(drop {fmt_pct(e.relative_drop)}), collapsed turns at trough "
                                       f"{fmt_pct(e.collapsed_share_at_trough)}"))
        if e.implicated:
            t = e.implicated[0]
            c = t.contexts[0]
            rows.append((f"episode {i}: top control token",
                         f"p({token_label(t.token, t.text)} | {c.context}) {fmt_prob(c.before)} -> {fmt_prob(c.after)}"
                         f" ({c.source})"))
    return _table(("", ""), rows)


def _moves_html(e: CollapseEpisode) -> str:
    rows = [(i, m.signal, m.step, m.lead, m.direction, f"{fmt_num(m.before, 3)} -> {fmt_num(m.after, 3)}",
             f"{fmt_num(m.score, 1)}σ", m.method, "yes" if m.concern else "no")
            for i, m in enumerate(e.moves, start=1)]
    return _table(("#", "signal", "step", "lead", "direction", "before -> after", "shift", "detector", "concern"),
                  rows, numeric=(0, 2, 3, 6))


def _tokens_html(e: CollapseEpisode, result: ScanResult) -> str:
    if not e.implicated:
        if not has_token_probabilities(result.signals.columns):
            return ('<p class="dim">No token probabilities in this run (text-only format, or no tokens/ or probe/ '
                    'tables): control tokens cannot be implicated from probabilities; see the rollouts.</p>')
        return '<p class="dim">No control-token probability rose notably around the onset.</p>'
    rows = []
    for t in e.implicated:
        for c in t.contexts:
            rows.append((_Raw(f'<span class="ctl">{esc(token_label(t.token, t.text))}</span> ({esc(t.token)})'),
                         c.context, c.source, fmt_prob(c.before), fmt_prob(c.after), fmt_rise(c.before, c.after),
                         "—" if c.step is None else c.step, "—" if c.lead is None else c.lead,
                         "yes" if c.signature else ""))
    table = _table(("token", "context", "source", "p before", "p after", "rise", "moved at", "lead", "signature"),
                   rows, numeric=(3, 4, 5, 6, 7))
    attr = [f"{esc(t.token)}: {fmt_num(t.attribution_before, 4)} -> {fmt_num(t.attribution_after, 4)}"
            for t in e.implicated if t.attribution_before is not None or t.attribution_after is not None]
    if attr:
        table += f'<p class="dim">logit attribution (advantage-weighted push): {"; ".join(attr)}</p>'
    return table


def _examples_html(title: str, examples: Sequence[RolloutExample], extra: Iterable[str]) -> str:
    parts = [f"<h3>{esc(title)}</h3>"]
    if not examples:
        parts.append('<p class="dim">(no rollout text)</p>')
    for ex in examples:
        meta = f"step {ex.step}, sample {ex.sample_id}" + (f", group {ex.group_id}" if ex.group_id is not None else "")
        meta += f", reward {fmt_num(ex.reward)}"
        if ex.turn_states:
            meta += f", turns: {', '.join(ex.turn_states)}"
        parts.append(f'<p class="meta">{esc(meta)}</p><pre class="rollout">{highlight(ex.excerpt, extra)}</pre>')
    return "".join(parts)


def _page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<style>{_CSS}</style></head><body>{body}</body></html>\n")


def _notes_issues(result: ScanResult) -> str:
    out = []
    if result.pathologies:
        out.append("<h2>Pathologies</h2>" + _table(
            ("kind", "signal", "steps", "message"),
            [(p.kind, p.signal, f"{p.first_step}..{p.last_step} ({p.n_steps})", p.message) for p in result.pathologies]))
    sources = list(getattr(result, "sources", []) or [])
    if sources:
        out.append("<h2>Sources</h2><ul>" + "".join(f"<li>{esc(n)}</li>" for n in sources) + "</ul>")
    if result.notes:
        out.append("<h2>Notes</h2><ul>" + "".join(f"<li>{esc(n)}</li>" for n in result.notes) + "</ul>")
    issues = list(getattr(result, "issues", []) or [])
    if issues:
        out.append(f"<h2>Issues ({esc(issues_summary(len(issues)))})</h2><ul class=\"issues\">"
                   + "".join(f"<li>{esc(i)}</li>" for i in issues) + "</ul>")
    return "".join(out)


def scan_html(result: ScanResult, *, capability_hint: str | None = None) -> str:
    """The HTML text of a scan report."""
    fig_html = _FigureWriter()
    extra = implicated_texts(result)
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    info = run_info_text(getattr(result, "run_info", {}) or {})
    body = [f"<h1>diagnose scan: {esc(result.source_path or '?')}</h1>",
            f'<p class="meta">{esc(result.source_format or "?")} run{esc("; " + info) if info else ""}; report '
            f"generated {now} by collapse-diagnostics {esc(__version__)}</p>",
            f'<div class="verdict v-{esc(result.verdict)}">{esc(verdict_line(result, capability_hint))}</div>',
            "<h2>Key numbers</h2>", _key_numbers(result)]
    figures = scan_figures(result)
    for title, fig in figures[:2]:
        body.append(f"<h2>{esc(title)}</h2>")
        body.append(fig_html(fig))
    if len(figures) < 2 or figures[1][0] != "Control-token probabilities":
        body.append('<p class="dim">No control-token probabilities in this run (no tokens/ or probe/ tables: '
                    "text-only formats cannot give them).</p>")
    order = {t: f for t, f in figures[2:]}
    for i, e in enumerate(result.episodes, start=1):
        body.append(f"<h2>Episode {i}: {esc(e.signal)} collapse at step {e.onset_step}</h2>")
        body.append(_table(("onset", "detected", "trough", "recovery", "end", f"{e.signal} before -> trough",
                            "relative drop", "collapsed turns at trough"),
                           [(e.onset_step, e.detected_step, e.trough_step,
                             "—" if e.recovery_step is None else e.recovery_step, e.end_step,
                             f"{fmt_num(e.pre_level)} -> {fmt_num(e.trough_value)}", fmt_pct(e.relative_drop),
                             fmt_pct(e.collapsed_share_at_trough))]))
        f = order.get(f"Episode {i}: what moved, in order")
        if f is not None:
            body.append(fig_html(f))
        body.append("<h3>Signals that moved (earliest first)</h3>")
        body.append(_moves_html(e) if e.moves else '<p class="dim">No other signal moved near the onset.</p>')
        body.append("<h3>Control tokens implicated</h3>")
        body.append(_tokens_html(e, result))
        body.append(_examples_html("Rollouts before the onset", e.examples_before, extra))
        body.append(_examples_html("Rollouts at the trough", e.examples_after, extra))
    body.append(_notes_issues(result))
    return _page(f"diagnose scan: {result.source_path or ''}", "".join(body))


def write_scan_html(result: ScanResult, path: str | os.PathLike[str], *, capability_hint: str | None = None) -> Path:
    """Write the scan report to ``path`` atomically; returns the path."""
    return atomic_write_text(path, scan_html(result, capability_hint=capability_hint))


# ---------------------------------------------------------------------------------------------
# compare report
# ---------------------------------------------------------------------------------------------


def compare_html(cmp: Comparison) -> str:
    fig_html = _FigureWriter()
    a_label, b_label = cmp.labels
    body = [f"<h1>diagnose compare: {esc(a_label)} vs {esc(b_label)}</h1>",
            f'<p class="meta">{esc(cmp.a.source_path)} ({esc(cmp.a.source_format)}) vs {esc(cmp.b.source_path)} '
            f"({esc(cmp.b.source_format)})</p>"]
    for label, res in zip(cmp.labels, (cmp.a, cmp.b)):
        body.append(f'<div class="verdict v-{esc(res.verdict)}">{esc(label)}: {esc(verdict_line(res))}</div>')
    body.append("<h2>Key numbers</h2>")
    body.append(_table(("", a_label, b_label), cmp.key_rows(), numeric=(1, 2)))
    body.append("<h2>Overlay</h2>")
    body.append(fig_html(compare_figure(cmp)))
    body.append("<h2>Signals side by side (median of the first / last 5 steps, min, max)</h2>")
    rows = []
    for r in cmp.signal_rows:
        rows.append((r["signal"], *(f"{fmt_num(r[k]['start'], 3)} -> {fmt_num(r[k]['end'], 3)} "
                                    f"[{fmt_num(r[k]['min'], 3)}, {fmt_num(r[k]['max'], 3)}]" if r[k] else "—"
                                    for k in ("a", "b"))))
    body.append(_table(("signal", a_label, b_label), rows))
    for label, res in zip(cmp.labels, (cmp.a, cmp.b)):
        extra = _notes_issues(res)
        if extra:
            body.append(f"<h2>{esc(label)}</h2>" + extra.replace("<h2>", "<h3>").replace("</h2>", "</h3>"))
    return _page(f"diagnose compare: {a_label} vs {b_label}", "".join(body))


def write_compare_html(cmp: Comparison, path: str | os.PathLike[str]) -> Path:
    """Write the comparison report to ``path`` atomically; returns the path."""
    return atomic_write_text(path, compare_html(cmp))
