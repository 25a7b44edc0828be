"""Experiment trackers: where a run's per-step metrics live when the trainer's own files lack them."""
