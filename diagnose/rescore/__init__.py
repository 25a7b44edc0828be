"""`diagnose rescore`: the control-token signals of any trainer's run, recovered from its saved
checkpoints (docs/rescore.md).

Modules: ``checkpoints`` (finding HF checkpoint directories: ours, TRL, verl, save_pretrained
folders), ``render`` (logged rollouts back to token ids through the run's chat template),
``score`` (safe loading, length-bucketed teacher forcing; torch), ``tables`` (the tables in the
run's ``.diagnose/rescore/``, `attach_rescored` for the scan; torch-free), ``pipeline``
(`rescore_run`), ``cli`` (the command).

This package imports nothing heavy: torch is loaded by ``score`` only.
"""
