#!/usr/bin/env bash
# decodeperf (issue #6: INT2 decode attention toward >= 85 % of copy bandwidth) on one H100.
# Expected GPU time: about 3 minutes
#   ~25 s  test_gpu decode tests: DecodeInt2Paths* (every case in both launch variants, Fused and Separate, vs the
#          double reference, twice for determinism, fused vs separate), DecodeGpu*, SegDecodeGpu*, KvWriteGpu*
#   ~90 s  decode_attention_bench --max-context 131072 --iters 20 (CUDA graph timing); int2_us is the Fused
#          launch, the last two columns sep_us / sep/int2 time the Separate launch (4 kernels) in the same run
#   ~50 s  ncu of rotate_q + the fused INT2 kernel of the second call at batch 8 x 32K (Qwen3-8B shape)
# Needs: $BIN (bin/ + lib/ from scripts/device/pack.sh), $OUT, cwd = repo.
# Look for: "[  PASSED  ]" and no FAILED in decodeperf_test_gpu.log; per DecodeInt2Paths case the lines
#   "fused nmse", "separate nmse" (<= 1e-5) and "fused vs separate nmse" (<= 1e-9 fp32 out); in
#   decodeperf_bench.log the %d2d column (goal >= 85 % at >= 32K, batch >= 8) and sep/int2 (> 1.00x: the fused
#   launch wins; the lead keeps Fused as the default only if it does); ncu_decodeperf_b8_32k.txt: Duration, DRAM
#   throughput, registers, occupancy of decode_attention_int2_kernel<128, true> (was 106 us / 43 % under ncu).
source scripts/device/common.sh
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee "$OUT/decodeperf_device.txt"

status=0
timeout 120 "$BIN/bin/test_gpu" --gtest_filter='*DecodeInt2Paths*:*DecodeGpu*:*SegDecodeGpu*:*KvWriteGpu*' \
  2>&1 | tee "$OUT/decodeperf_test_gpu.log" || status=1

timeout 240 "$BIN/bin/decode_attention_bench" --max-context 131072 --iters 20 \
  2>&1 | tee "$OUT/decodeperf_bench.log" || status=1

NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
[ "${1:-}" = ncu ] || NCU=  # the lead's runs skip the profile unless asked (device budget)
if [ -n "$NCU" ]; then
  SECT="--section SpeedOfLight --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables --section WarpStateStats --section SchedulerStats --section Occupancy --section LaunchStats --section ComputeWorkloadAnalysis --section InstructionStats --section SourceCounters"
  # Launch order per call (Fused): rotate_q, int2<.., true>; skip the first call's two, profile the second's.
  timeout 150 "$NCU" $SECT -k regex:'decode_attention_int2_kernel|decode_rotate_q_kernel' -c 2 --launch-skip 2 \
    "$BIN/bin/decode_attention_bench" --eager --iters 2 --max-context 32768 --batch 8 --context 32768 \
    > "$OUT/ncu_decodeperf_b8_32k.txt" 2>&1 || status=1
  grep -E "decode_attention_int2|decode_rotate_q|Duration|DRAM Throughput|Registers Per|Achieved Occupancy|Issue Slots Busy|No Eligible" \
    "$OUT/ncu_decodeperf_b8_32k.txt" | head -30
else
  echo "ncu not found: no profile"
fi

grep -E "nmse|PASSED|FAILED|qwen3-8b|llama3-70b|model" "$OUT"/decodeperf_*.log > "$OUT/decodeperf_summary.txt" || true
exit $status
