#!/usr/bin/env bash
# Builds benchmarks/.venv-llmc: llm-compressor 0.6.0.1 (the newest release that
# accepts torch 2.14.1) in a venv of its own, because it pins transformers 4.52
# and numpy<2 while the main venv has transformers 5 and numpy 2.
# The quality and scale benchmarks run llm-compressor through this venv's
# python and exchange models with the main venv as Hugging Face folders.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="$here/.venv-llmc"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -c /etc/xdg/pip/constraints.txt -c "$here/llmc-constraints.txt" \
    torch==2.14.1 llmcompressor==0.6.0.1
"$venv/bin/python" - <<'PY'
import torch, transformers, llmcompressor, numpy
assert torch.__version__.startswith("2.14.1"), torch.__version__
print("torch", torch.__version__, "transformers", transformers.__version__,
      "llmcompressor", llmcompressor.__version__, "numpy", numpy.__version__)
PY
