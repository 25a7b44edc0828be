"""Turn a HF causal LM into a `Policy` (messages -> raw assistant text) for the environment.

Why keep control tokens in the decoded text: the whole point is to *see* a stray `<|im_end|>`
or a bare `<tool_call>`; only the final turn-end token, which the chat template adds back, is cut.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from diagnose.chat import ENDOFTEXT, IM_END, render_chat


@torch.no_grad()
def generate_turn(
    model: Any,
    tokenizer: Any,
    messages: Sequence[dict[str, Any]],
    *,
    max_new_tokens: int = 96,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> str:
    """One assistant turn: sample until `<|im_end|>`/`<|endoftext|>` or ``max_new_tokens``.

    Plain ancestral sampling with a KV cache (temperature 0 = greedy), written out so that it is
    reproducible from ``generator`` alone, independent of `generate()`'s processor defaults.
    """
    prompt = render_chat(messages, add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].to(model.device)
    stop = {tokenizer.convert_tokens_to_ids(t) for t in (IM_END, ENDOFTEXT)}
    out: list[int] = []
    past = None
    step_ids = ids
    for _ in range(max_new_tokens):
        res = model(input_ids=step_ids, past_key_values=past, use_cache=True)
        past = res.past_key_values
        logits = res.logits[0, -1].float()
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = int(torch.multinomial(probs, 1, generator=generator))
        if nxt in stop:
            break
        out.append(nxt)
        step_ids = torch.tensor([[nxt]], device=model.device)
    return tokenizer.decode(out, skip_special_tokens=False)


def hf_policy(model: Any, tokenizer: Any, *, seed: int = 0, **kwargs: Any):
    """A `Policy` backed by a HF model; sampling reproducible from ``seed``."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    model.eval()

    def policy(messages: list[dict[str, Any]]) -> str:
        return generate_turn(model, tokenizer, messages, generator=gen, **kwargs)

    return policy
