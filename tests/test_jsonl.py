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


LINES = [b'{"a": 1}', b'{"a": NaN, "b": Infinity}', b'\xef\xbb\xbf{"bom": 1}', b'{"n": 123456789012345678901234}',
         b'{"n": -9223372036854775809}', b'{"n": 18446744073709551615}', b'{"x": 1e400}', b'{"s": "\\ud800"}',
         b'{"a": 1, "a": 2}', b'[1, 2]', b'"str"', b'{"deep": ' + b"[" * 1500 + b"]" * 1500 + b"}", b'{"t": "\x01"}',
         b'\xff\xfe{"bin": 1}', b'{"cut": ', b'  ', b'{"u": "\xc3\xa9\xf0\x9f\x99\x82"}', b'{"f": 0.1, "g": -0.0, "h": 5e-324}']


def test_fast_parse_reads_every_line_as_json_does(tmp_path, monkeypatch):
    """orjson (the fast path) and json (the reference) give the same objects and errors."""
    import diagnose.jsonl as jl
    from hypothesis import given, settings, strategies as st

    @settings(max_examples=60, deadline=None, database=None)
    @given(st.lists(st.sampled_from(LINES) | st.binary(max_size=12), min_size=1, max_size=10), st.booleans())
    def one(lines, bom_first):
        p = tmp_path / "x.jsonl"
        body = b"\n".join(lines)
        p.write_bytes((b"\xef\xbb\xbf" if bom_first else b"") + body)
        fast = [(n, repr(o)) for n, o in jl.iter_jsonl(p)]
        monkeypatch.setattr(jl, "orjson", None)
        ref = [(n, repr(o)) for n, o in jl.iter_jsonl(p)]
        monkeypatch.undo()
        assert fast == ref

    one()
