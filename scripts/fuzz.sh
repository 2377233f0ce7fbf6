#!/usr/bin/env bash
# Builds the libFuzzer targets with clang (ASan + UBSan, the whole tree instrumented for coverage) into
# build-fuzz and runs each for SECONDS (default 60). Seeds come from fuzz/corpus/<target> (read only); new inputs
# go to build-fuzz/corpus/<target>, crashes to build-fuzz/artifacts/<target>/. Exit 1 when any target crashed.
#   scripts/fuzz.sh [SECONDS] [TARGET...]      e.g. scripts/fuzz.sh 60 safetensors config
# Needs clang + libclang-rt (scripts/install-fuzz-deps.sh). Runs niced: CPU is shared.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
SECONDS_PER_TARGET="${1:-60}"
shift || true
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(safetensors config tokenizer bundle)
BUILD="$ROOT/build-fuzz"
JOBS="${OSCAR_FUZZ_BUILD_JOBS:-2}"

command -v clang++ >/dev/null || { echo "fuzz.sh: clang++ not found; run scripts/install-fuzz-deps.sh" >&2; exit 2; }
FLAGS="-fsanitize=fuzzer-no-link,address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g"
export CCACHE_BASEDIR="$ROOT"
cmake -S "$ROOT" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++ \
  -DCMAKE_C_FLAGS="$FLAGS" -DCMAKE_CXX_FLAGS="$FLAGS" \
  -DCMAKE_EXE_LINKER_FLAGS="-fsanitize=address,undefined" \
  -DOSCAR_FUZZ=ON -DOSCAR_ENABLE_CUDA=OFF -DOSCAR_BUILD_TESTS=OFF -DOSCAR_BUILD_BENCH=OFF >/dev/null
nice -n 10 cmake --build "$BUILD" -j"$JOBS" --target $(printf 'fuzz_%s ' "${TARGETS[@]}")

status=0
for t in "${TARGETS[@]}"; do
  mkdir -p "$BUILD/corpus/$t" "$BUILD/artifacts/$t"
  echo "== fuzz_$t for ${SECONDS_PER_TARGET}s"
  # -rss_limit_mb / -malloc_limit_mb: a forged size that makes a parser allocate gigabytes is a finding too.
  if ! ASAN_OPTIONS=detect_leaks=1:allocator_may_return_null=0 UBSAN_OPTIONS=print_stacktrace=1 \
      nice -n 10 "$BUILD/fuzz/fuzz_$t" -max_total_time="$SECONDS_PER_TARGET" -rss_limit_mb=2048 \
      -malloc_limit_mb=1024 -timeout=10 -print_final_stats=1 \
      -artifact_prefix="$BUILD/artifacts/$t/" "$BUILD/corpus/$t" "$ROOT/fuzz/corpus/$t" \
      > "$BUILD/fuzz_$t.log" 2>&1; then
    echo "fuzz_$t: CRASH (see $BUILD/fuzz_$t.log, inputs in $BUILD/artifacts/$t/)"
    status=1
  fi
  grep -E "^stat::(number_of_executed_units|new_units_added)|^#[0-9]+.*DONE" "$BUILD/fuzz_$t.log" || true
done
exit $status
