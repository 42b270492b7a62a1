#!/usr/bin/env bash
# The demo: installs what is needed, builds, then runs scripts/demo.py on lorafuse's own C++ Llama: a small
# character-level base model pre-trained on data/corpus, LoRA fine-tuning on two instruction tasks
# (data/product_descriptions.json, data/product_features.json) with progress bars and loss curves, adapters
# saved, reloaded, switched, disabled and merged, and a summary. On a GPU when one is present (and lorafuse
# has its CUDA kernels), else on the CPU (about three minutes on two cores). Arguments go to demo.py
# (--device, --out DIR, default demo_out/, --quick, --help).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
lorafuse_install
cd "$LORAFUSE_ROOT"
"$PY" scripts/demo.py "$@"
