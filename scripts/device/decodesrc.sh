#!/usr/bin/env bash
# decodesrc (issue #6): where the fused INT2 decode kernel's excess global sectors and shared wavefronts come from
# (ncu reported 48 % / 57 % excess at 8 x 32K on 2026-12-06): one kernel under ncu with source counters, exported
# per CUDA source line and per SASS instruction (the build has -lineinfo). Expected GPU time ~1.5 min.
# Needs: $BIN, $OUT, cwd = repo (setup.sh links /work/main to it, where the line info points).
# Look for: decodesrc_cuda.csv / decodesrc_sass.csv, columns "L2 Theoretical Sectors Global Excessive" and
#   "L1 Wavefronts Shared Excessive" per line.
source scripts/device/common.sh
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
[ -n "$NCU" ] || { echo "no ncu"; exit 1; }
status=0
timeout 200 "$NCU" --section SourceCounters --section WarpStateStats --section MemoryWorkloadAnalysis_Tables \
  --import-source yes -k regex:'decode_attention_int2_kernel' -c 1 --launch-skip 1 -o "$OUT/decodesrc" \
  "$BIN/bin/decode_attention_bench" --eager --iters 2 --max-context 32768 --batch 8 --context 32768 \
  > "$OUT/decodesrc_ncu.log" 2>&1 || status=1
for view in cuda sass; do
  timeout 60 "$NCU" -i "$OUT/decodesrc.ncu-rep" --page source --csv --print-source $view \
    > "$OUT/decodesrc_$view.csv" 2> "$OUT/decodesrc_$view.err" || status=1
  wc -l "$OUT/decodesrc_$view.csv"
done
timeout 60 "$NCU" -i "$OUT/decodesrc.ncu-rep" --page details > "$OUT/decodesrc_details.txt" 2>&1 || status=1
xz -T4 "$OUT/decodesrc.ncu-rep"
head -3 "$OUT/decodesrc_cuda.csv" | cut -c1-600
exit $status
