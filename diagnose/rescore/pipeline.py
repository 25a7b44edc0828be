"""`rescore_run`: both measures for every checkpoint of a run, cached per checkpoint.

1. load the run (`diagnose.adapters.load_run`) and find its checkpoints (`checkpoints.py`);
2. the run's tokenizer (``--tokenizer``, else the first checkpoint that holds one) and chat
   template render the logged rollouts back to ids (`render.py`);
3. the fixed probe set: the first ``samples`` early, healthy, on-policy rollouts (every turn a
   healthy call or answer, at least one call; at most 2 per GRPO group), fixed in the manifest;
4. per checkpoint at step N, unless cached: the probe table at N, and the tokens table of the
   rollouts sampled by those weights: the first logged step in (N, next checkpoint] (TRL and our
   trainer save after the optimizer step, so the weights of step N sample step N+1);
5. tables and manifest written atomically (`tables.py`).

A checkpoint that cannot be used (does not load, NaN weights, another tokenizer) is one line in
the report and the others go on.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from diagnose.model.files import ModelFileError, check_model_files
from diagnose.model.lora import ADAPTER_CONFIG, AdapterError, adapter_base, is_adapter_dir
from diagnose.rescore.checkpoints import Checkpoint, discover_checkpoints, weight_files
from diagnose.rescore.tables import RESCORE_VERSION, RescoreStore, digest, file_stat
from diagnose.source import OFF_POLICY_FLAGS, on_policy

__all__ = ["RescoreConfig", "RescoreError", "RescoreReport", "rescore_run"]

HEALTHY = ("healthy_call", "healthy_response")
PER_GROUP = 2
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json",
                   "vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer.model")


class RescoreError(ValueError):
    """The run cannot be rescored at all; one line naming what is wrong."""


@dataclass
class RescoreConfig:
    """Options of ``diagnose rescore`` (docs/rescore.md)."""

    checkpoints: str | None = None  # glob or comma-separated list; None: discover
    tokenizer: str | None = None  # the run's tokenizer directory; None: the first checkpoint's
    samples: int = 32  # size of the fixed probe set
    device: str = "cpu"
    dtype: str = "auto"
    batch_tokens: int = 8192
    format: str | None = None  # force the adapter
    base: str | None = None  # base model of LoRA adapter checkpoints; None: their adapter_config.json's


@dataclass
class RescoreReport:
    store: Path
    tokenizer: str
    computed: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (checkpoint, one-line reason)
    #: the skipped ones found unusable before loading (not reported through ``log`` while running)
    skipped_early: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    probe_size: int = 0
    tokens_scored: int = 0
    seconds: float = 0.0


# ---- tokenizer --------------------------------------------------------------------------------


def _tokenizer_dir(cfg: RescoreConfig, ckpts: list[Checkpoint]) -> Path:
    if cfg.tokenizer:
        p = Path(cfg.tokenizer).expanduser()
        if not p.is_dir():
            raise RescoreError(f"--tokenizer {cfg.tokenizer}: no such directory")
        return p
    for c in ckpts:
        if c.path.is_dir() and any(os.path.lexists(c.path / f) for f in ("tokenizer.json", "tokenizer_config.json")):
            return c.path
    adapters = [c for c in ckpts if is_adapter_dir(c.path)]
    if adapters:  # adapters saved without a tokenizer: their base model's
        try:
            return adapter_base(adapters[0].path, cfg.base)
        except AdapterError as e:
            raise RescoreError(f"no checkpoint holds tokenizer files, and {e}") from None
    raise RescoreError("no checkpoint holds tokenizer files; pass --tokenizer DIR (the run's tokenizer)")


def _tokenizer_key(d: Path) -> dict[str, Any]:
    return {"path": str(d.resolve()), "files": {f: file_stat(d / f) for f in TOKENIZER_FILES if (d / f).exists()}}


def _load_tokenizer(d: Path) -> Any:
    from transformers import AutoTokenizer

    try:  # each tokenizer file, named when broken (transformers' errors do not say which)
        check_model_files(d, model=False)
    except ModelFileError as e:
        raise RescoreError(str(e)) from None
    try:
        return AutoTokenizer.from_pretrained(d, local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise RescoreError(f"{d}: the tokenizer does not load ({type(e).__name__}: {str(e)[:200]})") from None


def _same_tokenizer(run_tok: Any, d: Path, registry: Any) -> str | None:
    """Why the checkpoint's own tokenizer (if it saved one) is not the run's; None if it is."""
    if not any(os.path.lexists(d / f) for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    try:
        tok = _load_tokenizer(d)
    except RescoreError as e:
        return str(e)
    if len(tok) != len(run_tok):
        return f"its tokenizer has {len(tok)} tokens, the run's {len(run_tok)}: not the run's tokenizer"
    for t in registry:
        if tok.convert_tokens_to_ids(t.text) != run_tok.convert_tokens_to_ids(t.text):
            return f"its tokenizer maps {t.text!r} to another id than the run's: not the run's tokenizer"
    return None


# ---- rollouts ---------------------------------------------------------------------------------


def logged_rollouts(src: Any) -> pl.DataFrame:
    if src.rollouts is None:
        raise RescoreError(f"{src.path}: the run logs no rollouts (prompt/completion text), nothing to rescore")
    cols = src.rollouts.collect_schema().names()
    keep = [c for c in ("step", "sample_id", "group_id", "prompt", "completion", "turn_states",
                        *OFF_POLICY_FLAGS) if c in cols]
    df = src.rollouts.select(keep).collect()
    if "prompt" not in df.columns or df.height == 0:
        raise RescoreError(f"{src.path}: the run's rollouts have no prompt text, so they cannot be re-rendered")
    return df.sort("step", "sample_id")


def probe_candidates(df: pl.DataFrame) -> pl.DataFrame:
    """Early healthy on-policy rollouts, at most ``PER_GROUP`` per group, in step order: what the
    fixed probe on a run's own data is built from (here and in the TRL callback)."""
    healthy = (pl.col("turn_states").list.eval(pl.element().is_in(list(HEALTHY))).list.all()
               & pl.col("turn_states").list.contains("healthy_call"))
    group = pl.col("group_id") if "group_id" in df.columns else pl.col("sample_id")
    return (df.filter(on_policy(df.columns) & healthy & pl.col("prompt").is_not_null())
            .with_columns(pl.int_range(pl.len()).over("step", group).alias("_k"))
            .filter(pl.col("_k") < PER_GROUP).drop("_k"))


def render_first(renderer: Any, cands: pl.DataFrame, n: int) -> tuple[list[Any], int]:
    """The first ``n`` candidate rollouts that re-render to their logged text, and how many were tried."""
    rendered, tried = [], 0
    for row in cands.iter_rows(named=True):
        if len(rendered) >= n:
            break
        tried += 1
        r = renderer.render(row["step"], row["sample_id"], row["prompt"], row["completion"] or "")
        if r is not None:
            rendered.append(r)
    return rendered, tried


def _assign(ckpts: list[Checkpoint], logged: list[int]) -> dict[str, int | None]:
    """Checkpoint -> the rollout step its weights sampled: the first logged step in (N, N_next].
    The last checkpoint, with no logged step after it, gets the last logged step not taken (the
    rollouts of the step it closes, sampled one update earlier)."""
    out: dict[str, int | None] = {}
    steps = [c.step for c in ckpts if c.step is not None]
    for c in ckpts:
        if c.step is None:
            out[c.name] = None
            continue
        nxt = min((s for s in steps if s > c.step), default=None)
        cands = [s for s in logged if s > c.step and (nxt is None or s <= nxt)]
        out[c.name] = min(cands) if cands else None
        if nxt is None and not cands:
            taken = {v for v in out.values() if v is not None}
            before = [s for s in logged if s <= c.step and s not in taken and s > max(taken, default=-1)]
            out[c.name] = max(before) if before else None
    return out


# ---- the run ----------------------------------------------------------------------------------


def _check_device(cfg: RescoreConfig) -> None:
    """--device and --dtype, before anything is loaded."""
    import torch

    from diagnose.rescore.score import ScoreConfig

    try:
        dev = torch.device(cfg.device)
        ScoreConfig(device=cfg.device, dtype=cfg.dtype).torch_dtype()
    except (RuntimeError, ValueError) as e:
        raise RescoreError(f"--device {cfg.device} / --dtype {cfg.dtype}: {str(e).splitlines()[0]}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RescoreError(f"--device {cfg.device}: CUDA is not available on this machine (use --device cpu)")


Progress = Callable[[str, int, int], None]  # (description, done tokens, total tokens)


def rescore_run(run: str | os.PathLike[str], cfg: RescoreConfig | None = None, *,
                progress: Progress | None = None, log: Callable[[str], None] | None = None) -> RescoreReport:
    """Rescore every usable checkpoint of ``run`` that is not cached yet; see the module doc."""
    from diagnose.adapters import load_run
    from diagnose.control_tokens import ControlTokenRegistry
    from diagnose.rescore.render import RenderError, Renderer

    cfg = cfg or RescoreConfig()
    _check_device(cfg)
    t0 = time.perf_counter()
    say = log or (lambda _m: None)
    src = load_run(run, format=cfg.format)
    ckpts = discover_checkpoints(run, cfg.checkpoints)
    if not ckpts:
        raise RescoreError(f"{run}: no checkpoints found (looked for checkpoints/step-N/, checkpoint-N/, "
                           "global_step_N/actor, save_pretrained folders); pass --checkpoints GLOB")
    tok_dir = _tokenizer_dir(cfg, ckpts)
    tok = _load_tokenizer(tok_dir)
    try:
        renderer = Renderer(tok, src.dialect)
    except RenderError as e:
        raise RescoreError(f"{tok_dir}: {e}") from None
    registry = ControlTokenRegistry.from_tokenizer(tok)
    if src.control_tokens:
        theirs = {c.get("name"): c.get("token_id") for c in src.control_tokens}
        diff = [t.name for t in registry if t.name in theirs and theirs[t.name] != t.token_id]
        if diff:
            raise RescoreError(f"{tok_dir}: the tokenizer does not match the run: control token ids differ from "
                               f"run.json ({', '.join(diff)})")
    df = logged_rollouts(src)
    store = RescoreStore(run)
    report = RescoreReport(store=store.dir, tokenizer=str(tok_dir))

    probe = _probe_set(renderer, df, cfg.samples, store, tok_dir, registry)
    report.probe_size = len(probe[0])
    global_key = {"version": RESCORE_VERSION, "tokenizer": _tokenizer_key(tok_dir), "samples": cfg.samples,
                  "probe_set": [[r.step, r.sample_id] for r in probe[0]], "control_tokens": registry.to_json()}
    if store.reset_if(global_key) and store.dir.is_dir():
        report.notes.append("tokenizer, samples or probe set changed: every checkpoint recomputed")
    assign = _assign(ckpts, sorted(df.get_column("step").unique().to_list()))

    todo: list[tuple[Checkpoint, dict[str, Any]]] = []
    for c in ckpts:
        if c.problem:
            report.skipped.append((str(c.path), c.problem))
            report.skipped_early.append((str(c.path), c.problem))
            continue
        key = {"path": str(c.path.resolve()), "weights": {p.name: file_stat(p) for p in weight_files(c.path)},
               "config": file_stat(c.path / "config.json"), "rollout_step": assign[c.name],
               "global": digest(global_key)}
        if is_adapter_dir(c.path):  # the same adapter over another base is another model
            key |= {"adapter_config": file_stat(c.path / ADAPTER_CONFIG), "base": cfg.base}
        if store.entry(c.name, key) is not None:
            report.cached.append(c.name)
        else:
            todo.append((c, key))
    _score_all(todo, renderer, tok, registry, df, probe, assign, store, cfg, report, progress, say)
    report.seconds = time.perf_counter() - t0
    return report


def _probe_set(renderer: Any, df: pl.DataFrame, samples: int, store: RescoreStore, tok_dir: Path,
               registry: Any) -> tuple[list[Any], list[list[str]]]:
    """The fixed probe rollouts (rendered) and their context labels; the manifest's set when the
    tokenizer and size are unchanged, so the probe stays identical across re-runs."""
    man = store.manifest.get("global_key") or {}
    fixed = None
    if man.get("tokenizer") == _tokenizer_key(tok_dir) and man.get("samples") == samples:
        fixed = {tuple(x) for x in man.get("probe_set") or []}
    cands = probe_candidates(df)
    if fixed:
        keys = pl.DataFrame(sorted(fixed), schema={"step": df.schema["step"], "sample_id": df.schema["sample_id"]},
                            orient="row")
        cands = df.join(keys, on=["step", "sample_id"], how="semi", maintain_order="left")
    rendered, tried = render_first(renderer, cands, samples)
    if tried and len(rendered) < max(1, tried // 2):
        raise RescoreError(f"{tok_dir}: the tokenizer does not match the run: only {len(rendered)} of {tried} "
                           "logged completions re-render to their logged text")
    if not rendered:
        raise RescoreError("no early healthy rollout (every turn a healthy call or answer) to build the probe from")
    return rendered, [renderer.contexts(r) for r in rendered]


def _score_all(todo: list[tuple[Checkpoint, dict[str, Any]]], renderer: Any, tok: Any, registry: Any,
               df: pl.DataFrame, probe: tuple[list[Any], list[list[str]]], assign: dict[str, int | None],
               store: RescoreStore, cfg: RescoreConfig, report: RescoreReport, progress: Progress | None,
               say: Callable[[str], None]) -> None:
    from diagnose.rescore.score import CheckpointError, ScoreConfig, load_checkpoint, probe_table, tokens_table

    scfg = ScoreConfig(device=cfg.device, dtype=cfg.dtype, batch_tokens=cfg.batch_tokens, base=cfg.base)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    rendered_steps: dict[int, list[Any]] = {}
    for c, _ in todo:
        s = assign[c.name]
        if s is not None and s not in rendered_steps:
            rows = df.filter(pl.col("step") == s)
            rs = [renderer.render(r["step"], r["sample_id"], r["prompt"] or "", r["completion"] or "")
                  for r in rows.iter_rows(named=True)]
            ok = [r for r in rs if r is not None]
            if len(ok) < len(rs):
                report.notes.append(f"step {s}: {len(rs) - len(ok)} of {len(rs)} rollouts do not re-render to their "
                                    "logged text and are not re-scored")
            rendered_steps[s] = ok
    n_probe = sum(len(r) for r in probe[0])
    total = sum(n_probe + sum(len(r) for r in rendered_steps.get(assign[c.name], [])) for c, _ in todo)
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(desc, done, total)

    for c, key in todo:
        desc = f"{c.name} (step {c.step})"
        if progress is not None:
            progress(desc, done, total)
        why = _same_tokenizer(tok, c.path, registry)
        try:
            if why:
                raise CheckpointError(why)
            model = load_checkpoint(c, scfg, len(tok))
        except CheckpointError as e:
            report.skipped.append((str(c.path), str(e)))
            say(f"{c.path}: {e}")
            done += n_probe + sum(len(r) for r in rendered_steps.get(assign[c.name], []))
            continue
        tables: dict[str, str | None] = {"probe": None, "tokens": None}
        pf = probe_table(model, probe[0], probe[1], registry, c.step, scfg, pad, advance)
        tables["probe"] = store.write_table("probe", c.step, pf)
        s = assign[c.name]
        if s is not None and rendered_steps.get(s):
            tf = tokens_table(model, rendered_steps[s], registry, scfg, pad, advance)
            tables["tokens"] = store.write_table("tokens", s, tf)
            report.tokens_scored += tf.height
        del model
        store.commit(c.name, {"key": key, "step": c.step, "rollout_step": s, "path": str(c.path), "tables": tables},
                     extra={"control_tokens": registry.to_json(),
                            "probe_set": [[r.step, r.sample_id] for r in probe[0]]})
        report.computed.append(c.name)
