"""`diagnose dashboard`: start the Streamlit dashboard (``dashboards/app.py``) on a runs root.

The dashboard code lives in the ``dashboards`` package, which imports ``diagnose`` (never the
other way round): this module only finds the app script on disk and runs
``python -m streamlit run <app.py> --server.address 127.0.0.1 ...`` with the runs root in
``$DIAGNOSE_RUNS_ROOT``. See docs/dashboard.md.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT_ENV = "DIAGNOSE_RUNS_ROOT"  # read by dashboards/data.py
DEFAULT_ADDRESS = "127.0.0.1"
DEFAULT_PORT = 8501


class LaunchError(RuntimeError):
    """The dashboard cannot be started (message for the user)."""


def app_path() -> Path:
    """``dashboards/app.py``: next to the ``diagnose`` package (source checkout, editable or
    regular install), located without importing ``dashboards``."""
    here = Path(__file__).resolve().parent.parent / "dashboards" / "app.py"
    if here.is_file():
        return here
    spec = importlib.util.find_spec("dashboards")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            p = Path(loc) / "app.py"
            if p.is_file():
                return p
    raise LaunchError("dashboards/app.py not found: install the package from a source checkout (pip install -e .)")


def is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def streamlit_command(root: Path, *, address: str = DEFAULT_ADDRESS, port: int = DEFAULT_PORT,
                      open_browser: bool = True, python: str | None = None) -> list[str]:
    """The ``streamlit run`` command line of the dashboard."""
    return [
        python or sys.executable, "-m", "streamlit", "run", str(app_path()),
        "--server.address", address,
        "--server.port", str(port),
        "--server.headless", "false" if open_browser else "true",
        "--browser.gatherUsageStats", "false",
        "--server.fileWatcherType", "none",
        "--server.runOnSave", "false",
        "--client.toolbarMode", "minimal",
        "--", str(root),
    ]


def check_ready(root: Path) -> Path:
    """The resolved runs root; raises `LaunchError` when it is no directory or streamlit is
    missing."""
    root = root.expanduser().resolve()
    if not root.is_dir():
        raise LaunchError(f"{root}: no such directory (the runs root holds run directories)")
    if importlib.util.find_spec("streamlit") is None:
        raise LaunchError("streamlit is not installed: pip install -e . (it is a dependency of this package)")
    return root


def launch(root: Path, *, address: str = DEFAULT_ADDRESS, port: int = DEFAULT_PORT, open_browser: bool = True,
           exec_fn=os.execve) -> None:
    """Replace this process with the dashboard server (``exec_fn`` is swapped in tests)."""
    root = check_ready(root)
    cmd = streamlit_command(root, address=address, port=port, open_browser=open_browser)
    env = {**os.environ, ROOT_ENV: str(root)}
    exec_fn(cmd[0], cmd, env)


def describe(cmd: Sequence[str]) -> str:
    return " ".join(cmd)
