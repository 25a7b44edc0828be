"""diagnose.atomic: temp file + fsync + os.replace writers."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from diagnose.atomic import (
    atomic_dir,
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    is_temp_name,
    temp_path_for,
)

TMP_RE = re.compile(r"^\.(?P<name>.+)\.[0-9a-f]+\.tmp$")


def test_write_bytes_text_creates_parents_and_replaces(tmp_path: Path) -> None:
    p = tmp_path / "a" / "b" / "f.bin"
    assert atomic_write_bytes(p, b"one") == p
    assert p.read_bytes() == b"one"
    atomic_write_bytes(p, b"two")
    assert p.read_bytes() == b"two"
    atomic_write_text(p, "héllo\n")
    assert p.read_text(encoding="utf-8") == "héllo\n"
    assert sorted(x.name for x in p.parent.iterdir()) == ["f.bin"]  # no temp files left


def test_write_json_strict_and_converts(tmp_path: Path) -> None:
    import enum

    import numpy as np

    class Color(enum.Enum):
        RED = "red"

    p = tmp_path / "x.json"
    atomic_write_json(p, {"a": 1, "nan": math.nan, "inf": [math.inf, -math.inf], "np": np.float32(0.5),
                          "arr": np.arange(3), "path": Path("/x/y"), "color": Color.RED, "s": {3}})
    text = p.read_text()
    assert text.endswith("\n")
    obj = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert obj == {"a": 1, "nan": "nan", "inf": ["inf", "-inf"], "np": 0.5, "arr": [0, 1, 2],
                   "path": "/x/y", "color": "red", "s": [3]}


def test_atomic_path_success_names_and_replace(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "t.parquet"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent
        m = TMP_RE.match(tmp.name)
        assert m and m.group("name") == "t.parquet"
        assert is_temp_name(tmp.name)
        assert not target.exists()
        tmp.write_bytes(b"data")
    assert target.read_bytes() == b"data"
    assert not tmp.exists()


def test_atomic_path_failure_keeps_old_and_removes_temp(tmp_path: Path) -> None:
    target = tmp_path / "t.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(target) as tmp:
            tmp.write_text("half-written")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["t.txt"]


def test_atomic_path_body_must_create_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="did not create"):
        with atomic_path(tmp_path / "never.txt"):
            pass
    assert list(tmp_path.iterdir()) == []


def test_temp_names_are_unique_and_hidden(tmp_path: Path) -> None:
    names = {temp_path_for(tmp_path / "f").name for _ in range(50)}
    assert len(names) == 50
    assert all(n.startswith(".f.") and n.endswith(".tmp") for n in names)
    assert not is_temp_name("step-000001.parquet")


def test_atomic_dir(tmp_path: Path) -> None:
    target = tmp_path / "ckpt" / "step-000001"
    with atomic_dir(target) as tmp:
        assert not target.exists()
        (tmp / "a.txt").write_text("1")
    assert (target / "a.txt").read_text() == "1"
    with pytest.raises(FileExistsError):
        with atomic_dir(target):
            pass
    with atomic_dir(target, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    with pytest.raises(ValueError):
        with atomic_dir(target, overwrite=True) as tmp:
            (tmp / "c.txt").write_text("3")
            raise ValueError("fail")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["step-000001"]
