"""The episode protocol (Qwen2.5 / Hermes style), step-wise (`Rollout`, for batched trainers)
or in one go (`run_episode`), the checker, and the gold trajectory (`gold_messages`).

Protocol, per assistant turn:
1. ``text = policy(messages)``; appended as ``{"role": "assistant", "content": text}`` (one
   trailing ``<|im_end|>`` / ``<|endoftext|>`` is dropped first).
2. The turn is classified (`classify_turn`) and parsed (`parse_calls`) in the task's syntax.
3. No well-formed call: the episode ends; the turn is the final answer. With
   ``on_malformed="continue"`` a turn that attempted calls but got none well-formed (a bare
   ``<tool_call>``, a broken JSON body) gets one error object per attempt instead and the episode
   goes on, as in agent loops that feed parse errors back (the long failing episodes of real runs).
4. Otherwise each well-formed call is executed in order and its result appended as
   ``{"role": "tool", "content": json.dumps(result)}``; after them, one error object per
   malformed call attempt of the turn. Bad calls get ``{"error": ...}`` outputs, never exceptions.
5. The episode also ends after ``max_turns`` assistant turns.
"""

from __future__ import annotations

import json
from typing import Any, Literal, get_args

from diagnose.chat import ENDOFTEXT, IM_END
from diagnose.toolcall import ToolCall, parse_calls, render_calls
from diagnose.turns import TurnClassification, TurnState, classify_turn

from .base import Episode, Policy, Score, Task, contains_value, multiset_matches
from .env import ReplayEnv, ToolEnv, execute_turn, gold_state, is_error, make_env

OnMalformed = Literal["end", "continue"]  # what a turn of only malformed call attempts does
ON_MALFORMED: tuple[str, ...] = get_args(OnMalformed)


def strip_terminator(text: str) -> str:
    """Drop one trailing ``<|im_end|>`` / ``<|endoftext|>`` (and whitespace after it), which a
    generator may include when it stops on that token; anything else is left as it is."""
    t = text.rstrip()
    for term in (IM_END, ENDOFTEXT):
        if t.endswith(term):
            return t[: -len(term)]
    return text


def tool_message(result: Any) -> dict[str, str]:
    return {"role": "tool", "content": json.dumps(result, ensure_ascii=False)}


def _malformed_count(parsed) -> int:
    """Call attempts in a turn that did not yield a well-formed call."""
    return max(0, len(parsed.blocks) - len(parsed.calls))


class Rollout:
    """One episode, advanced a turn at a time: ``while not r.done: r.step(generate(r.messages))``.

    ``messages`` is the conversation so far (task messages, then assistant/tool messages).
    """

    def __init__(self, task: Task, max_turns: int = 6, on_malformed: OnMalformed = "end"):
        if max_turns < 1:
            raise ValueError("max_turns must be >= 1")
        if on_malformed not in ON_MALFORMED:
            raise ValueError(f"on_malformed must be one of {ON_MALFORMED}, got {on_malformed!r}")
        self.task = task
        self.max_turns = max_turns
        self.on_malformed = on_malformed
        self.env: ToolEnv | ReplayEnv = make_env(task)
        self.messages: list[dict] = [dict(m) for m in task.messages]
        self.turn_states: list[TurnState] = []
        self.classifications: list[TurnClassification] = []
        self.turn_calls: list[list[ToolCall]] = []
        self.final_answer: str | None = None
        self.finished = False  # ended by a call-free turn
        self.done = False
        self.n_attempts = 0
        self.tool_errors = 0
        self._final_clean = False

    def step(self, text: str) -> list[dict]:
        """Feed the next assistant turn; returns the tool messages it produced (appended too)."""
        if self.done:
            raise RuntimeError("episode is over")
        if not isinstance(text, str):
            raise TypeError(f"policy must return str, got {type(text).__name__}")
        text = strip_terminator(text)
        syntax = self.task.syntax
        cls = classify_turn(text, self.task.tools, syntax)
        parsed = parse_calls(text, syntax)
        calls = list(parsed.calls)
        self.messages.append({"role": "assistant", "content": text})
        self.classifications.append(cls)
        self.turn_states.append(cls.state)
        self.turn_calls.append(calls)
        malformed = _malformed_count(parsed)
        self.n_attempts += len(calls) + malformed
        if not calls and not (malformed and self.on_malformed == "continue"):
            self.done = self.finished = True
            self.final_answer = parsed.content
            self._final_clean = cls.state == TurnState.HEALTHY_RESPONSE
            return []
        results = execute_turn(self.env, calls) if calls else []
        results += [{"error": "malformed tool call"}] * malformed
        self.tool_errors += sum(1 for r in results if is_error(r))
        new = [tool_message(r) for r in results]
        self.messages.extend(new)
        if len(self.turn_states) >= self.max_turns:
            self.done = True
        return new

    def score(self) -> Score:
        task = self.task
        made = [c for turn in self.turn_calls for c in turn]
        gold = [c for turn in task.gold_turns for c in turn]
        hits = multiset_matches(made, gold)
        state_right = self.env.state_key() == gold_state(task)
        answer_right = (
            self.finished
            and self._final_clean
            and contains_value(self.final_answer or "", task.answer_value)
        )
        return Score(
            reward=float(state_right and answer_right),
            calls_right=hits / len(gold) if gold else 1.0,
            state_right=state_right,
            answer_right=answer_right,
            calls_precision=hits / len(made) if made else float(not gold),
            n_turns=len(self.turn_states),
            n_calls=self.n_attempts,
            well_formed_calls=len(made),
            tool_errors=self.tool_errors,
            finished=self.finished,
        )

    def episode(self) -> Episode:
        return Episode(
            task_id=self.task.id,
            messages=self.messages,
            turn_states=list(self.turn_states),
            score=self.score(),
            turn_calls=[list(t) for t in self.turn_calls],
            classifications=list(self.classifications),
            final_answer=self.final_answer,
        )


def run_episode(task: Task, policy: Policy, max_turns: int = 6, on_malformed: OnMalformed = "end") -> Episode:
    """Run ``policy`` on ``task`` until a call-free turn or ``max_turns`` turns; score it."""
    r = Rollout(task, max_turns, on_malformed)
    while not r.done:
        r.step(policy(list(r.messages)))
    return r.episode()


def gold_assistant_texts(task: Task) -> list[str]:
    """The gold assistant turns' raw text: rendered calls per call turn, then the answer."""
    texts = [render_calls(turn, task.syntax) for turn in task.gold_turns if turn]
    return texts + [task.gold_answer]


def gold_messages(task: Task) -> list[dict]:
    """The full ground-truth conversation (system, user, assistant calls, tool results, ...,
    final answer), produced by executing the gold calls; usable as SFT data with `render_chat`."""
    env = make_env(task)
    messages = [dict(m) for m in task.messages]
    for turn in task.gold_turns:
        if not turn:
            continue
        messages.append({"role": "assistant", "content": render_calls(turn, task.syntax)})
        messages.extend(tool_message(r) for r in execute_turn(env, turn))
    messages.append({"role": "assistant", "content": task.gold_answer})
    return messages
