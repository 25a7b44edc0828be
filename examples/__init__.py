"""Runnable examples; importable so that tests and benchmarks reuse them (`from examples.trl_grpo_tool_use import build_trainer`)."""
