"""The likelihood probe: does the model *know* the next call, whether or not it can emit it?

No free generation. At every call turn of a task's gold trajectory (teacher-forced: the gold
conversation up to that assistant turn), the gold call text competes with distractors made
from it by one change each:

* ``wrong_tool``: one call's tool name replaced by another tool of the task;
* ``wrong_value``: one argument value replaced by a plausible value of the same type and shape
  taken from the task's world (another person, account id, quantity; ``acct-7669`` is replaced
  by another ``acct-NNNN``), or a small mutation when the world has none;
* ``wrong_arg_name``: one argument renamed to another parameter name of the task's tools.

Each candidate is scored by the sum of its tokens' log-probabilities (the call text only, not
the turn end). The step counts as known when the gold call scores strictly highest. Tokens the
candidates share (``<tool_call>\\n{"name": "``) get identical log-probs and cancel, so a spike of
``<|im_end|>`` right after ``<tool_call>\\n`` does not hide the knowledge: this separates knowing
the call from being able to emit it. Chance level is the mean of 1/(number of candidates).

Scoring is batched (:func:`conversation_logprobs`): each task's gold conversation is run once
with a KV cache; then every (step, candidate) pair of a group of tasks is one row of a single
forward over that cache, with the conversation's positions from the step on masked out. Token
log-probs are gathered and summed with masks: no Python loop over tokens. Groups hold at most
``likelihood_batch_tokens`` padded tokens. Models whose cache cannot be re-indexed fall back to
:func:`sequence_logprobs` (every pair from scratch, left-padded, same numbers).
"""

from __future__ import annotations

import inspect
import json
import random
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from diagnose.capability.config import ProbeConfig
from diagnose.model.sequences import encode, prompt_text
from diagnose.tasks import Task, gold_messages
from diagnose.tasks.base import canon, schema_of
from diagnose.toolcall import ToolCall, render_calls

KINDS: tuple[str, ...] = ("wrong_tool", "wrong_value", "wrong_arg_name")


@dataclass
class Step:
    """One gold call turn: its context (prompt text ending with the assistant header) and the
    candidate texts, gold first."""

    task_id: str
    task_index: int  # index of the task in the list given to build_steps
    turn: int  # k-th call turn of the gold trajectory
    context: str
    texts: list[str]
    kinds: list[str]  # "gold" first, then one of KINDS per distractor


@dataclass
class LikelihoodResult:
    accuracy: float | None  # share of steps where the gold call scores strictly highest
    n_steps: int
    chance: float | None  # mean of 1 / candidates per step
    by_kind: dict[str, float] = field(default_factory=dict)  # share of (gold > distractor) per kind
    per_step: list[bool] = field(default_factory=list)


# ---------------------------------------------------------------------------------- distractors


def _shape(v: str) -> str:
    """Character-class shape of a string: ``acct-7669`` -> ``a-0``, ``Frank`` -> ``Aa``."""
    s = re.sub(r"[A-Z]", "A", v)
    s = re.sub(r"[a-z]", "a", s)
    s = re.sub(r"[0-9]", "0", s)
    return re.sub(r"(.)\1+", r"\1", s)


_FIELD_NAME = re.compile(r"[a-z_]+")


def _scalars(obj: Any, out: list[Any]) -> None:
    """Every scalar value of a JSON-like object, and the dict keys that name things (``Rupert``,
    ``acct-7669``) rather than fields (``balance``, ``items``)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not _FIELD_NAME.fullmatch(str(k)):
                out.append(k)
            _scalars(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _scalars(v, out)
    elif obj is None or isinstance(obj, (bool, int, float, str)):
        out.append(obj)


def _same_type(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return True
    return type(a) is type(b)


def _mutate(v: Any) -> Any:
    if isinstance(v, bool):
        return not v
    if isinstance(v, int):
        return v + 1
    if isinstance(v, float):
        return v + 1.0
    if isinstance(v, str):
        m = re.search(r"[0-9](?=[^0-9]*$)", v)
        if m:
            return v[: m.start()] + str((int(m.group()) + 1) % 10) + v[m.end():]
        return v + "s" if v else "x"
    return None


def _value_pool(task: Task, context_messages: list[dict[str, Any]]) -> list[Any]:
    """Values a wrong argument could plausibly take: the task's world and the tool outputs so far."""
    vals: list[Any] = []
    _scalars(task.init_state, vals)
    for m in context_messages:
        if m.get("role") == "tool":
            try:
                _scalars(json.loads(m.get("content") or "null"), vals)
            except ValueError:
                pass
    for turn in task.gold_turns:
        for c in turn:
            _scalars(c.arguments, vals)
    out, seen = [], set()
    for v in vals:
        key = json.dumps(canon(v), sort_keys=True, default=str)
        if key not in seen and v is not None and v != "":
            seen.add(key)
            out.append(v)
    return out


def _param_names(task: Task) -> list[str]:
    names: list[str] = []
    for t in task.tools:
        props = (schema_of(t).get("parameters") or {}).get("properties") or {}
        names.extend(p for p in props if p not in names)
    return names


def _replace(turn: list[ToolCall], i: int, call: ToolCall) -> list[ToolCall]:
    return [call if j == i else c for j, c in enumerate(turn)]


def distractors(task: Task, turn_index: int, turn: list[ToolCall], pool: list[Any], k: int) -> list[tuple[str, list[ToolCall]]]:
    """Up to ``k`` distractor turns per kind, each differing from ``turn`` in one place;
    deterministic in (task id, turn index)."""
    rng = random.Random(f"likelihood/{task.id}/{turn_index}")
    tools = [str(schema_of(t).get("name")) for t in task.tools]
    params = _param_names(task)
    out: list[tuple[str, list[ToolCall]]] = []
    for j in range(k):
        ci = (turn_index + j) % len(turn)
        call = turn[ci]
        others = [n for n in tools if n != call.name]
        if others:
            out.append(("wrong_tool", _replace(turn, ci, ToolCall(others[(j + rng.randrange(len(others))) % len(others)],
                                                                  dict(call.arguments)))))
        keys = list(call.arguments)
        if not keys:
            continue
        key = keys[(j + rng.randrange(len(keys))) % len(keys)]
        gold_v = call.arguments[key]
        same = [v for v in pool if _same_type(v, gold_v) and canon(v) != canon(gold_v)]
        if isinstance(gold_v, str):
            shaped = [v for v in same if _shape(v) == _shape(gold_v)]
            same = shaped or same
        new_v = same[rng.randrange(len(same))] if same else _mutate(gold_v)
        if new_v is not None:
            out.append(("wrong_value", _replace(turn, ci, ToolCall(call.name, {**call.arguments, key: new_v}))))
        free = [p for p in params if p not in call.arguments]
        new_k = free[rng.randrange(len(free))] if free else key + "_id"
        renamed = {(new_k if a == key else a): v for a, v in call.arguments.items()}
        out.append(("wrong_arg_name", _replace(turn, ci, ToolCall(call.name, renamed))))
    return out


def build_steps(tasks: list[Task], cfg: ProbeConfig) -> list[Step]:
    """The scored steps of every task: one per gold call turn."""
    steps: list[Step] = []
    for ti, task in enumerate(tasks):
        msgs = gold_messages(task)
        gold_turns = [t for t in task.gold_turns if t]
        turn_index = 0
        for i in range(len(task.messages), len(msgs)):
            if msgs[i]["role"] != "assistant":
                continue
            if turn_index >= len(gold_turns):
                break
            turn = gold_turns[turn_index]
            gold_text = render_calls(turn, task.syntax)
            texts, kinds = [gold_text], ["gold"]
            for kind, alt in distractors(task, turn_index, turn, _value_pool(task, msgs[:i]), cfg.distractors_per_kind):
                try:
                    text = render_calls(alt, task.syntax)
                except ValueError:  # e.g. a name that is not a python identifier
                    continue
                if text not in texts:
                    texts.append(text)
                    kinds.append(kind)
            if len(texts) > 1:
                steps.append(Step(task.id, ti, turn_index, prompt_text(msgs[:i]), texts, kinds))
            turn_index += 1
    return steps


# ---------------------------------------------------------------------------------- scoring


def _accepts(model: Any, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def sequence_logprobs(model: Any, contexts: list[list[int]], continuations: list[list[int]],
                      batch_tokens: int = 65_536) -> np.ndarray:
    """Sum of log p(continuation tokens | context) for each pair, batched."""
    import torch

    from diagnose.model.logits import token_stats

    n = len(contexts)
    out = np.full(n, np.nan, dtype=np.float64)
    lengths = [len(c) + len(x) for c, x in zip(contexts, continuations)]
    order = sorted(range(n), key=lambda i: lengths[i], reverse=True)
    keep_arg = _accepts(model, "logits_to_keep")
    device = model.device
    i = 0
    while i < n:
        width = lengths[order[i]]
        rows = order[i: i + max(1, batch_tokens // max(width, 1))]
        i += len(rows)
        k = max(len(continuations[r]) for r in rows) + 1
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        clen = torch.tensor([len(continuations[r]) for r in rows])
        for b, r in enumerate(rows):
            seq = contexts[r] + continuations[r]
            ids[b, width - len(seq):] = torch.tensor(seq)
            mask[b, width - len(seq):] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        kw: dict[str, Any] = {"input_ids": ids.to(device), "attention_mask": mask.to(device),
                              "position_ids": pos.to(device), "use_cache": False}
        if keep_arg:
            kw["logits_to_keep"] = k
        with torch.no_grad():
            logits = model(**kw).logits[:, -k:]
        targets = ids[:, width - k + 1:].to(device)
        lp = token_stats(logits[:, :-1], targets, with_entropy=False).logprob  # [b, k-1]
        sel = torch.arange(k - 1, device=device)[None, :] >= (k - 1 - clen.to(device))[:, None]
        out[rows] = (lp * sel).sum(-1).double().cpu().numpy()
    return out


def _select_cache(cache: Any, index: Any) -> bool:
    """Repeat/select the batch rows of a HF cache in place; False when the cache cannot."""
    for name in ("batch_select_indices", "reorder_cache"):
        fn = getattr(cache, name, None)
        if fn is not None:
            fn(index)
            return True
    return False


def _cache_kw(model: Any) -> str:
    return "cache" if _accepts(model, "cache") else "past_key_values"  # renamed in transformers 5


def conversation_logprobs(model: Any, sequences: list[list[int]], queries: list[tuple[int, int, list[int]]],
                          batch_tokens: int = 65_536) -> np.ndarray | None:
    """Sum of log p(continuation | sequence[:cut]) for each query ``(sequence index, cut,
    continuation)``, running each sequence once.

    Each sequence (a whole gold conversation) is run once with a KV cache; a query re-uses its
    sequence's cache with the positions from ``cut - 1`` on masked out, feeds the token at
    ``cut - 1`` followed by the continuation at their true positions, and reads the
    continuation's log-probs. Exact (up to float rounding) and several times cheaper than
    running every (context, candidate) pair from scratch. None when the model's cache cannot
    be re-indexed (use :func:`sequence_logprobs` then)."""
    import torch

    from diagnose.model.logits import token_stats

    device = model.device
    out = np.full(len(queries), np.nan)
    by_seq: dict[int, list[int]] = {}
    for qi, (si, _, _) in enumerate(queries):
        by_seq.setdefault(si, []).append(qi)
    order = sorted(by_seq, key=lambda si: len(sequences[si]), reverse=True)
    keep_kw: dict[str, Any] = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    i = 0
    while i < len(order):
        width = len(sequences[order[i]])
        group: list[int] = []
        cost = 0
        while i < len(order):  # padded tokens: the repeated caches and the query rows
            si = order[i]
            add = len(by_seq[si]) * (width + 1 + max(len(queries[q][2]) for q in by_seq[si]))
            if group and cost + add > batch_tokens:
                break
            group.append(si)
            cost += add
            i += 1
        ids = torch.zeros((len(group), width), dtype=torch.long)
        for b, si in enumerate(group):
            ids[b, : len(sequences[si])] = torch.tensor(sequences[si])
        qs = [q for si in group for q in by_seq[si]]
        owner = torch.tensor([b for b, si in enumerate(group) for _ in by_seq[si]], device=device)
        cuts = torch.tensor([queries[q][1] for q in qs], device=device)
        conts = [queries[q][2] for q in qs]
        c_len = torch.tensor([len(x) for x in conts], device=device)
        c_w = int(c_len.max()) + 1
        q_ids = torch.zeros((len(qs), c_w), dtype=torch.long)
        for b, q in enumerate(qs):
            si, cut, x = queries[q]
            q_ids[b, : len(x) + 1] = torch.tensor([sequences[si][cut - 1], *x])
        q_ids = q_ids.to(device)
        with torch.no_grad():
            # right padding: causal attention keeps the padding from touching real positions
            first = model(input_ids=ids.to(device), use_cache=True, **keep_kw)
            cache = getattr(first, "cache", None) or getattr(first, "past_key_values", None)
            if cache is None or not _select_cache(cache, owner):
                return None
            visible = torch.arange(width, device=device)[None, :] < (cuts - 1)[:, None]
            att = torch.cat([visible.long(), torch.ones_like(q_ids)], dim=1)
            pos = (cuts - 1)[:, None] + torch.arange(c_w, device=device)[None, :]
            logits = model(input_ids=q_ids, attention_mask=att, position_ids=pos, use_cache=False,
                           **{_cache_kw(model): cache}).logits
            lp = token_stats(logits[:, :-1], q_ids[:, 1:], with_entropy=False).logprob  # [N, c_w-1]
            sel = torch.arange(c_w - 1, device=device)[None, :] < c_len[:, None]
            out[qs] = (lp * sel).sum(-1).double().cpu().numpy()
    return out


def score_steps(model: Any, tokenizer: Any, tasks: list[Task], steps: list[Step], cfg: ProbeConfig) -> LikelihoodResult:
    """Rank the gold call against its distractors at every step (``steps`` from
    :func:`build_steps` on the same ``tasks``)."""
    if not steps:
        return LikelihoodResult(None, 0, None)
    from diagnose.model.sequences import encode_conversation

    seqs: dict[int, list[int]] = {}
    cuts: dict[tuple[int, int], int] = {}
    for ti in sorted({s.task_index for s in steps}):
        task = tasks[ti]
        seq = encode_conversation(tokenizer, gold_messages(task), len(task.messages))
        seqs[ti] = seq.ids
        for k, (turn, train) in enumerate(zip(seq.turn, seq.loss_mask)):
            if train and (ti, turn) not in cuts:
                cuts[(ti, turn)] = k  # first token of assistant turn `turn`
    index = {ti: j for j, ti in enumerate(seqs)}
    queries = [(index[s.task_index], cuts[(s.task_index, s.turn)], encode(tokenizer, text))
               for s in steps for text in s.texts]
    flat = conversation_logprobs(model, list(seqs.values()), queries, cfg.likelihood_batch_tokens)
    if flat is None:
        flat = sequence_logprobs(model, [seqs[s.task_index][: cuts[(s.task_index, s.turn)]] for s in steps for _ in s.texts],
                                 [q[2] for q in queries], cfg.likelihood_batch_tokens)
    per_step: list[bool] = []
    wins: dict[str, list[bool]] = {k: [] for k in KINDS}
    at = 0
    for s in steps:
        sc = flat[at: at + len(s.texts)]
        at += len(s.texts)
        gold = sc[0]
        per_step.append(bool(np.isfinite(gold) and gold > np.max(sc[1:])))
        for kind, v in zip(s.kinds[1:], sc[1:]):
            wins[kind].append(bool(gold > v))
    chance = float(np.mean([1.0 / len(s.texts) for s in steps]))
    return LikelihoodResult(
        accuracy=float(np.mean(per_step)), n_steps=len(steps), chance=chance,
        by_kind={k: float(np.mean(v)) for k, v in wins.items() if v}, per_step=per_step)
