"""The terminal report of `diagnose scan` (rich). Its numbers, labels and verdict line are
written as every other output writes them (`diagnose.scan.formatting`).

    from rich.console import Console
    from diagnose.scan.report import render_scan
    render_scan(result, Console())        # verdict first, then episodes, pathologies, notes, issues

All text from the run (rollouts, signal and file names, notes) goes into `rich.text.Text`
objects, never through console markup, so a completion holding ``[bold]`` prints as is.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from diagnose.scan.formatting import (
    control_pattern,
    fmt_num,
    fmt_pct,
    fmt_prob,
    fmt_rise,
    implicated_texts,
    run_info_text,
    token_label,
    verdict_line,
)
from diagnose.scan.names import has_token_probabilities, table_presence
from diagnose.scan.result import CollapseEpisode, ImplicatedToken, RolloutExample, ScanResult, issues_summary

__all__ = ["excerpt_text", "header_text", "render_scan"]

MAX_MOVES = 15  # rows of the "what moved" table in the terminal
MAX_TOKENS = 5
MAX_CONTEXTS = 4
MAX_EXAMPLES = 2
EXCERPT_CHARS = 240
MAX_ISSUES = 20

_STYLE = {"collapse": "bold red", "pathology": "bold yellow", "healthy": "bold green", "insufficient_data": "bold blue"}


# ---------------------------------------------------------------------------------------------
# pieces
# ---------------------------------------------------------------------------------------------


def excerpt_text(text: str | None, pattern: re.Pattern[str], limit: int = EXCERPT_CHARS) -> Text:
    """A rollout excerpt on one line: control strings highlighted, newlines shown as ``\\n``."""
    out = Text()
    if text is None:
        out.append("(no text)", style="dim")
        return out
    cut = text[:limit]
    pos = 0
    for m in pattern.finditer(cut):
        _plain(out, cut[pos:m.start()])
        out.append(m.group(0), style="bold magenta")
        pos = m.end()
    _plain(out, cut[pos:])
    if len(text) > limit:
        out.append(" …", style="dim")
    return out


def _plain(out: Text, s: str) -> None:
    parts = s.split("\n")
    for i, part in enumerate(parts):
        if i:
            out.append("\\n", style="dim cyan")
        if part:
            out.append(part.replace("\t", "\\t").replace("\r", "\\r"))


def _moves_table(e: CollapseEpisode, limit: int = MAX_MOVES) -> Table:
    t = Table(title="signals that moved (earliest first; lead = steps before the onset)", title_justify="left",
              show_edge=False, pad_edge=False)
    for col, kw in (("#", {"justify": "right"}), ("signal", {"overflow": "fold", "min_width": 24}), ("step", {"justify": "right"}),
                    ("lead", {"justify": "right"}), ("move", {}), ("before -> after", {}),
                    ("shift", {"justify": "right"}), ("", {})):
        t.add_column(col, **kw)
    for i, m in enumerate(e.moves[:limit], start=1):
        arrow = "↑ up" if m.direction == "up" else "↓ down"
        lead = Text(f"{m.lead:+d}", style="bold" if m.lead > 0 else "")
        t.add_row(str(i), Text(m.signal), str(m.step), lead, arrow, f"{fmt_num(m.before, 3)} -> {fmt_num(m.after, 3)}",
                  f"{fmt_num(m.score, 1)}σ", Text("concern" if m.concern else "", style="yellow"))
    return t


def _rise_line(tok: ImplicatedToken, c: Any) -> Text:
    label = token_label(tok.token, tok.text)
    ctx = "any generated position" if c.context == "all" else c.context
    line = Text("  p(")
    line.append(label, style="bold magenta")
    line.append(f" | {ctx}) ")
    line.append(f"{fmt_prob(c.before)} -> {fmt_prob(c.after)}", style="bold")
    extra = [fmt_rise(c.before, c.after), "probe" if c.source == "probe" else "rollout tokens"]
    if c.step is not None:
        extra.append(f"moved at step {c.step}" + (f", {c.lead} step(s) before the onset" if c.lead and c.lead > 0 else ""))
    if c.signature:
        extra.append("the collapse signature of this context")
    line.append(f"  ({'; '.join(extra)})", style="dim")
    return line


def _tokens_block(e: CollapseEpisode, result: ScanResult) -> list[Any]:
    out: list[Any] = [Text("control tokens implicated", style="bold")]
    if not e.implicated:
        if not has_token_probabilities(result.signals.columns):
            out.append(Text("  none measurable: this run has no token probabilities (text-only format, or no "
                            "tokens/ or probe/ tables); control tokens can only be seen in the rollouts below",
                            style="dim"))
        else:
            out.append(Text("  none: no control-token probability rose "
                            f"≥{result.config.implicate_min_ratio:g}× around the onset", style="dim"))
        return out
    for tok in e.implicated[:MAX_TOKENS]:
        head = Text(f"  {tok.token}", style="bold")
        if tok.role:
            head.append(f" ({tok.role})", style="dim")
        out.append(head)
        for c in tok.contexts[:MAX_CONTEXTS]:
            out.append(_rise_line(tok, c))
        if len(tok.contexts) > MAX_CONTEXTS:
            out.append(Text(f"    ... {len(tok.contexts) - MAX_CONTEXTS} more context(s)", style="dim"))
        if tok.attribution_before is not None or tok.attribution_after is not None:
            out.append(Text(f"    logit attribution (advantage-weighted push) {fmt_num(tok.attribution_before, 4)} -> "
                            f"{fmt_num(tok.attribution_after, 4)}", style="dim"))
    if len(e.implicated) > MAX_TOKENS:
        out.append(Text(f"  ... {len(e.implicated) - MAX_TOKENS} more token(s) (see --json)", style="dim"))
    return out


def _examples_block(title: str, examples: Sequence[RolloutExample], pattern: re.Pattern[str]) -> list[Any]:
    out: list[Any] = [Text(title, style="bold")]
    if not examples:
        out.append(Text("  (no rollout text)", style="dim"))
        return out
    for ex in examples[:MAX_EXAMPLES]:
        head = Text(f"  step {ex.step} sample {ex.sample_id}", style="cyan")
        if ex.group_id is not None:
            head.append(f" group {ex.group_id}", style="cyan")
        head.append(f"  reward {fmt_num(ex.reward)}")
        if ex.turn_states:
            head.append(f"  turns: {', '.join(ex.turn_states)}", style="dim")
        out.append(head)
        body = Text("    ")
        body.append_text(excerpt_text(ex.excerpt, pattern))
        out.append(body)
    return out


def _episode_table(e: CollapseEpisode) -> Table:
    t = Table(show_header=True, show_edge=False, pad_edge=False)
    for col in ("onset", "detected", "trough", "recovery", "end", f"{e.signal} before -> trough",
                "relative drop", "collapsed turns at trough"):
        t.add_column(col, justify="right")
    t.add_row(str(e.onset_step), str(e.detected_step), str(e.trough_step),
              "—" if e.recovery_step is None else str(e.recovery_step), str(e.end_step),
              f"{fmt_num(e.pre_level)} -> {fmt_num(e.trough_value)}", fmt_pct(e.relative_drop),
              fmt_pct(e.collapsed_share_at_trough))
    return t


def _pathology_table(result: ScanResult) -> Table:
    t = Table(title="pathologies", title_justify="left", show_edge=False, pad_edge=False)
    for col in ("kind", "signal", "steps", "message"):
        t.add_column(col)
    for p in result.pathologies:
        t.add_row(p.kind, Text(p.signal), f"{p.first_step}..{p.last_step} ({p.n_steps})", Text(p.message))
    return t


# ---------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------


def header_text(result: ScanResult) -> Text:
    steps = result.signals.get_column("step") if "step" in result.signals.columns else None
    span = f"steps {steps.min()}..{steps.max()}" if steps is not None and len(steps) else "no steps"
    pres = table_presence(result.signals.columns)
    have = ", ".join(k for k, ok in pres.items() if ok) or "nothing"
    t = Text("diagnose scan ", style="bold")
    t.append(str(result.source_path or "?"))
    t.append(f"  ({result.source_format or '?'}, {result.signals.height} {span}; signals from: {have})", style="dim")
    info = run_info_text(result.run_info)
    if info:
        t.append("\n  " + info, style="dim")
    return t


def render_scan(result: ScanResult, console: Console, *, capability_hint: str | None = None,
                show_cache: bool = True) -> None:
    """Print the scan report: verdict line first, then per episode the timeline, what moved
    (with lead times), implicated control tokens, rollouts before/after; pathologies, notes
    and issues last."""
    console.print(header_text(result), soft_wrap=True)
    cache = getattr(result, "cache", None)
    if show_cache and cache is not None:
        console.print(Text(f"cache: {cache.describe()}", style="dim"), soft_wrap=True)
    console.print(Text(verdict_line(result, capability_hint), style=_STYLE.get(result.verdict, "bold")), soft_wrap=True)
    pattern = control_pattern(implicated_texts(result))
    for i, e in enumerate(result.episodes, start=1):
        console.print()
        console.rule(Text(f"episode {i}: {e.signal} collapse at step {e.onset_step}", style="bold red"), align="left")
        console.print(_episode_table(e))
        leading = e.leading
        if leading:
            first = leading[0]
            console.print(Text(f"first to move: {first.signal} at step {first.step}, {first.lead} step(s) before the "
                               f"{e.signal} drop"), soft_wrap=True)
        if e.moves:
            console.print(_moves_table(e))
            if len(e.moves) > MAX_MOVES:
                console.print(Text(f"... {len(e.moves) - MAX_MOVES} more moved signal(s) (see --json)", style="dim"))
        else:
            console.print(Text("no other signal moved within the lead/lag window", style="dim"))
        console.print(Group(*_tokens_block(e, result)))
        console.print(Group(*_examples_block("rollouts before the onset", e.examples_before, pattern)))
        console.print(Group(*_examples_block("rollouts at the trough", e.examples_after, pattern)))
    if result.pathologies:
        console.print()
        console.print(_pathology_table(result))
    sources = list(getattr(result, "sources", []) or [])
    if sources:
        console.print()
        console.print(Text("sources", style="bold"))
        for line in sources:
            console.print(Text(f"  - {line}"), soft_wrap=True)
    if result.notes:
        console.print()
        console.print(Text("notes", style="bold"))
        for n in result.notes:
            console.print(Text(f"  - {n}"), soft_wrap=True)  # paths in notes stay whole (copy-paste)
    issues = list(getattr(result, "issues", []) or [])
    if issues:
        console.print()
        console.print(Text(f"issues ({issues_summary(len(issues))})", style="bold yellow"))
        for i in issues[:MAX_ISSUES]:
            console.print(Text(f"  {i}", style="yellow"), soft_wrap=True)  # never split a path
        if len(issues) > MAX_ISSUES:
            console.print(Text(f"  ... and {len(issues) - MAX_ISSUES} more (see --json)", style="yellow"))
