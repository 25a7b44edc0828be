#!/usr/bin/env bash
# Install the project (editable) with its test extras, pinned CPU torch first so that no
# multi-GB CUDA build is pulled in. Idempotent: re-running only checks what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install -q --disable-pip-version-check --root-user-action=ignore "$@"; }
"$PY" -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' 2>/dev/null \
  || pip_install "torch==2.13.0"
pip_install -e ".[dev]"
