"""The scan's result types and their JSON, side by side.

Every record (`SignalMove`, `ContextRise`, `ImplicatedToken`, `RolloutExample`,
`CollapseEpisode`, `Pathology`, and `diagnose.scan.detect.Change` inside an episode) is a
dataclass whose JSON is built from its fields: floats become null when not finite, nested
records and lists of records recurse, a field with ``metadata={"json": "group"}`` goes into the
``group`` object (an episode's ``severity``), and ``_JSON_EXTRA`` names the computed properties
written too (read-only: ignored when reading back). Reading back (`_Record.from_dict`) follows
the same field types, so a new field needs no JSON code. `ScanResult.to_json` /
`result_from_json` add the top level (verdict, source, config, the signal table);
`RunScanResult` adds what the adapter could not read (``issues``) and how the result was
obtained (``cache``, a `CacheInfo`). Schema: docs/scan.md.

    result_from_json(r.to_json(), r.signals).to_json() == r.to_json()
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import polars as pl

from diagnose.scan.detect import Change, DetectConfig
from diagnose.source import SourceIssue

__all__ = [
    "SCHEMA_VERSION",
    "VERDICTS",
    "CacheInfo",
    "CollapseEpisode",
    "ContextRise",
    "FailureMode",
    "ImplicatedToken",
    "Pathology",
    "RolloutExample",
    "RunScanResult",
    "ScanResult",
    "SignalMove",
    "issue_to_dict",
    "issues_summary",
    "result_from_json",
]

SCHEMA_VERSION = 1
VERDICTS = ("collapse", "healthy", "pathology", "insufficient_data")


def _f(v: Any) -> float | None:
    """JSON float: None for missing / non-finite."""
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


# ---------------------------------------------------------------------------------------------
# generic JSON of a dataclass record, from its fields
# ---------------------------------------------------------------------------------------------

_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _split_optional(tp: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); anything else -> (tp, False)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _record_of_list(tp: Any) -> type | None:
    """The dataclass ``R`` of ``list[R]``, else None."""
    if typing.get_origin(tp) is list:
        (arg,) = typing.get_args(tp) or (None,)
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _encode(value: Any, tp: Any) -> Any:
    base, _ = _split_optional(tp)
    if value is None:
        return None
    if base is float:
        return _f(value)
    if dataclasses.is_dataclass(value):
        return to_dict(value)
    if _record_of_list(base) is not None:
        return [to_dict(v) for v in value]
    return value


def _decode(value: Any, tp: Any) -> Any:
    base, optional = _split_optional(tp)
    if value is None:
        return None if optional or base is not float else math.nan
    if base is float:
        return float(value)
    if base is int:
        return int(value)
    if base is bool:
        return bool(value)
    if dataclasses.is_dataclass(base):
        return from_dict(base, value)
    rec = _record_of_list(base)
    if rec is not None:
        return [from_dict(rec, v) for v in value]
    return value


def to_dict(obj: Any) -> dict[str, Any]:
    """The JSON object of a dataclass record (see the module docstring)."""
    cls = type(obj)
    hints = _hints(cls)
    extra_after: dict[str, list[str]] = {}
    for name, after in getattr(cls, "_JSON_EXTRA", {}).items():
        extra_after.setdefault(after, []).append(name)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = _encode(getattr(obj, f.name), hints[f.name])
        group = f.metadata.get("json")
        if group:
            out.setdefault(group, {})[f.name] = value
        else:
            out[f.name] = value
        for name in extra_after.get(f.name, ()):
            out[name] = getattr(obj, name)
    return out


def from_dict(cls: type, d: Mapping[str, Any]) -> Any:
    """Rebuild a record from `to_dict` output. A missing key takes the field's default, else
    NaN for a float and None for an optional field; any other missing key is a KeyError."""
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        group = f.metadata.get("json")
        src = (d.get(group) or {}) if group else d
        if f.name in src:
            kwargs[f.name] = _decode(src[f.name], hints[f.name])
            continue
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
            continue
        base, optional = _split_optional(hints[f.name])
        if optional or base is float:
            kwargs[f.name] = _decode(None, hints[f.name])
        else:
            raise KeyError(f.name)
    return cls(**kwargs)


class _Record:
    """Mixin: `to_dict` / `from_dict` from the dataclass fields."""

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        return from_dict(cls, d)


# ---------------------------------------------------------------------------------------------
# the records
# ---------------------------------------------------------------------------------------------


@dataclass
class SignalMove(_Record):
    """A signal's own change point near an episode's onset. ``lead`` = onset - step: positive
    when the signal moved before the primary signal dropped."""

    signal: str
    step: int
    lead: int
    direction: str  # "up" | "down"
    method: str
    score: float  # confirmed shift, in robust sigmas of the signal's baseline
    alarm_step: int
    before: float  # median level before the change
    after: float  # median level from the onset on (lag_window steps)
    concern: bool  # the move is in the signal's direction of concern


@dataclass
class ContextRise(_Record):
    """A control token's probability rise at one context (``all``: mean over generated
    positions). ``source``: ``probe`` (fixed probe) or ``tokens`` (rollouts)."""

    context: str
    source: str
    signal: str
    before: float
    after: float
    ratio: float
    step: int | None  # its change point (None: no confirmed change point near the onset)
    lead: int | None
    signature: bool  # this token is the collapse token of this key context (KEY_CONTEXT_ROLES)


@dataclass
class ImplicatedToken(_Record):
    """A control token whose probability rose around the onset, with every context where it
    rose (largest rise first)."""

    _JSON_EXTRA: ClassVar[dict[str, str]] = {"context": "score"}

    token: str
    role: str | None
    text: str | None
    score: float  # log10 of the largest rise ratio
    contexts: list[ContextRise]
    attribution_before: float | None = None  # attribution/<token>/total, median before / after
    attribution_after: float | None = None

    @property
    def context(self) -> str:
        """The key context of the largest rise (a named key context preferred over ``all``)."""
        named = [c for c in self.contexts if c.context != "all"]
        return (named or self.contexts)[0].context


@dataclass
class RolloutExample(_Record):
    """A rollout shown as an example: ``excerpt`` is its first broken turn with the text before it
    (``diagnose.scan.excerpts``), or its beginning when no turn broke; ``broken_turn`` the index
    of that assistant turn (None: none broke)."""

    step: int
    sample_id: int
    group_id: int | None
    reward: float | None
    turn_states: list[str] | None
    excerpt: str | None
    broken_turn: int | None = None


@dataclass
class FailureMode(_Record):
    """One kind of failure that grew in a collapse episode (``diagnose.scan.failures``): its
    signal, what it means, and its share before the onset and around the trough."""

    signal: str  # e.g. "format_error/invalid_json", "turn_state/collapsed", "calls_right" (its complement)
    label: str  # e.g. "a call body that is not JSON"
    unit: str  # "of turns" | "of calls"
    before: float
    at_trough: float

    @property
    def rise(self) -> float:
        return self.at_trough - self.before

    def text(self) -> str:
        """``a call body that is not JSON 4% -> 20% of turns``."""
        return f"{self.label} {self.before:.0%} -> {self.at_trough:.0%} {self.unit}"


@dataclass
class CollapseEpisode(_Record):
    _JSON_EXTRA: ClassVar[dict[str, str]] = {"recovered": "end_step"}

    signal: str  # the primary signal that dropped: "reward" or "accuracy"
    onset_step: int  # first step of the drop (refined)
    detected_step: int  # first step of the sustained drop below the threshold
    trough_step: int
    recovery_step: int | None  # first step of the sustained recovery; None: not recovered
    end_step: int  # last step of the episode
    pre_level: float  # baseline median before the onset
    peak: float  # running (smoothed) peak before the onset
    trough_value: float
    relative_drop: float = field(metadata={"json": "severity"})  # (peak - trough) / |peak|
    collapsed_share_at_trough: float | None = field(metadata={"json": "severity"})  # turn_state/collapsed at the trough
    onset_changes: list[Change] = field(default_factory=list)
    moves: list[SignalMove] = field(default_factory=list)
    implicated: list[ImplicatedToken] = field(default_factory=list)
    examples_before: list[RolloutExample] = field(default_factory=list)
    examples_after: list[RolloutExample] = field(default_factory=list)
    failure_modes: list[FailureMode] = field(default_factory=list)  # what broke, largest rise first
    token_note: str | None = None  # why no control token is implicated, or which series could not be judged

    @property
    def recovered(self) -> bool:
        return self.recovery_step is not None

    @property
    def severity(self) -> dict[str, float | None]:
        return {"relative_drop": _f(self.relative_drop), "collapsed_share_at_trough": _f(self.collapsed_share_at_trough)}

    @property
    def leading(self) -> list[SignalMove]:
        """Signals that moved strictly before the onset, earliest first."""
        return [m for m in self.moves if m.lead > 0]


@dataclass
class Pathology(_Record):
    """A training pathology: ``kind`` in ``entropy_collapse``, ``entropy_blowup``,
    ``nan_logprobs``, ``nonfinite_metrics``, ``mismatch_growth``, ``format_collapse``."""

    kind: str
    signal: str
    first_step: int
    last_step: int
    n_steps: int
    baseline: float | None  # the early / reference level
    value: float | None  # the most extreme value
    message: str


@dataclass
class ScanResult:
    signals: pl.DataFrame
    episodes: list[CollapseEpisode]
    pathologies: list[Pathology]
    verdict: str  # one of VERDICTS
    notes: list[str]
    primary_signal: str | None = None
    source_path: str | None = None
    source_format: str | None = None
    config: DetectConfig = field(default_factory=DetectConfig)
    #: where the evidence came from, one line per source with what it lacks (`RunSource.sources`)
    sources: list[str] = field(default_factory=list)
    #: the run's config for the header: ``model``, ``lr``, ``seed`` (`RunSource.info`)
    run_info: dict[str, Any] = field(default_factory=dict)

    def to_json(self, include_signals: bool = False) -> dict[str, Any]:
        """JSON-serialisable summary (``schema_version`` 1). ``include_signals``: also the
        per-step signal table, as ``{"columns": [...], "data": {column: [values]}}`` (non-finite
        values as null)."""
        steps = self.signals.get_column("step") if "step" in self.signals.columns else pl.Series([], dtype=pl.Int64)
        out: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "verdict": self.verdict,
            "source": {"path": self.source_path, "format": self.source_format, "info": dict(self.run_info)},
            "sources": list(self.sources),
            "primary_signal": self.primary_signal,
            "n_steps": int(self.signals.height),
            "first_step": int(steps.min()) if len(steps) else None,
            "last_step": int(steps.max()) if len(steps) else None,
            "episodes": [e.to_dict() for e in self.episodes],
            "pathologies": [p.to_dict() for p in self.pathologies],
            "notes": list(self.notes),
            "config": self.config.to_dict(),
            "signal_columns": [c for c in self.signals.columns if c != "step"],
        }
        if include_signals:
            clean = self.signals.with_columns(
                [pl.when(pl.col(c).is_finite()).then(pl.col(c)).alias(c) for c in self.signals.columns if c != "step"])
            out["signals"] = {"columns": clean.columns, "data": clean.to_dict(as_series=False)}
        return out


def _config(d: Mapping[str, Any] | None) -> DetectConfig:
    names = {f.name for f in dataclasses.fields(DetectConfig)}
    return DetectConfig(**{k: v for k, v in (d or {}).items() if k in names})


def _signals_from_json(data: Any) -> pl.DataFrame:
    if isinstance(data, Mapping):
        cols = data.get("columns", [])
        sig = data.get("data", {})
        return pl.DataFrame({c: sig.get(c, []) for c in cols},
                            schema={c: (pl.Int64 if c == "step" else pl.Float64) for c in cols})
    return pl.DataFrame(schema={"step": pl.Int64})


# ---------------------------------------------------------------------------------------------
# the scan of a run: with its issues and how it was obtained
# ---------------------------------------------------------------------------------------------


@dataclass
class CacheInfo:
    """How a result was obtained. ``signals``: ``cached`` | ``incremental`` | ``full`` |
    ``off``; ``steps_recomputed``: the steps whose derived signals were recomputed (None: all
    of them, or none when ``signals == "cached"``); ``episodes``: ``cached`` | ``computed``."""

    enabled: bool = True
    dir: Path | None = None
    hit: bool = False  # served entirely from the cache (the run was not loaded)
    loaded_run: bool = True
    signals: str = "full"
    steps_recomputed: list[int] | None = None
    episodes: str = "computed"
    reason: str = ""
    written: bool = False
    write_error: str | None = None

    def describe(self) -> str:
        if not self.enabled:
            return "cache disabled (--no-cache)"
        if self.hit:
            return f"served from the cache ({self.dir})"
        if self.signals == "cached" and self.episodes == "cached":
            # the quick check saw files touched (size or mtime, the reason says how many); their
            # content fingerprints had not changed, so nothing was recomputed: one statement
            return ("nothing recomputed: " + (self.reason or "the run was re-read") + ", but no file's content changed"
                    + (f"; cached in {self.dir}" if self.written else ""))
        elif self.signals == "cached":
            what = "step signals from the cache; metrics re-read and detection re-run"
        elif self.signals == "incremental":
            steps = self.steps_recomputed or []
            shown = ", ".join(map(str, steps[:6])) + (", ..." if len(steps) > 6 else "")
            what = f"recomputed {len(steps)} step(s) ({shown})"
        else:
            what = "computed in full"
        why = f"; {self.reason}" if self.reason else ""
        where = (f"; cached in {self.dir}" if self.written else
                 f"; not cached ({self.write_error})" if self.write_error else "")
        return what + why + where


@dataclass
class RunScanResult(ScanResult):
    """A `ScanResult` with what the adapter could not read (``issues``) and how the result was
    obtained (``cache``). ``to_json`` adds ``issues``."""

    issues: list[SourceIssue] = field(default_factory=list)
    cache: CacheInfo = field(default_factory=CacheInfo)

    def to_json(self, include_signals: bool = False) -> dict[str, Any]:
        """`ScanResult.to_json` with ``issues`` after ``notes``."""
        base = super().to_json(include_signals=include_signals)
        out: dict[str, Any] = {}
        for k, v in base.items():
            out[k] = v
            if k == "notes":
                out["issues"] = [issue_to_dict(i) for i in self.issues]
        out.setdefault("issues", [issue_to_dict(i) for i in self.issues])
        return out


def issues_summary(n: int) -> str:
    """The one wording of a run's `SourceIssue` count (notes, terminal, HTML, dashboard). Not
    "unreadable": an issue may be a skipped file or line, but also a file read only in part,
    e.g. open-instruct token traces without a tokenizer, or a step file holding other steps."""
    return f"{n} input problem(s) (files or lines skipped or partly read)"


def issue_to_dict(i: SourceIssue) -> dict[str, Any]:
    return {"path": str(i.path), "line": i.line, "message": i.message}


def result_from_json(data: Mapping[str, Any], signals: pl.DataFrame | None = None) -> RunScanResult:
    """Rebuild a result from its JSON (``ScanResult.to_json()``, with or without ``issues``).
    ``signals``: the signal table (else the JSON's ``signals`` if present, else empty).
    ``result_from_json(r.to_json(), r.signals).to_json() == r.to_json()``."""
    if data.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"schema_version {data.get('schema_version')!r}, expected {SCHEMA_VERSION}")
    src = data.get("source") or {}
    return RunScanResult(
        signals=signals if signals is not None else _signals_from_json(data.get("signals")),
        episodes=[CollapseEpisode.from_dict(e) for e in data.get("episodes", [])],
        pathologies=[Pathology.from_dict(p) for p in data.get("pathologies", [])], verdict=data["verdict"],
        notes=list(data.get("notes", [])), primary_signal=data.get("primary_signal"), source_path=src.get("path"),
        source_format=src.get("format"), config=_config(data.get("config")),
        sources=[str(x) for x in data.get("sources", [])], run_info=dict(src.get("info") or {}),
        issues=[SourceIssue(str(i["path"]), i.get("line"), str(i["message"])) for i in data.get("issues", [])],
    )


def wrap_result(res: ScanResult, issues: list[SourceIssue], info: CacheInfo) -> RunScanResult:
    """A `ScanResult` as a `RunScanResult` with the run's issues and the cache info."""
    fields = {f.name: getattr(res, f.name) for f in dataclasses.fields(ScanResult)}
    return RunScanResult(**fields, issues=list(issues), cache=info)
