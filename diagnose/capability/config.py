"""What the capability probe runs and how it judges: :class:`ProbeConfig`.

Why one dataclass: the thresholds that turn numbers into a verdict are a claim about what
"capability intact" means; they are written into ``meta.json`` beside the results, so a
verdict can always be traced back to the rule that produced it (docs/probe.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

#: The verdicts, from best to worst. ``inconclusive``: nothing could be measured.
HEALTHY = "healthy"
INTACT_FORMAT_BROKEN = "capability intact, format broken"
LOST = "capability lost"
INCONCLUSIVE = "inconclusive"
VERDICTS: tuple[str, ...] = (HEALTHY, INTACT_FORMAT_BROKEN, LOST, INCONCLUSIVE)

#: Generation measures whose accuracy is an end-to-end task success rate (same unit as native).
GENERATION_MEASURES: tuple[str, ...] = ("native", "repair_forbid", "repair_prefill", "alt_pythonic", "alt_json")
#: Content measures: the format taken out of the way (repaired, or another syntax).
CONTENT_MEASURES: tuple[str, ...] = ("repair_forbid", "repair_prefill", "alt_pythonic", "alt_json")


@dataclass
class ProbeConfig:
    """Probe settings and verdict thresholds.

    Tasks: ``n_tasks`` held-out tasks of ``split`` (seed ``seed``), identical for every
    checkpoint, unless a task file is given. Generation is greedy, batched, ``max_turns``
    assistant turns of at most ``max_new_tokens`` tokens each.

    Verdict (see :func:`diagnose.capability.verdict.verdict`):

    * ``capability_score`` = the best end-to-end accuracy among native and the content measures
      (format repairs, other syntaxes); ``format_score`` = native accuracy; gap = the difference.
    * capability present: ``capability_score >= capable_min``;
    * format broken: ``gap >= max(gap_abs_min, gap_rel_min * capability_score)``;
    * present and not broken: ``healthy``; present and broken: ``capability intact, format broken``;
    * not present by generation, but the likelihood probe ranks the gold call first well above
      chance (chance-corrected skill ``>= likelihood_skill_min``) while the native turns are
      mostly malformed (healthy-turn share ``< format_ok_min``): ``capability intact, format
      broken`` (the model knows the calls, the format hides them);
    * otherwise ``capability lost`` (not measurable at this checkpoint, whether it ever had it).
    """

    # tasks
    n_tasks: int = 100
    split: str = "test"
    seed: int = 0
    # generation
    max_turns: int = 6
    max_new_tokens: int = 96
    max_context: int = 2048
    batch_size: int = 128  # rollouts per generate call
    # likelihood probe
    distractors_per_kind: int = 2  # per kind: wrong tool, wrong argument value, wrong argument name
    likelihood_batch_tokens: int = 65_536  # padded tokens per forward
    # verdict thresholds
    capable_min: float = 0.2
    gap_abs_min: float = 0.15
    gap_rel_min: float = 0.3
    likelihood_skill_min: float = 0.5
    format_ok_min: float = 0.5
    measures: tuple[str, ...] = field(default=("native", "repair_forbid", "repair_prefill", "alt_pythonic",
                                               "alt_json", "likelihood"))

    def __post_init__(self) -> None:
        from diagnose.capability.results import MEASURES

        bad = [m for m in self.measures if m not in MEASURES]
        if bad:
            raise ValueError(f"unknown measure(s) {bad}; expected some of {list(MEASURES)}")
        if self.n_tasks < 1:
            raise ValueError("n_tasks must be >= 1")
        if self.max_turns < 1 or self.max_new_tokens < 1:
            raise ValueError("max_turns and max_new_tokens must be >= 1")
        if self.distractors_per_kind < 1:
            raise ValueError("distractors_per_kind must be >= 1")
        self.measures = tuple(self.measures)

    def thresholds(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in ("capable_min", "gap_abs_min", "gap_rel_min",
                                              "likelihood_skill_min", "format_ok_min")}

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["measures"] = list(self.measures)
        return d
