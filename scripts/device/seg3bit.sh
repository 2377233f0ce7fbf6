#!/usr/bin/env bash
# seg3bit (issue #10: 3-bit segments and compiled segment layouts in the segmented decode kernel) on one H100.
# Expected GPU time: about 3 minutes
#   ~15 s  test_gpu SegKvWriteGpu* / SegDecodeGpu* (incl. the ThreeBit cases) / DecodeInt2Paths* / DecodeGpu* (INT2)
#   ~60 s  test_gpu EngineSpectral* (spectral calibration of qwen3-tiny on the host CPU, 3 engines x 128 steps)
#   ~60 s  decode_attention_bench --max-context 32768: INT2 (fused + separate) vs four segmented layouts of the same
#          bytes (segA: 4/2/0-bit, seg3b: K 48x3b+80x1b | V 32x3b+64x2b+32x0b, segcal: the calibrator's qwen3-tiny
#          pick K 48x3b+80x1b | V INT2 — all three compiled; seggen: a layout without a compiled kernel)
#   ~40 s  ncu of the seg3b and segcal kernels at batch 8 x 32K (compare with /work/prof/ncu_int2_b8_32k.txt or
#          decodeperf's INT2 profile)
# Needs: $BIN (bin/ + lib/ from scripts/device/pack.sh), fixtures at /work/shared/fixtures, $OUT, cwd = repo.
# Look for:
#   seg3bit_test_gpu.log: "[  PASSED  ]" and no FAILED; each SegDecodeGpu case prints "nmse" (<= 1e-5; the ThreeBit/
#     cases are the new 3-bit unpack: ThreeBit/0-2 compiled layouts, 3 the INT2-kernel routing of a one-segment
#     2-bit layout, 4-8 the generic kernel).
#   seg3bit_bench.log: columns segA_us..seggen_us and their "/int2" ratios (goal <= 1.10x); sep/int2 is the INT2
#     separate-kernel launch that the segmented path shares its window/merge kernels with.
#   ncu_seg3b_b8_32k.txt / ncu_segcal_b8_32k.txt: Duration, Executed Instructions, Registers, "Local Memory
#     Spilling Requests" (old seg kernel: 624 us, 154.7 M instructions, 3.6 M spills; INT2: 106 us, 45.8 M, none).
source scripts/device/common.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/seg3bit_device.txt"

status=0
timeout 300 "$BIN/bin/test_gpu" \
  --gtest_filter='*KvWriteGpu*:*DecodeGpu*:EngineSpectral*:*DecodeInt2Paths*' \
  2>&1 | tee "$OUT/seg3bit_test_gpu.log" || status=1

timeout 240 "$BIN/bin/decode_attention_bench" --max-context 32768 --iters 20 \
  2>&1 | tee "$OUT/seg3bit_bench.log" || status=1

NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
[ "${1:-}" = ncu ] || NCU=  # the lead's runs skip the profile unless asked (device budget)
if [ -n "$NCU" ]; then
  SECT="--section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section SchedulerStats --section Occupancy --section LaunchStats --section ComputeWorkloadAnalysis --section InstructionStats --section SourceCounters"
  DB="$BIN/bin/decode_attention_bench --eager --iters 2 --max-context 32768 --batch 8 --context 32768"
  # Per bench shape the segmented kernel runs 5 times per layout (3 warm-ups + 2 eager iterations) in the order
  # segA, seg3b, segcal, seggen: skip 6 = seg3b's second launch, skip 11 = segcal's second launch.
  prof() {  # name kernel-regex launch-skip
    timeout 90 $NCU $SECT -k regex:"$2" -c 1 --launch-skip "$3" $DB > "$OUT/ncu_$1.txt" 2>&1
    echo "ncu $1 rc=$?"
    grep -E "decode_attention_(seg|int2)_kernel|Duration|Executed Instructions  |Registers Per|Spilling Requests  |DRAM Throughput|Issue Slots Busy|Warp Cycles Per Issued" "$OUT/ncu_$1.txt" | head -12
  }
  prof seg3b_b8_32k 'decode_attention_seg_kernel' 6
  prof segcal_b8_32k 'decode_attention_seg_kernel' 11
else
  echo "no ncu found" | tee "$OUT/ncu_missing.txt"
fi

grep -E "nmse|spectral engine|greedy|layer [0-9]|PASSED|FAILED|/int2|qwen3-8b|llama3-70b" "$OUT"/seg3bit_*.log \
  > "$OUT/seg3bit_summary.txt" || true
for f in "$OUT"/ncu_seg3b_b8_32k.txt "$OUT"/ncu_segcal_b8_32k.txt; do
  [ -f "$f" ] && { echo "== $f"; grep -E "decode_attention_(seg|int2)_kernel|Duration|Executed Instructions  |Registers Per|Spilling Requests  " "$f"; } >> "$OUT/seg3bit_summary.txt"
done
exit $status
