"""`classify_turns`: `diagnose.turns.classify_turn` over a batch of turns, with a vectorised fast
path for the shapes most turns have, and the same answer for every turn.

Why: a scan classifies every assistant turn of every rollout. `classify_turn` costs 30-150 µs
a turn in Python (the Hermes parser, `json.loads`, the meaningful-text and wrong-syntax checks),
and sampled text rarely repeats, so memoising by text does not help: a run of 10^6 rollouts
would spend minutes there. Most turns are one of two shapes, which this module decides with
polars string expressions over the whole batch (Rust, both cores) and orjson on the call bodies:

* **a plain answer**: no call tags, control tokens, brackets or braces (nothing any call syntax
  could read as a call), ending in neither ``)`` nor a code fence: ``healthy_response`` when it
  has an ASCII letter or digit (``collapsed``/``empty_turn`` when it is only whitespace or ASCII
  punctuation);
* **Hermes calls** (syntax HERMES): ``<tool_call>``/``</tool_call>`` strictly alternating, each
  body a JSON object with a non-blank string ``name`` and an ``arguments`` object (orjson),
  text only before the first call or ASCII text between/after calls: ``healthy_call``, or
  ``polluted`` with ``unknown_tool`` / ``repeated_call`` / ``text_after_call``.

Everything else (any control token left once the turn terminator is dropped, reasoning never
closed, lenient or broken bodies, numbers orjson reads differently than Python, non-ASCII text
where meaningfulness is decided, ...) goes to the reference `classify_turn` (deduplicated), so
the results are identical; `tests/test_turn_batch.py` checks that on generated turns of every
error type in the Hermes, Qwen3.5 XML, Llama 3.1 and Mistral call syntaxes. The fast path only
ever *accepts* a shape it can decide exactly; it never concludes an error from the fast decoder.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import orjson
import polars as pl

from diagnose.format_errors import FormatError
from diagnose.toolcall import CallSyntax
from diagnose.transcripts import VERL_TOOL_ROUND
from diagnose.turns import TurnState, classify_turn

__all__ = ["PY_WHITESPACE", "Fallback", "classify_completions", "classify_turn_lists", "classify_turns",
           "current_sampling", "reference_fallback", "sample_mask", "sampling", "split_completions"]

#: ``(text, tool names or None) -> (state, error types)``: the reference for what the fast path
#: leaves (a memoised `classify_turn`, e.g. `diagnose.adapters.TurnClassifier.turn`).
Fallback = Callable[[str, "tuple[str, ...] | None"], "tuple[str, tuple[str, ...]]"]

#: What Python's ``str.strip()`` strips (``str.isspace``); Rust's whitespace differs (\x1c-\x1f).
PY_WHITESPACE = ("\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006"
                 "\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000")
_WS = (r"[\t\n\x0B\x0C\r\x1C-\x1F \x{85}\x{A0}\x{1680}\x{2000}-\x{200A}\x{2028}\x{2029}\x{202F}"
       r"\x{205F}\x{3000}]")
# one turn terminator at the end, as `diagnose.turns._strip_terminator` drops it (<|im_end|> or a
# Llama 3.1 end, optionally followed by <|endoftext|>); what it leaves with "<|" goes to the reference
_TERMINATOR = rf"(?:<\|(?:im_end|eot_id|eom_id|end_of_text)\|>{_WS}*)?(?:<\|endoftext\|>)?{_WS}*$"
_OPEN, _CLOSE = "<tool_call>", "</tool_call>"
# everything that makes a turn more than plain text or Hermes calls (ASCII case-insensitive, as
# the reference's tag and invented-output patterns): the tags found, in order
_MARKERS = ["<|", _OPEN, _CLOSE, "tool_response", "<tool_result>", "</tool_result>", "<tool_output>", "</tool_output>"]
_HERMES_ONLY = r"^(?:<tool_call></tool_call>)+$"
_ALNUM = "[A-Za-z0-9]"
_NON_ASCII = r"[^\x00-\x7F]"

_COLLAPSED, _RESPONSE = TurnState.COLLAPSED.value, TurnState.HEALTHY_RESPONSE.value
_CALL, _POLLUTED = TurnState.HEALTHY_CALL.value, TurnState.POLLUTED.value
_EMPTY = (FormatError.EMPTY_TURN.value,)
_UNKNOWN, _REPEATED, _AFTER = (FormatError.UNKNOWN_TOOL.value, FormatError.REPEATED_CALL.value,
                               FormatError.TEXT_AFTER_CALL.value)
#: deeper JSON than this may exceed Python's recursion limit where orjson reads it, or orjson's
#: own when it writes it (the bracket count bounds the depth); 19+ digit integers orjson may read
#: as floats
_MAX_BRACKETS = 200
_BIG_INT = r"[0-9]{19,}"


def reference_fallback(syntax: CallSyntax = CallSyntax.HERMES) -> Fallback:
    """`classify_turn` in ``syntax``, memoised by (text, tool names), for what the fast path leaves."""
    memo: dict[tuple[str, tuple[str, ...] | None], tuple[str, tuple[str, ...]]] = {}

    def fallback(text: str, tool_names: tuple[str, ...] | None) -> tuple[str, tuple[str, ...]]:
        hit = memo.get((text, tool_names))
        if hit is None:
            tools = None if tool_names is None else [{"name": n} for n in tool_names]
            c = classify_turn(text, tools, syntax)
            hit = memo[(text, tool_names)] = (c.state.value, tuple(e.value for e in c.errors))
        return hit

    return fallback


def classify_turns(turns: pl.Series | Sequence[str | None],
                   tool_names: Sequence[tuple[str, ...] | None] | tuple[str, ...] | None = None,
                   syntax: CallSyntax = CallSyntax.HERMES, *, fallback: Fallback | None = None) -> pl.DataFrame:
    """``(state, errors)`` of each turn, exactly as `classify_turn` gives them.

    ``turns``: assistant turn texts (None reads as ""). ``tool_names``: the tools each turn may
    call (a sequence aligned with ``turns``; one tuple for all; None: no unknown-tool check).
    ``fallback``: classifies what the fast path leaves (`Fallback`; default: `classify_turn`
    in ``syntax``, memoised). Returns one row per turn, in order: ``state`` (str), ``errors``
    (list[str], `FormatError` values in declaration order) and ``fast`` (decided without the
    reference)."""
    syntax = CallSyntax(syntax)
    texts, originals, forced = _as_series(turns)
    n = len(texts)
    per_turn = tool_names is not None and not (isinstance(tool_names, tuple) and
                                               all(isinstance(x, str) for x in tool_names))
    if per_turn and len(tool_names) != n:  # type: ignore[arg-type]
        raise ValueError(f"tool_names has {len(tool_names)} entries for {n} turns")  # type: ignore[arg-type]

    def tools_of(i: int) -> tuple[str, ...] | None:
        return tool_names[i] if per_turn else tool_names  # type: ignore[index,return-value]

    states: list[str | None] = [None] * n
    errors: list[tuple[str, ...] | None] = [None] * n
    df = _bodies(texts)
    _plain(df, states, errors)
    if syntax is CallSyntax.HERMES:
        _hermes(df, states, errors, tools_of)
    if fallback is None:
        fallback = reference_fallback(syntax)
    for i in forced:
        states[i] = None
    fast = [s is not None for s in states]
    raw = (originals if originals is not None else texts.to_list()) if not all(fast) else []
    for i in range(n):
        if states[i] is None:
            text = raw[i]
            states[i], errors[i] = fallback("" if text is None else text, tools_of(i))
    return _frame(states, errors, fast)  # type: ignore[arg-type]


def _frame(states: list[str], errors: list[tuple[str, ...]], fast: list[bool]) -> pl.DataFrame:
    """The result frame; the few distinct (state, errors) pairs are built once and gathered
    (building a list column from millions of small Python lists is slow)."""
    codes: dict[tuple[str, tuple[str, ...]], int] = {}
    keys = [codes.setdefault(pair, len(codes)) for pair in zip(states, errors)]
    uniques = pl.DataFrame({"state": [s for s, _ in codes], "errors": [list(e) for _, e in codes]},
                           schema={"state": pl.String, "errors": pl.List(pl.String)})
    return uniques[pl.Series(keys, dtype=pl.UInt32)].with_columns(pl.Series("fast", fast, dtype=pl.Boolean))


def _as_series(turns: pl.Series | Sequence[Any]) -> tuple[pl.Series, list[Any] | None, list[int]]:
    """The turns as a String Series; the original list and the indexes of items polars cannot
    hold (lone surrogates, bytes, ...), which go to the reference as they are."""
    if isinstance(turns, pl.Series):
        return turns.cast(pl.String).fill_null("").rename("t"), None, []
    originals = list(turns)
    try:
        return pl.Series("t", originals, dtype=pl.String).fill_null(""), originals, []
    except (UnicodeEncodeError, TypeError, pl.exceptions.PolarsError):
        pass
    forced = [i for i, t in enumerate(originals) if t is not None and not _utf8(t)]
    bad = set(forced)
    clean = [None if i in bad else t for i, t in enumerate(originals)]
    return pl.Series("t", clean, dtype=pl.String).fill_null(""), originals, forced


def _utf8(t: Any) -> bool:
    if not isinstance(t, str):
        return False
    try:
        t.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _bodies(texts: pl.Series) -> pl.DataFrame:
    """``i``, ``b``: what `classify_turn` classifies (terminator dropped, reasoning set aside,
    as ``answer_part``), and ``tags``: the markers found in it, in order."""
    df = pl.DataFrame({"i": pl.int_range(len(texts), dtype=pl.Int64, eager=True), "t": texts})
    special = df.filter(pl.col("t").str.contains_any(["<|", "think>"]))
    if special.height:
        t = pl.col("t").str.replace(_TERMINATOR, "")
        reasoned = t.str.contains("</think>", literal=True)
        unclosed = t.str.strip_chars_start(PY_WHITESPACE).str.starts_with("<think>")
        body = (pl.when(reasoned).then(t.str.split("</think>").list.last().str.strip_chars_start("\n"))
                .when(unclosed).then(pl.lit("")).otherwise(t))
        special = special.with_columns(body.alias("t"))
        df = df.filter(~pl.col("i").is_in(special.get_column("i").implode())).vstack(special).sort("i")
    return df.rename({"t": "b"}).with_columns(
        pl.col("b").str.extract_many(_MARKERS, ascii_case_insensitive=True).alias("tags"))


def _plain(df: pl.DataFrame, states: list[str | None], errors: list[tuple[str, ...] | None]) -> None:
    """Turns with no marker at all, decided in every syntax: nothing a call parser reads."""
    plain = df.filter(pl.col("tags").list.len() == 0).select(
        "i",
        pl.col("b").str.strip_chars(PY_WHITESPACE).alias("s"),
    ).with_columns(
        (pl.col("s") == "").alias("empty"),
        (pl.col("s").str.contains_any(["{", "["]) | pl.col("s").str.ends_with(")")
         | pl.col("s").str.ends_with("`")).alias("callish"),
        pl.col("s").str.contains(_ALNUM).alias("alnum"),
        pl.col("s").str.contains(_NON_ASCII).alias("non_ascii"),
    ).filter(pl.col("empty") | (~pl.col("callish") & (pl.col("alnum") | ~pl.col("non_ascii"))))
    for i, empty, alnum in plain.select("i", "empty", "alnum").iter_rows():
        if empty or not alnum:
            states[i], errors[i] = _COLLAPSED, _EMPTY
        else:
            states[i], errors[i] = _RESPONSE, ()


def _hermes(df: pl.DataFrame, states: list[str | None], errors: list[tuple[str, ...] | None],
            tools_of: Callable[[int], tuple[str, ...] | None]) -> None:
    """Turns of strictly alternating ``<tool_call>``/``</tool_call>`` and nothing else special."""
    cand = df.filter(pl.col("tags").list.len() > 0).filter(
        pl.col("tags").list.join("").str.contains(_HERMES_ONLY)).select("i", "b")
    if cand.height == 0:
        return
    pieces = cand.select("i", pl.col("b").str.split(_OPEN).list.slice(1).alias("p")).explode("p").with_columns(
        pl.col("p").str.split_exact(_CLOSE, 1).struct.rename_fields(["body", "gap"]).alias("x")).unnest("x")
    after = pieces.group_by("i").agg(
        pl.col("gap").str.contains(_ALNUM).any().alias("text_after"),
        pl.col("gap").str.contains(_NON_ASCII).any().alias("gap_non_ascii"),
        (pl.col("body").str.count_matches(r"[\[{]").max() > _MAX_BRACKETS).alias("deep"),
        pl.col("body").str.contains(_BIG_INT).any().alias("big_int"),
    ).filter(~pl.col("deep") & ~pl.col("big_int") & (pl.col("text_after") | ~pl.col("gap_non_ascii")))
    text_after = dict(zip(after.get_column("i").to_list(), after.get_column("text_after").to_list()))
    bodies = pieces.filter(pl.col("i").is_in(after.get_column("i").implode()))
    calls: dict[int, list[tuple[str, Any]] | None] = {}
    for i, body in zip(bodies.get_column("i").to_list(), bodies.get_column("body").to_list()):
        got = calls.setdefault(i, [])
        if got is None:
            continue
        call = _call(body)
        if call is None:
            calls[i] = None
        else:
            got.append(call)
    for i, got in calls.items():
        if got is None:
            continue
        errs = []
        known = tools_of(i)
        if known is not None and any(name not in known for name, _ in got):
            errs.append(_UNKNOWN)
        if len(got) > 1:
            try:
                keys = [orjson.dumps(c, option=orjson.OPT_SORT_KEYS) for c in got]
            except (orjson.JSONEncodeError, TypeError):
                continue
            if len(set(keys)) < len(keys):
                errs.append(_REPEATED)
        if text_after[i]:
            errs.append(_AFTER)
        states[i], errors[i] = (_POLLUTED if errs else _CALL), tuple(errs)


def _call(body: str) -> tuple[str, Any] | None:
    """``(name, arguments)`` of a body that `diagnose.toolcall` reads as a call with no lenient
    reading; None for anything else (left to the reference)."""
    try:
        obj = orjson.loads(body)
    except (orjson.JSONDecodeError, TypeError):
        return None
    if not isinstance(obj, dict):
        return None
    name, args = obj.get("name"), obj.get("arguments")
    if not isinstance(name, str) or not name.strip() or not isinstance(args, dict):
        return None
    return name, args


# ---------------------------------------------------------------------------------------------
# completions: split into turns, classify, and back to one list per completion
# ---------------------------------------------------------------------------------------------

#: `split(text) -> turns`: the reference splitter of a trainer's transcripts.
Splitter = Callable[[str], "list[str]"]

# verl's tool round (`diagnose.transcripts`), when every "user\n" of the text opens a tool
# response (the interaction-round alternative, with its look-arounds, cannot match)
_VERL_ROUND = "(?s)" + VERL_TOOL_ROUND
_SEP = "\x00"


def split_completions(texts: pl.Series, split: Splitter, fast: str | None = None) -> pl.DataFrame:
    """``row`` (index into ``texts``), ``turn`` (text): the assistant turns of each completion,
    in order, exactly as ``split`` gives them (a null completion: one empty turn). ``fast="verl"``
    splits verl dumps (special tokens skipped) with one polars regex pass when the text has only
    tool rounds; the rest goes through ``split``."""
    df = pl.DataFrame({"row": pl.int_range(len(texts), dtype=pl.Int64, eager=True), "t": texts.fill_null("")})
    done = df.head(0).select("row", pl.col("t").alias("turn"))
    if fast == "verl":
        t = pl.col("t")
        ok = (~t.str.contains_any(["<|im_start|>", "<|im_end|>", _SEP])
              & (t.str.count_matches("user\n", literal=True)
                 == t.str.count_matches("user\n<tool_response>\n", literal=True)))
        cand = df.filter(ok).select("row", t.str.replace_all(_VERL_ROUND, _SEP).str.split(_SEP).alias("turn"))
        # an unfinished round in the last piece may be cut (`_CUT_ROUND`): the reference decides
        cand = cand.filter(~pl.col("turn").list.last().str.contains("user\n", literal=True))
        done = cand.explode("turn")
        df = df.filter(~pl.col("row").is_in(cand.get_column("row").implode()))
    if df.height:
        rows, turns = [], []
        for r, text in df.iter_rows():
            got = split(text)
            rows.extend([r] * len(got))
            turns.extend(got)
        done = pl.concat([done, pl.DataFrame({"row": rows, "turn": turns}, schema=done.schema)])
    return done.sort("row", maintain_order=True)


def classify_completions(texts: pl.Series, split: Splitter, *, fast_split: str | None = None,
                         tool_names: Sequence[tuple[str, ...] | None] | tuple[str, ...] | None = None,
                         syntax: CallSyntax = CallSyntax.HERMES, fallback: Fallback | None = None,
                         keep: Sequence[bool] | None = None) -> pl.DataFrame:
    """``turn_states``, ``error_types`` (list[str], the errors of all turns in turn order) and
    ``n_turns`` of each completion (null where the completion is null), as splitting with
    ``split`` and classifying each turn with `classify_turn` gives them. ``tool_names``: per
    completion (or one tuple for all, or None). ``keep``: classify only these rows (`sample_mask`;
    the others get nulls)."""
    null = texts.is_null()
    if keep is not None:
        null = null | ~pl.Series(keep, dtype=pl.Boolean)
        texts = pl.select(pl.when(~null).then(texts)).to_series()
    out = classify_split(split_completions(texts, split, fast_split), len(texts), tool_names, syntax, fallback,
                         skip=null if null.any() else None)
    return out.select(pl.when(~null).then(pl.col(c)).alias(c) for c in out.columns)


def classify_turn_lists(turn_lists: Sequence[Sequence[str]],
                        tool_names: Sequence[tuple[str, ...] | None] | tuple[str, ...] | None = None,
                        syntax: CallSyntax = CallSyntax.HERMES, fallback: Fallback | None = None,
                        keep: Sequence[bool] | None = None) -> pl.DataFrame:
    """`classify_completions` for completions already split: one list of turn texts each
    (``keep``: classify only these rows, the others get nulls)."""
    keep = keep if keep is not None else [True] * len(turn_lists)
    rows = [r for r, turns in enumerate(turn_lists) if keep[r] for _ in turns]
    flat = [t for r, turns in enumerate(turn_lists) if keep[r] for t in turns]
    frame = pl.DataFrame({"row": rows, "turn": flat}, schema={"row": pl.Int64, "turn": pl.Object}) \
        if not _all_str(flat) else pl.DataFrame({"row": rows, "turn": flat}, schema={"row": pl.Int64, "turn": pl.String})
    skip = pl.Series([not k for k in keep], dtype=pl.Boolean)
    out = classify_split(frame, len(turn_lists), tool_names, syntax, fallback, skip=skip if skip.any() else None)
    return out.select(pl.when(~skip).then(pl.col(c)).alias(c) for c in out.columns) if skip.any() else out


def _all_str(texts: list[Any]) -> bool:
    try:
        pl.Series(texts, dtype=pl.String)
    except (UnicodeEncodeError, TypeError, pl.exceptions.PolarsError):
        return False
    return True


def classify_split(turns: pl.DataFrame, n: int,
                   tool_names: Sequence[tuple[str, ...] | None] | tuple[str, ...] | None = None,
                   syntax: CallSyntax = CallSyntax.HERMES, fallback: Fallback | None = None,
                   skip: pl.Series | None = None) -> pl.DataFrame:
    """Per completion ``0..n-1``: its turns' states, errors and count, from ``row``/``turn``
    (the turns of each completion in order; a completion without turns gets empty lists).
    ``skip``: completions not to classify (their turns are dropped here)."""
    if skip is not None:
        turns = turns.filter(~pl.col("row").is_in(pl.Series(range(n), dtype=pl.Int64).filter(skip).implode()))
    rows = turns.get_column("row")
    per_turn = tool_names
    if tool_names is not None and not (isinstance(tool_names, tuple) and all(isinstance(x, str) for x in tool_names)):
        per_turn = [tool_names[r] for r in rows.to_list()]  # type: ignore[index]
    col = turns.get_column("turn")
    got = classify_turns(col if col.dtype == pl.String else col.to_list(), per_turn, syntax, fallback=fallback)
    per = pl.DataFrame({"row": rows, "turn_states": got.get_column("state"), "error_types": got.get_column("errors")})
    states = per.group_by("row", maintain_order=True).agg("turn_states")
    errors = per.select("row", "error_types").explode("error_types").drop_nulls("error_types") \
        .group_by("row", maintain_order=True).agg("error_types")
    empty = pl.lit([], dtype=pl.List(pl.String))
    return pl.DataFrame({"row": pl.int_range(n, dtype=pl.Int64, eager=True)}) \
        .join(states, on="row", how="left").join(errors, on="row", how="left").sort("row").select(
            pl.col("turn_states").fill_null(empty), pl.col("error_types").fill_null(empty),
            pl.col("turn_states").list.len().fill_null(0).cast(pl.Int32).alias("n_turns"))


def sample_mask(steps: Sequence[int | None], n: int | None, seed: int = 0) -> list[bool] | None:
    """Which rows to classify when sampling ``n`` rollouts per step (``diagnose scan --sample``):
    at each step a uniform random subset of ``n`` of its rows (all when it has fewer), drawn
    from a generator seeded by ``(seed, step)``, so the sample does not depend on the order in
    which files are read. None (no sampling) when ``n`` is None."""
    if n is None:
        return None
    import numpy as np

    by_step: dict[int | None, list[int]] = {}
    for i, s in enumerate(steps):
        by_step.setdefault(s, []).append(i)
    keep = [False] * len(steps)
    for s, rows in by_step.items():
        if len(rows) <= n:
            chosen = rows
        else:
            rng = np.random.default_rng([seed, 0 if s is None else int(s) + 1])
            chosen = [rows[k] for k in rng.choice(len(rows), size=n, replace=False)]
        for i in chosen:
            keep[i] = True
    return keep


_SAMPLING: ContextVar[tuple[int, int] | None] = ContextVar("diagnose_turn_sampling", default=None)


@contextmanager
def sampling(n: int | None, seed: int = 0) -> Iterator[None]:
    """Within the block, adapters classify the turns of ``n`` rollouts per step only (a seeded
    random sample, `sample_mask`); the others get null turn states. None: every rollout."""
    token = _SAMPLING.set(None if n is None else (int(n), int(seed)))
    try:
        yield
    finally:
        _SAMPLING.reset(token)


def current_sampling() -> tuple[int, int] | None:
    """``(rollouts per step, seed)`` set by `sampling`, or None."""
    return _SAMPLING.get()
