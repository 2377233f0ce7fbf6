#!/usr/bin/env bash
# efwrite (issues #10 + #6: INT2 quantize-on-write with error-feedback rounding) on one H100.
# Expected GPU time: about 2.5 minutes (hard cap ~6 min from the timeouts below)
#   ~40 s  test_gpu KvWriteEfGpu* (EF kernel bit-exact vs kv_write_ref: d 64/128/256, 1/3/8 KV heads, clip feedback
#          on/off, 4 clip positions, stress + Gaussian-with-outlier tokens, tails) + KvWriteInt2Gpu* (the RTN
#          kernel, whose rotation/clip code the EF kernel now shares) + EngineEf* (qwen3-tiny: CPU calibration,
#          prefill records bit-exact vs kv_write_ref with tables, GPU eval vs CPU simulation with tables)
#   ~50 s  kv_write_bench 32K qwen3-8b with the prefill: tiled / radix / legacy / ef kv_write, % of prefill
#   ~10 s  kv_write_bench at decode size (8 INT2 tokens per call): per-launch latency, tiled vs ef
#   ~40 s  compute-sanitizer memcheck (KvWriteEfGpu d = 128) + racecheck (its smaller test)
# Needs: $BIN (bin/ + lib/), fixtures at /work/shared/fixtures, $OUT, cwd = repo. Optional arg "bench": the 32K
#   bench alone. Optional arg "ncu": profile one
#   EF call (layer 0 V) into ncu_efwrite_32k.txt (+~30 s).
# Look for:
#   efwrite_test_gpu.log  "[  PASSED  ]" and no FAILED; the two "EF oscar cpu/cuda" lines (PPL / KL close).
#   efwrite_bench.log     "kv_write alone [ef] ... one INT2 call (K/V mean): N us" next to the [tiled] line, and
#                         "RESULT ef/tiled kv_write = X.XXx" (expected several x: O(d^2) per token) and
#                         "RESULT kv_write ef ... % of prefill".
#   efwrite_sanitize.txt  "ERROR SUMMARY: 0 errors" for memcheck and racecheck.
source scripts/device/common.sh
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/efwrite_device.txt"

status=0
# Argument "bench": only the 32K kv_write_bench (alone and the engine write path serial / overlapped), ~1 min.
if [ "${1:-}" = bench ]; then
  timeout 150 "$BIN/bin/kv_write_bench" --config bench/configs/qwen3-8b.json --seq 32768 --impl all \
    2>&1 | tee "$OUT/efwrite_bench.log" || status=1
  exit $status
fi
timeout 240 "$BIN/bin/test_gpu" --gtest_filter='*KvWriteEfGpu*:*KvWriteInt2Gpu*:EngineEf*' \
  2>&1 | tee "$OUT/efwrite_test_gpu.log" || status=1

timeout 150 "$BIN/bin/kv_write_bench" --config bench/configs/qwen3-8b.json --seq 32768 --impl all \
  2>&1 | tee "$OUT/efwrite_bench.log" || status=1
# A decode step's write: 8 new INT2 tokens per call (seq 72 = sink 64 + 8), so "one INT2 call" is the per-launch
# latency every decode step pays per layer and tensor (staging R and the table included).
timeout 60 "$BIN/bin/kv_write_bench" --config bench/configs/qwen3-8b.json --seq 72 --skip-prefill --write-iters 50 \
  --impl all 2>&1 | tee "$OUT/efwrite_bench_decode.log" || status=1
# The same as one CUDA graph: GPU time only, what a graph-launched decode step pays (the eager numbers above include
# the host's launch path).
timeout 60 "$BIN/bin/kv_write_bench" --config bench/configs/qwen3-8b.json --seq 72 --skip-prefill --write-iters 50 \
  --impl all --graph 2>&1 | tee "$OUT/efwrite_bench_decode_graph.log" || status=1

NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
[ "${1:-}" = ncu ] || NCU=
if [ -n "$NCU" ]; then
  SECT="--section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy --section LaunchStats --section InstructionStats"
  timeout 120 $NCU $SECT -k regex:'kv_write_int2_ef_kernel' -c 1 --launch-skip 1 \
    "$BIN/bin/kv_write_bench" --config bench/configs/qwen3-8b.json --seq 32768 --skip-prefill --write-iters 2 \
    --impl ef > "$OUT/ncu_efwrite_32k.txt" 2>&1 || status=1
  grep -E "Duration|Executed Instructions|Registers Per|Achieved Occupancy|Issue Slots Busy|Stall" \
    "$OUT/ncu_efwrite_32k.txt" | head -20
fi

CS=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
if [ -n "$CS" ]; then
  : > "$OUT/efwrite_sanitize.txt"
  for spec in "memcheck:HeadDims/KvWriteEfGpu.BitExactWithReference/1" \
              "racecheck:HeadDims/KvWriteEfGpu.ZeroWeightsEqualRtnAndRealTablesDiffer/1"; do
    tool=${spec%%:*}; filter=${spec#*:}
    timeout 120 $CS --tool $tool --error-exitcode 3 --print-limit 20 "$BIN/bin/test_gpu" \
      --gtest_filter="$filter" > "$OUT/efwrite_$tool.log" 2>&1
    echo "$tool rc=$? $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/efwrite_$tool.log" | tail -1)" \
      | tee -a "$OUT/efwrite_sanitize.txt"
  done
fi

grep -hE "PASSED|FAILED|EF oscar|kv_write alone|one INT2|prefill|RESULT" "$OUT"/efwrite_test_gpu.log \
  "$OUT"/efwrite_bench.log "$OUT"/efwrite_bench_decode.log "$OUT"/efwrite_bench_decode_graph.log \
  > "$OUT/efwrite_summary.txt" || true
exit $status
