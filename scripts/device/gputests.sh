#!/usr/bin/env bash
# gputests: test_gpu with one gtest filter (the argument, e.g. '*KvWrite*:*EngineEf*'), for re-running the suites a
# change touched without the whole binary's ~5.5 min. Needs: $BIN, $OUT, cwd = repo.
# Look for: gputests_test_gpu.log "[  PASSED  ]" and no FAILED.
set -uo pipefail
[ -f scripts/device/setup.sh ] && [ -z "${BIN:-}" ] && source scripts/device/setup.sh
: "${BIN:?set BIN to the packed binaries}" "${OUT:?set OUT}" "${1:?a gtest filter}"
export LD_LIBRARY_PATH=$BIN/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
mkdir -p "$OUT"
"$BIN/bin/test_gpu" --gtest_filter="$1" > "$OUT/gputests_test_gpu.log" 2>&1
status=$?
grep -E "^\[  (PASSED|FAILED|SKIPPED) |tests? ran|FAILED TEST" "$OUT/gputests_test_gpu.log" | head -20
exit $status
