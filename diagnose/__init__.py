"""Collapse diagnostics for RL of LLM agents on multi-step tool use."""

__version__ = "0.1.0"
