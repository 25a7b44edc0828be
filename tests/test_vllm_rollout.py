"""The vLLM rollout backend, as far as a CPU machine can check it: the engine is refused with a
clear error (no run directory left behind), vLLM's outputs are converted to the triples the
rollout loop uses, and the rollout loop runs on any engine passed to it. The engine itself
runs only on a GPU with the vllm extra (docs/trainer.md)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from diagnose.model.generation import Sampling, generate_batch
from diagnose.tasks import make_tasks
from diagnose.model.resolve import load_model_and_tokenizer
from train_minimal.config import build_config
from train_minimal.presets import preset
from train_minimal.rollout import rollout_episodes
from train_minimal.trainer import TrainingError, train
from train_minimal.vllm_rollout import VLLMUnavailable, check_vllm, to_triple


def _has_vllm_gpu() -> bool:
    try:
        check_vllm()
    except VLLMUnavailable:
        return False
    return True


@pytest.mark.skipif(_has_vllm_gpu(), reason="vLLM and a GPU are present: the backend can run")
def test_vllm_backend_without_vllm_or_gpu_is_a_clear_error(tmp_path):
    cfg = build_config(preset("smoke"), overrides=["rollout.backend=vllm"])
    with pytest.raises(TrainingError, match="rollout.backend=vllm needs"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def _lp(v):
    return SimpleNamespace(logprob=v)


def test_vllm_outputs_become_rollout_triples():
    stop = [7, 8]
    c = SimpleNamespace(token_ids=[3, 4, 7], logprobs=[{3: _lp(-0.1)}, {4: _lp(-0.2)}, {7: _lp(-0.3)}],
                        finish_reason="stop")
    assert to_triple(c, stop) == ([3, 4, 7], [-0.1, -0.2, -0.3], True)
    # the stop token left out of token_ids: put back, its log-prob unknown
    ids, lps, stopped = to_triple(SimpleNamespace(token_ids=[3], logprobs=[{3: _lp(-0.1)}], finish_reason="stop"), stop)
    assert ids == [3, 7] and lps[0] == -0.1 and math.isnan(lps[1]) and stopped
    # out of tokens: not stopped, nothing appended; missing log-probs are NaN
    ids, lps, stopped = to_triple(SimpleNamespace(token_ids=[3, 4], logprobs=None, finish_reason="length"), stop)
    assert ids == [3, 4] and all(math.isnan(x) for x in lps) and not stopped


def test_rollouts_run_on_the_engine_they_are_given(tiny_model_dir):
    model, tok = load_model_and_tokenizer(tiny_model_dir)
    tasks = make_tasks("test", 2)
    items = [(t, i, "policy") for i, t in enumerate(tasks)]
    s = Sampling(max_new_tokens=8)
    calls = []

    def engine(contexts, sampling):
        calls.append(len(contexts))
        return generate_batch(model, tok, contexts, sampling)

    torch.manual_seed(0)
    default = rollout_episodes(model, tok, items, max_turns=2, sampling=s)
    torch.manual_seed(0)
    custom = rollout_episodes(model, tok, items, max_turns=2, sampling=s, generate=engine)
    assert calls and calls[0] == 2
    assert [t.seq.ids for t in custom] == [t.seq.ids for t in default]
