#!/usr/bin/env bash
# gpusuite (issue #8 and the merge gate for GPU work): the whole GPU test binary once, every test including the
# parameterized suites (Shapes/..., Groups/..., ...) that per-area filters like "FoldValueRotation*" miss, then
# compute-sanitizer memcheck of the suites named in the argument (comma-separated gtest suite names; none = skip).
# Argument: [shards=N,]SUITE,SUITE... — shards=N runs the test binary as N gtest shards side by side on the one GPU
# (GTEST_TOTAL_SHARDS; each test still runs once), since much of the suite's time is its CPU-side simulations.
# Expected GPU time: ~5.5 min for the suite in one shard (300 s cut it after 114 of 161 tests on 2026-12-06); with
# shards=4 ~210 s for 194 tests (2026-12-07: 200 s cut shard 0 three tests short; give it 260);
# memcheck of one Eval suite ~2-4 min (its CPU simulation is not slowed).
# Pack from the main checkout: tests find fixtures at <source dir>/../shared/fixtures, so a build made in another
# checkout skips every fixture test on the device (the 2026-12-05 third run did).
# Needs: $BIN (bin/ + lib/ from scripts/device/pack.sh), fixtures at /work/shared/fixtures, $OUT, cwd = repo.
# Look for: gpusuite_test_gpu*.log "[  PASSED  ]" and no FAILED; gpusuite_memcheck.txt "ERROR SUMMARY: 0 errors" and
#   rc=0 per suite (rc=124: the suite ran past MEMCHECK_SUITE_S, default 280 s).
source scripts/device/common.sh
arg=${1:-}
shards=1
if [[ $arg == shards=* ]]; then
  shards=${arg%%,*}; shards=${shards#shards=}
  [[ $arg == *,* ]] && arg=${arg#*,} || arg=
fi
start=$SECONDS
pids=()
for ((i = 0; i < shards; ++i)); do
  log="$OUT/gpusuite_test_gpu.log"; [ "$shards" -gt 1 ] && log="$OUT/gpusuite_test_gpu_$i.log"
  GTEST_TOTAL_SHARDS=$shards GTEST_SHARD_INDEX=$i timeout 480 "$BIN/bin/test_gpu" > "$log" 2>&1 &
  pids+=($!)
done
for ((i = 0; i < shards; ++i)); do
  wait "${pids[$i]}"
  echo "test_gpu shard $i/$shards rc=$? $((SECONDS - start))s"
done
grep -hE "^\[  (PASSED|FAILED|SKIPPED) |tests? ran|FAILED TEST" "$OUT"/gpusuite_test_gpu*.log | head -30
bash scripts/device/memcheck.sh "$arg"
