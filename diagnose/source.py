"""A training run as the analyses see it, whatever trainer wrote it.

Adapters (`diagnose.adapters`) turn a run directory of ours, of TRL, verl, open-instruct or a
conversation dump into a `RunSource`; `diagnose scan`, the dashboard and the notebooks read
only this. Tables are polars LazyFrames so that a 50M-row token table is never materialised.

Column contracts (a table may carry more columns; absent optional tables are None):

``metrics``  one row per step: ``step`` (i64) plus any numeric metric columns, named as in
             run-format v1 (``reward``, ``accuracy``, ``entropy``, ``kl``, ``clip_ratio``,
             ``grad_norm``, ``completions/mean_length``, ``turn_state/<state>``, ``probe/<ctx>/<tok>``,
             ``attribution/<tok>/{self,other,total}``, ...). Adapters map their trainer's names onto
             these where the meaning is the same (verl ``actor/entropy`` -> ``entropy``).
``rollouts`` one row per sample: ``step`` (i64), ``sample_id`` (i64), ``group_id`` (i64),
             ``prompt`` (str), ``completion`` (str), ``reward`` (f64), ``turn_states`` (list[str]),
             ``error_types`` (list[str]); optional ``accuracy``, ``task_id``, ``is_hint``,
             ``is_off_policy``, ``n_turns``.
``tokens``   run-format v1 token table (``step``, ``sample_id``, ``turn``, ``position``, ``token_id``,
             ``logprob``, ``sampler_logprob``, ``entropy``, ``is_generated``, ``lp_ctrl_<name>``...).
``probe``    run-format v1 probe table.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from diagnose.jsonl import LineError
from diagnose.transcripts import Dialect


@dataclass
class SourceIssue:
    """Something unreadable in the run: which file (and line), what, and what was skipped."""

    path: str
    line: int | None
    message: str
    #: what the issue means for the analyses, where it matters (`STEP_MISMATCH`); None otherwise
    kind: str | None = None

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}" if self.line else f"{self.path}: {self.message}"

    @classmethod
    def from_line_error(cls, e: LineError) -> "SourceIssue":
        return cls(e.path, e.line or None, e.message)


#: `SourceIssue.kind` of a step file whose rows belong to other steps than its name says: the
#: scan cache cannot map such a file to its steps and recomputes every step.
STEP_MISMATCH = "step_mismatch"


def step_mismatch_message(what: str, steps: Any, file_step: int, authority: str) -> str:
    """The one wording of a file-name / data step mismatch (``what``: "rows", "lines", ...;
    ``authority``: which field wins, e.g. "the step column")."""
    return f"{what} have step(s) {steps} but the file name says {file_step}; {authority} is authoritative"


#: Flags of rollouts that are not the policy's own samples (a hinted prompt, an off-policy
#: demonstration): analyses of the policy leave them out, as the trainer's own metrics do.
OFF_POLICY_FLAGS: tuple[str, ...] = ("is_hint", "is_off_policy")


def on_policy(columns: Iterable[str]) -> pl.Expr:
    """True on the rollouts that are the policy's own samples: none of the `OFF_POLICY_FLAGS`
    the table has is set (a null flag counts as unset)."""
    have = set(columns)
    keep = pl.lit(True)
    for flag in OFF_POLICY_FLAGS:
        if flag in have:
            keep = keep & ~pl.col(flag).fill_null(False)
    return keep


@dataclass
class RunSource:
    path: Path
    format: str  # "native" | "trl" | "verl" | "open_instruct" | "conversations"
    metrics: pl.LazyFrame
    rollouts: pl.LazyFrame | None = None
    tokens: pl.LazyFrame | None = None
    probe: pl.LazyFrame | None = None
    control_tokens: list[dict[str, Any]] = field(default_factory=list)  # run.json["control_tokens"] form
    issues: list[SourceIssue] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what this format cannot provide, for the report
    #: how the ``completion`` texts are written: `diagnose.transcripts.split_turns(completion,
    #: dialect)` gives the turns their ``turn_states`` are of (`diagnose rescore` re-renders so)
    dialect: Dialect = Dialect.CHATML
    #: where the run's evidence came from, one line per source with what it lacks (the trainer
    #: layout, then each experiment tracker: `diagnose.adapters.trackers`), for the report
    sources: list[str] = field(default_factory=list)
    #: what the run's config says, for the report header: ``model``, ``lr``, ``seed`` (from a tracker)
    info: dict[str, Any] = field(default_factory=dict)
    #: validation samples (rollout columns, ``step`` = the validation's step), kept apart from the
    #: training rollouts: verl's ``val/generations``, open-instruct's ``sample_completions`` (W&B)
    validation: pl.LazyFrame | None = None

    @property
    def has_token_probabilities(self) -> bool:
        return self.tokens is not None

    @property
    def has_step_mismatch(self) -> bool:
        """Some step file holds rows of other steps than its name says (`STEP_MISMATCH`)."""
        return any(i.kind == STEP_MISMATCH for i in self.issues)

    def fingerprint(self) -> dict[str, Any]:
        """What the scan cache keys on: files with their size and mtime (set by the adapter)."""
        return dict(self._fingerprint)

    _fingerprint: dict[str, Any] = field(default_factory=dict, repr=False)
    #: what the adapter already validated, in a form ``load_run(..., file_checks=...)`` takes back
    #: (native runs: `RunReader.file_checks`); opaque to everything else, {} when not supported
    file_checks: dict[str, Any] = field(default_factory=dict, repr=False)
    #: ``scan_steps(kind, steps)``: the rows of those steps of table 'rollouts' | 'tokens' |
    #: 'probe', reading only those steps' files, for adapters whose files are per step (native:
    #: `RunReader.scan`, which also filters on the step column); None: filter the whole table. An incremental scan of one new step then opens one file per table, not all.
    scan_steps: Callable[[str, list[int]], pl.LazyFrame] | None = field(default=None, repr=False)
