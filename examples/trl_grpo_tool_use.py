"""A real `trl.GRPOTrainer` run on the embedded tiny model: multi-turn tool use through TRL's own
tool support, with `DiagnoseCallback` probing control tokens while it trains.

    python examples/trl_grpo_tool_use.py --out runs/trl-example --max-steps 8
    diagnose scan runs/trl-example          # TRL's files + the callback's probe tables

How the tools run: TRL's ``environment_factory`` (TRL >= 1.13; one environment instance per
rollout, one environment per task family, selected by the dataset's ``environment`` column). Each
environment's public methods are our environment's tools (`diagnose.tasks`), so TRL parses the
model's ``<tool_call>`` blocks, executes them, appends the tool messages and generates the next
turn itself. The reward (`task_success`) replays the completion's turns through our environment
and scores it with our checker: 1 when the final state and answer are right.

Prompts are our tasks' own: their system messages already hold the tool schemas exactly as our
trainer renders them, so the chat template's tools branch is switched off here (TRL would render
schemas again from the methods' signatures, ``transformers.utils.get_json_schema``, with a
description per parameter that the tiny model never saw). The embedded tokenizer's template is
Qwen2.5's but for the default system line, so TRL does not recognise it; the response parser TRL
sets for Qwen2.5 (`trl.chat_template_utils.qwen3_template`) is set here.

8 steps take about 3 minutes on 2 free CPU cores (~330 s of CPU time, measured), one short line per
step. Needs ``pip install 'collapse-diagnostics[trl]'``.
"""

from __future__ import annotations

import inspect
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

import typer

from diagnose.tasks import Task, make_tasks
from diagnose.tasks.episode import Rollout
from diagnose.toolcall import ToolCall, render_calls

_PY_TYPES = {"string": str, "integer": int, "number": float, "boolean": bool}


def _tool_method(schema: dict[str, Any]):
    """A method named and typed after one tool schema, calling our environment."""
    fn = schema["function"]
    name, params = fn["name"], fn.get("parameters", {})
    props, required = params.get("properties", {}), set(params.get("required", []))

    def method(self, **kwargs: Any) -> str:
        return json.dumps(self.env.call(ToolCall(name, kwargs)), ensure_ascii=False)

    sig = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    for p, spec in props.items():
        default = inspect.Parameter.empty if p in required else None
        sig.append(inspect.Parameter(p, inspect.Parameter.KEYWORD_ONLY, default=default,
                                     annotation=_PY_TYPES.get(spec.get("type"), str)))
    method.__signature__ = inspect.Signature(sig, return_annotation=str)
    method.__annotations__ = {p: _PY_TYPES.get(s.get("type"), str) for p, s in props.items()} | {"return": str}
    args = "\n".join(f"    {p}: The {p.replace('_', ' ')}." for p in props)
    method.__doc__ = f"{fn.get('description', name)}\n\nArgs:\n{args}\n" if props else fn.get("description", name)
    method.__name__ = method.__qualname__ = name
    return method


def environment_classes(tasks: list[Task]) -> dict[str, type]:
    """One environment class per task family; ``reset(task_id=...)`` puts it in that task's state."""
    by_id = {t.id: t for t in tasks}
    classes: dict[str, type] = {}
    for t in tasks:
        if t.family in classes:
            continue

        def reset(self, task_id: str | None = None, **kwargs: Any) -> None:
            self.rollout = Rollout(by_id[task_id])
            self.env = self.rollout.env

        body = {"reset": reset, "env": None}
        body |= {s["function"]["name"]: _tool_method(s) for s in t.tools}
        classes[t.family] = type(f"{t.family.title()}Env", (), body)
    return classes


def _turn_text(message: dict[str, Any]) -> str:
    """An assistant message back as the text the model wrote (TRL parses calls into ``tool_calls``)."""
    content = message.get("content") or ""
    if isinstance(content, list):  # content blocks
        content = "".join(b.get("text", "") for b in content if isinstance(b, dict))
    calls = []
    for c in message.get("tool_calls") or []:
        f = c.get("function", c) if isinstance(c, dict) else {}
        args = f.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                args = {}
        calls.append(ToolCall(str(f.get("name", "")), args if isinstance(args, dict) else {}))
    if not calls:
        return content
    return (content.strip() + "\n" if content.strip() else "") + render_calls(calls)


def make_reward(tasks: list[Task]):
    by_id = {t.id: t for t in tasks}

    def task_success(prompts: list, completions: list, task_id: list[str], **kwargs: Any) -> list[float]:
        """1.0 when replaying the completion's turns in our environment solves the task."""
        out = []
        for completion, tid in zip(completions, task_id, strict=True):
            r = Rollout(by_id[tid])
            turns = completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
            for m in turns:
                if m.get("role") == "assistant" and not r.done:
                    r.step(_turn_text(m))
            out.append(r.score().reward if r.done else 0.0)
        return out

    return task_success


def build_trainer(out: Path, max_steps: int, *, n_tasks: int = 32, probe_every: int = 2, seed: int = 0,
                  callbacks: list | None = None, lr: float = 2e-4, peft_config: Any = None):
    """The GRPOTrainer of this example (also used by the tests and the callback benchmark);
    ``peft_config`` (a `peft.LoraConfig`): train a LoRA adapter, so checkpoints are adapter folders."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer
    from trl.chat_template_utils import qwen3_template

    from diagnose.integrations.trl import DiagnoseCallback
    from diagnose.model.build import ensure_base_model
    from diagnose.model.resolve import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(ensure_base_model())
    tokenizer.padding_side = "left"
    tokenizer.response_template = qwen3_template  # what TRL sets for Qwen2.5's template (see docstring)
    if "{%- if tools %}" not in (tokenizer.chat_template or ""):
        raise ValueError("expected the embedded tokenizer's Qwen2.5-style chat template")
    # the tasks' system messages already hold their tool schemas as our trainer wrote them
    tokenizer.chat_template = tokenizer.chat_template.replace("{%- if tools %}", "{%- if false %}", 1)
    tasks = make_tasks("train", n_tasks, seed=seed)
    rows = [{"prompt": [dict(m) for m in t.messages], "environment": t.family, "task_id": t.id} for t in tasks]
    args = GRPOConfig(
        output_dir=str(out), max_steps=max_steps, learning_rate=lr, per_device_train_batch_size=8,
        num_generations=4, max_completion_length=256, max_tool_calling_iterations=4, temperature=1.0,
        logging_steps=1, save_steps=max(1, max_steps // 2), save_only_model=True,
        # completions/*.parquet (what `diagnose scan` reads) without TRL's rich table of every completion
        log_completions=True, num_completions_to_print=0,
        report_to="none", use_cpu=True, seed=seed, beta=0.0, bf16=False, disable_tqdm=True,
    )
    cbs = [DiagnoseCallback(probe_every=probe_every)] if callbacks is None else callbacks
    return GRPOTrainer(model=model, processing_class=tokenizer, reward_funcs=[make_reward(tasks)], args=args,
                       train_dataset=Dataset.from_list(rows), environment_factory=environment_classes(tasks),
                       callbacks=cbs, peft_config=peft_config)


def step_lines():
    """A callback printing one short line per logged step (instead of transformers' dict of every
    metric), so the example's output is readable in a terminal and in a log alike."""
    from transformers import TrainerCallback

    class StepLines(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "reward" not in logs:
                return
            calls = logs.get("tools/call_frequency")
            typer.echo(f"step {state.global_step}/{state.max_steps}: reward {logs['reward']:.2f}"
                       + (f", tool calls per completion {calls:.2f}" if calls is not None else "")
                       + f" ({time.perf_counter() - self.t0:.0f} s)")

    return StepLines()


def main(out: Path = typer.Option(Path("runs/trl-example"), help="TRL output_dir."),
         max_steps: int = typer.Option(8, min=1, help="Optimizer steps."),
         probe_every: int = typer.Option(2, min=1, help="DiagnoseCallback probe interval."),
         seed: int = typer.Option(0)) -> None:
    from transformers.trainer_callback import PrinterCallback
    from transformers.utils import logging as hf_logging

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    # TRL 1.x still calls transformers' gradient_checkpointing names, deprecated in transformers 5:
    # a FutureWarning per call, nothing the user of this example can act on
    warnings.filterwarnings("ignore", message=".*is deprecated and will be removed in v6", category=FutureWarning)
    hf_logging.disable_progress_bar()  # a "Writing model shards" bar per checkpoint
    trainer = build_trainer(out, max_steps, probe_every=probe_every, seed=seed)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(step_lines())
    trainer.train()
    typer.echo(f"done: {out}   next: diagnose scan {out}")


if __name__ == "__main__":
    typer.run(main)
