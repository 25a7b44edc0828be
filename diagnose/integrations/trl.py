"""`DiagnoseCallback`: the fixed control-token probe inside a `trl.GRPOTrainer` run.

Why: TRL logs decoded text with the special tokens stripped and no log-probs, so
p(`<|im_end|>` | `<|im_start|>assistant\\n<tool_call>\\n`), the spike that precedes a tool-use
collapse, is invisible in its output. Every ``probe_every`` steps this callback teacher-forces
the live policy on a fixed set of gold tool-use trajectories (`diagnose.model.ctrl_probe`) and
writes our run format's probe tables and ``probe/<context>/<token>`` metrics into
``<output_dir>/diagnose/`` (a run directory of format v1). `diagnose scan output_dir` reads TRL's
own files and attaches these (`diagnose.adapters._common.sidecar`), while training runs.

With ``stop_on_collapse=True`` it also runs the incremental scan after each probe; when a
collapse onset is detected it asks the trainer to save a checkpoint and stop, and logs why.

    from diagnose.integrations.trl import DiagnoseCallback
    trainer = GRPOTrainer(..., callbacks=[DiagnoseCallback(probe_every=10)])

Needs the ``[trl]`` extra (trl, and torch/transformers through it).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from diagnose.adapters._common.sidecar import SIDECAR_DIR
from diagnose.atomic import atomic_write_json
from diagnose.control_tokens import ControlTokenRegistry
from diagnose.model.ctrl_probe import build_probe_set, probe_summary, run_probe
from diagnose.rundir.writer import RunWriter
from diagnose.tasks import Task, load_task_file, make_tasks

__all__ = ["DiagnoseCallback", "DiagnoseCallbackConfig"]

log = logging.getLogger("diagnose.trl")

#: what the callback writes when it stops a run (beside the probe tables)
STOP_FILE = "stopped.json"


@dataclass
class DiagnoseCallbackConfig:
    """What the callback probes and when.

    ``probe_every``: probe every K optimizer steps (and at step 1); ``probe_on``: ``"tasks"`` (gold
    trajectories: ``tasks`` / ``task_file``, else ``probe_tasks`` held-out tasks of the embedded
    environment, ``make_tasks("test", n)``) or ``"completions"`` (the run's own early healthy
    completions, ``probe_tasks`` of them, taken from TRL's ``completions/`` at the first probe
    step where some are logged and kept fixed from then on; needs ``log_completions=True``);
    ``scan_every``: with ``stop_on_collapse``, scan every K steps (default: at every probe)."""

    run_dir: str | None = None
    probe_every: int = 10
    probe_tasks: int = 16
    task_file: str | None = None
    stop_on_collapse: bool = False
    scan_every: int | None = None
    seed: int = 0
    probe_on: str = "tasks"

    def __post_init__(self) -> None:
        if self.probe_on not in ("tasks", "completions"):
            raise ValueError(f"probe_on must be 'tasks' or 'completions', got {self.probe_on!r}")
        if self.probe_every < 1:
            raise ValueError(f"probe_every must be >= 1, got {self.probe_every}")
        if self.probe_tasks < 1:
            raise ValueError(f"probe_tasks must be >= 1, got {self.probe_tasks}")
        if self.scan_every is not None and self.scan_every < 1:
            raise ValueError(f"scan_every must be >= 1, got {self.scan_every}")


class DiagnoseCallback(TrainerCallback):
    """A `transformers.TrainerCallback` for `trl.GRPOTrainer` (see the module docstring).

    ``tasks``: gold trajectories to probe on (`diagnose.tasks.Task` list); else ``task_file``
    (our task JSONL, docs/environment.md); else the environment's held-out tasks."""

    def __init__(self, run_dir: str | None = None, probe_every: int = 10, *, probe_tasks: int = 16,
                 tasks: list[Task] | None = None, task_file: str | None = None,
                 stop_on_collapse: bool = False, scan_every: int | None = None, seed: int = 0,
                 probe_on: str = "tasks") -> None:
        self.config = DiagnoseCallbackConfig(run_dir, probe_every, probe_tasks, task_file, stop_on_collapse,
                                             scan_every, seed, probe_on)
        self._tasks = tasks
        self._writer: RunWriter | None = None
        self._probe_set: Any = None  # a ProbeSet (tasks) or (rendered rollouts, their contexts)
        self._tokenizer: Any = None
        self._pending: tuple[int, dict] | None = None  # the current step's metrics row, see `_log`
        self._registry: ControlTokenRegistry | None = None
        self._output_dir: Path | None = None
        self.probe_seconds = 0.0  # time spent probing (and scanning), for overhead measurements
        self.stopped_at: int | None = None
        self.stop_reason: str | None = None

    # ---- setup ---------------------------------------------------------------------------

    def _probe_tasks(self) -> list[Task]:
        cfg = self.config
        if self._tasks:
            return list(self._tasks)
        if cfg.task_file:
            tasks, errors = load_task_file(cfg.task_file)
            for e in errors[:10]:
                log.warning("diagnose: skipped %s", e)
            if not tasks:
                raise ValueError(f"{cfg.task_file}: no usable task to probe on")
            return tasks[: cfg.probe_tasks]
        return make_tasks("test", cfg.probe_tasks, seed=cfg.seed + 2000)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                       processing_class: Any = None, **kwargs: Any) -> None:
        tokenizer = getattr(processing_class, "tokenizer", processing_class)  # a processor wraps one
        if tokenizer is None:
            raise ValueError("DiagnoseCallback needs the trainer's tokenizer (processing_class)")
        self._output_dir = Path(args.output_dir)
        run_dir = Path(self.config.run_dir) if self.config.run_dir else self._output_dir / SIDECAR_DIR
        self._registry = ControlTokenRegistry.from_tokenizer(tokenizer)
        self._tokenizer = tokenizer
        if self.config.probe_on == "tasks":
            self._probe_set = build_probe_set(tokenizer, self._probe_tasks())
        resume = (run_dir / "run.json").exists()
        self._writer = RunWriter(
            run_dir, config={"writer": "diagnose.integrations.trl.DiagnoseCallback", **vars(self.config)},
            model={"name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None),
                   "architecture": type(model).__name__ if model is not None else None},
            tokenizer={"name_or_path": getattr(tokenizer, "name_or_path", None), "vocab_size": len(tokenizer)},
            control_tokens=self._registry.to_json(), seeds={"seed": self.config.seed}, resume=resume)
        if resume:  # resumed from a checkpoint: what was logged after it is re-run, so logged once
            self._writer.truncate_after(int(state.global_step))

    # ---- every step ------------------------------------------------------------------------

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        """TRL's logged scalars, under TRL's names, so that a scan during training has the reward
        even before the first ``trainer_state.json`` is saved (the adapter prefers TRL's files)."""
        if self._writer is None or not logs or not state.is_world_process_zero:
            return
        numeric = {k: v for k, v in logs.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if numeric:
            self._log(int(state.global_step), numeric)

    def _log(self, step: int, metrics: dict) -> None:
        """One ``metrics.jsonl`` line per step: the probe (on_step_end), TRL's log of the step and its
        end-of-training summary (on_log) arrive separately, so a step's row is written once the
        trainer has moved past it (or at the end of training)."""
        if self._pending is not None and self._pending[0] != step:
            self._flush()
        if self._pending is None:
            self._pending = (step, {})
        self._pending[1].update(metrics)

    def _flush(self) -> None:
        if self._pending is not None and self._writer is not None:
            step, metrics = self._pending
            if metrics:
                self._writer.log_metrics(step, metrics)
        self._pending = None

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> Any:
        step = int(state.global_step)
        cfg = self.config
        if self._writer is None or not state.is_world_process_zero:
            return control
        t0 = time.perf_counter()
        if step % cfg.probe_every == 0 or step == 1:
            frame = self._probe(model, step)
            if frame is not None:
                self._writer.write_probe(step, frame)
                self._log(step, probe_summary(frame, self._registry.names))
        every = cfg.scan_every or cfg.probe_every
        if cfg.stop_on_collapse and step % every == 0:
            self._maybe_stop(step, control)
        self.probe_seconds += time.perf_counter() - t0
        return control

    def _probe(self, model: Any, step: int) -> Any:
        """The probe table at ``step``; None while ``probe_on="completions"`` has nothing logged yet."""
        if self.config.probe_on == "tasks":
            return run_probe(model, self._probe_set, self._registry, step)
        if self._probe_set is None:
            self._probe_set = self._completions_probe_set()
            if self._probe_set is None:
                return None
        from diagnose.rescore.score import ScoreConfig, probe_table

        rendered, contexts = self._probe_set
        pad = self._tokenizer.pad_token_id if self._tokenizer.pad_token_id is not None else 0
        return probe_table(model, rendered, contexts, self._registry, step, ScoreConfig(device=str(model.device)), pad)

    def _completions_probe_set(self) -> tuple[list, list] | None:
        """The run's earliest healthy logged completions, re-rendered to ids through the tokenizer's
        chat template (`diagnose.rescore.render`, as `diagnose rescore` does), or None if none yet."""
        from diagnose.adapters import UnknownRunLayout, load_run
        from diagnose.rescore.pipeline import RescoreError, logged_rollouts, probe_candidates, render_first
        from diagnose.rescore.render import Renderer

        if not (self._output_dir / "completions").is_dir():
            return None
        try:
            src = load_run(self._output_dir, format="trl")
            cands = probe_candidates(logged_rollouts(src))
        except (RescoreError, UnknownRunLayout):  # nothing readable logged yet (the first file still being written)
            return None
        renderer = Renderer(self._tokenizer, src.dialect)
        rendered, _ = render_first(renderer, cands, self.config.probe_tasks)
        if not rendered:
            return None
        log.info("diagnose: probing on %d early healthy completions of steps %s", len(rendered),
                 sorted({r.step for r in rendered}))
        return rendered, [renderer.contexts(r) for r in rendered]

    def _maybe_stop(self, step: int, control: Any) -> None:
        from diagnose.scan import scan_run

        result = scan_run(self._output_dir)
        if not result.episodes:
            return
        ep = result.episodes[0]
        reason = (f"collapse onset at step {ep.onset_step} on {ep.signal} (scan verdict {result.verdict}); "
                  f"stopped at step {step} with a checkpoint")
        log.warning("diagnose: %s", reason)
        self.stopped_at, self.stop_reason = step, reason
        atomic_write_json(self._writer.run_dir / STOP_FILE,
                          {"step": step, "onset_step": ep.onset_step, "signal": ep.signal, "reason": reason})
        control.should_save = True
        control.should_training_stop = True

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._writer is not None:
            self._flush()
            self._writer.close()
            self._writer = None
