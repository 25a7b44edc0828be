"""`diagnose dashboard` on a fresh or headless machine: never Streamlit's first-run email prompt,
a browser only where one can be opened, the URL and the `ssh -L` line printed."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from diagnose.dashboard_launch import can_open_browser, startup_lines, streamlit_command


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fresh_home_closed_stdin_serves_health_within_30s(tmp_path: Path) -> None:
    """A new user's machine: HOME without ~/.streamlit, stdin not a terminal, an SSH session
    without a display. The health endpoint must answer (the email prompt would block forever)."""
    home, root = tmp_path / "home", tmp_path / "runs"
    home.mkdir()
    root.mkdir()
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STREAMLIT_", "DISPLAY", "WAYLAND"))}
    env.update(HOME=str(home), SSH_CONNECTION="10.0.0.2 50000 10.0.0.1 22", XDG_CONFIG_HOME=str(home / ".config"))
    exe = shutil.which("diagnose")
    cli = [exe] if exe else [sys.executable, "-m", "diagnose.cli"]
    proc = subprocess.Popen([*cli, "dashboard", str(root), "--port", str(port)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)
    try:
        deadline, ok = time.monotonic() + 30, False
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                    ok = r.status == 200 and r.read().strip() == b"ok"
                    break
            except OSError:
                time.sleep(0.3)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        out = proc.communicate(timeout=10)[0].decode(errors="replace")
    assert ok, f"no health answer within 30 s; output:\n{out}"
    assert "Email" not in out, out
    assert f"http://127.0.0.1:{port}" in out
    assert f"ssh -L {port}:127.0.0.1:{port} " in out
    assert not (home / ".streamlit").exists(), "nothing is written into the user's home"


def test_browser_only_where_one_can_be_opened() -> None:
    assert not can_open_browser({"SSH_CONNECTION": "a 1 b 22", "DISPLAY": ":0"}, "linux")
    assert not can_open_browser({"SSH_TTY": "/dev/pts/1"}, "darwin")
    assert not can_open_browser({}, "linux")
    assert can_open_browser({"DISPLAY": ":0"}, "linux")
    assert can_open_browser({"WAYLAND_DISPLAY": "wayland-0"}, "linux")
    assert can_open_browser({}, "darwin") and can_open_browser({}, "win32")


def test_command_never_prompts_and_headless_without_display(tmp_path: Path) -> None:
    for env in ({}, {"DISPLAY": ":0"}, {"SSH_TTY": "x"}):
        cmd = streamlit_command(tmp_path, env=env)
        assert cmd[cmd.index("--server.showEmailPrompt") + 1] == "false"
        assert cmd[cmd.index("--browser.gatherUsageStats") + 1] == "false"
    ssh = streamlit_command(tmp_path, env={"SSH_CONNECTION": "a 1 b 22", "DISPLAY": ":0"})
    assert ssh[ssh.index("--server.headless") + 1] == "true"
    asked_not = streamlit_command(tmp_path, open_browser=False, env={"DISPLAY": ":0"})
    assert asked_not[asked_not.index("--server.headless") + 1] == "true"


def test_startup_lines_name_the_url_and_the_port_forward(tmp_path: Path) -> None:
    remote = startup_lines("127.0.0.1", 8600, tmp_path, open_browser=True, env={"SSH_CONNECTION": "a 1 b 22"})
    assert "http://127.0.0.1:8600" in remote[0]
    assert "SSH session" in remote[1] and "ssh -L 8600:127.0.0.1:8600 " in remote[1]
    local = startup_lines("127.0.0.1", 8600, tmp_path, open_browser=True, env={"DISPLAY": ":0"})
    if sys.platform.startswith("linux"):
        assert len(local) == 1
