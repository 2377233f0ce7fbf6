#!/usr/bin/env bash
# decodefloor (issue #6): where the fused INT2 decode call's fixed cost goes. Graph timings fit
# ~1.0 us per 16-token tile per warp plus a ~30-42 us intercept (8 x 4K 50 us with 8 tiles per warp, 8 x 32K 107 us
# with 63), and that intercept is ~40 % of the call at 8 x 32K. Expected GPU time ~2.5 min.
#   - decode_attention_bench at 1 x 4K, 8 x 4K, 8 x 32K (graph timing, every variant column)
#   - nsys (if installed): the graph's kernel nodes at 8 x 4K, per-kernel durations and the gaps between them
#   - ncu SpeedOfLight/Launch/Occupancy of rotate_q and the fused INT2 kernel at those shapes (durations under
#     ncu's locked clocks), and SASS source counters (stall samples per instruction) of the INT2 kernel at 8 x 4K
# Needs: $BIN, $OUT, cwd = repo.
source scripts/device/common.sh
DB="$BIN/bin/decode_attention_bench"
status=0
for shape in "1 4096" "8 4096" "8 32768"; do
  set -- $shape
  timeout 60 "$DB" --iters 20 --max-context "$2" --batch "$1" --context "$2" 2>&1 | tee -a "$OUT/decodefloor_bench.log" \
    || status=1
done

NSYS=$(command -v nsys || ls /usr/local/cuda*/bin/nsys /opt/nvidia/nsight-systems*/bin/nsys 2>/dev/null | head -1)
if [ -n "$NSYS" ]; then
  timeout 120 "$NSYS" profile --cuda-graph-trace=node -o "$OUT/decodefloor_b8_4k" --force-overwrite true \
    "$DB" --iters 20 --max-context 4096 --batch 8 --context 4096 > "$OUT/decodefloor_nsys.log" 2>&1 || status=1
  timeout 60 "$NSYS" stats --report cuda_gpu_kern_sum --report cuda_gpu_trace --format csv \
    -o "$OUT/decodefloor_b8_4k" "$OUT/decodefloor_b8_4k.nsys-rep" >> "$OUT/decodefloor_nsys.log" 2>&1 || status=1
  rm -f "$OUT"/*.sqlite
  xz -T4 "$OUT"/*.nsys-rep 2>/dev/null
else
  echo "nsys not found"
fi

NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
if [ -n "$NCU" ]; then
  SECT="--section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats"
  for shape in "1 4096" "8 4096" "8 32768"; do
    set -- $shape
    timeout 90 "$NCU" $SECT -k regex:'decode_attention_int2_kernel|decode_rotate_q_kernel' -c 2 --launch-skip 2 \
      "$DB" --eager --iters 2 --max-context "$2" --batch "$1" --context "$2" \
      > "$OUT/ncu_floor_b$1_$2.txt" 2>&1 || status=1
    echo "== b$1 $2"; grep -E "decode_attention_int2|decode_rotate_q|Duration|Elapsed Cycles|SM Active Cycles" \
      "$OUT/ncu_floor_b$1_$2.txt" | head -12
  done
  timeout 120 "$NCU" --section SourceCounters --section WarpStateStats --import-source yes \
    -k regex:'decode_attention_int2_kernel' -c 1 --launch-skip 1 -o "$OUT/decodefloor_src" \
    "$DB" --eager --iters 2 --max-context 4096 --batch 8 --context 4096 > "$OUT/decodefloor_src.log" 2>&1 || status=1
  timeout 60 "$NCU" -i "$OUT/decodefloor_src.ncu-rep" --page source --csv --print-source sass \
    > "$OUT/decodefloor_sass.csv" 2> "$OUT/decodefloor_sass.err" || status=1
  xz -T4 "$OUT/decodefloor_src.ncu-rep"
fi
exit $status
