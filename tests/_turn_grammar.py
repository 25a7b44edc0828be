"""Generated assistant turns for checking `diagnose.turn_batch.classify_turns` against
`diagnose.turns.classify_turn`: what a tool-use policy writes in four call dialects, healthy and
broken in every way the `FormatError` taxonomy names.

Dialects (how the *model* writes its calls; the classifier's syntax is chosen separately):

* ``hermes``: Qwen2.5 / Hermes ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``;
* ``qwen35_xml``: Qwen3.5/3.6 ``<tool_call>\\n<function=f>\\n<parameter=a>\\nv\\n</parameter>\\n</function>\\n</tool_call>``
  (``qwen3_5_think.jinja``, `diagnose.control_families`);
* ``llama31``: Llama 3.1 JSON calls ``{"name": ..., "parameters": {...}}`` ending in
  ``<|eot_id|>``, and ``<|python_tag|>`` built-in calls ending in ``<|eom_id|>``;
* ``mistral``: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}]</s>``.

Each turn mixes a dialect's calls with prose, reasoning, control tokens, tag errors, broken JSON
and numbers, whitespace Python and Rust disagree on, and cuts; `turn_batch` draws many at once
from a seeded `random.Random` (the hypothesis tests draw the seeds).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable

DIALECTS = ("hermes", "qwen35_xml", "llama31", "mistral")
TOOLS = ("get_weather", "find_account", "transfer", "search")
NAMES = TOOLS + ("lookup", "get_weather ", "\u3000", "f", "brave_search")

WORDS = ("the", "account", "id", "is", "Paris", "42", "done", "I", "will", "call", "tool", "result", "ok",
         "weather", "transfer", "tr-7035", "answer", "sunny", "Let", "me", "check")
UNICODE_WORDS = ("é", "日本", "🙂", "Ω", "٣", "ǅ", "\u0301", "Ⅻ", "²", "\u200b")
PUNCT = ("...", "?!", ".", "-", "*", "#", "~", ":", ";", "'", '"')
SPACES = (" ", "\n", "\t", "\n\n", "\x1c", "\u3000", "\u2028", "\xa0", "\x85", "\x0c", "\u200b")
TERMINATORS = ("<|im_end|>", "<|im_end|>\n", "<|im_end|><|endoftext|>", "<|im_end|>\n<|endoftext|>\n", "<|endoftext|>",
               "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|im_end|>\u3000", "<|im_end|>\x1c", "</s>",
               "<|im_end|><|im_end|>", "<|eot_id|><|endoftext|>")
CONTROL = ("<|im_start|>assistant\n", "<|im_end|>", "<|im_start|>", "<|python_tag|>", "<|fim_prefix|>", "<|eot_id|>",
           "<|", "|>", "<|im_end|>\n<|im_start|>user\n")
TAG_NOISE = ("<tool_call>", "<tool_call>\n", "</tool_call>", "\n</tool_call>", "<TOOL_CALL>", "</Tool_Call>",
             "<tool_response>\n{\"ok\": true}\n</tool_response>", "<tool_response>", "<tool_result>x</tool_result>",
             "<tool_output>", "tool_response", "<think>", "</think>", "[TOOL_CALLS]", "</s>", "<function=f>",
             "</function>", "<parameter=a>")
VALUES: tuple[object, ...] = (0, 1, -1, 1.0, -0.0, 0.0, 2.5, 1e16, True, False, None, "", "x", "Paris", 'q"uote',
                              "back\\slash", "line\nbreak", "é🙂", "<tool_call>", "</tool_call>", "<|im_end|>", [],
                              [1, "a"], {}, {"k": [None, {"z": 1}]}, 2**63, 2**64 + 1)
BODY_BREAKS = ('{"name": "f"', '{"name": "get_weather", "arguments": {"city": "Paris"}', '{"name": 5, "arguments": {}}',
               '{"name": "", "arguments": {}}', '{"name": "  ", "arguments": {}}', '{"arguments": {}}',
               '{"name": "f"}', '{"name": "f", "arguments": []}', '{"name": "f", "arguments": 3}',
               '{"name": "f", "arguments": null}', '{"name": "f", "arguments": "{\\"a\\": 1}"}',
               '{"name": "f", "arguments": ""}', '{"name": "f", "arguments": "nope"}',
               '{"name": "f", "parameters": {"a": 1}}', '{"function": {"name": "f", "arguments": {}}}',
               '{"name": "f", "arguments": {"a": NaN}}', '{"name": "f", "arguments": {"a": 1e999}}',
               '{"name": "f", "arguments": {"a": 123456789012345678901234}}', '{"name": "f", "arguments": {"a": -0}}',
               '{"name": "f", "arguments": {"a": "\\ud800"}}', '{"name": "f", "arguments": {"a": "\x01"}}',
               '{"name": "f", "arguments": {}} extra', '{"name": "f", "arguments": {}}}', '\ufeff{"name": "f", "arguments": {}}',
               '\x0c{"name": "f", "arguments": {}}\x1c', '{"name": "f", "arguments": {"a": 1, "a": 2}}',
               '[{"name": "f", "arguments": {}}]', '"just a string"', "not json at all", "", "   ", "\n",
               '{"name": "f", "arguments": {"a": Infinity}}', "{'name': 'f', 'arguments': {}}",
               '{"name": "\\u3000", "arguments": {}}', '{"name": "f\\u0000", "arguments": {}}')


def _value(rng: random.Random, depth: int = 0) -> object:
    r = rng.random()
    if depth < 2 and r < 0.12:
        return [_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if depth < 2 and r < 0.22:
        return {rng.choice(("a", "b", "city", "id", "é")): _value(rng, depth + 1) for _ in range(rng.randint(0, 3))}
    return rng.choice(VALUES)


def _args(rng: random.Random) -> dict[str, object]:
    return {rng.choice(("city", "name", "amount", "from_id", "query", "a", "b")): _value(rng)
            for _ in range(rng.randint(0, 3))}


def _name(rng: random.Random) -> str:
    return rng.choice(TOOLS) if rng.random() < 0.8 else rng.choice(NAMES)


def _dumps(rng: random.Random, obj: object) -> str:
    """JSON as models write it: json.dumps spacing, compact, indented, or non-ASCII escaped."""
    style = rng.random()
    if style < 0.6:
        return json.dumps(obj, ensure_ascii=False)
    if style < 0.75:
        return json.dumps(obj, separators=(",", ":"))
    if style < 0.85:
        return json.dumps(obj, indent=rng.choice((1, 2)))
    if style < 0.9:
        return "\n" + json.dumps(obj) + "\n \t"
    return json.dumps(obj, ensure_ascii=True)


def _deep(rng: random.Random) -> str:
    d = rng.choice((50, 380, 420, 900, 1100))
    return '{"name": "f", "arguments": {"a": ' + "[" * d + "]" * d + "}}"


def _hermes_call(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.72:
        body = _dumps(rng, {"name": _name(rng), "arguments": _args(rng)})
    elif r < 0.95:
        body = rng.choice(BODY_BREAKS)
    elif r < 0.97:
        body = _deep(rng)
    else:
        body = json.dumps({"arguments": _args(rng), "name": _name(rng)})  # key order
    sep = "\n" if rng.random() < 0.9 else rng.choice(("", " ", "\n\n", "\u3000"))
    return f"<tool_call>{sep}{body}{sep}</tool_call>"


def _xml_call(rng: random.Random) -> str:
    params = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in _args(rng).items())
    call = f"<tool_call>\n<function={_name(rng)}>\n{params}</function>\n</tool_call>"
    return call if rng.random() < 0.9 else call[: rng.randint(0, len(call))]


def _llama_call(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.6:
        return json.dumps({"name": _name(rng), "parameters": _args(rng)})
    if r < 0.8:
        return "<|python_tag|>" + json.dumps({"name": _name(rng), "parameters": _args(rng)})
    if r < 0.9:
        return f'<|python_tag|>brave_search.call(query="{rng.choice(WORDS)}")'
    return json.dumps({"name": _name(rng), "arguments": _args(rng)})


def _mistral_call(rng: random.Random) -> str:
    calls = [{"name": _name(rng), "arguments": _args(rng)} for _ in range(rng.randint(1, 2))]
    text = "[TOOL_CALLS]" + rng.choice(("", " ")) + json.dumps(calls)
    return text if rng.random() < 0.9 else text[: rng.randint(0, len(text))]


def _python_call(rng: random.Random) -> str:
    return rng.choice(("[get_weather(city='Paris')]", "[f(a=1), g(b=\"x\")]", "f(a=1)", "[f(1)]", "[f(a=1",
                       "[f(a=g())]", "[]", "(done)", "see (below)", "[1] cited", "```\nf(a=1)\n```", "```json\n{}\n```"))


def _prose(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.7:
        words = [rng.choice(WORDS) for _ in range(rng.randint(1, 12))]
    elif r < 0.85:
        words = [rng.choice(WORDS + UNICODE_WORDS) for _ in range(rng.randint(1, 6))]
    elif r < 0.93:
        words = [rng.choice(UNICODE_WORDS) for _ in range(rng.randint(1, 3))]
    else:
        words = [rng.choice(PUNCT) for _ in range(rng.randint(1, 3))]
    return rng.choice((" ", " ", " ", "\n", "")).join(words) + rng.choice(("", ".", "", " (ok)", ")", "`", "!"))


def _space(rng: random.Random) -> str:
    return rng.choice(("", "", "", "\n", " ")) if rng.random() < 0.8 else rng.choice(SPACES)


_CALLERS: dict[str, Callable[[random.Random], str]] = {
    "hermes": _hermes_call, "qwen35_xml": _xml_call, "llama31": _llama_call, "mistral": _mistral_call}


def turn(rng: random.Random, dialect: str) -> str:
    """One assistant turn in ``dialect``: mostly clean calls or answers, the rest broken."""
    call = _CALLERS[dialect]
    shape = rng.random()
    if shape < 0.3:  # calls, maybe after a short preamble
        parts = ([_prose(rng) + "\n"] if rng.random() < 0.2 else []) + \
            [call(rng) for _ in range(rng.choice((1, 1, 1, 2, 2, 3)))]
        if rng.random() < 0.15:  # the same call again
            parts.append(parts[-1])
        text = "\n".join(parts)
    elif shape < 0.5:  # a plain answer
        text = _prose(rng)
    else:  # anything: calls of any dialect, prose, noise, control tokens
        pieces: list[str] = []
        for _ in range(rng.randint(1, 5)):
            r = rng.random()
            if r < 0.3:
                pieces.append(call(rng))
            elif r < 0.4:
                pieces.append(rng.choice(list(_CALLERS.values()))(rng))
            elif r < 0.55:
                pieces.append(_prose(rng))
            elif r < 0.7:
                pieces.append(rng.choice(TAG_NOISE))
            elif r < 0.78:
                pieces.append(rng.choice(CONTROL))
            elif r < 0.86:
                pieces.append(_python_call(rng))
            else:
                pieces.append(_space(rng))
        text = _space(rng).join(pieces)
        if rng.random() < 0.15:  # generation cut off anywhere
            text = text[: rng.randint(0, len(text))]
    if rng.random() < 0.12:
        text = ("<think>\n" + _prose(rng) + rng.choice(("\n</think>\n\n", "\n</think>", "", "<tool_call>\n</think>\n"))
                + text)
    if rng.random() < 0.3:
        text = _space(rng) + text + rng.choice(TERMINATORS)
    elif rng.random() < 0.2:
        text = text + _space(rng)
    if rng.random() < 0.01:
        text = rng.choice(("", " ", "\n", "<|im_end|>", "\ud800", "a\udcff b", "<tool_call>\ud83d"))
    return text


def turns(seed: int, dialect: str, n: int) -> list[str]:
    rng = random.Random(f"{dialect}-{seed}")
    return [turn(rng, dialect) for _ in range(n)]


def tool_lists(seed: int, n: int) -> list[tuple[str, ...] | None]:
    """Per-turn tool names (None: no unknown-tool check), as verl's prompts give them."""
    rng = random.Random(seed)
    choices: list[tuple[str, ...] | None] = [None, TOOLS, TOOLS[:2], ("search",), ()]
    return [rng.choice(choices) for _ in range(n)]
