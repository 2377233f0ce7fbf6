#!/usr/bin/env bash
# qkvbf16 (issue #4): the QKV projection handed to the norm/RoPE kernel in bf16 (DeviceForwardOptions::qkv_bf16,
# forward_bench --qkv-output) against fp32, alternated in one process at the Qwen3-8B shapes, with the tests that
# guard it. Expected GPU time ~3 min.
#   - test_gpu: FwdGpuRope* (bf16 input bit-identical to fp32 input of the same values), FwdGpuRopeChecks,
#     Qwen3Tiny* (the bounds vs the CPU reference, with and without the option)
#   - forward_bench 1 x 32768 and 8 x 2048, --qkv-output f32,bf16,f32,bf16 --profile (rope_qkv ms per variant)
# Needs: $BIN, $OUT, cwd = repo. Look for: "[  PASSED  ]"; qkvbf16_bench_*.log "median" per variant and the
#   rope_qkv / qkv_proj rows of the breakdowns.
source scripts/device/common.sh
status=0
timeout 200 "$BIN/bin/test_gpu" --gtest_filter='*FwdGpuRope*:*Qwen3Tiny*' > "$OUT/qkvbf16_test_gpu.log" 2>&1 || status=1
grep -E "^\[  (PASSED|FAILED) |FAILED TEST|Qwen3|top-1" "$OUT/qkvbf16_test_gpu.log" | head -12
for shape in "1 32768" "8 2048"; do
  set -- $shape
  timeout 200 "$BIN/bin/forward_bench" --config bench/configs/qwen3-8b.json --batch "$1" --seq "$2" --warmup 1 \
    --iters 3 --qkv-output f32,bf16,f32,bf16 --profile > "$OUT/qkvbf16_bench_$1x$2.log" 2>&1 || status=1
  grep -E "^attn|rope_qkv|qkv_proj" "$OUT/qkvbf16_bench_$1x$2.log" | head -20
done
exit $status
