#!/usr/bin/env bash
# Every test of lorafuse: installs what is needed, builds through pip/CMake, then runs the C++ tests
# (Catch2, through ctest) and the Python tests (pytest). CUDA cases run where a GPU is present and skip
# cleanly elsewhere. Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
lorafuse_install
cd "$LORAFUSE_ROOT"
echo "lorafuse: C++ tests (ctest)"
ctest --test-dir "$LORAFUSE_BUILD_DIR" --output-on-failure -j "$MAX_JOBS"
echo "lorafuse: Python tests (pytest)"
# The C++ programs that Python tests drive (lorafuse_llama_adapters) are built above: missing is a failure.
export LORAFUSE_REQUIRE_CPP_TOOLS=1
"$PY" -m pytest tests/python -q -ra "$@"
