#!/usr/bin/env bash
# Every test of lorafuse: installs what is needed, builds through pip/CMake, then runs the C++ tests
# (Catch2, through ctest), a bounded libFuzzer run of the safetensors parser and NF4 checkpoint reader (fuzz/run.sh;
# LORAFUSE_FUZZ_SECONDS, default 60) and the Python tests (pytest). CUDA cases run where a GPU is present and skip
# cleanly elsewhere. Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
lorafuse_install
cd "$LORAFUSE_ROOT"
echo "lorafuse: C++ tests (ctest)"
# ctest splits a test name at ";" (a CMake list), so such a case would never run: refuse the name instead.
if "$LORAFUSE_BUILD_DIR/tests/cpp/lorafuse_tests" --list-test-names-only | grep -n ";"; then
  echo "lorafuse: the C++ test names above contain ';', which ctest cannot run; use ',' instead" >&2
  exit 1
fi
ctest --test-dir "$LORAFUSE_BUILD_DIR" --output-on-failure -j "$MAX_JOBS"
echo "lorafuse: fuzzing the safetensors parser (libFuzzer, ${LORAFUSE_FUZZ_SECONDS:-60} s)"
PY="$PY" bash fuzz/run.sh
echo "lorafuse: Python tests (pytest)"
# The C++ programs that Python tests drive (lorafuse_llama_adapters) are built above: missing is a failure.
export LORAFUSE_REQUIRE_CPP_TOOLS=1
# The real pretrained model is installed above (scripts/env.sh) unless LORAFUSE_PYTHON names an interpreter used as
# it is: then its tests skip, saying why, where the wheel is absent.
if [ -z "${LORAFUSE_PYTHON:-}" ]; then export LORAFUSE_REQUIRE_SMOLLM2=1; fi
"$PY" -m pytest tests/python -q -ra "$@"
