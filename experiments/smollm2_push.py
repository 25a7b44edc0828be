"""Where the push on a control token comes from in a TRL run, after the fact (docs/experiments.md 7.4).

    python experiments/smollm2_push.py RUN --checkpoints checkpoint-1,checkpoint-2 [--base DIR] [--markdown]

`diagnose rescore` (the product path: adapter checkpoints over their base) recovers, for the
rollouts each checkpoint sampled, the log-prob of every control token at every completion
position; TRL logged each rollout's advantage. The logit-gradient attribution
(`diagnose.model.attribution.logit_push`, raw advantages: the push the loss's terms put there) is
then split by context:

* ``turn start``: the first token of an assistant turn (where ``<tool_call>`` opens a call turn);
* ``call open``: right after ``<tool_call>\\n`` (where the body ``{"`` belongs; the paper's
  ``<|im_end|>`` and a nested ``<tool_call>`` are the collapse tokens there);
* ``elsewhere``: every other generated position.

For ``<|im_end|>`` and for the first token of ``<tool_call>`` (``<`` in SmolLM2): the mean
probability, "self" (sum of A (1 - p) where that token was sampled) and "other" (-sum of A p where
another was). A rise at the call-open context whose direct push there is ~0 comes through the
weights it shares with the contexts where the token was pushed: the paper's mechanism.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import polars as pl
import torch

from diagnose.adapters import load_run
from diagnose.model.attribution import after_sequence, logit_push
from diagnose.rescore.pipeline import RescoreConfig, rescore_run
from diagnose.rescore.tables import RescoreStore
from diagnose.rundir.schema import ctrl_column

TOKENS = ("im_end", "tool_call_open")


def _padded(t: pl.DataFrame, cols: list[str]) -> tuple[list[int], dict[str, torch.Tensor]]:
    """[B, T] tensors of the tokens table's columns, one row per sample (position order)."""
    groups = t.sort("sample_id", "position").partition_by("sample_id", maintain_order=True)
    width = max(g.height for g in groups)
    out: dict[str, torch.Tensor] = {}
    for c in cols:
        fill = False if c == "is_generated" else (0 if c in ("token_id", "position") else float("nan"))
        rows = [g[c].to_list() + [fill] * (width - g.height) for g in groups]
        out[c] = torch.tensor(rows)
    return [int(g["sample_id"][0]) for g in groups], out


def push_table(run: Path, tokenizer) -> pl.DataFrame:
    store = RescoreStore(run)
    adv = load_run(run, format="trl").rollouts.select("step", "sample_id", "advantage").collect()
    open_seq = tokenizer("<tool_call>\n", add_special_tokens=False)["input_ids"]
    header = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    ids = {"im_end": tokenizer.convert_tokens_to_ids("<|im_end|>"),
           "tool_call_open": tokenizer("<tool_call>", add_special_tokens=False)["input_ids"][0]}
    rows = []
    for name, entry in sorted(store.manifest.get("checkpoints", {}).items(), key=lambda kv: kv[1]["step"]):
        if not entry["tables"].get("tokens"):
            continue
        step = entry["rollout_step"]
        t = pl.read_parquet(store.dir / entry["tables"]["tokens"])
        cols = ["token_id", "position", "is_generated"] + [ctrl_column(k) for k in TOKENS]
        samples, x = _padded(t, cols)
        a = adv.filter(pl.col("step") == step)
        a_of = dict(zip(a["sample_id"].to_list(), a["advantage"].to_list(), strict=True))
        advantages = torch.tensor([a_of[s] for s in samples], dtype=torch.float32)
        gen = x["is_generated"].bool()
        start = ((x["position"] == 0) | after_sequence(x["token_id"], header)) & gen
        at_open = after_sequence(x["token_id"], open_seq) & gen
        contexts = {"turn start": start, "call open": at_open, "elsewhere": gen & ~start & ~at_open}
        for k in TOKENS:
            lp = x[ctrl_column(k)].float().nan_to_num(-1e9).unsqueeze(-1)
            for ctx, mask in contexts.items():
                s, o = logit_push(x["token_id"], lp, mask, advantages, torch.tensor([ids[k]]), per_token=False)
                p = lp[..., 0].exp()[mask]
                rows.append({"checkpoint": name, "rollout_step": step, "token": k, "context": ctx,
                             "positions": int(mask.sum()), "sampled": int((x["token_id"][mask] == ids[k]).sum()),
                             "mean_p": float(p.mean()) if p.numel() else None, "self": float(s[0]),
                             "other": float(o[0])})
    return pl.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("--checkpoints", required=True, help="comma-separated checkpoint folders to rescore")
    ap.add_argument("--base", default=None, help="base model of the adapters (default: adapter_config.json's)")
    ap.add_argument("--samples", type=int, default=4, help="rescore's fixed probe set (not used here; kept small)")
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args()
    from transformers import AutoTokenizer

    rep = rescore_run(a.run, RescoreConfig(checkpoints=a.checkpoints, samples=a.samples, base=a.base))
    for name, why in rep.skipped:
        print(f"skipped: {name}: {why}")
    first = a.checkpoints.split(",")[0].strip()
    tok = AutoTokenizer.from_pretrained(a.run / first if (a.run / first).is_dir() else first)
    df = push_table(a.run, tok)
    with pl.Config(tbl_rows=-1, tbl_cols=-1, tbl_width_chars=200, float_precision=4,
                   tbl_formatting="MARKDOWN" if a.markdown else "UTF8_FULL_CONDENSED",
                   tbl_hide_column_data_types=a.markdown, tbl_hide_dataframe_shape=a.markdown):
        print(df)


if __name__ == "__main__":
    main()
