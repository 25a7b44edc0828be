import json
import math

from diagnose.jsonl import iter_jsonl, read_jsonl


def test_good_bad_and_blank_lines(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_bytes(
        b'{"a": 1}\n'
        b"\n"
        b"not json\n"
        b"[1, 2]\n"
        b"\xff\xfe\x00garbage\n"
        b'{"b": NaN}\n'
        b'{"c": "trunc'
    )
    good, errors = read_jsonl(p)
    assert [ln for ln, _ in good] == [1, 6]
    assert math.isnan(good[1][1]["b"])
    by_line = {e.line: e.message for e in errors}
    assert set(by_line) == {3, 4, 5, 7}
    assert "invalid JSON" in by_line[3]
    assert "expected a JSON object" in by_line[4]
    assert "UTF-8" in by_line[5]
    assert "truncated" in by_line[7]
    assert all(str(p) in str(e) for e in errors)


def test_missing_file_is_one_error(tmp_path):
    items = list(iter_jsonl(tmp_path / "nope.jsonl"))
    assert len(items) == 1 and items[0][1].line == 0 and "cannot open" in items[0][1].message


def test_oversized_line_is_skipped_and_rest_kept(tmp_path):
    p = tmp_path / "big.jsonl"
    p.write_text(json.dumps({"x": "y" * 5000}) + "\n" + '{"ok": true}\n')
    items = list(iter_jsonl(p, max_line_bytes=1000))
    assert "longer than" in items[0][1].message
    assert items[1] == (2, {"ok": True})


def test_deeply_nested_json_is_an_error_not_a_crash(tmp_path):
    p = tmp_path / "deep.jsonl"
    p.write_text("[" * 100000 + "]" * 100000 + "\n" + '{"ok": 1}\n')
    good, errors = read_jsonl(p)
    assert good == [(2, {"ok": 1})] and len(errors) == 1
