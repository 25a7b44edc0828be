"""`diagnose dashboard`: start the Streamlit dashboard (``dashboards/app.py``) on a runs root.

The dashboard code lives in the ``dashboards`` package, which imports ``diagnose`` (never the
other way round): this module only finds the app script on disk and runs
``python -m streamlit run <app.py> --server.address 127.0.0.1 ...`` with the runs root in
``$DIAGNOSE_RUNS_ROOT``. See docs/dashboard.md.

Why the flags: on a fresh machine (no ``~/.streamlit``) a non-headless Streamlit asks for an
email on the terminal and never serves when stdin is not one; on a headless SSH box, where most
RL runs live, it also tries to open a browser. So the prompt is always off (by flag, nothing is
written into the user's home) and a browser is asked for only where one can be opened.
"""

from __future__ import annotations

import importlib.util
import getpass
import ipaddress
import os
import socket
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from diagnose.cli_errors import extra_hint
from diagnose.regular_file import kind_of

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


def is_remote_session(env: Mapping[str, str] | None = None) -> bool:
    """True inside an SSH session (``SSH_CONNECTION`` / ``SSH_TTY`` / ``SSH_CLIENT`` set)."""
    env = os.environ if env is None else env
    return any(env.get(k) for k in ("SSH_CONNECTION", "SSH_TTY", "SSH_CLIENT"))


def can_open_browser(env: Mapping[str, str] | None = None, platform: str | None = None) -> bool:
    """Whether a browser window can appear where the user sits: never over SSH; on macOS and
    Windows yes; elsewhere (Linux, BSD) only with a ``DISPLAY`` or ``WAYLAND_DISPLAY``."""
    env = os.environ if env is None else env
    platform = sys.platform if platform is None else platform
    if is_remote_session(env):
        return False
    if platform == "darwin" or platform.startswith("win"):
        return True
    return bool(env.get("DISPLAY") or env.get("WAYLAND_DISPLAY"))


def url_for(address: str, port: int) -> str:
    host = "127.0.0.1" if address in ("", "0.0.0.0", "::") else address
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def ssh_forward_line(port: int, env: Mapping[str, str] | None = None) -> str:
    """The command to run on the user's own machine to reach a dashboard served on this one."""
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name known (containers): a placeholder
        user = "USER"
    return f"ssh -L {port}:127.0.0.1:{port} {user}@{socket.gethostname() or 'HOST'}"


def startup_lines(address: str, port: int, root: Path, *, open_browser: bool,
                  env: Mapping[str, str] | None = None) -> list[str]:
    """What ``diagnose dashboard`` prints before serving: the URL, and on a remote or headless
    machine the port-forward line to run on the user's own machine."""
    lines = [f"dashboard on {url_for(address, port)} (runs root {root}); Ctrl+C stops it"]
    if not can_open_browser(env):
        where = "this is an SSH session" if is_remote_session(env) else "no display here"
        lines.append(f"{where}: from your own machine run  {ssh_forward_line(port, env)}  "
                     f"then open http://127.0.0.1:{port}")
    elif not open_browser:
        lines.append("open the URL in a browser (--no-browser)")
    return lines


def streamlit_command(root: Path, *, address: str = DEFAULT_ADDRESS, port: int = DEFAULT_PORT,
                      open_browser: bool = True, python: str | None = None,
                      env: Mapping[str, str] | None = None) -> list[str]:
    """The ``streamlit run`` command line of the dashboard: never the first-run email prompt,
    a browser only when asked for and `can_open_browser`."""
    headless = not (open_browser and can_open_browser(env))
    return [
        python or sys.executable, "-m", "streamlit", "run", str(app_path()),
        "--server.address", address,
        "--server.port", str(port),
        "--server.headless", "true" if headless else "false",
        "--server.showEmailPrompt", "false",
        "--browser.gatherUsageStats", "false",
        "--server.fileWatcherType", "none",
        "--server.runOnSave", "false",
        "--client.toolbarMode", "minimal",
        "--", str(root),
    ]


def check_ready(root: Path) -> Path:
    """The resolved runs root; raises `LaunchError` when it is no directory or streamlit is
    missing."""
    try:
        root = root.expanduser().resolve()
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop (Python < 3.13)
        raise LaunchError(f"{root}: cannot be resolved ({e})") from None
    if not root.is_dir():  # what it is instead: a file, a pipe, a socket, a device, nothing
        try:
            what = f"{kind_of(root.stat().st_mode) or 'a file'}, not a directory"
        except OSError:
            what = "no such directory"
        raise LaunchError(f"{root}: {what} (the runs root holds run directories)")
    if importlib.util.find_spec("streamlit") is None:
        raise LaunchError(f"diagnose dashboard needs the [dashboard] extra (streamlit is not installed): "
                          f"{extra_hint('dashboard')}")
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
