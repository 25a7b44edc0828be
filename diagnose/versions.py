"""The versions a run or a result file records (what produced it), written once."""

from __future__ import annotations

import platform
from importlib import metadata

__all__ = ["versions"]


def _dist_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    """Python and the packages whose versions change results (None: not installed)."""
    from diagnose import __version__ as package_version

    return {
        "python": platform.python_version(),
        "torch": _dist_version("torch"),
        "transformers": _dist_version("transformers"),
        "polars": _dist_version("polars"),
        "numpy": _dist_version("numpy"),
        "pyarrow": _dist_version("pyarrow"),
        "package": package_version,
    }
