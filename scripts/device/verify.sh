#!/usr/bin/env bash
# verify: the short merge gate when device time is scarce — the GPU tests of what changed since the last full run
# (int4 and fp8 engine modes, fp8 kernels, the fp64 fold, the INT2 decode regression), then the decode bench with
# the int4/fp8 columns. Expected GPU time: ~4 min. Arg: optional extra gtest filter terms (":"-joined).
# Look for: verify_test_gpu.log "[  PASSED  ]" and no FAILED (EvalGpu prints cpu/cuda rows per mode);
#   verify_bench.log int2_us / int4_us / fp8_us columns.
source scripts/device/common.sh
filter='Int4/*:EvalGpu.*:Groups/FoldValueRotation*:*Fp8*:Shapes/DecodeInt2Paths*'
[ -n "${1:-}" ] && filter="$filter:$1"
start=$SECONDS
timeout 200 "$BIN/bin/test_gpu" --gtest_filter="$filter" > "$OUT/verify_test_gpu.log" 2>&1
echo "test_gpu rc=$? $((SECONDS - start))s"
grep -E "^\[  (PASSED|FAILED|SKIPPED) |FAILED TEST|^(cpu|cuda) |fold \(" "$OUT/verify_test_gpu.log" | head -40
timeout 120 "$BIN/bin/decode_attention_bench" --max-context 32768 --iters 10 > "$OUT/verify_bench.log" 2>&1
echo "bench rc=$?"; grep -E "^model|^qwen3-8b|^llama3-70b" "$OUT/verify_bench.log" | head -12
