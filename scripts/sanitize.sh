#!/usr/bin/env bash
# ASan + UBSan build (gcc, RelWithDebInfo, -fno-sanitize-recover: any UB is a failure) of the CPU code and its
# test suite into build-asan, then ctest -LE gpu. Extra arguments go to ctest (e.g. -R Bundle).
#   scripts/sanitize.sh [ctest args...]
# OSCAR_SANITIZE_JOBS (default 2) sets build parallelism; everything runs under nice: the CPU is shared.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BUILD="$ROOT/build-asan"
JOBS="${OSCAR_SANITIZE_JOBS:-2}"
FLAGS="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer"
export CCACHE_BASEDIR="$ROOT"
cmake -S "$ROOT" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_C_COMPILER=gcc -DCMAKE_CXX_COMPILER=g++ \
  -DCMAKE_C_FLAGS="$FLAGS" -DCMAKE_CXX_FLAGS="$FLAGS" \
  -DCMAKE_EXE_LINKER_FLAGS="-fsanitize=address,undefined" -DCMAKE_SHARED_LINKER_FLAGS="-fsanitize=address,undefined" \
  -DOSCAR_ENABLE_CUDA=OFF -DOSCAR_BUILD_BENCH=OFF >/dev/null
nice -n 10 cmake --build "$BUILD" -j"$JOBS"
# Leak checking stays on; halt_on_error makes a report fail the test that triggered it.
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:halt_on_error=1:abort_on_error=0:strict_string_checks=1:detect_stack_use_after_return=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"
# OpenBLAS/TBB thread pools multiply the sanitizer's cost without adding coverage.
export OPENBLAS_NUM_THREADS=1
nice -n 10 ctest --test-dir "$BUILD" -LE gpu --output-on-failure --timeout 1800 "$@"
