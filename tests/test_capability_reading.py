"""The probe in plain words (`diagnose.capability.reading`): each verdict explained with the
measure that supports it, and the claim the evidence supports, on hand-made probe results of
each kind (as `diagnose probe` writes them: results + summary + meta)."""

from __future__ import annotations

import polars as pl
import pytest

from diagnose.capability.config import ProbeConfig
from diagnose.capability.reading import CLAIM_HIDDEN, CLAIM_KNOWS, CLAIM_LOST, CLAIM_NONE, read_probe
from diagnose.capability.results import RESULT_SCHEMA, SUMMARY_SCHEMA, CapabilityResults, read_capability, \
    write_capability
from diagnose.capability.verdict import summarize

CHANCE = 0.17


def probe_of(checkpoints: dict[int, dict[str, float]], *, healthy: float | dict[int, float] = 0.9) -> CapabilityResults:
    """Results for checkpoints {step: {measure: accuracy}}, summarised by the real verdict rule;
    ``healthy``: the native turns' healthy share, one for all or per step."""
    cfg = ProbeConfig()
    results, summary, meta = [], [], {"checkpoints": {}, "thresholds": cfg.thresholds()}
    for step, accs in checkpoints.items():
        name = f"step-{step:06d}"
        h = healthy[step] if isinstance(healthy, dict) else healthy
        rows = [{"checkpoint": name, "step": step, "measure": m, "accuracy": a, "n": 32,
                 **({"healthy_call": h, "healthy_response": 0.0} if m == "native" else {})}
                for m, a in accs.items()]
        results += rows
        summary.append(summarize(name, step, rows, chance=CHANCE, cfg=cfg))
        meta["checkpoints"][name] = {"step": step, "likelihood_chance": CHANCE, "roles": []}
    return CapabilityResults(None, pl.DataFrame(results, schema=RESULT_SCHEMA, strict=False),
                             pl.DataFrame(summary, schema=SUMMARY_SCHEMA, strict=False), meta)


BEFORE = {"native": 0.59, "repair_forbid": 0.59, "repair_prefill": 0.59, "alt_pythonic": 0.1, "alt_json": 0.1,
          "likelihood": 0.97}


def test_knows_the_calls_but_no_longer_generates_them():
    """The demo's case: generation gone everywhere, the teacher-forced ranking intact, the turns
    still well-formed: verdict `capability lost`, explained as lost by generation, not knowledge."""
    cap = probe_of({18: BEFORE, 24: {"native": 0.09, "repair_forbid": 0.09, "repair_prefill": 0.06,
                                      "alt_pythonic": 0.0, "alt_json": 0.0, "likelihood": 0.95}})
    r = read_probe(cap)
    assert [c.verdict for c in r.checkpoints] == ["healthy", "capability lost"]
    trough = r.checkpoints[1]
    assert "by generation, not by knowledge" in trough.words
    assert "95%" in trough.words and "chance 17%" in trough.words and "59% at step 18" in trough.words
    assert "likelihood 95% (chance 17%)" in trough.figures()
    assert r.claim == CLAIM_KNOWS


def test_hidden_by_the_format_when_a_repair_restores_it():
    cap = probe_of({18: BEFORE, 24: {"native": 0.05, "repair_forbid": 0.55, "repair_prefill": 0.3,
                                      "likelihood": 0.95}}, healthy=0.1)
    r = read_probe(cap)
    assert r.checkpoints[1].verdict == "capability intact, format broken"
    assert "forbidding the collapse tokens it solves 55%" in r.checkpoints[1].words
    assert r.claim == CLAIM_HIDDEN


def test_intact_by_likelihood_alone_is_not_a_format_that_hides_the_skill():
    """The demo run of issue 22: at the last checkpoint nothing is generated, with or without a
    repair, its turns malformed, the teacher-forced ranking at 89%: the probe's verdict is
    "capability intact, format broken" (by the likelihood), but no repair restores anything, so
    the claim is that the calls are recognised, not that the format hides them."""
    trough = {"native": 0.19, "repair_forbid": 0.19, "repair_prefill": 0.19, "alt_pythonic": 0.0, "alt_json": 0.0,
              "likelihood": 0.95}
    last = {"native": 0.0, "repair_forbid": 0.0, "repair_prefill": 0.0, "alt_pythonic": 0.0, "alt_json": 0.0,
            "likelihood": 0.89}
    r = read_probe(probe_of({20: BEFORE, 24: trough, 38: last}, healthy={20: 0.9, 24: 0.7, 38: 0.1}))
    assert [c.verdict for c in r.checkpoints] == ["healthy", "capability lost", "capability intact, format broken"]
    assert "no repair restores generation" in r.checkpoints[2].words
    assert r.claim == CLAIM_KNOWS and "restores" not in r.claim_short


def test_lost_when_the_ranking_is_at_chance_too():
    cap = probe_of({18: BEFORE, 24: {"native": 0.0, "repair_forbid": 0.0, "likelihood": 0.18}})
    r = read_probe(cap)
    assert r.checkpoints[1].verdict == "capability lost" and "only 18%" in r.checkpoints[1].words
    assert r.claim == CLAIM_LOST


def test_no_claim_of_loss_when_native_held():
    cap = probe_of({18: BEFORE, 24: {**BEFORE, "native": 0.5}})
    assert read_probe(cap).claim == CLAIM_NONE
    one = read_probe(probe_of({18: BEFORE}))
    assert "one checkpoint probed" in one.claim


def test_reads_back_written_results(tmp_path):
    """From the files, as the demo, the scan and the dashboard read them."""
    cap = probe_of({18: BEFORE, 24: {"native": 0.09, "repair_forbid": 0.09, "likelihood": 0.95}})
    write_capability(tmp_path, cap.results, cap.summary, cap.meta)
    back = read_capability(tmp_path)
    assert read_probe(back).claim == CLAIM_KNOWS


@pytest.mark.parametrize("claim", [CLAIM_HIDDEN, CLAIM_KNOWS, CLAIM_LOST])
def test_claims_say_what_they_rest_on(claim):
    assert len(claim) > 60  # a sentence that says why, not a label
