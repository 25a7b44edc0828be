"""vLLM as the rollout engine (``rollout.backend = "vllm"``; GPU, the ``vllm`` extra).

The engine runs in the trainer's process (colocated, tensor-parallel 1) and gets the policy's
weights before every rollout phase, so it samples from the current policy. It returns the
same ``(generated ids, sampler log-probs, stopped)`` triples as
`diagnose.model.generation.generate_batch`, so `rollout_episodes` does not care which engine ran.
The log-probs are vLLM's own: the trainer stores them as ``sampler_logprob`` and uses them as
the old policy of the clipped ratio, so training-inference mismatch shows in the traces
(``mismatch/abs_logprob_diff``) exactly as it would in a large run.
"""

from __future__ import annotations

import math
import os
from typing import Any

from diagnose.model.generation import Sampling, stop_token_ids


class VLLMUnavailable(RuntimeError):
    """vLLM cannot be used here (not installed, or no CUDA device)."""


def check_vllm() -> None:
    """Raise `VLLMUnavailable` with the reason when the vLLM backend cannot run here."""
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        raise VLLMUnavailable(f"rollout.backend=vllm needs the vllm extra (pip install -e '.[vllm]'): {e}") from None
    import torch

    if not torch.cuda.is_available():
        raise VLLMUnavailable("rollout.backend=vllm needs a CUDA GPU; use rollout.backend=hf on CPU")


def _inner_model(llm: Any) -> Any:
    """The engine's ``torch.nn.Module`` (in-process engine: VLLM_ENABLE_V1_MULTIPROCESSING=0).
    vLLM has moved it between releases; the known places are tried in turn."""
    engine = llm.llm_engine
    paths = (
        ("model_executor", "driver_worker", "worker", "model_runner", "model"),  # V1, in-process
        ("model_executor", "driver_worker", "model_runner", "model"),  # V0
        ("engine_core", "engine_core", "model_executor", "driver_worker", "worker", "model_runner", "model"),
    )
    for path in paths:
        obj = engine
        try:
            for name in path:
                obj = getattr(obj, name)
        except AttributeError:
            continue
        if hasattr(obj, "load_weights"):
            return obj
    raise VLLMUnavailable("cannot reach the vLLM engine's model to sync weights (unknown vLLM layout; "
                          "is VLLM_ENABLE_V1_MULTIPROCESSING=0 honoured by this version?)")


class VLLMEngine:
    """One colocated vLLM engine for the run's rollouts."""

    def __init__(self, model_path: str, tokenizer: Any, *, gpu_memory_utilization: float, max_context: int,
                 seed: int) -> None:
        check_vllm()
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process
        from vllm import LLM

        self.llm = LLM(model=model_path, tokenizer=model_path, dtype="bfloat16", seed=seed,
                       gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_context,
                       enable_prefix_caching=True)
        self.stop_ids = stop_token_ids(tokenizer)

    def sync_weights(self, model: Any) -> None:
        """Load the policy's current weights into the engine (names as in HF ``state_dict``)."""
        inner = _inner_model(self.llm)
        inner.load_weights((name, p.detach()) for name, p in model.state_dict().items())
        reset = getattr(self.llm, "reset_prefix_cache", None)
        if reset is not None:  # cached KV of shared prompts was computed with the old weights
            reset()

    def generate(self, contexts: list[list[int]], s: Sampling) -> list[tuple[list[int], list[float], bool]]:
        """As `diagnose.model.generation.generate_batch`: ids up to and including the stop token, the
        sampler's log-prob of each, whether a stop token was reached."""
        from vllm import SamplingParams

        params = SamplingParams(
            n=1, max_tokens=s.max_new_tokens, stop_token_ids=self.stop_ids, logprobs=0,
            skip_special_tokens=False, detokenize=False,
            **({"temperature": 0.0} if s.greedy or s.temperature <= 0 else {"temperature": s.temperature,
                                                                             "top_p": s.top_p}))
        prompts = [{"prompt_token_ids": list(c)} for c in contexts]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        return [to_triple(o.outputs[0], self.stop_ids) for o in outs]


def to_triple(c: Any, stop_ids: list[int]) -> tuple[list[int], list[float], bool]:
    """One vLLM ``CompletionOutput`` as ``(ids, log-probs, stopped)``. A stop token that vLLM
    left out of ``token_ids`` is put back (log-prob NaN: the engine did not report it)."""
    ids = list(c.token_ids)
    lps: list[float] = []
    for j, t in enumerate(ids):
        entry = c.logprobs[j].get(t) if c.logprobs is not None and j < len(c.logprobs) else None
        lps.append(float(entry.logprob) if entry is not None else math.nan)
    stopped = c.finish_reason == "stop"
    if stopped and (not ids or ids[-1] not in stop_ids):
        ids.append(stop_ids[0])
        lps.append(math.nan)
    return ids, lps, stopped
