#!/usr/bin/env bash
# splitrule (issue #6): decode_attention_num_splits' default (splits of at most 8K tokens for groups <= 4, the
# narrow layout) against the previous rule's counts (at most 16K for every group), at the shapes where they differ
# for qwen3-8b (group 4), run with --splits OLD so that each line reads "OLD splits: X us (R x the default)":
# R > 1 means the new default is faster. llama3-70b (group 8) rows are printed too; its counts did not change.
# Expected GPU time: ~3 min. Needs: $BIN, $OUT, cwd = repo.
# Look for: splitrule_bench.txt, the "fused with N splits" lines of qwen3-8b.
source scripts/device/common.sh
status=0
# torch SDPA bf16 (flash) at the 5x goal's 128K shapes, in the same process lifetime of the GPU, so that the bench
# rows of 8 x 128K and 32 x 128K carry vs_torch for the new default.
timeout 90 python3 bench/torch_sdpa_decode.py --batches 8,32 --contexts 131072 > "$OUT/splitrule_torch.txt" \
  2> "$OUT/splitrule_torch.err" || status=1
# batch context old-count(s): 32 x 32K 2 (new 4), 32 x 64K 4 (new 8), 8 x 128K 8 (new 16), 32 x 128K 8 (new 16),
# 64 x 16K 1 (new 2); 64 x 128K (new 16 vs 8) does not fit the bench's bf16 and baseline caches.
shapes=("8 131072 8" "32 131072 8" "32 32768 2" "32 65536 4" "64 16384 1")
for shape in "${shapes[@]}"; do
  set -- $shape
  echo "== batch $1 context $2 old splits $3" >> "$OUT/splitrule_bench.txt"
  timeout 100 "$BIN/bin/decode_attention_bench" --iters 20 --max-context "$2" --batch "$1" --context "$2" --splits "$3" \
    --torch-results "$OUT/splitrule_torch.txt" >> "$OUT/splitrule_bench.txt" 2>&1 || status=1
done
grep -E "^==|qwen3-8b|llama3-70b" "$OUT/splitrule_bench.txt" | cut -c1-110
exit $status
