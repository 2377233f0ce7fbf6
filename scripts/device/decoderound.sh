#!/usr/bin/env bash
# decoderound (issue #6): the INT2 decode kernel against the previous binary in the same process lifetime of the
# machine. Expected GPU time: ~5.5 min (~4 with "noncu").
#   ~3 min test_gpu decode and engine tests (DecodeInt2Paths: every case, all three launch variants, vs the double
#          reference, ~90 s; DecodeGpu ~70 s of CPU reference; the 150 s limit of 2026-12-06 cut it)
#   ~60 s  decode_attention_bench, new and base (.devcarry/base_decode_attention_bench.xz, the previous main)
#          alternated twice at five shapes (CUDA graph timing)
#   ~60 s  ncu (source counters, warp stalls) of the new fused INT2 kernel at batch 8 x 32K; SASS of the kernel
#   ~40 s  ncu of one whole fused call (rotate_q + INT2 kernel) at 8 x 4K: where the per-call floor goes
# Arg "noncu" skips the profile, "benchonly" the tests too. Needs: $BIN, $OUT, cwd = repo.
# Look for: "[  PASSED  ]" in decoderound_test_gpu.log; decoderound_bench.txt: int2_us new vs base per shape.
source scripts/device/common.sh
status=0
[ "${1:-}" = benchonly ] || timeout 300 "$BIN/bin/test_gpu" --gtest_filter='*DecodeInt2Paths*:*DecodeGpu*:*DecodeFp8Gpu*:*SegDecodeGpu*:*EngineQuantized*:*EngineBundle*:*EngineBatch*:*EngineRecompute*' \
  > "$OUT/decoderound_test_gpu.log" 2>&1 || status=1
grep -E "^\[  (PASSED|FAILED) |FAILED TEST|tests? ran" "$OUT/decoderound_test_gpu.log" | head -20
base=/tmp/base_decode_attention_bench
[ -x $base ] || { xz -dc .devcarry/base_decode_attention_bench.xz > $base && chmod +x $base; }
for rep in 1 2; do
  for shape in "8 32768" "8 131072" "1 32768" "32 131072" "8 4096"; do
    set -- $shape
    for which in base new; do
      exe=$base; [ $which = new ] && exe=$BIN/bin/decode_attention_bench
      echo "== $which rep$rep batch $1 context $2" >> "$OUT/decoderound_bench.txt"
      timeout 60 "$exe" --iters 20 --max-context "$2" --batch "$1" --context "$2" >> "$OUT/decoderound_bench.txt" 2>&1 || status=1
    done
  done
done
grep -E "^==|qwen3-8b|llama3-70b" "$OUT/decoderound_bench.txt" | head -80
CUOBJ=$(command -v cuobjdump || ls /usr/local/cuda*/bin/cuobjdump 2>/dev/null | head -1)
[ -n "$CUOBJ" ] && "$CUOBJ" -sass "$BIN/bin/decode_attention_bench" 2>/dev/null |
  awk '/Function : .*decode_attention_int2_kernelILi128ELb1/{p=1} p&&/Function : /&&!/int2_kernelILi128ELb1/{p=0} p' \
  > "$OUT/sass_int2_128_fused.txt"
wc -l "$OUT/sass_int2_128_fused.txt"
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
if [ "${1:-}" != noncu ] && [ "${1:-}" != benchonly ] && [ -n "$NCU" ]; then
  timeout 150 "$NCU" --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy \
    --section InstructionStats --section SourceCounters --section ComputeWorkloadAnalysis \
    --import-source no -k regex:'decode_attention_int2_kernel' -c 1 --launch-skip 1 \
    "$BIN/bin/decode_attention_bench" --eager --iters 2 --max-context 32768 --batch 8 --context 32768 \
    > "$OUT/ncu_round_b8_32k.txt" 2>&1 || status=1
  grep -E "Duration|DRAM Throughput|Registers Per|Achieved Occupancy|Issue Slots Busy|Executed Instructions  |Warp Cycles Per Issued" \
    "$OUT/ncu_round_b8_32k.txt" | head -20
fi
# The per-call floor (issue #6: ~45 us at 8 x 4K for 28 MB, where the bytes need ~9 us): both kernels of one fused
# decode call at a short shape, with launch and source-level stall data, to see where the fixed time goes
# (rotate_q -> PDL wait, the window share, the last block's merge).
if [ "${1:-}" != noncu ] && [ "${1:-}" != benchonly ] && [ -n "$NCU" ]; then
  timeout 150 "$NCU" --section SpeedOfLight --section WarpStateStats --section LaunchStats --section Occupancy \
    --section SourceCounters --import-source no -k regex:'decode_rotate_q_kernel|decode_attention_int2_kernel' \
    -c 2 --launch-skip 2 "$BIN/bin/decode_attention_bench" --eager --iters 2 --max-context 4096 --batch 8 \
    --context 4096 > "$OUT/ncu_floor_b8_4k.txt" 2>&1 || status=1
  grep -E "decode_|Duration|Elapsed Cycles|Grid Size|Waves Per SM|Warp Cycles Per Issued" "$OUT/ncu_floor_b8_4k.txt" | head -20
fi
exit $status
