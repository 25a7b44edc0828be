"""Capability probe: is the tool-use skill still there when the format breaks? (``diagnose probe``,
docs/probe.md). The model-running parts (``runner``, ``likelihood``, ``interventions``) import torch
and are imported from their modules; this package's top level stays torch-free."""

from diagnose.capability.config import VERDICTS, ProbeConfig
from diagnose.capability.results import (
    MEASURES,
    RESULT_SCHEMA,
    SUMMARY_SCHEMA,
    CapabilityReadError,
    CapabilityResults,
    capability_dir,
    read_capability,
    write_capability,
)

__all__ = ["MEASURES", "RESULT_SCHEMA", "SUMMARY_SCHEMA", "VERDICTS", "CapabilityReadError", "CapabilityResults",
           "ProbeConfig", "capability_dir", "read_capability", "write_capability"]
