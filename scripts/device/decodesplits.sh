#!/usr/bin/env bash
# decodesplits (issue #6): the fused INT2 decode launch at other split counts than decode_attention_num_splits()'s
# (decode_attention_bench --splits), at the shapes where the per-call floor matters: batch 1 at 32K and 128K, and
# batch 8 at 128K (the 5x-vs-torch goal's shapes); argument "wide": shorter contexts and batches 8 and 32 instead;
# "b1": batch 1 at 4K..64K against the old default split counts; "waves": the goal shapes past one wave.
# Expected GPU time: ~1 min each. Needs: $BIN, $OUT, cwd = repo.
# Look for: decodesplits_bench.txt, the "fused with N splits" lines (ratio < 1: faster than the default).
source scripts/device/common.sh
status=0
shapes=("1 32768 8,16,33,44,66,99,132" "1 131072 16,33,44,66,99,132,198" "8 131072 2,4,6,8,12,16")
# "wide": the shorter contexts and middle batches, to fit a split rule (1 x 32K ran fastest at 16 splits, not 66)
[ "${1:-}" = wide ] && shapes=("1 4096 4,8,16" "1 8192 8,16,32,66" "1 16384 8,16,33,66" "1 65536 16,33,66"
  "8 4096 1,2,4" "8 16384 1,2,4,8" "8 32768 2,4,6" "32 4096 1,2" "32 32768 1,2")
# "b1": batch 1 at 4K..64K against the fill's split counts (32, 64, 66), which were the default before the
# batch-1 rule of decode_attention_num_splits (splits of ~2K tokens, at least 64 blocks)
[ "${1:-}" = b1 ] && shapes=("1 4096 32" "1 8192 64" "1 16384 16,66" "1 32768 33,66" "1 65536 66")
# "waves": the goal shapes at split counts past one wave of resident blocks. At 8 x 128K the SMs' last blocks end
# 234-282 us apart (2026-12-07e trace) though every SM holds the same work; with several waves of shorter blocks
# the block scheduler balances the SMs (deterministically: each block's tokens are fixed), at the price of more
# blocks' setup and window share and a longer merge.
[ "${1:-}" = waves ] && shapes=("8 131072 16,24,32,48,64" "32 131072 4,6,8,16" "8 32768 16,24,32")
for shape in "${shapes[@]}"; do
  set -- $shape
  echo "== batch $1 context $2 splits $3" >> "$OUT/decodesplits_bench.txt"
  timeout 90 "$BIN/bin/decode_attention_bench" --iters 20 --max-context "$2" --batch "$1" --context "$2" --splits "$3" \
    >> "$OUT/decodesplits_bench.txt" 2>&1 || status=1
done
grep -E "^==|qwen3-8b|llama3-70b" "$OUT/decodesplits_bench.txt" | cut -c1-160
exit $status
