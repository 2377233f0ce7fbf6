#!/usr/bin/env bash
# decodebulk (issue #6): the INT2 decode kernel with its ring filled by TMA bulk copies (sm_90) against the previous
# binary (cp.async per lane; .devcarry/base_decode_attention_bench.xz), lean enough for a short device budget:
#   ~90 s  test_gpu DecodeInt2Paths (21 cases x 3 launch variants vs the double reference) and the engine's decode
#   ~90 s  decode_attention_bench new / base alternated at the goal shapes and 1 x 32K (CUDA graph timing)
#   ~15 s  scripts/device/decodesass.sh: ncu SASS mix of the new fused kernel at 8 x 128K
# Needs: $BIN, $OUT, cwd = repo. Look for: "[  PASSED  ]" in decodebulk_test_gpu.log; decodebulk_bench.txt int2_us.
source scripts/device/common.sh
status=0
timeout 130 "$BIN/bin/test_gpu" --gtest_filter='*DecodeInt2Paths*:*DecodeSpread*:*EngineQuantized*:*EngineBatch*' \
  > "$OUT/decodebulk_test_gpu.log" 2>&1 || status=1
grep -E "^\[  (PASSED|FAILED) |FAILED TEST|tests? ran" "$OUT/decodebulk_test_gpu.log" | head -20
base=/tmp/base_decode_attention_bench
[ -x $base ] || { xz -dc .devcarry/base_decode_attention_bench.xz > $base && chmod +x $base; }
for shape in "8 131072" "32 131072" "8 32768" "1 131072" "1 32768"; do
  set -- $shape
  for which in new base new base; do
    exe=$base; [ $which = new ] && exe=$BIN/bin/decode_attention_bench
    echo "== $which batch $1 context $2" >> "$OUT/decodebulk_bench.txt"
    timeout 40 "$exe" --iters 20 --max-context "$2" --batch "$1" --context "$2" >> "$OUT/decodebulk_bench.txt" 2>&1 || status=1
  done
done
grep -E "^==|^qwen3-8b|^llama3-70b" "$OUT/decodebulk_bench.txt" | cut -c1-75
bash scripts/device/decodesass.sh >> "$OUT/decodebulk_sass.console" 2>&1 || status=1
exit $status
