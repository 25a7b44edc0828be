"""The trainer experiment: presets x seeds -> one table (docs/experiments.md).

    python experiments/supervision_table.py --presets collapse,stable,sync --seeds 0,1,2 --out runs/exp

Trains every (preset, seed) run that is not already complete under --out, scans it, then
prints per run and, per preset, the mean over seeds of: peak and final on-policy accuracy,
final collapsed-turn rate, held-out test / content-OOD / format-OOD greedy accuracy at the end;
the scan's verdict, onset and collapsed-turn share at the trough; the first signal the scan saw
move (lead over the onset), the first control-token probability at a call context to move, and
the probe column with the largest rise over the RL phase. ``--markdown`` prints the tables as
Markdown for the docs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import polars as pl
from rich.console import Console
from rich.table import Table

from diagnose.control_tokens import KEY_CONTEXT_ROLES
from diagnose.rundir import RunReader
from diagnose.scan.run import scan_run
from train_minimal.config import build_config
from train_minimal.presets import preset
from train_minimal.trainer import train

console = Console()


def run_complete(path: Path, total: int) -> bool:
    try:
        return int(RunReader(path).metrics()["step"].max()) >= total
    except Exception:  # no run yet, or unreadable: (re)train it
        return False


def largest_probe_rise(m: pl.DataFrame) -> str:
    """The probe column ``probe/after_call_open/<token>`` or ``probe/turn_start/<token>`` with the
    largest rise (last / first probed value) over the RL phase; '' if none rose 2x."""
    cols = [c for c in m.columns if c.startswith(("probe/after_call_open/", "probe/turn_start/"))
            and not c.endswith("/gold")]
    rl = m.filter(pl.col("phase") == "rl")
    best, best_ratio = "", 2.0
    for c in cols:
        s = rl[c].drop_nulls()
        if s.len() >= 2 and s[0] > 0 and s[-1] / s[0] > best_ratio:
            best, best_ratio = c.removeprefix("probe/"), float(s[-1] / s[0])
    return best


CALL_CONTEXTS = ("probe/after_call_open/", "probe/after_call_body/", "probe/turn_start/")


def is_expected(signal: str, roles: dict[str, str]) -> bool:
    """``probe/<context>/<token>`` is the gold probability or the healthy next token of its context
    (``<tool_call>`` at turn start): its rise is not a collapse signature."""
    _, context, token = signal.split("/", 2)
    return token == "gold" or roles.get(token) == KEY_CONTEXT_ROLES.get(context, {}).get("expected")


def scan_summary(path: Path) -> dict[str, float | str]:
    """The scan's verdict, onset, collapsed share at the trough, the first signal to move (with
    its lead over the onset), the first control-token probability at a call context to rise (not
    the context's healthy next token),
    and the top implicated token."""
    r = scan_run(path)
    roles = {t["name"]: t["role"] for t in RunReader(path).info.get("control_tokens", [])}
    out: dict[str, float | str] = {"scan": r.verdict, "onset": float("nan"), "collapsed_at_trough": float("nan"),
                                   "first_mover": "", "ctrl_mover": "", "ctrl_lead": float("nan"), "implicated": ""}
    if r.episodes:
        ep = r.episodes[0]
        out["onset"] = float(ep.onset_step)
        if ep.collapsed_share_at_trough is not None:
            out["collapsed_at_trough"] = float(ep.collapsed_share_at_trough)
        if ep.moves:
            m = ep.moves[0]
            out["first_mover"] = f"{m.signal.removeprefix('probe/')} ({m.direction}, lead {m.lead})"
        ctrl = [m for m in ep.moves if m.signal.startswith(CALL_CONTEXTS) and m.direction == "up"
                and not is_expected(m.signal, roles)]
        if ctrl:
            out["ctrl_mover"] = f"{ctrl[0].signal.removeprefix('probe/')} ({ctrl[0].direction})"
            out["ctrl_lead"] = float(ctrl[0].lead)
        if ep.implicated:
            t = ep.implicated[0]
            out["implicated"] = f"{t.token} @ {t.context}"
    return out


def summarize(path: Path) -> dict[str, float | str]:
    m = RunReader(path).metrics()
    rl = m.filter(pl.col("phase") == "rl")
    last = m.tail(1)
    acc = rl["accuracy"].drop_nulls()
    out: dict[str, float | str] = {
        # full 5-step windows only: with min_samples=1 a single noisy first step (4 prompts) was a "peak"
        "peak_accuracy": float(acc.rolling_mean(min(5, acc.len()), min_samples=min(5, acc.len())).max()),
        "peak_any_window": float(acc.rolling_mean(5, min_samples=1).max()),
        "final_accuracy": float(acc.tail(5).mean()),
        "final_collapsed": float(rl["turn_state/collapsed"].tail(5).mean()),
        "largest_probe_rise": largest_probe_rise(m),
    }
    for split in ("test", "content_ood", "format_ood"):
        col = f"eval/{split}/accuracy"
        out[split] = float(last[col][0]) if col in last.columns and last[col][0] is not None else float("nan")
    return {**out, **scan_summary(path)}


def print_markdown(*frames: pl.DataFrame) -> None:
    """The tables as Markdown (polars' own table formatting), for docs/."""
    with pl.Config(tbl_formatting="MARKDOWN", tbl_hide_column_data_types=True, tbl_hide_dataframe_shape=True,
                   float_precision=2, tbl_rows=-1, tbl_cols=-1, tbl_width_chars=1000, fmt_str_lengths=200):
        for df in frames:
            print(df)
            print()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", default="collapse,stable")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", default="runs/exp")
    ap.add_argument("--set", action="append", default=[], help="extra override for every run")
    ap.add_argument("--markdown", action="store_true", help="print the tables as Markdown (for docs/)")
    a = ap.parse_args()
    rows = []
    for name in a.presets.split(","):
        for seed in (int(s) for s in a.seeds.split(",")):
            cfg = build_config(preset(name), overrides=[f"seed={seed}", f"name={name}-s{seed}", *a.set])
            path = Path(a.out) / f"{name}-s{seed}"
            if not run_complete(path, cfg.sft.steps + cfg.grpo.steps):
                train(cfg, path, console=console, resume=(path / "run.json").exists())
            rows.append({"preset": name, "seed": seed, **summarize(path)})
    df = pl.DataFrame(rows)
    agg = df.group_by("preset", maintain_order=True).agg(
        pl.col(pl.Float64).exclude("onset", "ctrl_lead").mean(), (pl.col("scan") == "collapse").sum().alias("collapsed_runs"),
        pl.len().alias("seeds"))
    if a.markdown:
        print_markdown(df, agg)
        return
    with pl.Config(tbl_cols=-1, tbl_width_chars=200):
        console.print(df)
    table = Table(title=f"mean over seeds {a.seeds}")
    for c in agg.columns:
        table.add_column(c)
    for r in agg.iter_rows():
        table.add_row(*(f"{v:.2f}" if isinstance(v, float) else str(v) for v in r))
    console.print(table)


if __name__ == "__main__":
    main()
