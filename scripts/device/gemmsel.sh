#!/usr/bin/env bash
# gemmsel (issue #4): timed cuBLASLt algorithm selection (runtime/lt_gemm.h, GemmSelection::Timed) against the
# heuristic's first choice, on an H100/H200. Expected GPU time ~2 min.
#   1. LtGemmGpu.* (both selections against a double matmul, beta 0 and 1).
#   2. forward_bench at Llama-3-8B and Qwen3-8B 8 x 2048 (the #4 shapes) with --gemm-selection heuristic,timed,
#      attention v2, --profile and --gemm-peak: GEMM ms per op and the forward median, both in one process.
# Look for: "[  PASSED  ]" in gemmsel_tests.log; the "attn v2" vs "attn v2 (timed GEMMs)" medians and the
# "timed GEMM selection: N shapes tuned, M kept another algorithm" line in gemmsel_*.log.
source scripts/device/common.sh
status=0
timeout 100 "$BIN/bin/test_gpu" --gtest_filter='LtGemmGpu.*' 2>&1 | tee "$OUT/gemmsel_tests.log" |
  grep -E "^\[  (FAILED|PASSED) |nmse|Failure" | head -20 || status=1
for model in llama3-8b qwen3-8b; do
  timeout 150 "$BIN/bin/forward_bench" --config bench/configs/$model.json --batch 8 --seq 2048 --warmup 2 \
    --iters 5 --attn-kernel v2 --gemm-selection heuristic,timed,heuristic,timed --profile --gemm-peak 2>&1 |
    tee "$OUT/gemmsel_${model}_8x2048.log" | grep -E "median|timed GEMM|GEMMs|peak" | head -20 || status=1
done
exit $status
