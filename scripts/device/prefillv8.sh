#!/usr/bin/env bash
# prefillv8 (issue #4): v8 = v7 + FA3's inter-warpgroup ping-pong (attention_prefill_v4.cuh, two named barriers),
# against v7 in the same process, on an H100/H200 from a pack built with CMAKE_CUDA_ARCHITECTURES 90a.
# Argument: a comma list of parts, default "tests,bench"; "hf" adds the transformers comparison (OSCAR Auto).
#   tests: FwdGpuAttention* (v1..v8 and Auto vs the fp64 reference, NMSE per kernel; can_implement), the Auto /
#          model tests (FwdGpuModel.Auto*), then compute-sanitizer synccheck of the qwen3-tiny shape (barrier misuse
#          would show there).
#   bench: forward_bench qwen3-8b 1 x 32768 and 8 x 2048 with v7,v8,v7,v8 --profile (alternated: same process).
# Expected GPU time: tests ~1.5 min, bench ~2 min, hf ~3 min.
# Look for: "[  PASSED  ]" in prefillv8_tests.log, "ERROR SUMMARY: 0 errors" in prefillv8_sanitize.txt, the "attn
#   v7/v8" median lines in prefillv8_bench_*.log.
source scripts/device/common.sh
parts=",${1:-tests,bench},"
status=0
if [[ $parts == *,tests,* ]]; then
  timeout 200 "$BIN/bin/test_gpu" --gtest_filter='*FwdGpuAttention*:FwdGpuModel.Auto*' 2>&1 |
    tee "$OUT/prefillv8_tests.log" | grep -E "^\[  (FAILED|PASSED) |v8|Failure" | head -40 || status=1
  CS=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
  if [ -n "$CS" ]; then
    : > "$OUT/prefillv8_sanitize.txt"
    for tool in synccheck; do
      timeout 90 "$CS" --tool $tool "$BIN/bin/test_gpu" --gtest_filter='Shapes/FwdGpuAttention.MatchesRef/3' \
        >> "$OUT/prefillv8_sanitize.txt" 2>&1 || status=1
      echo "== $tool rc=$?"; grep -E "ERROR SUMMARY|RACECHECK SUMMARY|PASSED|FAILED" "$OUT/prefillv8_sanitize.txt" | tail -3
    done
  fi
fi
if [[ $parts == *,bench,* ]]; then
  for shape in "1 32768" "8 2048"; do
    set -- $shape
    timeout 200 "$BIN/bin/forward_bench" --config bench/configs/qwen3-8b.json --batch "$1" --seq "$2" --warmup 1 \
      --iters 3 --attn-kernel v7,v8,v7,v8 --profile 2>&1 | tee "$OUT/prefillv8_bench_qwen3_${1}x${2}.log" |
      grep -E "^attn|attention " | head -20 || status=1
  done
fi
if [[ $parts == *,hf,* ]]; then
  timeout 400 python3 bench/forward_vs_transformers.py --forward-bench "$BIN/bin/forward_bench" --warmup 1 --iters 3 \
    --case bench/configs/llama3-8b.json:8x2048 --case bench/configs/qwen3-8b.json:8x2048 \
    --case bench/configs/qwen3-8b.json:1x32768 --json "$OUT/prefillv8_fwd_vs_hf.json" \
    > "$OUT/prefillv8_fwd_vs_hf.log" 2> "$OUT/prefillv8_fwd_vs_hf.err" || status=1
  cat "$OUT/prefillv8_fwd_vs_hf.log"
fi
exit $status
