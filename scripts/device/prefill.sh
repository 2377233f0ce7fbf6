#!/usr/bin/env bash
# Issue 4 (prefill) device run. Expected GPU time: ~4 min on one H100 (tests ~40 s, forward_bench 2 shapes × 3
# attention kernels ~90 s, transformers comparison ~70 s, compute-sanitizer on the kernel tests ~40 s).
# Needs: $BIN (packed Release build), $OUT, fixtures at /work/shared/fixtures, cwd = repo checkout.
# Writes flat logs to $OUT; the summary lines to look at are printed last.
set -uo pipefail
[ -f scripts/device/setup.sh ] && source scripts/device/setup.sh
: "${BIN:?BIN must point at the packed build}" "${OUT:?OUT must be set}"
export LD_LIBRARY_PATH=$BIN/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
FX=/work/shared/fixtures
M=$FX/models/tinystories-llama2c-280k-hf
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader | tee $OUT/prefill_gpu.txt

# 1. transformers bf16 golden of the TinyStories story (noise floor of bf16 on head_dim 8), before the tests use it.
$BIN/bin/oscar tokenize --model $M --text "$(head -c 16384 $FX/text/tinystories-sample.txt)" > $OUT/prefill_story_ids.json
timeout 120 python3 scripts/golden/make_tinystories_bf16_golden.py --ids $OUT/prefill_story_ids.json --model $M \
  --out tests/data/golden-bf16/tinystories-llama2c-280k-hf.safetensors 2>&1 | tee $OUT/prefill_golden.log
cp tests/data/golden-bf16/tinystories-llama2c-280k-hf.safetensors $OUT/prefill_tinystories_bf16_golden.safetensors 2>/dev/null

# 2. prefill kernel tests (v1, v2, v2k32 vs the CPU reference) and the forward-vs-CPU/transformers tests.
timeout 300 $BIN/bin/test_gpu --gtest_filter='*FwdGpuAttention*:FwdGpuModel*' 2>&1 | tee $OUT/prefill_tests.log | \
  grep -E "^\[  (FAILED|PASSED) |tokens|Failure|Expected|Which is" | head -60

# 3. forward breakdown, all three attention kernels in one process each shape.
for shape in "8 2048" "1 32768"; do
  set -- $shape
  timeout 240 $BIN/bin/forward_bench --config bench/configs/qwen3-8b.json --batch $1 --seq $2 --warmup 1 --iters 3 \
    --attn-kernel v1,v2,v2k32 --profile --gemm-peak 2>&1 | tee $OUT/prefill_bench_qwen3_${1}x${2}.log
done

# 4. next to transformers bf16 (sdpa), same shapes, OSCAR with the default (v2) kernel.
timeout 300 python3 bench/forward_vs_transformers.py --forward-bench $BIN/bin/forward_bench --warmup 1 --iters 3 --rounds 1 \
  --case bench/configs/qwen3-8b.json:8x2048 --case bench/configs/qwen3-8b.json:1x32768 \
  --json $OUT/prefill_fwd_vs_hf.json > $OUT/prefill_fwd_vs_hf.log 2> $OUT/prefill_fwd_vs_hf.err
cat $OUT/prefill_fwd_vs_hf.log

# 5. compute-sanitizer memcheck on the attention kernel tests (skip the 32K spot test: O(T) host ref is fine but the
#    sanitized kernel is 10-100x slower).
CS=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
if [ -n "$CS" ]; then
  timeout 240 $CS --tool memcheck --error-exitcode 3 $BIN/bin/test_gpu \
    --gtest_filter='Shapes/FwdGpuAttention.*:FwdGpuAttentionChecks*' > $OUT/prefill_memcheck.log 2>&1
  echo "memcheck exit $? (0 = clean)"; tail -3 $OUT/prefill_memcheck.log
else
  echo "compute-sanitizer not found" | tee $OUT/prefill_memcheck.log
fi

echo "=== summary ==="
grep -h "attn v\|measured peak\|GEMMs .* ms" $OUT/prefill_bench_qwen3_*.log
grep -h "tokens vs fp32\|tinystories\|transformers bf16 (sdpa) vs fp32" $OUT/prefill_tests.log $OUT/prefill_golden.log
grep -E "^\[  (PASSED|FAILED)" $OUT/prefill_tests.log
