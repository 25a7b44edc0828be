"""Multi-step tool-use environment: stateful in-process tools, seeded task families, splits,
the episode runner and checker, oracle/random policies, and the user task-file loader.

See docs/environment.md for the families, splits, protocol and scoring.

    from diagnose.tasks import make_tasks, run_episode, oracle_policy
    task = make_tasks("train", 1)[0]
    ep = run_episode(task, oracle_policy(task))
    assert ep.score.reward == 1.0
"""

from diagnose.jsonl import LineError

from .base import FILE_SPLIT, INSTRUCTION, SPLITS, Episode, Policy, Score, Task, contains_value, tool_schema
from .corpus import tokenizer_corpus
from .env import ReplayEnv, ToolEnv, gold_state, make_env
from .episode import Rollout, gold_assistant_texts, gold_messages, run_episode
from .families import FAMILIES, SPLIT_FAMILIES
from .generate import default_syntax, hint_for, make_tasks, with_hint
from .policies import oracle_policy, random_policy
from .taskfile import MAX_TASK_BYTES, MAX_TASK_CALLS, MAX_TASK_TURNS, fit_context, load_task_file

__all__ = [
    "FAMILIES",
    "FILE_SPLIT",
    "MAX_TASK_BYTES",
    "MAX_TASK_CALLS",
    "MAX_TASK_TURNS",
    "INSTRUCTION",
    "SPLITS",
    "SPLIT_FAMILIES",
    "Episode",
    "LineError",
    "Policy",
    "ReplayEnv",
    "Rollout",
    "Score",
    "Task",
    "ToolEnv",
    "contains_value",
    "default_syntax",
    "fit_context",
    "gold_assistant_texts",
    "gold_messages",
    "gold_state",
    "hint_for",
    "load_task_file",
    "make_env",
    "make_tasks",
    "oracle_policy",
    "random_policy",
    "run_episode",
    "tokenizer_corpus",
    "tool_schema",
    "with_hint",
]
