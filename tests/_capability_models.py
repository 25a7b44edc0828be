"""Tiny checkpoints with known capability, for the probe's honesty tests.

* ``build_healthy``: a small Qwen2 (hidden 64, 1 layer) overfitted on the gold trajectories of
  a few fixed tasks. Probed on those same tasks it solves them in the trained format: native
  accuracy and capability are both high (memorisation is fine: the tests check the probe's
  logic, not generalisation).
* ``build_collapsed``: the healthy model briefly fine-tuned to end the turn right after
  ``<tool_call>\\n`` (the Qwen2.5 collapse) wherever a call opens, the rest of its
  distribution there kept: the format breaks, the calls are still known.

Costs on 2 busy CPU cores (OMP_NUM_THREADS=1): healthy about 90 AdamW steps, 5-7 s; collapsed
6-25 steps, 1-2 s.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from diagnose.chat import IM_END, TOOL_CALL_OPEN
from diagnose.model.sequences import Sequence, encode, encode_conversation
from diagnose.tasks import Task, gold_messages


def _batch(seqs: list[Sequence], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    att = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros((len(seqs), width))
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s.ids)
        att[i, : len(s)] = 1
        mask[i, : len(s)] = torch.tensor(s.loss_mask, dtype=torch.float)
    return ids, att, mask[:, 1:]


def _train(model, seqs: list[Sequence], pad: int, *, lr: float, max_steps: int, min_p: float = 0.6) -> tuple[int, float]:
    """Full-batch AdamW on the assistant tokens until every one of them is the greedy choice
    with probability above ``min_p`` (then greedy decoding replays the gold turns). Logits are
    computed from the first trained position on only (the prompts are most of the tokens)."""
    ids, att, mask = _batch(seqs, pad)
    first = int((mask > 0).float().argmax(-1).min())
    keep = ids.shape[1] - first
    mask, targets = mask[:, first:], ids[:, first + 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    model.train()
    loss_v = float("nan")
    step = 0
    for step in range(1, max_steps + 1):
        logits = model(input_ids=ids, attention_mask=att, logits_to_keep=keep).logits[:, :-1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, targets[:, :, None]).squeeze(-1)
        loss = -(lp * mask).sum() / mask.sum()
        loss_v = float(loss.detach())
        if float(lp.detach().exp()[mask > 0].min()) > min_p:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return step, loss_v


def build_healthy(tokenizer_dir: Path, out: Path, tasks: list[Task], *, seed: int = 0) -> dict:
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from diagnose.model.build import tiny_config

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    base = tiny_config(tok).to_dict()
    for k in ("layer_types", "architectures", "transformers_version", "model_type"):
        base.pop(k, None)
    base.update(hidden_size=64, num_hidden_layers=1, intermediate_size=128, num_attention_heads=2,
                num_key_value_heads=2, head_dim=32)
    cfg = Qwen2Config(**base)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg)
    seqs = [encode_conversation(tok, gold_messages(t), len(t.messages)) for t in tasks]
    steps, loss = _train(model, seqs, tok.pad_token_id, lr=7e-3, max_steps=300)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return {"steps": steps, "loss": loss, "seconds": time.perf_counter() - t0}


def build_collapsed(healthy: Path, out: Path, tasks: list[Task], *, p_end: float = 0.8) -> dict:
    """The Qwen2.5 collapse, made to measure: at every position right after ``<tool_call>\\n``
    the healthy model is trained towards ``p_end`` on ``<|im_end|>`` and the rest of its own
    distribution there (so ``{"`` stays the best other token); every other position keeps its
    gold target. Native greedy turns become ``<tool_call>\\n<|im_end|>``; the skill is intact."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(healthy, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(healthy, local_files_only=True)
    im_end = tok.convert_tokens_to_ids(IM_END)
    pattern = encode(tok, TOOL_CALL_OPEN + "\n")
    seqs = [encode_conversation(tok, gold_messages(t), len(t.messages)) for t in tasks]
    ids, att, mask = _batch(seqs, tok.pad_token_id)
    n, width = len(pattern), ids.shape[1]
    hit = (ids.unfold(1, n, 1) == torch.tensor(pattern)).all(-1)  # [B, L-n+1]: the pattern starts at j
    at = torch.zeros_like(mask, dtype=torch.bool)  # [B, L-1]: position p predicts token p+1
    at[:, n - 1:] = hit[:, : width - n]  # the pattern's last position predicts the call body
    at &= mask > 0
    with torch.no_grad():
        p0 = torch.softmax(model(input_ids=ids, attention_mask=att).logits[:, :-1].float(), -1)
    soft = (1 - p_end) * p0
    soft[..., im_end] += p_end
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    step = 0
    for step in range(1, 61):
        lp = torch.log_softmax(model(input_ids=ids, attention_mask=att).logits[:, :-1].float(), -1)
        with torch.no_grad():  # done when the collapse is in and {" is the runner-up everywhere
            p_im_end = lp.exp()[..., im_end][at]
            rest = lp.detach()[at].clone()
            rest[:, im_end] = float("-inf")
            second_is_gold = bool((rest.argmax(-1) == ids[:, 1:][at]).all())
        if float(p_im_end.min()) > 0.6 and second_is_gold:
            break
        gold = -lp.gather(-1, ids[:, 1:, None]).squeeze(-1)
        soft_ce = -(soft * lp).sum(-1)
        loss = (torch.where(at, soft_ce, gold) * mask).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return {"steps": step, "p_im_end_min": float(p_im_end.min()), "second_is_gold": second_is_gold,
            "seconds": time.perf_counter() - t0}
