#!/usr/bin/env bash
# Installs mllm into the active Python environment (create one first: python3 -m venv .venv).
# torch comes first and is pinned to the CPU wheel where no CUDA GPU is present: an unpinned torch
# resolves to a multi-GB CUDA build. With a GPU it takes the CUDA build and the `gpu` extra is
# attempted (flash-attn; SDPA is the fallback when it does not build).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}
"$PY" -m pip install -q --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "install.sh: CUDA GPU found: installing a CUDA build of torch"
  "$PY" -m pip install -q "torch>=2.4"
  "$PY" -m pip install -q -e ".[dev,serve]"
  "$PY" -m pip install -q -e ".[gpu]" || echo "install.sh: flash-attn did not build; SDPA will be used"
else
  echo "install.sh: no CUDA GPU: installing the CPU wheel torch==2.13.0"
  "$PY" -m pip install -q "torch==2.13.0"
  "$PY" -m pip install -q -e ".[dev,serve]"
fi
"$PY" -c "import torch, transformers, deepspeed, mllm; print('install.sh: torch', torch.__version__, '| transformers', transformers.__version__, '| deepspeed', deepspeed.__version__)"
