"""The real-model table (docs/experiments.md, section 7): one row per TRL run of
experiments/smollm2_grpo.py, from the run's own files only (TRL's completions and trainer state,
the DiagnoseCallback's probe tables, the mechanism metrics the experiment's trainer logged, and
RUN/capability/ once probed).

    python experiments/smollm2_table.py runs/sm2/rl-s0 runs/sm2/sync-s0 [--markdown]

Columns: reward (first step, best, last), the scan's verdict and onset, the turn states at the
trough (or at the last step when there is no collapse), the first mover and its lead, the
fixed probe's p(<|im_end|> | <tool_call>\\n) and p(<tool_call> | turn start) (first step -> max
and where), the rollouts' own p(<|im_end|>) at the call-open positions, bare calls sampled
(<|im_end|> right after <tool_call>\\n), the push on <|im_end|> at the call-open positions (self
/ other, summed over steps) and everywhere (``attribution/im_end/*``, summed), and the probe
verdict per probed checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import polars as pl
from rich.console import Console
from rich.table import Table

from diagnose.capability import read_capability
from diagnose.scan import scan_run
from diagnose.scan.names import signal_kind

P_END_OPEN = "probe/after_call_open/im_end"
P_NESTED_OPEN = "probe/after_call_open/tool_call_open"
P_OPEN_AFTER_BODY = "probe/after_call_body/tool_call_open"
P_CALL_START = "probe/turn_start/tool_call_open"


def _g(v: float | None) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3g}"


def _col(df: pl.DataFrame, name: str) -> pl.DataFrame:
    return df.select("step", name).drop_nulls() if name in df.columns else pl.DataFrame({"step": [], name: []})


def _move(df: pl.DataFrame, name: str) -> str:
    """first value -> max (at step)."""
    s = _col(df, name)
    if s.is_empty():
        return "—"
    top = s.sort(name, descending=True).row(0)
    return f"{_g(s[name][0])} → {_g(top[1])} (step {top[0]})"


def _sum(df: pl.DataFrame, name: str) -> float | None:
    return float(df[name].drop_nulls().sum()) if name in df.columns else None


def first_probe_move(sig: pl.DataFrame, before: int) -> str:
    """The fixed probe's first large move before step ``before``: the first step where a
    ``probe/*`` probability is 10x and 0.05 above (or below) its step-1 value. The scan's own
    mover search needs more than ``min_periods`` (10) steps of baseline; these runs have 8."""
    moves: list[tuple[int, str, float, float]] = []
    for c in (c for c in sig.columns if c.startswith("probe/") and signal_kind(c) == "probability"):
        s = sig.select("step", c).drop_nulls().sort("step")
        if s.height < 2:
            continue
        v0 = s[c][0]
        moved = s.filter(((pl.col(c) > 10 * v0) & (pl.col(c) > v0 + 0.05))
                         | ((pl.col(c) < v0 / 10) & (pl.col(c) < v0 - 0.05)))
        if moved.height and moved["step"][0] < before:
            moves.append((int(moved["step"][0]), c, v0, float(moved[c][0])))
    if not moves:
        return "—"
    step = min(m[0] for m in moves)
    return "; ".join(f"{c.removeprefix('probe/')} {_g(v0)} → {_g(v)}" for st, c, v0, v in sorted(moves)
                     if st == step) + f" at step {step} (lead {before - step})"


def run_row(run: Path) -> dict[str, str]:
    res = scan_run(run)
    sig = res.signals
    reward = _col(sig, "reward")
    ep = res.episodes[0] if res.episodes else None
    fmt = next((p for p in res.pathologies if p.kind == "format_collapse"), None)
    at = ep.trough_step if ep else (fmt.first_step if fmt else int(sig["step"].max()))
    states = sig.filter(pl.col("step") == at)
    turn = ", ".join(f"{c.split('/')[1]} {_g(states[c][0])}" for c in sig.columns
                     if c.startswith("turn_state/") and not states.is_empty() and states[c][0])
    mover = "—"
    if ep and ep.moves:
        first = min(ep.moves, key=lambda m: (m.step, -m.lead))
        mover = f"{first.signal} ({first.direction}, lead {first.lead})"
    elif fmt:
        mover = first_probe_move(sig, fmt.first_step)
    implicated = ", ".join(f"{t.token}@{c.context}×{c.ratio:.3g}" for t in (ep.implicated if ep else [])
                           for c in t.contexts[:1])
    cap = read_capability(run)
    probe = "not probed"
    if cap is not None:
        probe = "; ".join(f"{r['checkpoint']}: {r['verdict']} (native {_g(r['format_score'])})"
                          for r in cap.summary.sort("step").iter_rows(named=True))
    timing = json.loads((run / "timing_grpo.json").read_text()) if (run / "timing_grpo.json").is_file() else {}
    bare = _sum(sig, "mech/end@open")
    return {
        "run": run.name,
        "reward first / best / last": f"{_g(reward['reward'][0])} / {_g(reward['reward'].max())} / "
                                      f"{_g(reward['reward'][-1])}" if not reward.is_empty() else "—",
        "scan": f"{res.verdict}" + (f", onset {ep.onset_step}, trough {ep.trough_step}" if ep else "")
                + (f", format_collapse steps {fmt.first_step}-{fmt.last_step}" if fmt else ""),
        "turn states (at the onset, else the last step)": f"step {at}: {turn}" if turn else "—",
        "first mover (lead)": mover,
        "implicated": implicated or "—",
        "p(<|im_end|> | <tool_call>\\n), probe": _move(sig, P_END_OPEN),
        "p(<tool_call> | <tool_call>\\n), probe": _move(sig, P_NESTED_OPEN),
        "p(<tool_call> | call body), probe": _move(sig, P_OPEN_AFTER_BODY),
        "p(<tool_call> | turn start), probe": _move(sig, P_CALL_START),
        "p(<|im_end|>) at call-open, rollouts": _move(sig, "mech/p_end@open"),
        "p(<) at call-open, rollouts": _move(sig, "mech/p_call@open"),
        "bare calls sampled": _g(bare),
        "nested <tool_call> sampled at call-open": _g(_sum(sig, "mech/call@open")),
        "<|im_end|> push @open self / other": f"{_g(_sum(sig, 'mech/self@open'))} / {_g(_sum(sig, 'mech/other@open'))}",
        "< push @open self / other": f"{_g(_sum(sig, 'mech/self_call@open'))} / "
                                     f"{_g(_sum(sig, 'mech/other_call@open'))}",
        "sumA@open > 0 / < 0 (steps)": (f"{int((sig['mech/sumA@open'] > 0).sum())} / "
                                        f"{int((sig['mech/sumA@open'] < 0).sum())}") if "mech/sumA@open" in sig.columns else "—",
        "<|im_end|> push everywhere self / other": f"{_g(_sum(sig, 'attribution/im_end/self'))} / "
                                                   f"{_g(_sum(sig, 'attribution/im_end/other'))}",
        "probe": probe,
        "s/step (TRL step_time: median, min-max)": (
            f"{_g(sig['step_time'].median())}, {_g(sig['step_time'].min())}-{_g(sig['step_time'].max())}"
            if "step_time" in sig.columns else _g(timing.get("s_per_step"))),
    }


def main() -> None:
    """One column per run, one row per measure (the measures do not fit side by side)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args()
    rows = [run_row(r) for r in a.runs]
    fields = [f for f in rows[0] if f != "run"]
    if a.markdown:
        esc = lambda v: str(v).replace("|", "\\|")  # noqa: E731
        print("| | " + " | ".join(r["run"] for r in rows) + " |")
        print("|---|" + "---|" * len(rows))
        for f in fields:
            print(f"| {esc(f)} | " + " | ".join(esc(r.get(f, "—")) for r in rows) + " |")
        return
    table = Table(title="SmolLM2-135M-Instruct, TRL GRPO + LoRA")
    table.add_column("")
    for r in rows:
        table.add_column(r["run"])
    for f in fields:
        table.add_row(f, *(str(r.get(f, "—")) for r in rows))
    Console().print(table)


if __name__ == "__main__":
    main()
