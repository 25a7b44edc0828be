"""Experiment trackers: where a run's per-step metrics (and some logged tables) live when the
trainer's own files lack them. Read apart from the trainer layouts, merged with them on the
trainer's step by `diagnose.adapters.load_run` (docs/adapters.md, "Trackers").

* `run`: `TrackerRun` (one tracker run in its own names) and `LoggedTable`;
* `wandb`, `tensorboard`, `console`: one reader per tracker (W&B through ``wandb leet inspect
  --json``, TensorBoard through ``EventAccumulator``, console logs of verl and transformers);
* `names`: tracker names -> the trainer's names -> the signal names the detectors know;
* `discover`: which trackers a path holds; `attach`: the launch folder's layout, the choice of
  one run per tracker, `TrackerData` for the adapters; `merge`: filling metrics, describing each
  source with what it lacks, the help for runs without rollouts; `tables`: logged tables as
  rollouts (TRL ``completions``) or validation samples (verl, open-instruct).

The wandb and tensorboard packages are the optional ``[trackers]`` extra; nothing here imports
them at module level, so the light core stays light.
"""
