#!/usr/bin/env bash
# prefillops (issue #4: prefill non-GEMM ops + the 2K attention) on one H100. Expected GPU time: about 4 minutes
#   ~40 s  test_gpu FwdGpu* (rope_qkv vector + scalar paths, rmsnorm vector + scalar, swiglu, attention v1/v2/v2k32/v3
#          vs the CPU refs, v3 bit-identical to v2, 32K spot rows, the forward-vs-CPU model tests)
#   ~50 s  compute-sanitizer memcheck on the rope / norm / attention kernel tests; racecheck on two attention shapes
#          (v3 moved the cp.async waits and barriers)
#   ~70 s  forward_bench --profile, Llama-3-8B and Qwen3-8B shapes at 8x2048, attention v2,v3,v2k32,v1; Llama-3-8B
#          1x32768 with v2,v3 (v3 removes v2's register spills; the 32K profile showed 94M spill requests)
#   ~70 s  bench/forward_vs_transformers.py, Llama-3-8B 8x2048 (OSCAR v2 in the table, v3 in the .err log)
# Needs: $BIN (bin/ + lib/ from scripts/device/pack.sh), fixtures at /work/shared/fixtures, $OUT, cwd = repo.
# Look for: "[  PASSED  ]" and no FAILED in prefillops_tests.log; memcheck/racecheck "ERROR SUMMARY: 0 errors";
#   in prefillops_bench_*.log the "attn v3" vs "attn v2" medians, and in the breakdowns the rows rope_qkv (was
#   15.9 ms / 32 calls at Llama-3 8x2048, ~6.5 ms expected at 90 % of copy bandwidth), add_rmsnorm (was 23.6 ms /
#   64 calls; ~21 ms is the bandwidth floor for 939 MB per call) and attention (v2 44.5 ms); the speedup column of
#   prefillops_fwd_vs_hf.log (goal >= 1.3x, was 1.19x).
source scripts/device/common.sh
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader | tee "$OUT/prefillops_gpu.txt"
status=0

timeout 150 "$BIN/bin/test_gpu" --gtest_filter='FwdGpu*:Shapes/FwdGpuAttention*' 2>&1 | tee "$OUT/prefillops_tests.log" | \
  grep -E "^\[  (FAILED|PASSED) |Failure|Expected|Which is|bit-identical" | head -40
grep -q "^\[  FAILED" "$OUT/prefillops_tests.log" && status=1

CS=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
if [ -n "$CS" ]; then
  timeout 120 "$CS" --tool memcheck --error-exitcode 3 --print-limit 20 "$BIN/bin/test_gpu" \
    --gtest_filter='FwdGpuRope*:FwdGpuRmsNorm*:Shapes/FwdGpuAttention.*:FwdGpuAttentionChecks*-*MatchesRef/13' \
    > "$OUT/prefillops_memcheck.log" 2>&1
  echo "memcheck rc=$? $(grep 'ERROR SUMMARY' "$OUT/prefillops_memcheck.log" | tail -1)"
  # memcheck skips instance 13 (its 2K-token CPU reference alone takes ~26 s). racecheck: instances 4 (32x8x128,
  # {300, 77}) and 0 (head_dim 8 padded, 5 sequences)
  timeout 90 "$CS" --tool racecheck --error-exitcode 3 --print-limit 20 "$BIN/bin/test_gpu" \
    --gtest_filter='Shapes/FwdGpuAttention.MatchesRef/4:Shapes/FwdGpuAttention.MatchesRef/0' \
    > "$OUT/prefillops_racecheck.log" 2>&1
  echo "racecheck rc=$? $(grep 'RACECHECK SUMMARY\|ERROR SUMMARY' "$OUT/prefillops_racecheck.log" | tail -1)"
else
  echo "compute-sanitizer not found" | tee "$OUT/prefillops_memcheck.log"
fi

for model in llama3-8b qwen3-8b; do
  timeout 120 "$BIN/bin/forward_bench" --config bench/configs/$model.json --batch 8 --seq 2048 --warmup 1 --iters 3 \
    --attn-kernel v2,v3 --profile --gemm-peak > "$OUT/prefillops_bench_${model}_8x2048.log" 2>&1 || status=1
done
timeout 120 "$BIN/bin/forward_bench" --config bench/configs/llama3-8b.json --batch 1 --seq 32768 --warmup 1 --iters 2 \
  --attn-kernel v2,v3 --profile > "$OUT/prefillops_bench_llama3-8b_1x32768.log" 2>&1 || status=1

timeout 200 python3 bench/forward_vs_transformers.py --forward-bench "$BIN/bin/forward_bench" --warmup 1 --iters 3 --rounds 1 \
  --attn-kernel v2,v3 --case bench/configs/llama3-8b.json:8x2048 \
  --json "$OUT/prefillops_fwd_vs_hf.json" > "$OUT/prefillops_fwd_vs_hf.log" 2> "$OUT/prefillops_fwd_vs_hf.err" || status=1

echo "=== summary ==="
grep -hE "^config|^batch|attn v|measured peak|GEMMs .* ms|^    (attention|rope_qkv|add_rmsnorm|swiglu) " \
  "$OUT"/prefillops_bench_*.log
cat "$OUT/prefillops_fwd_vs_hf.log"
grep -h "attn v" "$OUT/prefillops_fwd_vs_hf.err"
grep -E "^\[  (PASSED|FAILED)" "$OUT/prefillops_tests.log"
exit $status
