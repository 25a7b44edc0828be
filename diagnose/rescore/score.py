"""Loading a checkpoint safely and teacher-forcing rendered rollouts through it.

Why one scorer: both measures (the fixed probe on early healthy rollouts, the re-scoring of the
rollouts logged near each checkpoint) need the same forward pass over the same kind of
sequences; batching them in length-sorted buckets keeps padding small, and only the positions
from the first scored one on get logits (``logits_to_keep``, as the fixed probe does).

Weights are read from ``*.safetensors`` (``from_pretrained(use_safetensors=True)``) or, where a
checkpoint has only PyTorch ``.bin`` state dicts, with ``torch.load(weights_only=True)``; the
pickles TRL saves beside them (``training_args.bin``, ``rng_state.pth``, ``optimizer.pt``,
``scheduler.pt``) are never opened. A PEFT adapter checkpoint is merged into its base
(`diagnose.model.lora`; ``ScoreConfig.base`` when the recorded base is not on this machine).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import torch

from diagnose.control_tokens import ControlTokenRegistry
from diagnose.error_line import error_line
from diagnose.model.files import ModelFileError, check_model_files
from diagnose.model.ctrl_probe import ProbeSet, _keep_kwargs, run_probe
from diagnose.model.logits import token_stats
from diagnose.model.lora import AdapterError, is_adapter_dir, load_adapter_model
from diagnose.rescore.checkpoints import Checkpoint, weight_files
from diagnose.rescore.render import Rendered
from diagnose.rundir.writer import quiet_transformers
from diagnose.rundir.schema import ctrl_column, schema_for

__all__ = ["CheckpointError", "ScoreConfig", "buckets", "load_checkpoint", "probe_table", "tokens_table"]

Advance = Callable[[int], None]


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message is one line saying why."""


@dataclass
class ScoreConfig:
    """``device``: torch device; ``dtype``: ``auto`` (bf16 on CUDA, fp32 on CPU), ``bf16``,
    ``fp16`` or ``fp32``; ``batch_tokens``: padded tokens per forward pass (length-sorted buckets);
    ``base``: the base model of adapter checkpoints (None: each adapter's ``base_model_name_or_path``)."""

    device: str = "cpu"
    dtype: str = "auto"
    batch_tokens: int = 8192
    base: str | None = None

    def torch_dtype(self) -> torch.dtype:
        names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
                 "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}
        if self.dtype == "auto":
            return torch.bfloat16 if str(self.device).startswith("cuda") else torch.float32
        if self.dtype not in names:
            raise ValueError(f"unknown dtype {self.dtype!r}; expected auto, bf16, fp16 or fp32")
        return names[self.dtype]


def _load_bin(ckpt: Checkpoint, files: list[Any], dtype: torch.dtype) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(ckpt.path, local_files_only=True)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(torch.load(f, map_location="cpu", weights_only=True))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if "lm_head" in k} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied:
        raise CheckpointError(f"weights lack {len(set(missing) - tied)} tensor(s), e.g. {sorted(set(missing) - tied)[0]}")
    if tied:
        model.tie_weights()
    return model


def load_checkpoint(ckpt: Checkpoint, cfg: ScoreConfig, vocab_size: int) -> Any:
    """The model of ``ckpt`` in eval mode on ``cfg.device``; `CheckpointError` (one line) when it
    does not load, has non-finite weights or a vocabulary smaller than the run's tokenizer."""
    if ckpt.problem:
        raise CheckpointError(ckpt.problem)
    try:  # each file transformers / torch.load would read, named when broken
        check_model_files(ckpt.path, tokenizer=False)
    except ModelFileError as e:
        raise CheckpointError(f"{e.path.name}: {e.why}") from None
    files = weight_files(ckpt.path)
    dtype = cfg.torch_dtype()
    try:
        with quiet_transformers():
            model = _load(ckpt, files, dtype, cfg.base)
    except CheckpointError:
        raise
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - whatever a broken checkpoint raises, one line
        raise CheckpointError(f"does not load ({error_line(e)})") from None
    return _checked(model, cfg, vocab_size)


def _load(ckpt: Checkpoint, files: list[Any], dtype: torch.dtype, base: str | None) -> Any:
    if is_adapter_dir(ckpt.path):
        try:
            return load_adapter_model(ckpt.path, base=base, dtype=dtype)
        except AdapterError as e:
            raise CheckpointError(str(e)) from None
    if files and files[0].suffix == ".safetensors":
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(ckpt.path, dtype=dtype, local_files_only=True,
                                                    use_safetensors=True)
    return _load_bin(ckpt, files, dtype)


def _checked(model: Any, cfg: ScoreConfig, vocab_size: int) -> Any:
    emb = model.get_input_embeddings()
    n_vocab = emb.weight.shape[0] if emb is not None else getattr(model.config, "vocab_size", 0)
    if n_vocab < vocab_size:
        raise CheckpointError(f"its vocabulary ({n_vocab}) is smaller than the run tokenizer's ({vocab_size}): "
                              "the tokenizer does not match this model")
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise CheckpointError(f"non-finite weights (NaN/inf) in {len(bad)} tensor(s), e.g. {bad[0]}")
    model.to(cfg.device)
    model.eval()
    return model


def buckets(rendered: list[Rendered], batch_tokens: int) -> list[list[int]]:
    """Indices of ``rendered`` in length-sorted batches of at most ``batch_tokens`` padded tokens."""
    order = sorted(range(len(rendered)), key=lambda i: len(rendered[i]))
    out: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        width = len(rendered[i])
        if cur and width * (len(cur) + 1) > batch_tokens:
            out.append(cur)
            cur = []
        cur.append(i)
    if cur:
        out.append(cur)
    return out


def _pad(rows: list[Rendered], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    att = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r.ids)
        att[i, : len(r)] = 1
    return ids, att


@torch.no_grad()
def _forward_stats(model: Any, ids: torch.Tensor, att: torch.Tensor, first: int, ctrl: torch.Tensor):
    """Sampled-token log-prob, entropy and control log-probs predicting ``ids[:, first + 1:]``."""
    dev = model.device
    ids_d = ids.to(dev)
    kw = _keep_kwargs(model, ids.shape[1] - first)
    logits = model(input_ids=ids_d, attention_mask=att.to(dev), **kw).logits
    logits = logits[:, -(ids.shape[1] - first):-1]
    st = token_stats(logits, ids_d[:, first + 1:], ctrl)
    return st.logprob.cpu().numpy(), st.entropy.cpu().numpy(), st.ctrl_logprob.cpu().numpy()


def tokens_table(model: Any, rendered: list[Rendered], registry: ControlTokenRegistry, cfg: ScoreConfig,
                 pad_id: int, advance: Advance | None = None) -> pl.DataFrame:
    """The run-format ``tokens/`` table of ``rendered`` (one row per completion token)."""
    ctrl = torch.tensor(registry.ids, dtype=torch.long)
    parts: list[pl.DataFrame] = []
    for idx in buckets(rendered, cfg.batch_tokens):
        rows = [rendered[i] for i in idx]
        ids, att = _pad(rows, pad_id)
        first = min(r.prompt_len - 1 for r in rows)
        lp, ent, cl = _forward_stats(model, ids, att, first, ctrl)
        starts = [r.prompt_len - 1 for r in rows]
        ends = [len(r) - 1 for r in rows]
        ri = np.concatenate([np.full(e - s, k) for k, (s, e) in enumerate(zip(starts, ends))])
        ti = np.concatenate([np.arange(s, e) for s, e in zip(starts, ends)])
        ci = ti - first
        data: dict[str, Any] = {
            "step": np.array([rows[k].step for k in ri], dtype=np.int64),
            "sample_id": np.array([rows[k].sample_id for k in ri], dtype=np.int64),
            "turn": np.concatenate([np.asarray(r.turn, dtype=np.int32) for r in rows]),
            "position": (ti - np.asarray(starts)[ri]).astype(np.int32),
            "token_id": ids[:, 1:].numpy()[ri, ti].astype(np.int32),
            "logprob": lp[ri, ci].astype(np.float32),
            "entropy": ent[ri, ci].astype(np.float32),
            "is_generated": np.concatenate([np.asarray(r.generated, dtype=bool) for r in rows]),
        }
        for k, name in enumerate(registry.names):
            data[ctrl_column(name)] = cl[ri, ci, k].astype(np.float32)
        # the rollout engine's log-probs are not in the dump: null, as the format says
        parts.append(pl.DataFrame(data).with_columns(pl.lit(None, dtype=pl.Float32).alias("sampler_logprob")))
        if advance is not None:
            advance(int(att.sum()))
    out = pl.concat(parts) if parts else pl.DataFrame(schema=schema_for("tokens", registry.names))
    return out.select(schema_for("tokens", registry.names).names()).cast(dict(schema_for("tokens", registry.names)))\
        .sort("sample_id", "position")


def probe_table(model: Any, rendered: list[Rendered], contexts: list[list[str]], registry: ControlTokenRegistry,
                step: int, cfg: ScoreConfig, pad_id: int, advance: Advance | None = None) -> pl.DataFrame:
    """The run-format ``probe/`` table: `diagnose.model.ctrl_probe.run_probe` on each length-sorted
    bucket of the fixed probe rollouts, ``probe_id`` their index in the fixed set."""
    parts = []
    for idx in buckets(rendered, cfg.batch_tokens):
        rows = [rendered[i] for i in idx]
        ids, att = _pad(rows, pad_id)
        ps = ProbeSet(ids, att, [r.prompt_len - 1 for r in rows], [len(r) for r in rows],
                      [contexts[i] for i in idx], [f"{r.step}:{r.sample_id}" for r in rows])
        frame = run_probe(model, ps, registry, step)
        fixed_ids = np.asarray(idx, dtype=np.int64)[frame.get_column("probe_id").to_numpy()]
        parts.append(frame.with_columns(pl.Series("probe_id", fixed_ids)))
        if advance is not None:
            advance(int(att.sum()))
    schema = schema_for("probe", registry.names)
    out = pl.concat(parts) if parts else pl.DataFrame(schema=schema)
    return out.select(schema.names()).cast(dict(schema)).sort("probe_id", "position")
