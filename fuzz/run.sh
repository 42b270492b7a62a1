#!/usr/bin/env bash
# Fuzzes the safetensors parser (csrc/io/safetensors.cpp) and the NF4 checkpoint reader run on what it accepts
# (csrc/io/nf4_tensors.cpp) with libFuzzer, ASan and UBSan.
#
#   bash fuzz/run.sh                           # build, check the committed files, fuzz for 60 s
#   LORAFUSE_FUZZ_SECONDS=600 bash fuzz/run.sh  # fuzz longer
#   PY=/path/to/python bash fuzz/run.sh        # torch from that interpreter (default: the project venv)
#
# 1. Builds build/fuzz/safetensors_fuzzer (fuzz/CMakeLists.txt: clang++, ccache, ninja).
# 2. Runs every file of fuzz/regressions once (each must be rejected with a c10::Error carrying the message
#    that fuzz/make_corpus.py lists for it) and every seed of fuzz/corpus (each must be accepted).
#    crash_* regressions are inputs that once crashed the fuzzer; each runs alone, so one still open does
#    not hide the others.
# 3. Fuzzes from fuzz/corpus for LORAFUSE_FUZZ_SECONDS (default 60) into a temporary corpus, so the
#    committed one never changes.
# Exits non-zero on any finding. Crashing inputs go to build/fuzz/artifacts/ (replay one with
# build/fuzz/safetensors_fuzzer FILE); commit a new one as fuzz/regressions/crash_<kind>.safetensors, listed
# in fuzz/make_corpus.py, which regenerates fuzz/corpus and fuzz/regressions.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PY:-${LORAFUSE_PYTHON:-$HOME/.cache/lorafuse/venv/bin/python}}"
BUILD="$ROOT/build/fuzz"
FUZZER="$BUILD/safetensors_fuzzer"
FUZZ_SECONDS="${LORAFUSE_FUZZ_SECONDS:-60}"
export CCACHE_DIR="${CCACHE_DIR:-$HOME/.cache/lorafuse/ccache}"  # the project's cache (scripts/env.sh)
# libtorch is uninstrumented, so ASan only sees it through malloc/free; it has needed no suppressions.
# UBSan reports must stop the run (they are also compiled not to recover) with a stack to read.
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"

start=$SECONDS
# Configure once, and again when the interpreter changes (torch's paths come from it).
if [ ! -f "$BUILD/build.ninja" ] || ! grep -qxF "Python_EXECUTABLE:FILEPATH=$PY" "$BUILD/CMakeCache.txt"; then
  cmake -S "$ROOT/fuzz" -B "$BUILD" -G Ninja -DCMAKE_CXX_COMPILER="${LORAFUSE_FUZZ_CXX:-clang++}" \
    -DPython_EXECUTABLE:FILEPATH="$PY" >/dev/null
fi
cmake --build "$BUILD"
echo "fuzz: built in $((SECONDS - start)) s"

mkdir -p "$BUILD/artifacts" "$BUILD/logs"
status=0
# What each file did, checked by make_corpus.py --check. No -max_len here: files are read whole.
run_files() {
  local log="$1"
  shift
  if ! LORAFUSE_FUZZ_PRINT_ERRORS=1 "$FUZZER" -artifact_prefix="$BUILD/artifacts/" "$@" >"$log" 2>&1; then
    grep -a -E "ERROR|SUMMARY|^safetensors_fuzzer:|Test unit written" "$log" | head -20 >&2 || true
    echo "fuzz: the fuzzer crashed on $* (log: $log)" >&2
    return 1
  fi
  "$PY" "$ROOT/fuzz/make_corpus.py" --check "$log"
}

plain=()
crashes=()
for f in "$ROOT"/fuzz/regressions/*; do
  case "$(basename "$f")" in
    crash_*) crashes+=("$f") ;;
    *) plain+=("$f") ;;
  esac
done
run_files "$BUILD/logs/regressions.log" "${plain[@]}" "$ROOT"/fuzz/corpus/* || status=1
for f in "${crashes[@]}"; do
  run_files "$BUILD/logs/$(basename "$f").log" "$f" || status=1
done

# Fuzz: new inputs go to a temporary folder (the first corpus argument); fuzz/corpus is only read.
grown="$(mktemp -d "$BUILD/corpus.XXXXXX")"
trap 'rm -rf "$grown"' EXIT
echo "fuzz: fuzzing for ${FUZZ_SECONDS} s (log: $BUILD/logs/fuzz.log)"
if ! "$FUZZER" -max_total_time="$FUZZ_SECONDS" -max_len=4096 -timeout=10 -rss_limit_mb=4096 \
  -dict="$ROOT/fuzz/safetensors.dict" -artifact_prefix="$BUILD/artifacts/" -print_final_stats=1 \
  "$grown" "$ROOT/fuzz/corpus" >"$BUILD/logs/fuzz.log" 2>&1; then
  grep -a -E "ERROR|SUMMARY|^safetensors_fuzzer:|Test unit written|==[0-9]+==" "$BUILD/logs/fuzz.log" | head -40 >&2 || true
  echo "fuzz: FOUND A BUG (inputs in $BUILD/artifacts/, log: $BUILD/logs/fuzz.log)" >&2
  status=1
fi
grep -a -E "INITED|DONE|stat::number_of_executed_units|stat::average_exec_per_sec|stat::peak_rss_mb" \
  "$BUILD/logs/fuzz.log" | sed 's/^/fuzz: /' || true
echo "fuzz: $([ "$status" = 0 ] && echo "nothing found" || echo "FAILED") in $((SECONDS - start)) s"
exit "$status"
