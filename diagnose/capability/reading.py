"""The probe's results in plain words: what each measure says and which claim the evidence supports.

Why: a verdict word beside a table of percentages reads as a contradiction when the measures
disagree (``capability lost`` beside ``likelihood 95%``). The measures answer different
questions: the generation measures ask whether the model *produces* a working call (as trained,
with the format repaired, or in another syntax); the likelihood probe asks whether it still
*ranks* the gold call above one-edit distractors when the conversation is given to it
(teacher-forced). A collapse can take away the first and leave the second. One place says so, for
the probe's command, the scan's reports, the dashboard and the demo's last words.

Everything here is computed from :class:`~diagnose.capability.results.CapabilityResults` on
read, so results written before this module existed are explained too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from diagnose.capability.config import CONTENT_MEASURES, HEALTHY, INTACT_FORMAT_BROKEN, LOST, ProbeConfig
from diagnose.capability.results import CapabilityReadError, CapabilityResults, read_capability
from diagnose.capability.verdict import likelihood_skill

REPAIR_LABELS = {"repair_forbid": "forbidding the collapse tokens", "repair_prefill": "prefilling the call start",
                 "alt_pythonic": "the python-list syntax", "alt_json": "the JSON syntax"}

#: The claims a probe can support, worded once (and in a few words: `SHORT_CLAIM`).
CLAIM_HIDDEN = ("the skill is intact under a broken format: taking the format out of the way restores most of "
                "the accuracy (the paper's claim)")
CLAIM_KNOWS = ("the model still recognises the right calls but no longer generates them: teacher-forced it ranks "
               "the gold call first well above chance, yet neither its own output nor any format repair or other "
               "call syntax solves the tasks, so the format alone does not hide the skill")
CLAIM_LOST = ("the skill is lost: the model neither generates working calls (with or without a format repair) "
              "nor ranks the gold call above chance")
CLAIM_NONE = "no checkpoint after the onset lost the skill: the probe finds no collapse of capability"
SHORT_CLAIM = {CLAIM_HIDDEN: "skill intact under a broken format (a format repair restores it)",
               CLAIM_KNOWS: "the right calls still recognised, no longer generated (no format repair helps)",
               CLAIM_LOST: "skill lost", CLAIM_NONE: "no loss of skill"}


@dataclass
class CheckpointReading:
    """One checkpoint: its verdict, the figures behind it, and the verdict in plain words."""

    checkpoint: str
    step: int | None
    roles: list[str]
    verdict: str
    native: float | None
    best_content: str | None  # the best format repair / other syntax
    best_content_acc: float | None
    likelihood: float | None
    chance: float | None
    healthy_share: float | None  # native turns that are healthy calls or answers
    words: str = ""

    def title(self) -> str:
        """``step 28 · trough (episode 1)`` (the checkpoint's name for a bare model)."""
        head = f"step {self.step}" if self.step is not None else self.checkpoint
        return head + (f" · {', '.join(self.roles)}" if self.roles else "")

    def figures(self) -> str:
        """``native 9%; best repair (the python-list syntax) 9%; likelihood 95% (chance 17%)``."""
        parts = []
        if self.native is not None:
            parts.append(f"native {self.native:.0%}")
        if self.best_content is not None:
            parts.append(f"best repair / other syntax ({REPAIR_LABELS.get(self.best_content, self.best_content)}) "
                         f"{self.best_content_acc:.0%}")
        if self.likelihood is not None:
            parts.append(f"likelihood {self.likelihood:.0%}" + (f" (chance {self.chance:.0%})" if self.chance else ""))
        return "; ".join(parts)


@dataclass
class ProbeReading:
    """The whole probe of a run: per checkpoint, then the claim the evidence supports."""

    checkpoints: list[CheckpointReading] = field(default_factory=list)
    claim: str = ""
    n_tasks: int | None = None
    summary: Any = None  # the probe's summary and results tables (polars), for figures
    results: Any = None

    @property
    def chance(self) -> float | None:
        """The likelihood probe's chance level (the same task set at every checkpoint)."""
        return next((c.chance for c in self.checkpoints if c.chance is not None), None)
    measures: tuple[str, ...] = (
        "generation (native, format repairs, other syntaxes): does the model produce calls that solve the task? "
        "(greedy, end to end)",
        "likelihood: teacher-forced on the gold conversation, does the gold call score above one-edit distractors "
        "(wrong tool, value or argument name)? (does it know the right call when it need not produce it)")


    @property
    def claim_short(self) -> str:
        return SHORT_CLAIM.get(self.claim, self.claim)

    def headline(self) -> str:
        """One clause for a verdict line: ``the right calls still recognised, no longer generated (no
        format repair helps; probe of 3 checkpoints, 32 tasks)``."""
        n = f", {self.n_tasks} tasks" if self.n_tasks else ""
        short = self.claim_short
        where = f"probe of {len(self.checkpoints)} checkpoint(s){n}"
        return short[:-1] + f"; {where})" if short.endswith(")") else f"{short} ({where})"


def _measure_rows(cap: CapabilityResults, checkpoint: str) -> dict[str, dict[str, Any]]:
    rows = cap.results.filter(cap.results["checkpoint"] == checkpoint).to_dicts()
    return {r["measure"]: r for r in rows if r.get("accuracy") is not None}


def _checkpoint(cap: CapabilityResults, row: dict[str, Any]) -> CheckpointReading:
    by = _measure_rows(cap, row["checkpoint"])
    info = (cap.meta.get("checkpoints") or {}).get(row["checkpoint"], {})
    content = {m: by[m]["accuracy"] for m in CONTENT_MEASURES if m in by}
    best = max(content, key=content.get) if content else None
    native = by.get("native", {})
    healthy = None
    if native.get("healthy_call") is not None:
        healthy = (native.get("healthy_call") or 0.0) + (native.get("healthy_response") or 0.0)
    return CheckpointReading(
        checkpoint=row["checkpoint"], step=row.get("step"), roles=list(info.get("roles") or []),
        verdict=row["verdict"], native=native.get("accuracy"), best_content=best,
        best_content_acc=content.get(best) if best else None,
        likelihood=by.get("likelihood", {}).get("accuracy"), chance=info.get("likelihood_chance"),
        healthy_share=healthy)


def _words(c: CheckpointReading, ref: CheckpointReading | None, cfg: ProbeConfig) -> str:
    """The verdict of one checkpoint in plain words, against the reference (the first probed)."""
    skill = likelihood_skill(c.likelihood, c.chance)
    knows = skill is not None and skill >= cfg.likelihood_skill_min
    since = ""
    if ref is not None and ref is not c and ref.native:
        since = f" ({ref.native:.0%} at step {ref.step})"
    if c.verdict == HEALTHY:
        return f"healthy: the model solves {c.native or 0:.0%} of the tasks as trained{since}."
    if c.verdict == INTACT_FORMAT_BROKEN:
        if c.best_content_acc is not None and c.native is not None and c.best_content_acc > c.native:
            return (f"capability intact, format broken: as trained it solves {c.native:.0%}, but with "
                    f"{REPAIR_LABELS.get(c.best_content, c.best_content)} it solves {c.best_content_acc:.0%}.")
        return ("capability intact, format broken: no repair restores generation, but teacher-forced the model "
                f"ranks the gold call first on {c.likelihood:.0%} of the turns (chance {c.chance:.0%}) while most "
                "of its own turns are malformed.")
    if c.verdict == LOST:
        gen = (f"{c.native or 0:.0%} solved as trained{since}, {c.best_content_acc or 0:.0%} at best with a format "
               "repair or another syntax")
        if knows:
            return (f"capability lost by generation, not by knowledge: {gen}; yet teacher-forced it ranks the gold "
                    f"call first on {c.likelihood:.0%} of the turns (chance {c.chance:.0%}): it recognises the right "
                    "call but no longer produces it.")
        if c.likelihood is not None:
            return (f"capability lost: {gen}, and teacher-forced it ranks the gold call first on only "
                    f"{c.likelihood:.0%} of the turns (chance {c.chance or 0:.0%}).")
        return f"capability lost: {gen}."
    return f"{c.verdict}: nothing could be measured at this checkpoint."


def _repair_restores(c: CheckpointReading) -> bool:
    """A format repair or another syntax solves more tasks than the model as trained (the probe's
    "capability intact, format broken" by its gap rule, not by the likelihood alone)."""
    return c.best_content_acc is not None and c.native is not None and c.best_content_acc > c.native


def _claim(cps: list[CheckpointReading], cfg: ProbeConfig) -> str:
    """Which claim the later checkpoints support, judged against the first probed one. A checkpoint
    the probe calls "capability intact, format broken" on its likelihood alone (no repair helps;
    its turns malformed) supports the claim that the model recognises the calls, not that the
    format hides a skill a repair would bring back."""
    if len(cps) < 2:
        return "one checkpoint probed: nothing to compare it with (probe one before the onset too)."
    ref, later = cps[0], cps[1:]
    if any(c.verdict == INTACT_FORMAT_BROKEN and _repair_restores(c) for c in later):
        return CLAIM_HIDDEN
    ref_native = ref.native or 0.0
    if ref_native == 0:
        return f"the first probed checkpoint (step {ref.step}) solves no task either: there is no skill to compare with."
    fell = [c for c in later if c.verdict == INTACT_FORMAT_BROKEN or (c.native is not None and c.native < 0.5 * ref_native)]
    if not fell:
        return CLAIM_NONE
    if any(c.best_content_acc is not None and c.best_content_acc >= 0.8 * ref_native for c in fell):
        return CLAIM_HIDDEN
    knows = [c for c in fell if (s := likelihood_skill(c.likelihood, c.chance)) is not None
             and s >= cfg.likelihood_skill_min]
    if knows:
        return CLAIM_KNOWS
    return CLAIM_LOST


def read_probe(cap: CapabilityResults, cfg: ProbeConfig | None = None) -> ProbeReading:
    """The plain-words reading of a probe (checkpoints in step order, the first one the reference)."""
    cfg = cfg or ProbeConfig(**{k: v for k, v in (cap.meta.get("thresholds") or {}).items()
                                if k in ProbeConfig.__dataclass_fields__})
    rows = cap.summary.sort("step", nulls_last=True).to_dicts()
    cps = [_checkpoint(cap, r) for r in rows]
    ref = cps[0] if cps else None
    for c in cps:
        c.words = _words(c, ref, cfg)
    n = (cap.meta.get("tasks") or {}).get("n") if isinstance(cap.meta.get("tasks"), dict) else None
    return ProbeReading(cps, _claim(cps, cfg), n, cap.summary, cap.results)


def probe_reading(run_dir: str | os.PathLike[str]) -> tuple[ProbeReading | None, str | None]:
    """The reading of a run's probe results, if any: (reading, None), (None, None) when the run
    was not probed, (None, why) when its results cannot be read."""
    try:
        cap = read_capability(run_dir)
    except CapabilityReadError as e:
        return None, str(e)
    except OSError as e:
        return None, f"{run_dir}: {e}"
    if cap is None or cap.summary.is_empty():
        return None, None
    return read_probe(cap), None
