"""Bad input to `diagnose formats` (conversation JSONL). Exit codes (diagnose/cli.py): 0 = ran,
1 = nothing readable, 2 = missing input. Table: docs/reliability.md."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from _bad_input import (  # noqa: F401 - no_hang: the autouse watchdog
    HTML_PAYLOAD,
    Case,
    conv_line,
    garbage,
    good_conversations,
    invoke,
    named_pipe,
    no_hang,
    run_case,
    unix_socket,
)

from diagnose.cli import app


def conv(data: bytes, *extra: str):
    def build(tmp: Path) -> list[str]:
        (tmp / "c.jsonl").write_bytes(data)
        return ["formats", str(tmp / "c.jsonl"), *extra]
    return build


G = good_conversations(4)
CASES = [
    Case("truncated-last-line", conv(G[:-30]), 0, ["c.jsonl:4", "truncated JSON at end of file"]),
    Case("empty-file", conv(b""), 1, ["c.jsonl", "no readable conversation"]),
    Case("only-blank-lines", conv(b"\n\n  \n"), 1, ["c.jsonl", "no readable conversation"]),
    Case("binary-garbage", conv(garbage(3000)), 1, ["c.jsonl:1", "not valid UTF-8"]),
    Case("utf16-file", conv(G.decode().encode("utf-16")), 1, ["c.jsonl:1"]),
    Case("utf8-bom", conv(b"\xef\xbb\xbf" + G), 0, ["4 conversations"]),
    Case("huge-line-over-64MB", conv(G + b'{"x": "' + b"a" * (64 * 1024 * 1024 + 10) + b'"}\n'), 0,
         ["c.jsonl:5", "longer than"]),
    Case("not-an-object", conv(G + b"[1, 2]\n"), 0, ["c.jsonl:5", "JSON object"]),
    Case("messages-missing", conv(G + b'{"id": "x"}\n'), 0, ["c.jsonl:5", "'messages'"]),
    Case("message-not-an-object", conv(G + conv_line(messages=["hi"])), 0, ["c.jsonl:5", "messages[0]"]),
    Case("content-wrong-type", conv(G + conv_line(messages=[{"role": "assistant", "content": ["x"]}])), 0,
         ["c.jsonl:5", "content is list"]),
    Case("role-unknown", conv(G + conv_line(messages=[{"role": "robot", "content": "x"}])), 0,
         ["c.jsonl:5", "'robot'"]),
    Case("tool-calls-not-a-list", conv(G + conv_line(messages=[{"role": "assistant", "tool_calls": "f()"}])), 0,
         ["c.jsonl:5", "tool_calls is malformed"]),
    Case("tool-call-arguments-not-json", conv(G + conv_line(messages=[
        {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}])), 0,
        ["c.jsonl:5", "tool_calls[0] is malformed"]),
    Case("tool-call-name-not-a-string", conv(G + conv_line(messages=[
        {"role": "assistant", "tool_calls": [{"function": {"name": 7, "arguments": {}}}]}])), 0,
        ["c.jsonl:5", "tool_calls is malformed"]),
    Case("tools-wrong-type", conv(G + conv_line(tools="add")), 0, ["c.jsonl:5", "'tools'"]),
    Case("malformed-calls-in-text", conv(conv_line(messages=[
        {"role": "assistant", "content": '<tool_call>\n{"name": "f", "arguments": [}\n</tool_call>'},
        {"role": "assistant", "content": "<tool_call>\n{\"name\": \"f\"<|im_end|>"},
        {"role": "assistant", "content": '<tool_call><tool_call><tool_call>' * 1000}])), 0),
    Case("NaN-in-arguments", conv(b'{"messages": [{"role": "assistant", "content": "<tool_call>\\n{\\"name\\": \\"f\\", '
                                  b'\\"arguments\\": {\\"x\\": NaN}}\\n</tool_call>"}]}\n'), 0),
    Case("missing-file", lambda tmp: ["formats", str(tmp / "none.jsonl")], 2, ["none.jsonl", "no such file"]),
    Case("a-directory", lambda tmp: ((tmp / "d.jsonl").mkdir(), ["formats", str(tmp / "d.jsonl")])[1], 2,
         ["d.jsonl: a directory, not a file", "diagnose scan"], ["no such file"]),
    Case("a-named-pipe", lambda tmp: (named_pipe(tmp / "p.jsonl"), ["formats", str(tmp / "p.jsonl")])[1], 2,
         ["p.jsonl: a named pipe (FIFO), not a regular file"], ["no such file"]),
    Case("a-socket", lambda tmp: (unix_socket(tmp / "s.jsonl"), ["formats", str(tmp / "s.jsonl")])[1], 2,
         ["s.jsonl: a socket, not a regular file"]),
    Case("a-character-device", lambda tmp: ["formats", "/dev/zero"], 2, ["/dev/zero: a character device"]),
    Case("symlink-loop", lambda tmp: (os.symlink(tmp / "l.jsonl", tmp / "l.jsonl"), ["formats", str(tmp / "l.jsonl")])[1],
         2, ["l.jsonl: broken symlink or symlink loop"]),
    Case("markup-in-file-name", lambda tmp: ((tmp / "[red]x.jsonl").write_bytes(garbage(50)),
                                             ["formats", str(tmp / "[red]x.jsonl")])[1], 1, ["[red]x.jsonl"]),
    Case("markup-in-bad-content", conv(G + conv_line(messages=[{"role": HTML_PAYLOAD, "content": "x"}])), 0,
         ["[bold red]markup-9c1e[/bold red]"]),
    Case("json-output-with-bad-lines", conv(G + b"{oops\n", "--json"), 0, ["c.jsonl:5", '"skipped_lines": 1']),
]


@pytest.mark.parametrize("case", [c.param() for c in CASES])
def test_formats_bad_input(case: Case, tmp_path: Path) -> None:
    run_case(app, case, tmp_path)


def test_formats_json_stays_valid_with_model_text(tmp_path: Path) -> None:
    (tmp_path / "c.jsonl").write_bytes(conv_line(messages=[{"role": "assistant", "content": HTML_PAYLOAD}]))
    out = invoke(app, ["formats", str(tmp_path / "c.jsonl"), "--json"])
    assert out.code == 0 and json.loads(out.out)["assistant_turns"] == 1
