#!/usr/bin/env bash
# reviewdecode: compute-sanitizer pass over the decode kernels reviewed before their first GPU run (issues #4/#6/#10:
# fused INT2 decode with PDL + last-block merge, segmented 3-bit decode). Correctness vs the references is already
# run by scripts/device/decodeperf.sh and seg3bit.sh; this adds what those cannot see: out-of-bounds / misaligned
# accesses (memcheck), shared-memory races (racecheck: the fused window/merge reuse of the cp.async ring, the
# per-warp rings), barrier misuse (synccheck), on a few small cases of each kernel.
# Expected GPU time: about 4 minutes in all (sanitizers slow kernels 10-100x; the cases are the small ones):
#   ~60 s  memcheck  DecodeInt2Paths cases 0, 9, 11, 16, 17 (both launch variants each) + SegDecodeGpu ThreeBit 1, 4, 6
#   ~120 s racecheck DecodeInt2Paths cases 0, 9, 11, 16 + SegDecodeGpu ThreeBit 6
#   ~40 s  synccheck same cases as memcheck
# Needs: $BIN (bin/ + lib/ from scripts/device/pack.sh), $OUT, cwd = repo.
# Look for: in reviewdecode_summary.txt, "ERROR SUMMARY: 0 errors" for each tool (racecheck also prints
#   "RACECHECK SUMMARY: 0 hazards displayed") and "[  PASSED  ]" for each run; any "Invalid __global__ read",
#   "Misaligned", "Race reported", "Barrier error" line names the kernel and source line (built with line info if
#   the lead's build has -lineinfo; else the PC offset).
source scripts/device/common.sh
CS=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
if [ -z "$CS" ]; then echo "compute-sanitizer not found" | tee "$OUT/reviewdecode_summary.txt"; exit 1; fi

P='Shapes/DecodeInt2Paths.MatchesReference'
S='ThreeBit/SegDecodeGpu.MatchesReference'
small="$P/*_0:$P/*_9:$P/*_11:$P/*_16:$S/6"
wide="$small:$P/*_17:$S/1:$S/4"

status=0
run() {  # tool, filter, limit
  local tool=$1 filter=$2 limit=$3
  echo "== $tool: $filter"
  timeout "$limit" "$CS" --tool "$tool" --error-exitcode 3 --print-limit 30 \
    "$BIN/bin/test_gpu" --gtest_filter="$filter" > "$OUT/reviewdecode_$tool.log" 2>&1
  local rc=$?
  echo "$tool rc=$rc" | tee -a "$OUT/reviewdecode_summary.txt"
  [ $rc -eq 0 ] || status=1
}
: > "$OUT/reviewdecode_summary.txt"
run memcheck "$wide" 150
run racecheck "$small" 240
run synccheck "$wide" 120
grep -hE "ERROR SUMMARY|RACECHECK SUMMARY|PASSED|FAILED|Invalid|Misaligned|Race reported|Barrier|nmse" \
  "$OUT"/reviewdecode_*.log >> "$OUT/reviewdecode_summary.txt"
cat "$OUT/reviewdecode_summary.txt"
exit $status
