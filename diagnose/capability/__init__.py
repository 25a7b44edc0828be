"""Capability probe: is the tool-use skill still there when the format breaks? (``diagnose probe``)"""

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

__all__ = ["MEASURES", "RESULT_SCHEMA", "SUMMARY_SCHEMA", "CapabilityReadError", "CapabilityResults",
           "capability_dir", "read_capability", "write_capability"]
