#!/usr/bin/env bash
# Nsight Compute profiles of the kernels issues #4/#6/#10 still have speed goals on, plus compute-sanitizer over the
# whole GPU test suite. Expected GPU time: ~6 min (ncu ~3 min, memcheck ~3 min).
# Arg: "ncu", "sanitize", "sanitize-params" or "all" (default). Writes flat text reports to $OUT.
set -uo pipefail
[ -f scripts/device/setup.sh ] && [ -z "${BIN:-}" ] && source scripts/device/setup.sh
: "${BIN:?}" "${OUT:?}"
what=${1:-all}
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
CS=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
echo "ncu=$NCU cs=$CS"
SECT="--section SpeedOfLight --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables --section WarpStateStats --section SchedulerStats --section Occupancy --section LaunchStats --section ComputeWorkloadAnalysis --section InstructionStats --section SourceCounters"
prof() {  # name kernel-regex cmd...
  local name=$1 k=$2; shift 2
  timeout 150 $NCU $SECT -k regex:"$k" -c 1 --launch-skip 1 "$@" > $OUT/ncu_$name.txt 2>&1
  echo "ncu $name rc=$?"; grep -E "Duration|Memory Throughput|DRAM Throughput|Compute \(SM\)|Achieved Occupancy|Registers Per|Issue Slots Busy|No Eligible" $OUT/ncu_$name.txt | head -12
}
if [ -n "$NCU" ] && { [ "$what" = ncu ] || [ "$what" = all ]; }; then
  DB="$BIN/bin/decode_attention_bench --eager --iters 2 --max-context 32768"
  prof int2_b8_32k 'decode_attention_int2_kernel' $DB --batch 8 --context 32768
  prof int2_b1_32k 'decode_attention_int2_kernel' $DB --batch 1 --context 32768
  prof window_b8_32k 'decode_attention_window_kernel' $DB --batch 8 --context 32768
  prof merge_b8_32k 'decode_attention_merge_kernel' $DB --batch 8 --context 32768
  prof seg_b8_32k 'decode_attention_seg_kernel' $DB --batch 8 --context 32768
  prof kvwrite_32k 'kv_write_kernel' $BIN/bin/kv_write_bench --config bench/configs/qwen3-8b.json --seq 32768 --skip-prefill --write-iters 2
  prof prefill_v2_32k 'attention_prefill_v2_kernel' $BIN/bin/forward_bench --config bench/configs/qwen3-8b.json --batch 1 --seq 32768 --warmup 0 --iters 1 --attn-kernel v2
  # the full forward at 32K with the per-op breakdown, for Llama-3-8B too (re-measure with v2)
  timeout 200 $BIN/bin/forward_bench --config bench/configs/llama3-8b.json --batch 8 --seq 2048 --warmup 1 --iters 3 --attn-kernel v2 --profile --gemm-peak > $OUT/fwd_llama3_8x2048.log 2>&1
  timeout 200 $BIN/bin/forward_bench --config bench/configs/llama3-8b.json --batch 1 --seq 32768 --warmup 1 --iters 2 --attn-kernel v2 --profile > $OUT/fwd_llama3_1x32768.log 2>&1
  timeout 300 python3 bench/forward_vs_transformers.py --forward-bench $BIN/bin/forward_bench --warmup 1 --iters 3 --rounds 1 \
    --case bench/configs/llama3-8b.json:8x2048 --case bench/configs/llama3-8b.json:1x32768 \
    --json $OUT/fwd_llama3_vs_hf.json > $OUT/fwd_llama3_vs_hf.log 2> $OUT/fwd_llama3_vs_hf.err
  cat $OUT/fwd_llama3_vs_hf.log
fi
# "sanitize-params": only the parameterized suites (Shapes/..., Cases/..., ...), whose first run was lost to a log-path bug
if [ -n "$CS" ] && [ "$what" != ncu ]; then
  # every GPU test under memcheck, one gtest suite at a time so a slow one cannot hide the rest
  # arg 2: a gtest filter of suites (default: every suite); suite lines of --gtest_list_tests end in "."
  suites=$($BIN/bin/test_gpu --gtest_list_tests --gtest_filter="${2:-*}" | grep -E '^[A-Za-z].*\.$' | sed 's/\.$//' | sort -u)
  [ "$what" = sanitize-params ] && suites=$(echo "$suites" | grep /)
  : > $OUT/memcheck_summary.txt
  for s in $suites; do
    start=$SECONDS
    log=$OUT/memcheck_${s//\//_}.log
    # rc 255 with "terminated before first instrumented API call": the suite made no CUDA call (host-only checks)
    timeout ${MEMCHECK_SUITE_S:-120} $CS --tool memcheck --error-exitcode 3 --print-limit 20 $BIN/bin/test_gpu --gtest_filter="$s.*" > $log 2>&1
    rc=$?
    echo "$s rc=$rc $((SECONDS-start))s $(grep -E 'ERROR SUMMARY' $log | tail -1) $(grep -cE '^\[       OK' $log) ok" | tee -a $OUT/memcheck_summary.txt
    [ $rc -eq 0 ] && rm -f $log
  done
  timeout 150 $CS --tool racecheck --error-exitcode 3 $BIN/bin/test_gpu --gtest_filter='*Decode*:*KvWrite*' > $OUT/racecheck_decode.log 2>&1
  echo "racecheck decode rc=$?" | tee -a $OUT/memcheck_summary.txt; tail -3 $OUT/racecheck_decode.log
fi
