"""Exit 0 when this checkout is installed (editable) with every requirement of the given extras.

    python scripts/installed.py dev            # the test tools
    python scripts/installed.py train,dashboard --why

Used by scripts/setup.sh to skip pip (and its ~100 lines of "already satisfied") when nothing is
missing. Requirements are read from pyproject.toml, not from the installed metadata, so a
dependency added to pyproject.toml since the last install is noticed. ``--why`` prints what is
missing.
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import shutil
import sys
import tomllib
from pathlib import Path

try:
    from packaging.requirements import Requirement
except ImportError:  # a bare Python: pip's own copy
    from pip._vendor.packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent


def requirements(project: dict, extras: list[str], seen: set[str] | None = None) -> list[Requirement]:
    """The base dependencies and those of ``extras``, self-references (``pkg[model]``) expanded."""
    seen = set() if seen is None else seen
    name = project["name"]
    out = [Requirement(r) for r in project.get("dependencies", [])] if not seen else []
    for extra in extras:
        if extra in seen:
            continue
        seen.add(extra)
        for line in project.get("optional-dependencies", {}).get(extra, []):
            req = Requirement(line)
            if req.name == name:
                out += requirements(project, sorted(req.extras), seen)
            else:
                out.append(req)
    return out


def missing(extras: list[str]) -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    spec = importlib.util.find_spec("diagnose")
    where = Path(spec.origin).resolve().parent.parent if spec and spec.origin else None
    out = [] if where == ROOT else [f"{project['name']} (editable, from {ROOT})"]
    out += [f"the {cmd} command" for cmd in project.get("scripts", {}) if shutil.which(cmd) is None]
    for req in requirements(project, extras):
        if req.marker is not None and not req.marker.evaluate():
            continue
        try:
            version = md.version(req.name)
        except md.PackageNotFoundError:
            out.append(str(req))
            continue
        if not req.specifier.contains(version, prereleases=True):
            out.append(f"{req} (installed: {version})")
    return out


def main() -> None:
    extras = [e for e in sys.argv[1].split(",") if e] if len(sys.argv) > 1 else []
    gaps = missing(extras)
    if "--why" in sys.argv:
        print(", ".join(gaps) or "nothing")
    sys.exit(1 if gaps else 0)


if __name__ == "__main__":
    main()
