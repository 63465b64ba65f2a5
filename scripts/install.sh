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
export PIP_DISABLE_PIP_VERSION_CHECK=1
step() { echo "install [$1/3] $2" >&2; }
step 1 "pip itself, in $VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
step 2 "torch 2.14.1 + torchvision 0.29.1 (about 5 GB unpacked: this step takes about a minute, silently)"
"$VENV/bin/python" -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
step 3 "fallwatch with its extras edge, cloud, web, dev (transformers, apprise, paho-mqtt, fastapi, pytest ...: about 20 s)"
"$VENV/bin/python" -m pip install --quiet -e ".[edge,cloud,web,dev]"
echo "installed into $VENV: try 'make demo'" >&2
