"""Batched generation for the environment: HF ``generate`` with a KV cache, left padding, and the
sampler's own log-probs of every generated token (for training/inference mismatch).

Why keep control tokens in the decoded text: the point is to *see* a stray `<|im_end|>` or a
bare `<tool_call>`; only the final stop token, which the chat template adds back, is cut.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from diagnose.chat import ENDOFTEXT, IM_END
from diagnose.model.sequences import encode, prompt_text


@dataclass
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    greedy: bool = False  # temperature 0
    max_context: int = 2048


def _left_pad(seqs: list[list[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def stop_token_ids(tokenizer: Any) -> list[int]:
    """The ids that end an assistant turn: ``<|im_end|>`` (the turn end), then ``<|endoftext|>``."""
    return [tokenizer.convert_tokens_to_ids(IM_END), tokenizer.convert_tokens_to_ids(ENDOFTEXT)]


@torch.no_grad()
def generate_batch(model: Any, tokenizer: Any, contexts: list[list[int]], s: Sampling, *,
                   logits_processor: Any = None) -> list[tuple[list[int], list[float], bool]]:
    """For each context: (generated ids up to and including the stop token, sampler log-probs of
    those ids, whether a stop token was reached).

    ``logits_processor``: optional HF logits processor(s) (one, a list or a ``LogitsProcessorList``)
    applied to every step's scores, e.g. the capability probe's format repairs; the returned
    log-probs are then those of the processed distribution."""
    stop = stop_token_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[1]
    ids, mask = _left_pad(contexts, pad, model.device)
    kw: dict[str, Any] = dict(do_sample=False) if s.greedy or s.temperature <= 0 else dict(
        do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=0)
    if logits_processor is not None:
        from transformers import LogitsProcessorList

        procs = logits_processor if isinstance(logits_processor, (list, tuple, LogitsProcessorList)) else [logits_processor]
        kw["logits_processor"] = LogitsProcessorList(procs)
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=s.max_new_tokens, eos_token_id=stop,
        pad_token_id=pad, output_scores=True, return_dict_in_generate=True, **kw)
    gen = out.sequences[:, ids.shape[1]:]
    # scores are the processed logits the token was drawn from (temperature/top-p applied)
    lps = torch.stack([torch.log_softmax(sc.float(), -1).gather(-1, gen[:, t:t + 1]).squeeze(-1)
                       for t, sc in enumerate(out.scores)], dim=1)
    results = []
    for row, lp in zip(gen.tolist(), lps.tolist()):
        n = len(row)
        for j, t in enumerate(row):
            if t in stop:
                n = j + 1
                break
        stopped = n <= len(row) and n > 0 and row[n - 1] in stop
        results.append((row[:n], lp[:n], stopped))
    return results


def hf_policy(model: Any, tokenizer: Any, *, seed: int = 0, **sampling: Any):
    """A `Policy` (messages -> assistant text) backed by a HF model; reproducible from ``seed``."""
    s = Sampling(**sampling)
    model.eval()
    state = {"calls": 0}

    def policy(messages: list[dict[str, Any]]) -> str:
        torch.manual_seed(seed * 1_000_003 + state["calls"])
        state["calls"] += 1
        ids, _, stopped = generate_batch(model, tokenizer, [encode(tokenizer, prompt_text(messages))], s)[0]
        return tokenizer.decode(ids[:-1] if stopped else ids, skip_special_tokens=False)

    return policy
