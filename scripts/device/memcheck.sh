#!/usr/bin/env bash
# memcheck (issue #8): compute-sanitizer memcheck of the named gtest suites of test_gpu, one process per suite
# (comma-separated suite names, or full gtest filters containing a '.'; none = nothing). gpusuite.sh calls it after the whole-binary run; alone it leaves the
# full device time to suites whose CPU side is slow under the sanitizer (EvalGpu*: ~2-4 min each).
# Needs: $BIN, $OUT, cwd = repo. Look for: gpusuite_memcheck.txt "ERROR SUMMARY: 0 errors" and rc=0 per suite
#   (rc=124: the suite ran past MEMCHECK_SUITE_S, default 280 s).
source scripts/device/common.sh
CS=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
: > "$OUT/gpusuite_memcheck.txt"
for s in ${1//,/ }; do
  [ -n "$CS" ] || { echo "no compute-sanitizer" | tee -a "$OUT/gpusuite_memcheck.txt"; break; }
  start=$SECONDS
  log=$OUT/memcheck_${s//\//_}.log
  filter=$s; [[ $s == *.* ]] || filter="$s.*"  # a bare suite name means all its tests
  timeout "${MEMCHECK_SUITE_S:-280}" "$CS" --tool memcheck --error-exitcode 3 --print-limit 20 "$BIN/bin/test_gpu" \
    --gtest_filter="$filter" > "$log" 2>&1
  rc=$?
  echo "$s rc=$rc $((SECONDS - start))s $(grep -E 'ERROR SUMMARY' "$log" | tail -1) $(grep -cE '^\[       OK' "$log") ok" |
    tee -a "$OUT/gpusuite_memcheck.txt"
done
