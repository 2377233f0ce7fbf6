#!/usr/bin/env bash
# memcheck (issue #8): compute-sanitizer memcheck of the named gtest suites of test_gpu, one process per suite
# (comma-separated suite names, or full gtest filters containing a '.'; none = nothing). gpusuite.sh calls it after the whole-binary run; alone it leaves the
# full device time to suites whose CPU side is slow under the sanitizer (EvalGpu*: ~2-4 min each).
# Needs: $BIN, $OUT, cwd = repo. Look for: gpusuite_memcheck.txt "ERROR SUMMARY: 0 errors" and rc=0 per suite
#   (rc=124: the suite ran past MEMCHECK_SUITE_S, default 280 s).
# A first item "par" runs the suites side by side (one sanitizer process each; the sanitizer is CPU-bound, the host
# has 16 cores), so a handful of suites fits one device call.
source scripts/device/common.sh
CS=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
: > "$OUT/gpusuite_memcheck.txt"
items=${1//,/ }
parallel=0
[[ $items == par\ * ]] && { parallel=1; items=${items#par }; }
one_suite() {
  local s=$1 start=$SECONDS
  local log=$OUT/memcheck_${s//[\/:*]/_}.log
  local filter=$s; [[ $s == *.* ]] || filter="$s.*"  # a bare suite name means all its tests
  timeout "${MEMCHECK_SUITE_S:-280}" "$CS" --tool memcheck --error-exitcode 3 --print-limit 20 "$BIN/bin/test_gpu" \
    --gtest_filter="$filter" > "$log" 2>&1
  local rc=$?
  echo "$s rc=$rc $((SECONDS - start))s $(grep -E 'ERROR SUMMARY' "$log" | tail -1) $(grep -cE '^\[       OK' "$log") ok" |
    tee -a "$OUT/gpusuite_memcheck.txt"
}
[ -n "$CS" ] || { [ -n "$items" ] && echo "no compute-sanitizer" | tee -a "$OUT/gpusuite_memcheck.txt"; exit 0; }
for s in $items; do
  if [ $parallel = 1 ]; then one_suite "$s" & else one_suite "$s"; fi
done
wait
