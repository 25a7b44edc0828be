import json

from typer.testing import CliRunner

from diagnose.cli import app

runner = CliRunner()

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def conv(cid, *assistant_turns, tools=TOOLS):
    msgs = [{"role": "system", "content": "You help."}, {"role": "user", "content": "Weather in Paris?"}]
    for t in assistant_turns:
        msgs.append({"role": "assistant", "content": t})
        msgs.append({"role": "tool", "content": '{"temp": 21}'})
    return json.dumps({"id": cid, "messages": msgs[:-1], "tools": tools})


def write(tmp_path, lines):
    p = tmp_path / "conv.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_formats_json_counts_states(tmp_path):
    p = write(tmp_path, [
        conv("a", CALL, "It is 21 degrees in Paris."),
        conv("b", "<tool_call>"),                      # the real collapse signature
        conv("c", "", CALL + " done<|im_end|>"),
        json.dumps({"id": "d", "messages": [{"role": "assistant", "content": None,
                    "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]}]}),
    ])
    res = runner.invoke(app, ["formats", str(p), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["conversations"] == 4 and out["assistant_turns"] == 6
    assert out["states"]["healthy_call"] == 2          # a's call and d's structured call
    assert out["states"]["healthy_response"] == 1
    assert out["states"]["collapsed"] == 2             # bare <tool_call>, empty turn
    assert out["states"]["polluted"] == 1
    assert out["errors"]["open_tag_only"] == 1
    assert out["errors"]["empty_turn"] == 1
    assert sum(out["states"].values()) == out["assistant_turns"]


def test_bad_lines_reported_with_line_numbers_and_skipped(tmp_path):
    p = write(tmp_path, [conv("a", CALL), "{not json", '{"messages": "nope"}', conv("b", "hi there")])
    res = runner.invoke(app, ["formats", str(p), "--json"])
    assert res.exit_code == 0
    assert f"{p}:2" in res.stderr and f"{p}:3" in res.stderr
    out = json.loads(res.stdout)
    assert out["conversations"] == 2 and out["skipped_lines"] == 2


def test_nothing_readable_is_nonzero(tmp_path):
    p = tmp_path / "junk.jsonl"
    p.write_bytes(b"\x00\x01\x02\xff\n{{{\n")
    res = runner.invoke(app, ["formats", str(p)])
    assert res.exit_code == 1
    assert "no readable conversation" in res.stderr
    assert "Traceback" not in res.output


def test_missing_file_is_clear(tmp_path):
    res = runner.invoke(app, ["formats", str(tmp_path / "missing.jsonl")])
    assert res.exit_code == 2 and "no such file" in res.stderr


def test_table_output(tmp_path):
    p = write(tmp_path, [conv("a", CALL, "Sunny.")])
    res = runner.invoke(app, ["formats", str(p)])
    assert res.exit_code == 0
    for state in ("healthy_call", "healthy_response", "polluted", "collapsed"):
        assert state in res.stdout


def test_error_lines_are_not_wrapped_however_long_the_path(tmp_path):
    """Error lines name the file; a terminal-width wrap would split the path and the message."""
    deep = tmp_path / ("a_rather_long_directory_name_" * 4) / "nested"
    deep.mkdir(parents=True)
    p = deep / "junk.jsonl"
    p.write_bytes(b"\xff\xfe\n{{{\n")
    res = runner.invoke(app, ["formats", str(p)])
    assert res.exit_code == 1
    assert f"{p}: no readable conversation (2 bad lines)" in res.stderr.splitlines()[-1]
    assert any(line.startswith(f"skipped {p}:1: ") for line in res.stderr.splitlines())
