"""`diagnose rescore` end to end on a collapse: a `collapse`-preset run of our trainer, laid out
again as TRL writes it (tests/_rescore_layout.py: stripped text, ``checkpoint-N/``, no traces),
rescored, scans to the same implicated control token at the same context as the native run,
its rise dated within one checkpoint interval; where the native scan implicates none, neither does
the rescored one (with probe and token signals present).

Measured: ``runs/c0`` (the collapse preset of tiny-base v1, 50 steps, a checkpoint every 5):
both scans implicate ``call_open_newline`` at ``after_call_close`` (from the token table), its
rise at step 34 natively and 36 rescored. The preset of tiny-base v2 (seed 0, a checkpoint every
2 steps): both collapse at step 14 and implicate no token; the rescored p(<|im_end|> |
after_call_open) on the run's own early rollouts follows the native gold probe (1.9e-4 -> 3.1e-5
at the onset, natively 2.1e-4 -> 3.5e-5).

Slow (trains the preset, ~5 min on 2 CPU cores): set ``DIAGNOSE_COLLAPSE_RUN`` to an existing
native collapse run (e.g. ``runs/c0`` from ``train-minimal run --preset collapse``) to reuse it.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import polars as pl
import pytest
from rich.console import Console

from diagnose.rescore.pipeline import RescoreConfig, rescore_run
from diagnose.rundir import RunReader
from diagnose.scan.run import scan_run

sys.path.insert(0, str(Path(__file__).parent))
from _rescore_layout import native_to_trl  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def collapse_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("rescore_collapse")
    given = os.environ.get("DIAGNOSE_COLLAPSE_RUN")
    if given:
        native = Path(given)
    else:
        from train_minimal.config import build_config
        from train_minimal.presets import preset
        from train_minimal.trainer import train

        native = base / "native"
        train(build_config(preset("collapse"), overrides=["seed=0"]), native,
              console=Console(file=open(os.devnull, "w")))
    return native, native_to_trl(native, base / "trl")


def _rise_step(signals: pl.DataFrame, col: str, before: float, after: float) -> int | None:
    """First step from which the signal is past the geometric midpoint of its before/after levels."""
    mid = math.sqrt(max(before, 1e-12) * after)
    s = signals.select("step", col).drop_nulls().filter(pl.col(col) >= mid)
    return int(s["step"][0]) if s.height else None


def test_rescored_scan_implicates_what_the_native_scan_does(collapse_runs):
    native, trl = collapse_runs
    nat = scan_run(native, use_cache=False)
    assert nat.verdict == "collapse" and nat.episodes, "the native run must collapse"
    before = scan_run(trl, use_cache=False)
    assert not any(c.startswith(("probe/", "ctx/")) for c in before.signals.columns)  # text only

    rep = rescore_run(trl, RescoreConfig(samples=16))
    assert rep.computed and not rep.skipped
    res = scan_run(trl, use_cache=False)
    assert any("rescored from checkpoints" in n for n in res.notes)
    assert any(c.startswith("probe/after_call_open/") for c in res.signals.columns)
    assert any(c.startswith("ctx/") for c in res.signals.columns)
    assert res.verdict == "collapse" and res.episodes
    a, b = nat.episodes[0], res.episodes[0]
    assert a.onset_step == b.onset_step  # same rewards: same episode
    if not a.implicated:
        # the native scan implicates no control token (the collapse preset of tiny-base v2, seed 0):
        # the same answer, from signals that are there, not an absence of data
        assert not b.implicated, [(t.token, t.context) for t in b.implicated]
        return
    top = a.implicated[0]
    match = [t for t in b.implicated if t.token == top.token and t.context == top.context]
    assert match, (top.token, top.context, [(t.token, t.context) for t in b.implicated])
    steps = [s for s, _ in RunReader(native).checkpoints()]
    interval = min(y - x for x, y in zip(steps, steps[1:]))
    ca, cb = top.contexts[0], match[0].contexts[0]
    assert ca.signal == cb.signal
    ra = _rise_step(nat.signals, ca.signal, ca.before, ca.after)
    rb = _rise_step(res.signals, cb.signal, cb.before, cb.after)
    assert ra is not None and rb is not None and abs(ra - rb) <= interval, (ra, rb, interval)
