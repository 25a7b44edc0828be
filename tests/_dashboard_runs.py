"""A small runs root for the dashboard tests: every kind of run the dashboard must handle."""

from __future__ import annotations

from pathlib import Path

from diagnose.capability import write_capability
from diagnose.synth import write_synthetic_run
from diagnose.synth.foreign import write_open_instruct_run, write_trl_run

SMALL = {"samples_per_step": 16, "tokens_per_sample": 48}


def write_capability_demo(run: Path, onset: int, steps: tuple[int, ...]) -> None:
    """Made-up probe results in the capability schema: the format breaks at the onset, the
    capability does not."""
    results, summary = [], []
    for s in steps:
        ok = s < onset
        summary.append({"checkpoint": f"step-{s:06d}", "step": s, "format_score": 0.6 if ok else 0.05,
                        "capability_score": 0.62 if ok else 0.55, "format_gap": 0.02 if ok else 0.5,
                        "verdict": "healthy" if ok else "capability intact, format broken"})
        for m in ("native", "repair_forbid", "alt_json", "likelihood"):
            results.append({"checkpoint": f"step-{s:06d}", "step": s, "measure": m, "n": 32,
                            "accuracy": 0.6 if ok or m != "native" else 0.05})
    write_capability(run, results, summary, {"tasks": 32, "split": "test", "synthetic": True})


def make_runs_root(root: Path) -> Path:
    """``collapse`` (native, token traces, probe, capability results), ``stable`` (native, no
    collapse), ``partial`` (native without tokens/ and probe/), ``adapters/trl`` (TRL: text only,
    no log-probs), ``adapters/oi`` (open-instruct: token log-probs, no control tokens),
    ``broken`` (a run.json that is not JSON)."""
    root.mkdir(parents=True, exist_ok=True)
    write_synthetic_run(root / "collapse", steps=40, collapse_at=22, **SMALL)
    write_capability_demo(root / "collapse", 22, (10, 20, 30, 39))
    write_synthetic_run(root / "stable", steps=40, collapse_at=None, seed=1, **SMALL)
    write_synthetic_run(root / "partial", steps=30, collapse_at=18, seed=2, tokens=False, probe=False, **SMALL)
    write_trl_run(root / "adapters" / "trl", steps=30, collapse_at=18)
    write_open_instruct_run(root / "adapters" / "oi", steps=12, collapse_at=7)
    (root / "broken").mkdir()
    (root / "broken" / "run.json").write_text("{not json", encoding="utf-8")
    return root


def make_demo_like_root(root: Path) -> Path:
    """A runs root shaped like the one `scripts/demo.sh` leaves: ``collapse`` (our format, token
    traces, the fixed probe, a collapse) as our trainer writes it with the demo's settings (beta 0:
    ``kl`` logged as 0 at every step; a binary task reward, so ``accuracy`` equals ``reward``) and
    probed as the demo's run is (generation lost at the trough and no repair helping, so native and
    the repairs coincide; the teacher-forced likelihood unchanged), plus a second run to compare."""
    import json

    import polars as pl

    from diagnose.capability import ProbeConfig
    from diagnose.capability.verdict import summarize

    run = root / "collapse"
    write_synthetic_run(run, steps=40, collapse_at=22, **SMALL)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    (run / "metrics.jsonl").write_text("".join(json.dumps({**d, "kl": 0.0}) + "\n" for d in lines))
    for f in sorted((run / "rollouts").glob("step-*.parquet")):
        pl.read_parquet(f).with_columns(pl.col("reward").alias("accuracy")).write_parquet(f)
    # the synthetic writer has no tool outputs in its completions; our trainer logs them as token rows
    # with is_generated false: the last 8 positions of each rollout stand in for them here
    for f in sorted((run / "tokens").glob("step-*.parquet")):
        df = pl.read_parquet(f)
        last = pl.col("position").max().over("sample_id")
        df.with_columns((pl.col("position") <= last - 8).alias("is_generated")).write_parquet(f)
    results, summary = [], []
    for step, native, role in ((20, 0.5, "before onset (episode 1)"), (26, 0.06, "trough (episode 1)"),
                               (39, 0.06, "last")):
        name = f"step-{step:06d}"
        accs = {"native": native, "repair_forbid": native, "repair_prefill": native, "alt_pythonic": 0.0,
                "alt_json": 0.0 if step > 20 else 0.16, "likelihood": 0.95}
        rows = [{"checkpoint": name, "step": step, "measure": m, "n": 32, "accuracy": a,
                 **({"healthy_call": 0.7, "healthy_response": 0.1} if m == "native" else {})} for m, a in accs.items()]
        results += rows
        summary.append(summarize(name, step, rows, chance=0.17, cfg=ProbeConfig()))
    meta = {"tasks": {"n": 32}, "checkpoints": {f"step-{s:06d}": {"step": s, "roles": [r], "likelihood_chance": 0.17}
                                               for s, r in ((20, "before onset (episode 1)"), (26, "trough (episode 1)"),
                                                            (39, "last"))}}
    write_capability(run, results, summary, meta)
    write_synthetic_run(root / "stable", steps=40, collapse_at=None, seed=1, **SMALL)
    return root
