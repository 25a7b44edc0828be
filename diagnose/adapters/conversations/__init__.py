"""Conversation JSONL (as read by `diagnose.conversations`) as a `RunSource`.

``path`` is either one JSONL file (one conversation per line; the step is the line's ``step``
field, 0 when absent) or a folder of per-step files named ``<step>.jsonl``,
``step_<step>.jsonl`` or ``step-000010.jsonl`` (a line's own ``step`` field wins; a folder
without such names is read file by file like a single file).

One rollout per conversation: ``completion`` is the assistant turns joined with ChatML turn
boundaries (``<|im_end|>\\n<|im_start|>assistant\\n``), ``turn_states``/``error_types`` come
from each assistant message (`Conversation.assistant_texts`, classified with the
conversation's ``tools``), ``prompt`` is the messages before the first assistant turn rendered
with the chat template, ``reward``/``accuracy`` are the ``reward``/``accuracy`` fields when
present, and groups are a ``group_id``/``group`` field when present, else identical prompts
within a step.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import polars as pl

from diagnose.adapters._common.hooks import run_alias, runs  # one run per path: the default hooks
from diagnose.adapters._common.io import first_object, visible_files
from diagnose.adapters._common.issues import IssueLog, NonFinite
from diagnose.adapters._common.metrics import derived_metrics
from diagnose.adapters._common.rollouts import (
    ListColumn,
    empty_rollouts,
    groups_by_key,
    json_scalar_column,
    rollouts_frame,
)
from diagnose.adapters._common.source import make_source
from diagnose.adapters._common.turns import TurnClassifier, tool_names_of
from diagnose.adapters._common.values import as_float, as_step
from diagnose.chat import IM_END, IM_START, render_chat
from diagnose.conversations import Conversation, iter_conversations
from diagnose.jsonl import LineError
from diagnose.source import RunSource

__all__ = ["FORMAT", "OPTIONS", "STEP_FILE_RE", "TURN_JOIN", "detect", "has_candidates", "input_files",
           "load", "run_alias", "runs", "step_of_file"]

FORMAT = "conversations"
#: `load_run` options `load` takes: none
OPTIONS: tuple[str, ...] = ()
STEP_FILE_RE = re.compile(r"^(?:step[_-]?)?(\d+)\.jsonl$")
TURN_JOIN = f"{IM_END}\n{IM_START}assistant\n"
_RESERVED = ("step", "reward", "accuracy", "group_id", "group")


def input_files(p: Path) -> list[tuple[int | None, Path]]:
    """``[(step from the file name or None, file)]``."""
    if p.is_file():
        m = STEP_FILE_RE.match(p.name)
        return [(int(m.group(1)) if m else None, p)]
    jsonl = [f for f in visible_files(p) if f.suffix == ".jsonl"]
    stepped = []
    for f in jsonl:
        m = STEP_FILE_RE.match(f.name)
        if m:
            stepped.append((int(m.group(1)), f))
    if stepped:
        stepped.sort(key=lambda x: (x[0], x[1].name))
        return stepped
    return [(None, f) for f in jsonl]


def _looks_like_conversations(f: Path) -> bool:
    obj = first_object(f)
    return obj is not None and isinstance(obj.get("messages"), list)


def detect(p: Path) -> bool:
    if p.is_file():
        return p.suffix in (".jsonl", ".json", ".ndjson") and _looks_like_conversations(p)
    return any(_looks_like_conversations(f) for _, f in input_files(p)[:5])


def has_candidates(p: Path) -> bool:
    return bool(input_files(p))


def step_of_file(rel: str, single_file: bool) -> int | str:
    """For the scan cache: the step of a ``<step>.jsonl`` / ``step_<step>.jsonl`` /
    ``step-NNNNNN.jsonl`` file of a folder, else ``"global"`` (a single file, or files whose
    names carry no step: any step may depend on them)."""
    if single_file:
        return "global"
    m = STEP_FILE_RE.match(rel.rsplit("/", 1)[-1])
    return int(m.group(1)) if m else "global"


def _prompt(conv: Conversation, tool_names: tuple[str, ...] | None, memo: dict[Any, str]) -> str:
    """The messages before the first assistant turn, rendered with the chat template (the tools
    block is added unless the system prompt already has one). Memoised: a group shares it."""
    msgs = []
    for m in conv.messages:
        if m.get("role") == "assistant":
            break
        msgs.append(m)
    key = (tuple((m.get("role"), m.get("content") if isinstance(m.get("content"), str) else None) for m in msgs),
           tool_names)
    hit = memo.get(key)
    if hit is not None:
        return hit
    system = msgs[0].get("content") if msgs and msgs[0].get("role") == "system" else None
    tools = None if isinstance(system, str) and "<tools>" in system else conv.tools
    try:
        text = render_chat(msgs, tools, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - odd messages: keep something readable
        text = json.dumps(msgs, ensure_ascii=False, default=str)
    memo[key] = text
    return text


def _list_column(name: str, values: list[list[str]]) -> pl.Series:
    col = ListColumn()
    for v in values:
        col.append(v)
    return col.series(name)


def load(p: Path) -> RunSource:
    issues = IssueLog()
    notes = ["conversation dumps carry text only: no token probabilities, no control-token signals, no trainer "
             "metrics (reward and turn-state curves are derived from the conversations)"]
    classifier = TurnClassifier()
    files = input_files(p)
    nonfinite = NonFinite()
    rows: list[dict[str, Any]] = []
    no_step = 0
    prompts: dict[Any, str] = {}
    for fstep, f in files:
        n_good = 0
        other_steps: set[int] = set()
        no_assistant = 0
        for item in iter_conversations(f):
            if isinstance(item, LineError):
                issues.line_error(item)
                continue
            conv = item
            step = as_step(conv.extra.get("step"))
            if step is None:
                if conv.extra.get("step") is not None:
                    issues.add(f, conv.line, f"invalid 'step' ({conv.extra.get('step')!r}); "
                                             + (f"the file name's step {fstep} used" if fstep is not None else "step 0 used"))
                if fstep is None:
                    no_step += 1
                step = fstep if fstep is not None else 0
            elif fstep is not None and step != fstep:
                other_steps.add(step)
            try:
                texts = conv.assistant_texts()
            except Exception as e:  # noqa: BLE001 - malformed tool_calls
                issues.add(f, conv.line, f"assistant tool_calls unreadable ({type(e).__name__}: {e}); "
                                         "classified from the text content only")
                texts = [m.get("content") or "" for m in conv.messages if m.get("role") == "assistant"]
            if not texts:
                no_assistant += 1
            names = tool_names_of(conv.tools)
            states, errors = classifier.turns(texts, names)
            reward_raw = conv.extra.get("reward")
            reward = as_float(reward_raw)
            if reward is None and reward_raw is not None:
                issues.add(f, conv.line, f"'reward' is not a number ({type(reward_raw).__name__}); set to null")
            nonfinite.check(f, "reward", reward, conv.line)
            acc_raw = conv.extra.get("accuracy")
            group = conv.extra.get("group_id", conv.extra.get("group"))
            if isinstance(group, bool) or not isinstance(group, (int, str)):
                group = None
            rows.append({
                "step": step,
                "prompt": _prompt(conv, names, prompts),
                "completion": TURN_JOIN.join(texts),
                "reward": reward,
                "accuracy": as_float(acc_raw),
                "has_accuracy": acc_raw is not None,
                "group": group,
                "turn_states": states,
                "error_types": errors,
                "id": conv.id,
                "extra": {k: v for k, v in conv.extra.items() if k not in _RESERVED},
            })
            n_good += 1
        if other_steps:
            issues.step_mismatch(f, "conversations", sorted(other_steps)[:5], fstep, "the 'step' field")
        if no_assistant:
            issues.add(f, None, f"{no_assistant} conversation(s) without an assistant message (no turns)")
        if n_good == 0:
            issues.add(f, None, "no readable conversation in this file")
    nonfinite.flush(issues)
    if no_step:
        notes.append(f"{no_step} conversation(s) without a 'step' field (and no step in the file name): put at step 0")

    by_step: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        by_step.setdefault(r["step"], []).append(i)
    sample_ids = [0] * len(rows)
    group_ids = [0] * len(rows)
    for idx in by_step.values():
        explicit = all(rows[i]["group"] is not None for i in idx)
        gs = groups_by_key([rows[i]["group"] if explicit else rows[i]["prompt"] for i in idx])
        for k, i in enumerate(idx):
            sample_ids[i] = k
            group_ids[i] = gs[k]
    if rows:
        cols: dict[str, list[Any]] = {
            "step": [r["step"] for r in rows],
            "sample_id": sample_ids,
            "group_id": group_ids,
            "prompt": [r["prompt"] for r in rows],
            "completion": [r["completion"] for r in rows],
            "reward": [r["reward"] for r in rows],
            "n_turns": [len(r["turn_states"]) for r in rows],
            "turn_states": _list_column("turn_states", [r["turn_states"] for r in rows]),
            "error_types": _list_column("error_types", [r["error_types"] for r in rows]),
        }
        if any(r["has_accuracy"] for r in rows):
            cols["accuracy"] = [r["accuracy"] for r in rows]
        extras: dict[str, Any] = {"conversation_id": pl.Series("conversation_id", [r["id"] for r in rows],
                                                               dtype=pl.String)}
        keys: dict[str, None] = {}
        for r in rows:
            for k in r["extra"]:
                keys.setdefault(k, None)
        for k in keys:
            if k not in extras:
                extras[k] = json_scalar_column(k, [r["extra"].get(k) for r in rows])
        rollouts = rollouts_frame(cols, extras)
        if all(r["reward"] is None for r in rows):
            notes.append("no 'reward' field in the conversations: reward is null")
    else:
        rollouts = empty_rollouts()
    metrics = derived_metrics(rollouts)
    return make_source(p, FORMAT, metrics=metrics, rollouts=rollouts, issues=issues, notes=notes,
                       files=[f for _, f in files])
