"""A run of our trainer laid out again as TRL's GRPOTrainer writes it: text with special tokens
stripped, ``checkpoint-N/`` directories, no token traces (for tests/test_rescore*.py).

Followed (TRL 1.16.0, ``trl/trainer/grpo_trainer.py``):

* ``GRPOTrainer._generate``: with text prompts (not conversational) the completions are
  ``processing_class.batch_decode(completion_ids, skip_special_tokens=True)``; a multi-turn tool
  episode comes from a ``rollout_func`` that returns ``completion_ids`` holding the tool outputs
  (``env_mask`` marks them), decoded the same way;
* ``GRPOTrainer.log``: ``completions/completions_{global_step:05d}.parquet`` with columns
  ``step``, ``prompt``, ``completion``, one column per reward function, ``advantage``;
* ``transformers.Trainer._save_checkpoint``: ``checkpoint-{global_step}/`` with the
  ``save_pretrained`` weights and config, the tokenizer (``processing_class.save_pretrained``),
  ``trainer_state.json`` (``global_step``, ``log_history``) and the pickles ``training_args.bin``,
  ``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth``.

The pickles here are traps: unpickling any of them creates ``UNPICKLED`` in the output folder.
``log_history`` holds only metrics TRL itself logs (no probe / control-token / turn-state keys).
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import polars as pl
from transformers import AutoTokenizer

from diagnose.rundir import RunReader

#: our metric name -> TRL's log_history name (only metrics TRL's GRPOTrainer logs itself)
TRL_METRICS = {"reward": "reward", "reward_std": "reward_std", "loss": "loss", "grad_norm": "grad_norm",
               "lr": "learning_rate", "entropy": "entropy", "kl": "kl", "clip_ratio": "clip_ratio/region_mean",
               "completions/mean_length": "completions/mean_length", "frac_reward_zero_std": "frac_reward_zero_std"}
MARKER = "UNPICKLED"


class _Trap:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def native_to_trl(native: Path, out: Path, tokenizer_dir: Path | None = None) -> Path:
    r = RunReader(native)
    out.mkdir(parents=True)
    comp = out / "completions"
    comp.mkdir()
    ckpts = r.checkpoints()
    tok = AutoTokenizer.from_pretrained(tokenizer_dir or ckpts[0][1])
    ro = r.rollouts().collect()
    tk = r.tokens().collect().sort("step", "sample_id", "position")
    ids = {(k[0], k[1]): g["token_id"].to_list() for k, g in tk.group_by("step", "sample_id", maintain_order=True)}
    for step in sorted(ro["step"].unique().to_list()):
        rows = ro.filter(pl.col("step") == step).sort("sample_id")
        completions = [tok.decode(ids[(step, s)], skip_special_tokens=True) for s in rows["sample_id"].to_list()]
        pl.DataFrame({"step": [step] * rows.height, "prompt": rows["prompt"], "completion": completions,
                      "tool_use_reward": rows["reward"], "advantage": [0.0] * rows.height}) \
            .write_parquet(comp / f"completions_{step:05d}.parquet")
    m = r.metrics()
    history = []
    for row in m.iter_rows(named=True):
        e = {TRL_METRICS[k]: v for k, v in row.items() if k in TRL_METRICS and v is not None}
        if e:
            history.append({**e, "step": row["step"]})
    trap = _Trap(out / MARKER)
    for step, d in ckpts:
        dst = out / f"checkpoint-{step}"
        dst.mkdir()
        for f in d.iterdir():
            if f.suffix in (".safetensors", ".json", ".jinja") and f.name != "trainer_state.json":
                shutil.copy2(f, dst / f.name)
        state = {"global_step": step, "log_history": [h for h in history if h["step"] <= step]}
        (dst / "trainer_state.json").write_text(json.dumps(state))
        for name in ("training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth"):
            (dst / name).write_bytes(pickle.dumps(trap))
    return out
