"""Tokens/s of the rescore scoring pass (`diagnose.rescore.score.tokens_table`: forward + log-prob of
the sampled token, entropy and every control token's log-prob, copied to a table) against a plain
Hugging Face forward pass (``model(input_ids, attention_mask).logits``) over the same padded
batches, on the same machine in the same process; arms alternate which runs first, and the ratio
of the medians is printed (target >= 0.85).

    python benchmarks/bench_rescore.py                         # the embedded tiny model, CPU
    python benchmarks/bench_rescore.py --model qwen2.5-0.5b --device cuda --seq 2048 --batch 8

``--model``: ``tiny`` (the embedded default), ``qwen2.5-0.5b`` (Qwen2.5-0.5B's architecture config,
random weights: the cost of a forward does not depend on the weights' values) or a local HF
model directory.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from diagnose.control_tokens import ControlTokenRegistry
from diagnose.rescore.render import Rendered
from diagnose.rescore.score import ScoreConfig, _pad, buckets, tokens_table

#: Qwen2.5-0.5B's config.json (architecture only).
QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                  rope_theta=1000000.0, tie_word_embeddings=True, rms_norm_eps=1e-6)


def build(model: str, device: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, Qwen2Config

    from diagnose.model.resolve import load_model_and_tokenizer

    if model == "qwen2.5-0.5b":
        m = AutoModelForCausalLM.from_config(Qwen2Config(**QWEN25_05B), dtype=dtype)
        ctrl = list(range(151643, 151665))[:9]
    else:
        m, tok = load_model_and_tokenizer(model)
        m = m.to(dtype)
        ctrl = ControlTokenRegistry.from_tokenizer(tok).ids
    return m.to(device).eval(), ctrl


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--seq", type=int, default=1024, help="tokens per sequence")
    ap.add_argument("--prompt", type=int, default=768, help="prompt tokens per sequence (not scored)")
    ap.add_argument("--batch", type=int, default=8, help="sequences per forward")
    ap.add_argument("--n", type=int, default=32, help="sequences")
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    cfg = ScoreConfig(device=a.device, dtype=a.dtype, batch_tokens=a.seq * a.batch)
    model, ctrl_ids = build(a.model, a.device, cfg.torch_dtype())
    vocab = model.get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(a.n):
        length = a.seq - int(torch.randint(0, a.seq // 8, (1,), generator=g))
        ids = torch.randint(0, vocab, (length,), generator=g).tolist()
        n = length - a.prompt
        rows.append(Rendered(0, i, ids, a.prompt, [0] * n, [True] * n))

    class Reg:  # the registry's interface tokens_table uses: names and ids
        names = [f"c{k}" for k in range(len(ctrl_ids))]
        ids = ctrl_ids

    batches = [[rows[i] for i in b] for b in buckets(rows, cfg.batch_tokens)]
    n_tokens = sum(len(r) for r in rows)

    def sync():
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()

    @torch.no_grad()
    def plain():
        for b in batches:
            ids, att = _pad(b, 0)
            model(input_ids=ids.to(a.device), attention_mask=att.to(a.device)).logits
        sync()

    def rescore():
        tokens_table(model, rows, Reg, cfg, 0)
        sync()

    plain(), rescore()  # warm-up
    times = {"plain": [], "rescore": []}
    for rep in range(a.reps):
        order = [("plain", plain), ("rescore", rescore)]
        for name, fn in (order if rep % 2 == 0 else order[::-1]):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    tps = {k: n_tokens / statistics.median(v) for k, v in times.items()}
    print(f"model={a.model} device={a.device} dtype={cfg.torch_dtype()} seqs={a.n} tokens={n_tokens} "
          f"(scored {sum(len(r) - r.prompt_len for r in rows)})")
    print(f"plain HF forward: {tps['plain']:,.0f} tokens/s; rescore scoring pass: {tps['rescore']:,.0f} tokens/s; "
          f"ratio {tps['rescore'] / tps['plain']:.3f} (target >= 0.85)")


if __name__ == "__main__":
    main()
