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
