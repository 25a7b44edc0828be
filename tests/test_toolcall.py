"""The tool-call engine: rendering matches Qwen2.5 byte for byte, parsing round-trips every
syntax, and parse_calls is total and linear (it runs on raw RL rollouts)."""

from __future__ import annotations

import json
import keyword
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diagnose.chat import CHAT_TEMPLATE, render_chat, render_tools_block
from diagnose.toolcall import (
    CallBlock,
    CallSyntax,
    ParsedTurn,
    ToolCall,
    parse_calls,
    render_calls,
    render_tools_instructions,
)

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    },
    {"type": "function", "function": {"name": "get_time", "description": "Heure à Zürich", "parameters": {}}},
]

PARIS = ToolCall("get_weather", {"city": "Paris"})
HEALTHY = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def key(call: ToolCall) -> str:
    """Type-exact comparison (ToolCall equality treats 1 == True == 1.0)."""
    return json.dumps(call.to_dict(), sort_keys=True)


# --------------------------------------------------------------------------- ToolCall


def test_toolcall_dict_roundtrip_and_hash():
    assert PARIS.to_dict() == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert ToolCall.from_dict(PARIS.to_dict()) == PARIS
    assert hash(ToolCall("f", {"a": 1})) == hash(ToolCall("f", {"a": 1}))
    assert len({ToolCall("f", {"a": 1}), ToolCall("f", {"a": 1}), ToolCall("f", {"a": 2})}) == 2


@pytest.mark.parametrize(
    "data",
    [
        {"name": "f", "arguments": {"a": 1}},
        {"name": "f", "arguments": '{"a": 1}'},  # OpenAI: arguments as a JSON string
        {"name": "f", "parameters": {"a": 1}},
        {"id": "call_0", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}},
    ],
)
def test_from_dict_accepts_common_shapes(data):
    assert ToolCall.from_dict(data) == ToolCall("f", {"a": 1})


def test_from_dict_empty_string_arguments_mean_none():
    assert ToolCall.from_dict({"name": "f", "arguments": ""}) == ToolCall("f", {})


@pytest.mark.parametrize(
    "data",
    [{}, {"name": ""}, {"name": 3, "arguments": {}}, {"name": "f"}, {"name": "f", "arguments": [1]},
     {"name": "f", "arguments": "{oops"}, "not a dict"],
)
def test_from_dict_rejects(data):
    with pytest.raises(ValueError):
        ToolCall.from_dict(data)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- rendering


def test_render_hermes_exact():
    calls = [PARIS, ToolCall("get_time", {})]
    assert render_calls(calls) == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    )
    assert render_calls([]) == ""


def test_render_hermes_matches_chat_renderer_and_jinja_template():
    calls = [ToolCall("get_weather", {"city": "Zürich", "q": 'a"b\\c', "n": [1, 2.5, None, True]}), PARIS]
    msgs = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": c.to_dict()} for c in calls]},
    ]
    expected = f"<|im_start|>assistant\n{render_calls(calls)}<|im_end|>\n"
    assert render_chat(msgs).endswith(expected)
    compile_template = pytest.importorskip("transformers.utils.chat_template_utils")._compile_jinja_template
    rendered = compile_template(CHAT_TEMPLATE).render(messages=msgs, tools=None, add_generation_prompt=False)
    assert rendered.endswith(expected)


def test_render_pythonic_and_json():
    calls = [ToolCall("f", {"a": 1, "b": "x"}), ToolCall("g", {})]
    assert render_calls(calls, CallSyntax.PYTHONIC) == '[f(a=1, b="x"), g()]'
    assert render_calls(calls, CallSyntax.JSON) == '[{"name": "f", "arguments": {"a": 1, "b": "x"}}, {"name": "g", "arguments": {}}]'
    lits = ToolCall("f", {"t": True, "n": None, "l": [1, {"k": False}], "s": 'q"\\é\n'})
    assert render_calls([lits], "pythonic") == '[f(t=True, n=None, l=[1, {"k": False}], s="q\\"\\\\é\\n")]'


@pytest.mark.parametrize(
    "call,syntax",
    [
        (ToolCall("f", {"a": float("nan")}), CallSyntax.HERMES),
        (ToolCall("f", {"a": {1, 2}}), CallSyntax.JSON),
        (ToolCall("f", {"class": 1}), CallSyntax.PYTHONIC),  # keyword argument name
        (ToolCall("my-tool", {}), CallSyntax.PYTHONIC),  # not a python name
    ],
)
def test_render_rejects_unrepresentable(call, syntax):
    with pytest.raises(ValueError):
        render_calls([call], syntax)


def test_tools_instructions():
    assert render_tools_instructions(TOOLS, CallSyntax.HERMES) == render_tools_block(TOOLS)
    for syntax, marker in [(CallSyntax.PYTHONIC, "[func_name1(param1=value1, param2=value2), func_name2(param=value)]"),
                           (CallSyntax.JSON, '[{"name": <function-name>, "arguments": <args-json-object>}')]:
        text = render_tools_instructions(TOOLS, syntax)
        assert text.startswith("\n\n# Tools")
        assert "<tools>\n" + json.dumps(TOOLS[0], ensure_ascii=False) in text
        assert "Heure à Zürich" in text
        assert marker in text
        assert "<tool_call>" not in text


# --------------------------------------------------------------------------- parsing: HERMES


def test_parse_hermes_healthy():
    p = parse_calls(HEALTHY)
    assert isinstance(p, ParsedTurn)
    assert p.calls == (PARIS,)
    assert p.content == ""
    (b,) = p.blocks
    assert (b.start, b.end, b.closed, b.error) == (0, len(HEALTHY), True, None)
    assert b.raw.strip() == '{"name": "get_weather", "arguments": {"city": "Paris"}}'


def test_parse_hermes_content_split():
    text = f"Let me check.\n{HEALTHY}\nThe weather is sunny."
    p = parse_calls(text)
    assert p.content_before == "Let me check."
    assert p.content_after == "The weather is sunny."
    assert p.content == "Let me check.\n\nThe weather is sunny."


@pytest.mark.parametrize(
    "text,errors,closed",
    [
        ("<tool_call>", ["open_tag_only"], [False]),
        ("<tool_call>\n", ["open_tag_only"], [False]),
        ("<tool_call>\n</tool_call>", ["empty_call"], [True]),
        ('<tool_call>\n{"na', ["invalid_json"], [False]),
        ('<tool_call>\n{"name": "f", "arguments": {}}', ["unclosed_tag"], [False]),
        ('<tool_call>{"arguments": {}}</tool_call>', ["missing_name"], [True]),
        ('<tool_call>[{"name": "f", "arguments": {}}]</tool_call>', ["missing_name"], [True]),
        ('<tool_call>{"name": "f"}</tool_call>', ["bad_arguments"], [True]),
        ('<tool_call>{"name": "f", "arguments": [1]}</tool_call>', ["bad_arguments"], [True]),
        ('<tool_call>{"name": "f", "arguments": {"x": NaN}}</tool_call>', ["invalid_json"], [True]),
        ("<tool_call><tool_call>", ["nested_tag", "open_tag_only"], [False, False]),
        (f"<tool_call>\n{HEALTHY}", ["nested_tag", None], [False, True]),
    ],
)
def test_parse_hermes_block_errors(text, errors, closed):
    p = parse_calls(text)
    assert [b.error for b in p.blocks] == errors
    assert [b.closed for b in p.blocks] == closed


def test_unclosed_valid_body_still_yields_the_call():
    p = parse_calls('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n')
    assert p.calls == (PARIS,)
    assert p.blocks[0].error == "unclosed_tag"


def test_stray_close():
    p = parse_calls("Done.</tool_call>")
    assert p.stray_closes == (5,)
    assert p.blocks == ()
    assert p.content == "Done."


@pytest.mark.parametrize(
    "body,note",
    [
        ('{"name": "f", "arguments": "{\\"a\\": 1}"}', "arguments_string"),
        ('{"name": "f", "parameters": {"a": 1}}', "parameters_alias"),
        ('{"function": {"name": "f", "arguments": {"a": 1}}}', "function_wrapper"),
    ],
)
def test_lenient_bodies_are_calls_with_notes(body, note):
    p = parse_calls(f"<tool_call>\n{body}\n</tool_call>")
    assert p.calls == (ToolCall("f", {"a": 1}),)
    assert p.blocks[0].error is None
    assert note in p.blocks[0].notes


# --------------------------------------------------------------------------- parsing: lists


@pytest.mark.parametrize(
    "text",
    ['[get_weather(city="Paris")]', ' [get_weather(city="Paris")]\n', '```python\n[get_weather(city="Paris")]\n```',
     "[get_weather(city='Paris'),]", 'get_weather(city="Paris")'],
)
def test_parse_pythonic_ok(text):
    p = parse_calls(text, CallSyntax.PYTHONIC)
    assert p.calls == (PARIS,)
    assert p.content == ""
    assert all(b.error is None for b in p.blocks)


def test_parse_pythonic_spans_and_dotted_names():
    text = 'Sure: [a.b.f(x=1), g(y=(1, 2), z="日本")] ok'
    p = parse_calls(text, CallSyntax.PYTHONIC)
    assert [c.name for c in p.calls] == ["a.b.f", "g"]
    assert p.calls[1].arguments == {"y": [1, 2], "z": "日本"}
    assert "tuple_as_list" in p.blocks[1].notes
    assert [text[b.start : b.end] for b in p.blocks] == ["a.b.f(x=1)", 'g(y=(1, 2), z="日本")']
    assert (p.content_before, p.content_after) == ("Sure:", "ok")


@pytest.mark.parametrize(
    "text,errors",
    [
        ("[", ["open_tag_only"]),
        ("[]", ["empty_call"]),
        ("[get_wea", ["invalid_syntax"]),
        ('[f(a=1) g(b=2)]', ["invalid_syntax"]),
        ("[f(1)]", ["bad_arguments"]),
        ("[f(a=x)]", ["bad_arguments"]),
        ("[f(a=1, a=2)]", ["bad_arguments"]),
        ("[f(**kw)]", ["bad_arguments"]),
        ("[f(a={1, 2})]", ["bad_arguments"]),
        ("[f(a=1), 3, g()[0](b=1)]", [None, "missing_name", "missing_name"]),
        ("[__import__('os').system(cmd='ls')]", ["missing_name"]),
    ],
)
def test_parse_pythonic_errors(text, errors):
    assert [b.error for b in parse_calls(text, CallSyntax.PYTHONIC).blocks] == errors


@pytest.mark.parametrize("text", ["Note(this) is fine.", "A list [1, 2] of numbers.", "print(x)", "hello"])
def test_pythonic_prose_is_not_a_call(text):
    p = parse_calls(text, CallSyntax.PYTHONIC)
    assert p.blocks == ()
    assert p.content == text.strip()


@pytest.mark.parametrize(
    "text",
    ['[{"name": "get_weather", "arguments": {"city": "Paris"}}]', '{"name": "get_weather", "arguments": {"city": "Paris"}}',
     '```json\n[{"name": "get_weather", "arguments": {"city": "Paris"}}]\n```', '  {"name": "get_weather", "parameters": {"city": "Paris"}}  '],
)
def test_parse_json_ok(text):
    p = parse_calls(text, CallSyntax.JSON)
    assert p.calls == (PARIS,)
    assert p.content == ""


@pytest.mark.parametrize(
    "text,errors",
    [
        ("[", ["open_tag_only"]),
        ("{", ["open_tag_only"]),
        ("[]", ["empty_call"]),
        ('[{"name": "f"', ["invalid_json"]),
        ('[{"name": "f", "arguments": {}},]', ["invalid_json"]),
        ('[{"name": "f", "arguments": {}}, 1]', [None, "missing_name"]),
        ('{"name": "f", "arguments": 1}', ["bad_arguments"]),
    ],
)
def test_parse_json_errors(text, errors):
    assert [b.error for b in parse_calls(text, CallSyntax.JSON).blocks] == errors


def test_json_spans():
    text = 'Here: [{"name": "f", "arguments": {}}, {"name": "g", "arguments": {"a": 1}}] done'
    p = parse_calls(text, CallSyntax.JSON)
    assert [text[b.start : b.end] for b in p.blocks] == ['{"name": "f", "arguments": {}}', '{"name": "g", "arguments": {"a": 1}}']
    assert p.content == "Here:  done"


# --------------------------------------------------------------------------- round trips

NAMES = st.builds(
    lambda a, b: a + b, st.sampled_from("abcdefghijklmnopqrstuvwxyz_"),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_", max_size=12),
).filter(lambda s: not keyword.iskeyword(s))  # [a-z_][a-z0-9_]*
SCALARS = (
    st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=20)
    | st.sampled_from(['"', "\\", '\\"', "'", "é日本🙂", "\n\t\x00", "</b>", "{\"a\": [1]}"])
)
VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
CALLS = st.lists(st.builds(ToolCall, NAMES, st.dictionaries(NAMES, VALUES, max_size=4)), min_size=1, max_size=4)


@SETTINGS
@given(calls=CALLS, syntax=st.sampled_from(list(CallSyntax)))
def test_render_parse_roundtrip(calls, syntax):
    text = render_calls(calls, syntax)
    p = parse_calls(text, syntax)
    assert [key(c) for c in p.calls] == [key(c) for c in calls]
    assert all(b.error is None and b.closed for b in p.blocks)
    assert p.content == ""


@SETTINGS
@given(calls=CALLS, pre=st.sampled_from(["", "Let me check.\n", "I'll call two tools: "]))
def test_hermes_roundtrip_with_preamble(calls, pre):
    p = parse_calls(pre + render_calls(calls))
    assert [key(c) for c in p.calls] == [key(c) for c in calls]
    assert p.content == pre.strip()


# --------------------------------------------------------------------------- totality

FRAGMENTS = ["<tool_call>", "</tool_call>", '{"name": "f"', '"arguments": {}}', "<|im_end|>", "\n", "text",
             "<tool_response>", "[f(a=1)]", ", ", "]", "```json", '"', "\\", "(", "{"]


def check_parsed(p: ParsedTurn, text: str) -> None:
    assert p.text == text
    for b in p.blocks:
        assert isinstance(b, CallBlock)
        assert 0 <= b.start <= b.end <= len(text)
        assert (b.call is None) != (b.error is None) or b.error in ("unclosed_tag", "nested_tag")
    assert len(p.calls) == sum(b.call is not None for b in p.blocks)


@SETTINGS
@given(text=st.text(), syntax=st.sampled_from(list(CallSyntax)))
def test_parse_never_raises_on_text(text, syntax):
    check_parsed(parse_calls(text, syntax), text)


@SETTINGS
@given(data=st.binary(max_size=300), errors=st.sampled_from(["surrogateescape", "replace"]),
       syntax=st.sampled_from(list(CallSyntax)))
def test_parse_never_raises_on_binary(data, errors, syntax):
    text = data.decode("utf-8", errors)
    check_parsed(parse_calls(text, syntax), text)


@SETTINGS
@given(parts=st.lists(st.sampled_from(FRAGMENTS), max_size=25), syntax=st.sampled_from(list(CallSyntax)))
def test_parse_never_raises_on_fragments(parts, syntax):
    text = "".join(parts)
    check_parsed(parse_calls(text, syntax), text)


@pytest.mark.parametrize("syntax", list(CallSyntax))
@pytest.mark.parametrize(
    "text",
    ["\ud800", "<tool_call>\udcff</tool_call>", "[f(a='\udc80')]", "\x00[f(a=1)]\x00", "[f(a=" + "9" * 5000 + ")]",
     '<tool_call>{"name": "f", "arguments": {"a": ' + "9" * 5000 + "}}</tool_call>", '[{"name": "f", "arguments": {"a": 1e999}}]'],
)
def test_parse_edge_strings(text, syntax):
    check_parsed(parse_calls(text, syntax), text)


MB = 1_000_000
BIG = {
    "letters": "a" * MB,
    "open_tags": "<tool_call>" * (MB // 11),
    "close_tags": "</tool_call>" * (MB // 12),
    "calls": (HEALTHY + "\n") * (MB // (len(HEALTHY) + 1)),
    "deep_json": "<tool_call>" + "[" * MB,
    "deep_obj": "<tool_call>" + '{"a":' * (MB // 5),
    "py_repeat": "[" + 'get_weather(city="Paris"), ' * (MB // 28) + "]",
    "py_deep": "[f(a=" * (MB // 5),
    "brackets": "[" * MB,
    "escaped_quotes": '[f(a="' + '\\"' * (MB // 2),
    "json_list": "[" + '{"name": "f", "arguments": {}}, ' * (MB // 32) + "1]",
    "whitespace": " " * MB,
    "control": "<|im_end|>" * (MB // 10),
}


@pytest.mark.parametrize("name", sorted(BIG))
def test_one_megabyte_is_fast(name):
    text = BIG[name]
    for syntax in CallSyntax:
        t = time.perf_counter()
        parse_calls(text, syntax)
        assert time.perf_counter() - t < 5.0, (name, syntax)  # typically well under 1 s
