#!/usr/bin/env bash
# The demo: installs what is needed, builds, then runs lora_linear on the CPU (and on CUDA when a GPU is
# present) and prints its error against a float64 reference and timings beside the frozen base linear and
# the unfused chain that PEFT runs.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
lorafuse_install
cd "$LORAFUSE_ROOT"
"$PY" scripts/demo_lora_linear.py "$@"
