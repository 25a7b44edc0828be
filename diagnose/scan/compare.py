"""`diagnose compare`: two scanned runs side by side.

    from diagnose.scan.run import scan_run
    from diagnose.scan.compare import compare_results, render_compare
    cmp = compare_results(scan_run("runs/a"), scan_run("runs/b"))
    cmp.to_json(); render_compare(cmp, console)

Key numbers per run: verdict, steps, peak (max of trailing 5-step medians) and final (median of
the last 5 steps) primary signal, collapse onset (or none), collapsed-turn share at the end
(median of the last 5 steps), the implicated control token (top token of the first episode)
and the maximum probability of the collapse token at its context over the run (fixed probe
``probe/<ctx>/<tok>``, else rollout tokens ``ctx/<ctx>/<tok>``). The collapse token is the one
implicated in run A, else in run B, so both runs are measured on the same token and context.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table
from rich.text import Text

from diagnose.scan.formatting import fmt_num, fmt_pct, fmt_prob, token_label, verdict_line
from diagnose.scan.names import TokenSignal, token_signal_names
from diagnose.scan.result import ScanResult
from diagnose.scan.series import finite_series, level, smoothed_peak

__all__ = ["COMPARE_SCHEMA_VERSION", "Comparison", "compare_results", "render_compare"]

COMPARE_SCHEMA_VERSION = 1

#: Signals shown side by side (those present in at least one run), after the primary signal.
SIDE_BY_SIDE: tuple[str, ...] = (
    "accuracy", "turn_state/healthy_call", "turn_state/healthy_response", "turn_state/polluted",
    "turn_state/collapsed", "group_reward_std", "frac_reward_zero_std", "entropy", "kl", "clip_ratio", "grad_norm",
    "completions/mean_length",
)


def _stats(res: ScanResult, name: str) -> dict[str, float | None] | None:
    _, v = finite_series(res.signals, name)
    if v.size == 0:
        return None
    return {"start": level(res.signals, name, "start"), "end": level(res.signals, name, "end"),
            "min": float(v.min()), "max": float(v.max())}


@dataclass
class Comparison:
    a: ScanResult
    b: ScanResult
    labels: tuple[str, str] = ("A", "B")
    primary: str = "reward"
    token: dict[str, Any] | None = None  # {"token", "text", "context", "from"}
    key_numbers: dict[str, dict[str, Any]] = field(default_factory=dict)  # "a" / "b" -> numbers
    signal_rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def token_signal(self) -> str | None:
        """The collapse token's probability column (probe preferred; see `_token_max`)."""
        if self.token is None:
            return None
        return token_signal_names(self.token["token"], self.token["context"])[0]

    @property
    def token_title(self) -> str:
        if self.token is None:
            return "—"
        return f"p({token_label(self.token['token'], self.token.get('text'))} | {self.token['context']})"

    def key_rows(self) -> list[tuple[str, str, str]]:
        """(label, A, B) rows of the key-number table, formatted."""
        ka, kb = self.key_numbers["a"], self.key_numbers["b"]
        rows = [
            ("verdict", ka["verdict"], kb["verdict"]),
            ("steps", f"{ka['n_steps']}", f"{kb['n_steps']}"),
            (f"peak {self.primary} (5-step median)", fmt_num(ka["peak"]), fmt_num(kb["peak"])),
            (f"final {self.primary} (last 5 steps)", fmt_num(ka["final"]), fmt_num(kb["final"])),
            ("collapse onset", _onset(ka), _onset(kb)),
            ("collapsed-turn share at end", fmt_pct(ka["collapsed_share_end"]), fmt_pct(kb["collapsed_share_end"])),
            ("implicated token", ka["implicated"] or "—", kb["implicated"] or "—"),
            (f"max {self.token_title}" if self.token else "max probe probability of the collapse token",
             _maxp(ka), _maxp(kb)),
            ("pathologies", ", ".join(ka["pathologies"]) or "—", ", ".join(kb["pathologies"]) or "—"),
        ]
        return rows

    def to_json(self) -> dict[str, Any]:
        """``{"schema_version", "labels", "primary_signal", "collapse_token", "key_numbers": {"a",
        "b"}, "signals": [{"signal", "a", "b"}], "runs": {"a": <scan JSON>, "b": <scan JSON>}}``."""
        return {
            "schema_version": COMPARE_SCHEMA_VERSION,
            "labels": {"a": self.labels[0], "b": self.labels[1]},
            "primary_signal": self.primary,
            "collapse_token": self.token,
            "key_numbers": self.key_numbers,
            "signals": self.signal_rows,
            "runs": {"a": self.a.to_json(), "b": self.b.to_json()},
        }


def _onset(k: dict[str, Any]) -> str:
    if k["onset_step"] is None:
        return "none"
    more = f" (+{k['n_episodes'] - 1} more)" if k["n_episodes"] > 1 else ""
    rec = f", recovered at {k['recovery_step']}" if k["recovery_step"] is not None else ""
    return f"step {k['onset_step']}{rec}{more}"


def _maxp(k: dict[str, Any]) -> str:
    if k["max_token_prob"] is None:
        return "—"
    sig = TokenSignal.parse(str(k["max_token_prob_signal"]))
    src = "probe" if sig is not None and sig.source == "probe" else "rollout tokens"
    at = f" at step {k['max_token_prob_step']}" if k["max_token_prob_step"] is not None else ""
    return f"{fmt_prob(k['max_token_prob'])}{at} ({src})"


def _collapse_token(a: ScanResult, b: ScanResult, labels: Sequence[str]) -> dict[str, Any] | None:
    for label, res in zip(labels, (a, b)):
        for e in res.episodes:
            if e.implicated:
                t = e.implicated[0]
                return {"token": t.token, "text": t.text, "context": t.context, "from": label}
    return None


def _token_max(res: ScanResult, token: dict[str, Any] | None) -> tuple[float | None, str | None, int | None]:
    if token is None:
        return None, None, None
    for name in token_signal_names(token["token"], token["context"]):
        s, v = finite_series(res.signals, name)
        if v.size:
            i = int(np.argmax(v))
            return float(v[i]), name, int(s[i])
    return None, None, None


def _key_numbers(res: ScanResult, primary: str, token: dict[str, Any] | None) -> dict[str, Any]:
    e = res.episodes[0] if res.episodes else None
    top = e.implicated[0] if e and e.implicated else None
    pmax, psig, pstep = _token_max(res, token)
    steps = res.signals.get_column("step") if "step" in res.signals.columns else None
    return {
        "path": res.source_path, "format": res.source_format, "verdict": res.verdict,
        "n_steps": int(res.signals.height),
        "first_step": int(steps.min()) if steps is not None and len(steps) else None,
        "last_step": int(steps.max()) if steps is not None and len(steps) else None,
        "primary_signal": primary,
        "peak": smoothed_peak(res.signals, primary), "final": level(res.signals, primary, "end"),
        "onset_step": e.onset_step if e else None, "recovery_step": e.recovery_step if e else None,
        "n_episodes": len(res.episodes),
        "collapsed_share_end": level(res.signals, "turn_state/collapsed", "end"),
        "implicated": (f"{token_label(top.token, top.text)} @ {top.context}" if top else None),
        "implicated_token": top.token if top else None, "implicated_context": top.context if top else None,
        "max_token_prob": pmax, "max_token_prob_signal": psig, "max_token_prob_step": pstep,
        "pathologies": sorted({p.kind for p in res.pathologies}),
    }


def compare_results(a: ScanResult, b: ScanResult, labels: tuple[str, str] = ("A", "B")) -> Comparison:
    """Key numbers and side-by-side signals of two scan results."""
    primary = a.primary_signal or b.primary_signal or "reward"
    token = _collapse_token(a, b, labels)
    cmp = Comparison(a, b, labels, primary, token)
    cmp.key_numbers = {"a": _key_numbers(a, primary, token), "b": _key_numbers(b, primary, token)}
    names = [primary] + [s for s in SIDE_BY_SIDE if s != primary]
    if token is not None:
        names += token_signal_names(token["token"], token["context"])
    for name in names:
        sa, sb = _stats(a, name), _stats(b, name)
        if sa is None and sb is None:
            continue
        cmp.signal_rows.append({"signal": name, "a": sa, "b": sb})
    return cmp


def _span(st: dict[str, Any] | None) -> str:
    if st is None:
        return "—"
    return f"{fmt_num(st['start'], 3)} -> {fmt_num(st['end'], 3)}  [{fmt_num(st['min'], 3)}, {fmt_num(st['max'], 3)}]"


def render_compare(cmp: Comparison, console: Console) -> None:
    """Verdict lines, the key-number table and the signals side by side."""
    for label, res in zip(cmp.labels, (cmp.a, cmp.b)):
        line = Text(f"{label}: ", style="bold")
        line.append(str(res.source_path or "?"), style="dim")
        console.print(line, soft_wrap=True)
        style = {"collapse": "bold red", "pathology": "bold yellow", "healthy": "bold green"}.get(res.verdict, "bold")
        console.print(Text(f"   {verdict_line(res)}", style=style), soft_wrap=True)
    t = Table(title="key numbers", title_justify="left")
    t.add_column("")
    for label in cmp.labels:
        t.add_column(label, justify="right")
    for row in cmp.key_rows():
        t.add_row(*(Text(str(c)) for c in row))
    console.print(t)
    s = Table(title="signals side by side: start -> end (median of first / last 5 steps) [min, max]",
              title_justify="left")
    s.add_column("signal")
    for label in cmp.labels:
        s.add_column(label, justify="right")
    for r in cmp.signal_rows:
        s.add_row(Text(r["signal"]), _span(r["a"]), _span(r["b"]))
    console.print(s)
