"""Turn states and the error taxonomy: one hand-written case per state and per error type
(real-looking Qwen2.5 outputs), the precedence rules of docs/turn-states.md, and totality."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diagnose.toolcall import CallSyntax, ToolCall, render_calls
from diagnose.turns import FormatError, TurnClassification, TurnState, classify_turn

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}},
    {"name": "get_time"},  # bare form
]
E = FormatError
S = TurnState

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
CALL2 = '<tool_call>\n{"name": "get_time", "arguments": {"tz": "CET"}}\n</tool_call>'
PARIS = ToolCall("get_weather", {"city": "Paris"})


def check(text, state, errors=(), tools=TOOLS, syntax=CallSyntax.HERMES) -> TurnClassification:
    c = classify_turn(text, tools, syntax)
    assert (c.state, c.errors) == (state, tuple(errors)), text
    return c


def test_enum_values():
    assert [s.value for s in TurnState] == ["healthy_call", "healthy_response", "polluted", "collapsed"]
    assert "open_tag_only" in {e.value for e in FormatError}


# --------------------------------------------------------------------------- healthy


@pytest.mark.parametrize(
    "text",
    [
        CALL,
        CALL + "\n",
        f"{CALL}\n{CALL2}",
        f"I'll check the weather first.\n{CALL}",  # a preamble before the calls is fine
        CALL + "<|im_end|>",  # one trailing terminator ends the turn
        CALL + "<|im_end|>\n<|endoftext|>",
    ],
)
def test_healthy_call(text):
    c = check(text, S.HEALTHY_CALL)
    assert c.calls[0] == PARIS


@pytest.mark.parametrize("text", ["The weather in Paris is 18°C and sunny.", "42", "東京は晴れです。", "Done.<|im_end|>"])
def test_healthy_response(text):
    c = check(text, S.HEALTHY_RESPONSE)
    assert c.calls == ()


def test_lenient_call_is_healthy_but_noted():
    c = check('<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}\n</tool_call>', S.HEALTHY_CALL)
    assert c.calls == (PARIS,)
    assert c.lenient == ("arguments_string",)


def test_tools_none_skips_unknown_tool_check():
    check('<tool_call>\n{"name": "anything", "arguments": {}}\n</tool_call>', S.HEALTHY_CALL, tools=None)


# --------------------------------------------------------------------------- collapsed


@pytest.mark.parametrize(
    "text,errors",
    [
        ("", [E.EMPTY_TURN]),
        ("  \n\t", [E.EMPTY_TURN]),
        ("<|im_end|>", [E.EMPTY_TURN]),
        ("...", [E.EMPTY_TURN]),
        ("<tool_call>", [E.OPEN_TAG_ONLY]),  # THE Qwen2.5-1.5B collapse signature
        ("<tool_call>\n", [E.OPEN_TAG_ONLY]),
        ("<tool_call>\n<|im_end|>", [E.OPEN_TAG_ONLY]),
        ('<tool_call>\n{"na', [E.UNCLOSED_TAG, E.INVALID_JSON]),
        ("<tool_call>\n</tool_call>", [E.EMPTY_CALL]),
        ("<tool_call><tool_call>", [E.OPEN_TAG_ONLY, E.NESTED_TAG]),
        ("</tool_call>", [E.CLOSE_WITHOUT_OPEN]),
        ("<|im_start|>assistant\n", [E.STRAY_CONTROL_TOKEN]),
        ("<|im_end|><|im_end|>", [E.STRAY_CONTROL_TOKEN]),
        ('<tool_call>\n{"arguments": {}}\n</tool_call>', [E.MISSING_NAME]),
    ],
)
def test_collapsed(text, errors):
    c = check(text, S.COLLAPSED, errors)
    assert c.calls == ()


# --------------------------------------------------------------------------- polluted: one per error


@pytest.mark.parametrize(
    "text,errors",
    [
        # usable call + error
        ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n', [E.UNCLOSED_TAG]),
        (f"<tool_call>\n{CALL}", [E.NESTED_TAG]),
        (f"{CALL}</tool_call>", [E.CLOSE_WITHOUT_OPEN]),
        (f"{CALL}\n<tool_call>\n</tool_call>", [E.EMPTY_CALL]),
        (f"{CALL}\n<tool_call>\n{{'name': 'get_time'}}\n</tool_call>", [E.INVALID_JSON]),
        (f'{CALL}\n<tool_call>\n{{"name": "", "arguments": {{}}}}\n</tool_call>', [E.MISSING_NAME]),
        (f'{CALL}\n<tool_call>\n{{"name": "get_time"}}\n</tool_call>', [E.BAD_ARGUMENTS]),
        (f'{CALL}\n<tool_call>\n{{"name": "get_time", "arguments": ["CET"]}}\n</tool_call>', [E.BAD_ARGUMENTS]),
        ('<tool_call>\n{"name": "search_web", "arguments": {"q": "x"}}\n</tool_call>', [E.UNKNOWN_TOOL]),
        (f"{CALL}\n{CALL}", [E.REPEATED_CALL]),
        (f"{CALL}\nThe weather is sunny.", [E.TEXT_AFTER_CALL]),
        (f"{CALL}\nLet me also check the time.\n{CALL2}", [E.TEXT_AFTER_CALL]),
        (f'{CALL}\n<tool_response>\n{{"temp": 18}}\n</tool_response>', [E.INVENTED_TOOL_OUTPUT]),
        (f"{CALL}<|im_end|>\n<|im_start|>user\n", [E.STRAY_CONTROL_TOKEN]),
        (f"{CALL}\n<|endoftext|><|endoftext|>", [E.STRAY_CONTROL_TOKEN]),
        # text + error
        ("Let me check.<tool_call>", [E.OPEN_TAG_ONLY]),
        ("The answer is 4.</tool_call>", [E.CLOSE_WITHOUT_OPEN]),
        ("It is sunny.<|im_end|>\n<|im_start|>user\nthanks", [E.STRAY_CONTROL_TOKEN]),
        ("<tool_response>\n{\"temp\": 18}\n</tool_response>\nIt is 18 degrees.", [E.INVENTED_TOOL_OUTPUT]),
        ('{"name": "get_weather", "arguments": {"city": "Paris"}}', [E.WRONG_SYNTAX]),  # tags dropped
        ('[get_weather(city="Paris")]', [E.WRONG_SYNTAX]),
    ],
)
def test_polluted_per_error(text, errors):
    check(text, S.POLLUTED, errors)


def test_brief_example_polluted():
    text = ('Sure!<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call> '
            'The weather is sunny.<tool_response>\n{"temp": 18}\n</tool_response>')
    c = check(text, S.POLLUTED, [E.TEXT_AFTER_CALL, E.INVENTED_TOOL_OUTPUT])
    assert c.calls == (PARIS,)


def test_errors_are_unique_and_in_taxonomy_order():
    c = classify_turn("<tool_call>\n{bad\n</tool_call><tool_call>\n{bad\n</tool_call></tool_call></tool_call>")
    assert c.errors == (E.CLOSE_WITHOUT_OPEN, E.INVALID_JSON)
    order = list(FormatError)
    assert sorted(c.errors, key=order.index) == list(c.errors)


# --------------------------------------------------------------------------- precedence


def test_precedence_usable_content_beats_collapse():
    # the same broken call: collapsed alone, polluted once real text or a valid call is present
    check("<tool_call>", S.COLLAPSED, [E.OPEN_TAG_ONLY])
    check("Checking now.\n<tool_call>", S.POLLUTED, [E.OPEN_TAG_ONLY])
    check(f"{CALL}\n<tool_call>", S.POLLUTED, [E.OPEN_TAG_ONLY])


def test_precedence_any_error_breaks_health():
    check(CALL, S.HEALTHY_CALL)
    check(CALL.replace("get_weather", "get_wether"), S.POLLUTED, [E.UNKNOWN_TOOL])
    check("Fine.", S.HEALTHY_RESPONSE)
    check("Fine.<|im_start|>", S.POLLUTED, [E.STRAY_CONTROL_TOKEN])


def test_control_tokens_and_punctuation_are_not_meaningful_text():
    check("<|im_start|><tool_call>", S.COLLAPSED, [E.OPEN_TAG_ONLY, E.STRAY_CONTROL_TOKEN])
    check("}} <tool_call>\n{", S.COLLAPSED, [E.UNCLOSED_TAG, E.INVALID_JSON])
    check("<tool_response></tool_response>", S.COLLAPSED, [E.INVENTED_TOOL_OUTPUT])


def test_calls_reported_in_polluted_turns():
    c = classify_turn(f"{CALL}\nDone!", TOOLS)
    assert c.state is S.POLLUTED and c.calls == (PARIS,)


# --------------------------------------------------------------------------- other syntaxes

PY = CallSyntax.PYTHONIC
JS = CallSyntax.JSON


@pytest.mark.parametrize(
    "text,syntax,state,errors",
    [
        ('[get_weather(city="Paris")]', PY, S.HEALTHY_CALL, []),
        ('[get_weather(city="Paris"), get_time(tz="CET")]', PY, S.HEALTHY_CALL, []),
        ('```python\n[get_weather(city="Paris")]\n```', PY, S.HEALTHY_CALL, []),
        ('get_weather(city="Paris")', PY, S.HEALTHY_CALL, []),
        ("It is sunny in Paris.", PY, S.HEALTHY_RESPONSE, []),
        ("Note(this) is prose.", PY, S.HEALTHY_RESPONSE, []),
        ("[", PY, S.COLLAPSED, [E.OPEN_TAG_ONLY]),
        ("[]", PY, S.COLLAPSED, [E.EMPTY_CALL]),
        ("[get_weather(city=", PY, S.COLLAPSED, [E.UNCLOSED_TAG, E.INVALID_SYNTAX]),
        ("[get_weather(city=Paris)]", PY, S.COLLAPSED, [E.BAD_ARGUMENTS]),
        ('[get_weather("Paris")]', PY, S.COLLAPSED, [E.BAD_ARGUMENTS]),
        ('[search(q="x")]', PY, S.POLLUTED, [E.UNKNOWN_TOOL]),
        ('[get_weather(city="Paris"), get_weather(city="Paris")]', PY, S.POLLUTED, [E.REPEATED_CALL]),
        ('[get_weather(city="Paris")] Done, it is sunny.', PY, S.POLLUTED, [E.TEXT_AFTER_CALL]),
        ('Checking: [get_weather(city="Paris")]', PY, S.HEALTHY_CALL, []),
        (CALL, PY, S.POLLUTED, [E.WRONG_SYNTAX]),
        ('[{"name": "get_weather", "arguments": {"city": "Paris"}}]', PY, S.POLLUTED, [E.WRONG_SYNTAX]),
        ("<tool_call>", PY, S.COLLAPSED, [E.STRAY_CONTROL_TOKEN]),
        ('[{"name": "get_weather", "arguments": {"city": "Paris"}}]', JS, S.HEALTHY_CALL, []),
        ('{"name": "get_weather", "arguments": {"city": "Paris"}}', JS, S.HEALTHY_CALL, []),
        ("It is sunny in Paris.", JS, S.HEALTHY_RESPONSE, []),
        ("{", JS, S.COLLAPSED, [E.OPEN_TAG_ONLY]),
        ('[{"name": "get_weather", "arguments": {"ci', JS, S.COLLAPSED, [E.UNCLOSED_TAG, E.INVALID_JSON]),
        ('{"name": "get_weather"}', JS, S.COLLAPSED, [E.BAD_ARGUMENTS]),
        ('[get_weather(city="Paris")]', JS, S.POLLUTED, [E.WRONG_SYNTAX]),
        ('{"name": "get_weather", "arguments": {"city": "Paris"}}<|im_start|>', JS, S.POLLUTED, [E.STRAY_CONTROL_TOKEN]),
    ],
)
def test_other_syntaxes(text, syntax, state, errors):
    check(text, state, errors, syntax=syntax)


@pytest.mark.parametrize("syntax", list(CallSyntax))
def test_rendered_gold_is_healthy_in_every_syntax(syntax):
    calls = [PARIS, ToolCall("get_time", {"tz": "CET"})]
    c = check(render_calls(calls, syntax), S.HEALTHY_CALL, syntax=syntax)
    assert c.calls == tuple(calls)


def test_syntax_accepts_plain_strings():
    assert classify_turn('[get_weather(city="Paris")]', None, "pythonic").state is S.HEALTHY_CALL


# --------------------------------------------------------------------------- docs


def test_every_state_and_error_is_documented():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "turn-states.md").read_text()
    for value in [*TurnState, *FormatError]:
        assert f"`{value.value}`" in doc, value


# --------------------------------------------------------------------------- totality

FRAGMENTS = ["<tool_call>", "</tool_call>", '{"name": "f"', '"arguments": {}}', "<|im_end|>", "\n", "text",
             "<tool_response>", "[f(a=1)]"]
SYNTAXES = st.sampled_from(list(CallSyntax))
TOOL_LISTS = st.sampled_from([None, [], TOOLS, [{"name": "f"}], [{"weird": 1}, "not a dict"]])


def check_classification(c: TurnClassification) -> None:
    assert isinstance(c.state, TurnState)
    assert all(isinstance(e, FormatError) for e in c.errors)
    assert len(set(c.errors)) == len(c.errors)
    healthy = c.state in (S.HEALTHY_CALL, S.HEALTHY_RESPONSE)
    assert healthy == (not c.errors)
    if c.state is S.HEALTHY_CALL:
        assert c.calls
    if c.state in (S.HEALTHY_RESPONSE, S.COLLAPSED):
        assert not c.calls


@SETTINGS
@given(text=st.text(), syntax=SYNTAXES, tools=TOOL_LISTS)
def test_classify_never_raises_on_text(text, syntax, tools):
    check_classification(classify_turn(text, tools, syntax))  # type: ignore[arg-type]


@SETTINGS
@given(data=st.binary(max_size=300), errors=st.sampled_from(["surrogateescape", "replace"]), syntax=SYNTAXES)
def test_classify_never_raises_on_binary(data, errors, syntax):
    check_classification(classify_turn(data.decode("utf-8", errors), TOOLS, syntax))


@SETTINGS
@given(parts=st.lists(st.sampled_from(FRAGMENTS), max_size=25), syntax=SYNTAXES, tools=TOOL_LISTS)
def test_classify_never_raises_on_fragments(parts, syntax, tools):
    check_classification(classify_turn("".join(parts), tools, syntax))  # type: ignore[arg-type]


def test_classify_non_str_inputs():
    assert classify_turn(None).state is S.COLLAPSED  # type: ignore[arg-type]
    assert classify_turn(CALL.encode()).state is S.HEALTHY_CALL  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "text",
    [
        "<tool_call>" * 90_000,
        (CALL + "\n") * 12_000,
        "x" * 1_000_000,
        "<tool_call>\n" + '{"a": [' * 150_000,
        "Sure! " * 170_000 + "<tool_call>",
        '[get_weather(city="Paris"), ' * 35_000,
        "<|im_end|><tool_response>" * 40_000,
    ],
    ids=["open_tags", "calls", "letters", "deep", "text_then_open", "py_unclosed", "control"],
)
def test_one_megabyte_turn_is_fast(text):
    assert len(text) >= 900_000
    for syntax in CallSyntax:
        t = time.perf_counter()
        check_classification(classify_turn(text, TOOLS, syntax))
        assert time.perf_counter() - t < 5.0, syntax  # typically well under 1 s


# ---- reasoning blocks and other families' terminators ------------------------------------------

F_CALL = '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>'


@pytest.mark.parametrize("text, state", [
    ("<think>\nI should call f.\n</think>\n\n" + F_CALL, TurnState.HEALTHY_CALL),
    ("<think>\n\n</think>\n\n<tool_call>", TurnState.COLLAPSED),          # empty reasoning, bare tag
    ("<think>\nlet me think about <tool_call> tags\n</think>\n\nDone: 42.", TurnState.HEALTHY_RESPONSE),
    ("<think>\nreasoning cut at the length limit", TurnState.COLLAPSED),     # never closed: no output
    ("<think>\n</think>\n\n", TurnState.COLLAPSED),
])
def test_qwen3_reasoning_is_set_aside(text, state):
    """Qwen3 turns open with a <think> block (added, non-special tokens: kept by
    skip_special_tokens); the format is that of the text after </think>, as Qwen3's template reads it."""
    assert classify_turn(text).state == state


@pytest.mark.parametrize("end", ["<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"])
def test_llama3_terminators_end_the_turn(end):
    """A decoder keeping special tokens leaves Llama 3.1's turn end on the turn, like <|im_end|>."""
    assert classify_turn(F_CALL + end).state == TurnState.HEALTHY_CALL
    assert classify_turn("The balance is 12." + end).state == TurnState.HEALTHY_RESPONSE
