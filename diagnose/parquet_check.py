"""The cheap check of a parquet file before it is read: footer, column-chunk bounds, schema.

A file cut short by a killed writer (or corrupted on disk) fails here from its footer alone,
without reading its data, so a reader skips it with a message naming why instead of failing on
the first query. Any footer error counts, including a panic of polars' Rust reader.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from diagnose.error_line import error_line

__all__ = ["ParquetFooter", "check_parquet"]


@dataclass(frozen=True)
class ParquetFooter:
    """What the footer of a sound file says: its ``schema``, ``num_rows``, and for each column
    asked for, its ``(min, max)`` over the row groups' statistics (absent when none has any)."""

    schema: pl.Schema
    num_rows: int
    ranges: dict[str, tuple[Any, Any]]


def check_parquet(path: Path, *, size: int | None = None,
                  ranges: Sequence[str] = ()) -> tuple[ParquetFooter | None, str | None]:
    """``(footer, None)`` for a file whose footer reads and whose column chunks all lie inside
    the file (``size``: its size if known, else it is stat'ed), or ``(None, why)``.
    ``ranges``: columns whose min/max to take from the row-group statistics."""
    import pyarrow.parquet as pq

    try:
        size = path.stat().st_size if size is None else size
        md = pq.read_metadata(path)
        # the schema from the footer already read: a second read of every footer doubles the
        # cost of opening a run of many step files
        schema = pl.from_arrow(md.schema.to_arrow_schema().empty_table()).schema
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - any footer error (incl. a Rust panic) means unreadable
        return None, f"unreadable parquet file (truncated or corrupt): {error_line(e)}"
    try:
        index = {md.schema.column(j).path: j for j in range(md.num_columns)}
        wanted = {name: index[name] for name in ranges if name in index}
        lo: dict[str, Any] = {}
        hi: dict[str, Any] = {}
        for r in range(md.num_row_groups):
            rg = md.row_group(r)
            for j in range(rg.num_columns):
                cc = rg.column(j)
                start = cc.dictionary_page_offset if cc.has_dictionary_page else cc.data_page_offset
                if start is not None and start + cc.total_compressed_size > size:
                    return None, "column data extends past the end of the file (truncated)"
            for name, j in wanted.items():
                stats = rg.column(j).statistics if rg.num_rows else None
                if stats is not None and stats.has_min_max:
                    lo[name] = stats.min if name not in lo else min(lo[name], stats.min)
                    hi[name] = stats.max if name not in hi else max(hi[name], stats.max)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001
        return None, f"corrupt parquet metadata: {error_line(e)}"
    return ParquetFooter(schema, md.num_rows, {name: (lo[name], hi[name]) for name in lo}), None
