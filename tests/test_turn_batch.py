"""`diagnose.turn_batch.classify_turns` gives exactly what `diagnose.turns.classify_turn` gives.

Property tests on generated turns (`tests/_turn_grammar.py`) in the four call dialects a policy
writes -- Hermes, Qwen3.5 XML, Llama 3.1, Mistral -- each classified in the three syntaxes the
classifier knows (HERMES, JSON, PYTHONIC), with and without tool lists; every `FormatError` type
occurs. The default suite runs a few thousand turns per dialect; ``-m slow`` runs 10^5 per
dialect in HERMES (plus 2.5x10^4 in each other syntax). The fast path must decide a real share
of the turns (a fast path that sent everything to the reference would pass trivially).
"""

from __future__ import annotations

import os
from collections import Counter

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import _turn_grammar as grammar
from diagnose.format_errors import FormatError
from diagnose.toolcall import CallSyntax, ToolCall, render_calls
from diagnose.turn_batch import PY_WHITESPACE, classify_turns
from diagnose.turns import TurnState, classify_turn

SLOW_TURNS = int(os.environ.get("TURN_BATCH_TURNS", 100_000))


def reference(texts, tools, syntax=CallSyntax.HERMES):
    out = []
    for i, t in enumerate(texts):
        names = tools[i] if isinstance(tools, list) else tools
        c = classify_turn(t, None if names is None else [{"name": n} for n in names], syntax)
        out.append((c.state.value, [e.value for e in c.errors]))
    return out


def check(texts, tools=None, syntax=CallSyntax.HERMES) -> tuple[pl.DataFrame, list]:
    got = classify_turns(texts, tools, syntax)
    want = reference(texts, tools, syntax)
    assert got.height == len(texts)
    for k, (row, exp) in enumerate(zip(got.select("state", "errors").iter_rows(), want)):
        assert (row[0], row[1]) == exp, f"turn {k} {texts[k]!r} tools={tools[k] if isinstance(tools, list) else tools}"
    return got, want


def run_dialect(dialect: str, seeds: list[int], n_hermes: int, n_other: int) -> tuple[Counter, float]:
    """Classify generated turns of ``dialect`` in every syntax; (error types seen, fast share in HERMES)."""
    seen: Counter = Counter()
    fast = total = 0
    for seed in seeds:
        texts = grammar.turns(seed, dialect, n_hermes)
        got, want = check(texts, grammar.tool_lists(seed, n_hermes))
        fast += int(got.get_column("fast").sum())
        total += got.height
        for syntax in (CallSyntax.JSON, CallSyntax.PYTHONIC):
            sub = texts[:n_other]
            _, w = check(sub, grammar.TOOLS if seed % 2 else None, syntax)
            want += w
        seen.update(e for _, errs in want for e in errs)
    return seen, fast / max(total, 1)


@pytest.mark.parametrize("dialect", grammar.DIALECTS)
def test_matches_classify_turn(dialect):
    seen, fast = run_dialect(dialect, [1, 2], 1000, 300)
    assert fast > 0.15, f"the fast path decided only {fast:.0%} of the turns"
    assert len(seen) >= 12, f"error types seen: {sorted(seen)}"


@pytest.mark.slow
@pytest.mark.parametrize("dialect", grammar.DIALECTS)
def test_matches_classify_turn_1e5(dialect):
    """10^5 turns per dialect in HERMES, 2.5x10^4 in each of JSON and PYTHONIC, all error types."""
    per = 10_000
    seen: Counter = Counter()
    fast: list[float] = []

    @settings(max_examples=max(1, SLOW_TURNS // per), deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.integers(0, 2**31 - 1))
    def one(seed):
        s, f = run_dialect(dialect, [seed], per, per // 4)
        seen.update(s)
        fast.append(f)

    one()
    assert set(seen) == {e.value for e in FormatError}, f"missing: {set(e.value for e in FormatError) - set(seen)}"
    assert min(fast) > 0.15


# ---- hypothesis over fragments (shrinks to a minimal failing turn) ---------------------------

FRAGMENTS = st.sampled_from(grammar.TAG_NOISE + grammar.CONTROL + grammar.TERMINATORS + grammar.BODY_BREAKS
                            + grammar.SPACES + grammar.PUNCT + grammar.WORDS + grammar.UNICODE_WORDS
                            + ("<tool_call>\n", "\n</tool_call>", '{"name": "f", "arguments": {}}',
                               '{"name": "search", "arguments": {"q": 1}}', "[f(a=1)]", "(", ")", "`", "{", "["))
TURNS = st.lists(FRAGMENTS | st.text(max_size=5), max_size=8).map("".join)


@settings(max_examples=80, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(st.lists(TURNS, min_size=1, max_size=12), st.sampled_from([None, grammar.TOOLS, ("search",)]),
       st.sampled_from(list(CallSyntax)))
def test_fragments_match_classify_turn(texts, tools, syntax):
    check(texts, tools, syntax)


# ---- the shapes the fast path takes, and the edges it must leave ---------------------------


def test_clean_shapes_are_all_fast():
    call = render_calls([ToolCall("get_weather", {"city": "Paris", "n": 2})])
    texts = [call, f"Let me look.\n{call}", f"{call}\n{call.replace('Paris', 'Rome')}", "The answer is 42.",
             f"{call}<|im_end|>", "Done.<|im_end|>\n<|endoftext|>", "<think>\nhm (x)\n</think>\n\nSunny.", "", "  \n",
             "...", f"{call}\nI will wait.", f"{call}\n{call}"]
    got, want = check(texts, grammar.TOOLS)
    assert got.get_column("fast").all()
    assert [w[0] for w in want[-4:]] == ["collapsed", "collapsed", "polluted", "polluted"]


@pytest.mark.parametrize("text", [
    "Answer:" + "\x1c",  # Python strips \x1c, Rust does not
    "Done.<|im_end|>\u3000",  # a terminator before Unicode whitespace
    '<tool_call>\n{"name": "f", "arguments": {"a": 123456789012345678901234}}\n</tool_call>',  # orjson: a float
    '<tool_call>\n{"name": "f", "arguments": {"a": ' + "[" * 300 + "]" * 300 + "}}\n</tool_call>",
    '<tool_call>\n{"name": "f", "arguments": {"a": "\\ud800"}}\n</tool_call>',
    '<tool_call>\n{"name": "\\u3000", "arguments": {}}\n</tool_call>',
    '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>\nvoilà é',
    '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>\n日本',
    "call f(a=1)", "[f(a=1)]", '{"name": "f", "arguments": {}}', "```\nf(a=1)\n```",
    "<TOOL_CALL>x</TOOL_CALL>", "see <tool_response> above", "ok\ud800", "<think>never closed",
])
def test_edges_match_classify_turn(text):
    check([text, "fine."], grammar.TOOLS)
    for syntax in CallSyntax:
        check([text], None, syntax)


def test_inputs_of_every_kind():
    texts = [None, b"<tool_call>\xff", "ok", "\ud83d", 7]
    got = classify_turns(texts)
    assert got.get_column("state").to_list()[:3] == [classify_turn(t).state.value for t in texts[:3]]
    assert got.row(3)[0] == classify_turn("\ud83d").state.value
    series = classify_turns(pl.Series(["ok", None, "<tool_call>"]))
    assert series.get_column("state").to_list() == ["healthy_response", "collapsed", "collapsed"]
    with pytest.raises(ValueError, match="tool_names"):
        classify_turns(["a", "b"], [("f",)])


def test_fallback_gets_only_what_the_fast_path_leaves():
    asked = []

    def fallback(text, tools):
        asked.append(text)
        c = classify_turn(text)
        return c.state.value, tuple(e.value for e in c.errors)

    texts = ["Plain answer.", "<tool_call>\n", "<tool_call>\n", '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>']
    got = classify_turns(texts, fallback=fallback)
    assert asked == ["<tool_call>\n", "<tool_call>\n"]
    assert got.get_column("state").to_list() == ["healthy_response", "collapsed", "collapsed", "healthy_call"]


def test_python_whitespace_constant():
    assert PY_WHITESPACE == "".join(c for c in map(chr, range(0x110000)) if c.isspace())


def test_states_and_errors_are_the_taxonomy():
    got = classify_turns(grammar.turns(3, "hermes", 300), grammar.tool_lists(3, 300))
    assert set(got.get_column("state")) <= {s.value for s in TurnState}
    assert set(got.get_column("errors").explode().drop_nulls()) <= {e.value for e in FormatError}


# ---- completions: the verl split (one polars pass) against diagnose.transcripts.split_turns ----

_TOOL_ROUND = st.builds(lambda who, bodies: f"\n{who}\n" + "\n".join(f"<tool_response>\n{b}\n</tool_response>" for b in bodies)
                        + "\nassistant\n", st.sampled_from(["user", "tool"]),
                        st.lists(st.sampled_from(["42", '{"ok": true}', "a\nb", "", "user\nx"]), min_size=1, max_size=3))
_ROUND = st.one_of(
    _TOOL_ROUND,
    _TOOL_ROUND.map(lambda r: r[1:]),  # no newline before the role: verl's stripped <|im_end|>
    st.just("user\nplease try again\nassistant\n"),  # an interaction round
    st.just(" user\nnot a round\nassistant\n"),
    st.just("user\nfeedback cut by response_length"),
    st.just("user\n<tool_response>\na tool round cut by response_length"),
    st.just("<|im_end|>\n<|im_start|>user\n<tool_response>\n1\n</tool_response><|im_end|>\n<|im_start|>assistant\n"),
)
_PIECE = st.one_of(TURNS, st.sampled_from(["", "user", "assistant\n", "\x00", "tool\n"]))


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.tuples(_PIECE, st.lists(_ROUND, max_size=2)), min_size=1, max_size=4))
def test_verl_split_matches_split_turns(parts):
    """`split_completions(..., fast="verl")` cuts exactly where the reference splitter of the
    verl dialect does, on texts with tool rounds, interaction rounds, cut rounds, ChatML left in."""
    from diagnose.transcripts import Dialect, split_turns
    from diagnose.turn_batch import split_completions

    texts = ["".join(p + "".join(rounds) for p, rounds in parts[:k]) for k in range(1, len(parts) + 1)] + [None]
    calls: list[str] = []

    def reference_split(t):
        calls.append(t)
        return split_turns(t, Dialect.VERL)

    got = split_completions(pl.Series(texts, dtype=pl.String), reference_split, fast="verl")
    for row, text in enumerate(texts):
        turns = got.filter(pl.col("row") == row).get_column("turn").to_list()
        assert turns == split_turns(text, Dialect.VERL), repr(text)


def test_verl_split_fast_path_is_taken():
    """Texts with tool rounds only never reach the reference splitter (the fast path is real)."""
    from diagnose.turn_batch import split_completions

    rnd = "user\n<tool_response>\n{\"r\": 1}\n</tool_response>\nassistant\n"
    texts = pl.Series([f"<tool_call>\n{{}}\n</tool_call>{rnd}done", "plain answer", f"a{rnd}b{rnd}"])
    got = split_completions(texts, lambda t: pytest.fail(f"reference split called on {t!r}"), fast="verl")
    assert got.get_column("turn").to_list() == ["<tool_call>\n{}\n</tool_call>", "done", "plain answer", "a", "b", ""]
