#!/usr/bin/env bash
# Create .venv and install fallwatch with every extra, offline-friendly.
# torch/torchvision are pinned to the build that lies on this disk (CPU-capable);
# installing them first stops pip from ever pulling a different CUDA wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
"$VENV/bin/python" -m pip install --quiet -e ".[edge,cloud,web,dev]"
echo "installed into $VENV"
