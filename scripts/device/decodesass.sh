#!/usr/bin/env bash
# decodesass (issue #6): the fused INT2 decode kernel's instruction mix where its loop dominates (default: Qwen3-8B
# shape, batch 8 x 128K, 8 splits; argument "B CONTEXT" for another shape): Nsight Compute source counters per SASS
# instruction (executed warp instructions and stall samples), exported as CSV with the SASS text, to count what
# the INT2 tile loop spends its issue slots on (the loop is bound by instruction issue, 77-79 % of the copy
# bandwidth at 32 x 128K against the 85 %). Expected GPU time ~1.5 min.
# Needs: $BIN, $OUT, cwd = repo. Look for: decodesass.csv (columns "Source", "Instructions Executed",
#   "Warp Stall Sampling (All Samples)"); summarize with scripts/decode_sass_mix.py.
source scripts/device/common.sh
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
[ -n "$NCU" ] || { echo "no ncu"; exit 1; }
batch=${1:-8}
context=${2:-131072}
status=0
timeout 240 "$NCU" --section SourceCounters --section WarpStateStats --section InstructionStats --import-source yes \
  -k regex:'decode_attention_int2_kernel' -c 1 --launch-skip 1 -o "$OUT/decodesass" \
  "$BIN/bin/decode_attention_bench" --eager --iters 2 --max-context "$context" --batch "$batch" --context "$context" \
  > "$OUT/decodesass.log" 2>&1 || status=1
timeout 60 "$NCU" -i "$OUT/decodesass.ncu-rep" --page source --csv --print-source sass \
  > "$OUT/decodesass.csv" 2> "$OUT/decodesass.err" || status=1
timeout 60 "$NCU" -i "$OUT/decodesass.ncu-rep" --page details > "$OUT/decodesass_details.txt" 2>&1 || status=1
xz -T4 "$OUT/decodesass.ncu-rep" "$OUT/decodesass.csv"
grep -E "Duration|Issue Slots Busy|Executed Ipc|Warp Cycles Per Issued|No Eligible" "$OUT/decodesass_details.txt" | head -12
exit $status
