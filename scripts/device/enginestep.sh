#!/usr/bin/env bash
# enginestep (issue #6 runtime): rt::Engine decode steps end to end on random Qwen3-8B-shaped weights
# (bench/engine_step_bench.cu): INT2 and bf16 caches, greedy picks on the device against the host path
# (keep_logits), at 8 x 16K and 32 x 4K. Expected GPU time ~2 min. Needs: $BIN, $OUT, cwd = repo.
# Look for: enginestep_bench.txt, step_ms per (cache, picks) and the %d2d of the bytes a step must read.
source scripts/device/common.sh
status=0
for shape in "8 16384" "32 4096"; do
  set -- $shape
  timeout 150 "$BIN/bin/engine_step_bench" --config bench/configs/qwen3-8b.json --batch "$1" --context "$2" \
    --cache int2,bf16 --picks device,host --steps 32 >> "$OUT/enginestep_bench.txt" 2>&1 || status=1
done
cat "$OUT/enginestep_bench.txt"
exit $status
