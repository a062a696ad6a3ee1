#!/usr/bin/env bash
# Create .venv with everything fxprune, its tests, examples and benchmarks need.
# torch first, pinned: on these machines torch 2.14.1 + torchvision 0.29.1 install from local disk,
# while an unpinned torch could pull a multi-GB CUDA build from the registry.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
"$VENV/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
"$VENV/bin/python" -m pip install -q -e ".[test,examples,vision,hf,timm,lightning,plot,bench,compressed]"
echo "setup done: $("$VENV/bin/python" -c 'import torch, fxprune; print("torch", torch.__version__, "fxprune", fxprune.__version__)')"
