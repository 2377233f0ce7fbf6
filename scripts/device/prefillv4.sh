#!/usr/bin/env bash
# prefillv4 (issue #4): the wgmma prefill attention v4 (attention_prefill_v4.cuh) on an H100/H200, from a pack
# built with CMAKE_CUDA_ARCHITECTURES 90a. Expected GPU time ~3 min.
#   1. WgmmaGpu.* (the building blocks), then FwdGpuAttention.* (v1..v5 vs the double reference on 14 shapes, v4/v5
#      where head_dim is 128) and the 32K spot rows.
#   2. forward_bench qwen3-8b at 8 x 2048 and 1 x 32768 with v2,v4,v5 (v5: v4 pipelined) and --profile (attention ms and TFLOP/s per
#      kernel in one process).
#   3. with the argument "ncu": Nsight Compute of one v4 and one v5 attention launch at 1 x 8192 (speed of light,
#      compute and memory workload, warp stalls): prefillv4_ncu_v4.txt, prefillv4_ncu_v5.txt.
# Look for: "[  PASSED  ]" in prefillv4_tests.log; "attention" lines per kernel in prefillv4_bench_*.log.
# If WgmmaGpu.RegisterAWithTransposedB fails but its "swapped" nmse is ~1e-14, swap LBO/SBO of the MN-major
# descriptor in v4's P·V (kV4KvRegion, 1024).
source scripts/device/common.sh
mode=${1:-}  # the loop below reuses the positional parameters
status=0
timeout 200 "$BIN/bin/test_gpu" --gtest_filter='WgmmaGpu.*:*FwdGpuAttention*' 2>&1 | tee "$OUT/prefillv4_tests.log" |
  grep -E "^\[  (FAILED|PASSED) |nmse|unsupported|Failure" | head -40 || status=1
for shape in "8 2048" "1 32768"; do
  set -- $shape
  timeout 200 "$BIN/bin/forward_bench" --config bench/configs/qwen3-8b.json --batch "$1" --seq "$2" --warmup 1 \
    --iters 3 --attn-kernel v2,v4,v5 --profile 2>&1 | tee "$OUT/prefillv4_bench_${1}x${2}.log" |
    grep -iE "attention|tok/s|kernel" | head -20 || status=1
done
if [ "$mode" = ncu ]; then
  NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
  SECT="--section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy"
  for k in v4 v5; do
    timeout 120 "$NCU" $SECT -k regex:attention_prefill_v4_kernel -c 1 --launch-skip 4 "$BIN/bin/forward_bench" \
      --config bench/configs/qwen3-8b.json --batch 1 --seq 8192 --warmup 0 --iters 1 --attn-kernel $k \
      > "$OUT/prefillv4_ncu_$k.txt" 2>&1 || status=1
    echo "== ncu $k"; grep -E "Duration|Compute \(SM\) Throughput|Memory Throughput|Issue Slots Busy|Stall|Tensor|Shared" \
      "$OUT/prefillv4_ncu_$k.txt" | head -16
  done
fi
exit $status
