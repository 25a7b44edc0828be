"""A minimal, readable SFT/GRPO trainer for multi-step tool use, instrumented for `diagnose`."""
