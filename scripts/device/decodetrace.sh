#!/usr/bin/env bash
# decodetrace (issue #6): per-block phase timestamps of the fused INT2 decode kernel (decode_attention_bench
# --trace: globaltimer at block entry/exit, clock64 at the end of the query setup, of warp 0's tiles, of the
# block's tiles, of the window share, of the ticket and of the merge) at 1 x 4K, 8 x 4K, 8 x 32K, 8 x 128K, to see
# where the per-call intercept goes (ncu: the SMs are idle for ~30 % of the kernel at 8 x 4K). Plus the decode
# tests (the trace hooks are in the kernel). Expected GPU time ~2 min. Needs: $BIN, $OUT, cwd = repo.
source scripts/device/common.sh
status=0
if [ "${1:-}" != notests ]; then  # "notests": the caller runs the decode tests itself
  timeout 150 "$BIN/bin/test_gpu" --gtest_filter='*DecodeInt2Paths*' > "$OUT/decodetrace_test_gpu.log" 2>&1 || status=1
  grep -E "^\[  (PASSED|FAILED) |FAILED TEST" "$OUT/decodetrace_test_gpu.log" | head
fi
for shape in "1 4096" "8 4096" "8 32768" "8 131072" "1 32768"; do
  set -- $shape
  timeout 90 "$BIN/bin/decode_attention_bench" --iters 20 --max-context "$2" --batch "$1" --context "$2" \
    --trace "$OUT/decodetrace.txt" >> "$OUT/decodetrace_bench.log" 2>&1 || status=1
done
grep -E "qwen3-8b|llama3-70b" "$OUT/decodetrace_bench.log" | cut -c1-80
wc -l "$OUT/decodetrace.txt"
xz -T4 "$OUT/decodetrace.txt"
exit $status
