"""Honesty controls of the capability probe, on checkpoints whose capability is known
(``probe_models`` in conftest.py):

* an untrained model: capability near chance, never "intact";
* a healthy checkpoint: capability and native accuracy close, verdict "healthy";
* the same checkpoint with the Qwen2.5 collapse (``<tool_call>\\n<|im_end|>``) taught on top:
  native accuracy 0, both repairs restore it, verdict "capability intact, format broken".
"""

from __future__ import annotations

import pytest

from diagnose.capability.config import HEALTHY, INTACT_FORMAT_BROKEN, LOST, ProbeConfig
from diagnose.capability.runner import auto_max_new_tokens, probe_model
from diagnose.capability.verdict import likelihood_skill, summarize
from diagnose.tasks import make_tasks
from diagnose.model.resolve import load_model_and_tokenizer


def _probe(path, tasks):
    model, tok = load_model_and_tokenizer(path)
    cfg = ProbeConfig(n_tasks=len(tasks))
    cfg.max_new_tokens = auto_max_new_tokens(tok, tasks)
    res = probe_model(model, tok, tasks, cfg)
    rows = {r["measure"]: r for r in res.rows}
    return rows, summarize(str(path), None, res.rows, chance=res.likelihood_chance, cfg=cfg), res


@pytest.fixture(scope="module")
def probed(probe_models):
    tasks = probe_models["tasks"]
    return {name: _probe(probe_models[name], tasks) for name in ("healthy", "collapsed")}


def test_random_model_is_at_chance_and_never_intact(probe_models):
    tasks = make_tasks("test", 12)
    rows, summary, res = _probe(probe_models["random"], tasks)
    for m in ("native", "repair_forbid", "repair_prefill", "alt_pythonic", "alt_json"):
        assert rows[m]["accuracy"] == 0.0 and rows[m]["n"] == 12
    lik = rows["likelihood"]
    assert lik["n"] >= 25 and 0.1 < res.likelihood_chance < 0.3
    assert lik["accuracy"] <= res.likelihood_chance + 0.15  # near chance (here: below it)
    assert likelihood_skill(lik["accuracy"], res.likelihood_chance) < ProbeConfig().likelihood_skill_min
    assert summary["verdict"] == LOST and summary["capability_score"] == 0.0


def test_healthy_checkpoint_is_healthy(probed):
    rows, summary, res = probed["healthy"]
    assert rows["native"]["accuracy"] >= 0.75
    assert rows["native"]["collapsed"] == 0.0 and rows["native"]["polluted"] == 0.0
    # the repairs never have anything to repair
    for m in ("repair_forbid", "repair_prefill"):
        assert rows[m]["fired_rate"] == 0.0 and rows[m]["accuracy"] == rows["native"]["accuracy"]
    assert rows["likelihood"]["accuracy"] == 1.0
    assert abs(summary["capability_score"] - summary["format_score"]) < 0.15
    assert summary["verdict"] == HEALTHY


def test_collapsed_checkpoint_is_intact_with_a_broken_format(probed):
    rows, summary, res = probed["collapsed"]
    native = rows["native"]
    assert native["accuracy"] == 0.0 and native["collapsed"] == 1.0  # every turn: <tool_call>\n<|im_end|>
    assert all(r.turn_states == ["collapsed"] for r in res.episodes["native"])
    for m in ("repair_forbid", "repair_prefill"):
        assert rows[m]["fired_rate"] == 1.0 and rows[m]["accuracy"] >= 0.75, rows[m]
    assert rows["likelihood"]["accuracy"] >= 0.9  # it still knows every call
    assert summary["format_gap"] >= 0.75
    assert summary["verdict"] == INTACT_FORMAT_BROKEN


def test_the_fixture_is_cheap(probe_models):
    """The healthy checkpoint is built by overfitting, fast enough for the default suite."""
    b = probe_models["build"]
    assert b["healthy"]["steps"] < 300 and b["collapsed"]["second_is_gold"]
