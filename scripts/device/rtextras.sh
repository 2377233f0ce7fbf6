#!/usr/bin/env bash
# rtextras (issue #6 runtime extras) on one H100. Expected GPU time: about 2 minutes
#   ~60 s  test_gpu FoldValueRotation* / EngineFoldV* / EvalGpuHadamard2* (qwen3-tiny; the CPU eval simulation of
#          2 x 768 tokens is most of it)
#   ~60 s  kv_write_bench on the Qwen3-8B shape (random weights, 15 GiB; 32K-token prompt: 1+3 plain prefills and
#          1+3 prefills with the engine's write path, ~2.4 s each, plus 20 kv_write passes)
# Needs: $BIN (bin/ + lib/ from scripts/pack-portable.sh), fixtures at /work/shared/fixtures, $OUT, cwd = repo.
# Look for: the gtest summary "[  PASSED  ] 4 tests" (and the printed fold/hadamard2 numbers), and the bench line
#   "RESULT kv_write ... us = X% of prefill | engine write path +Y us = Z% of prefill (goal < 2%)".
source scripts/device/common.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/rtextras_device.txt"

status=0
timeout 300 "$BIN/bin/test_gpu" \
  --gtest_filter='FoldValueRotation*:EngineFoldV*:EvalGpuHadamard2*' \
  2>&1 | tee "$OUT/rtextras_test_gpu.log" || status=1

timeout 240 "$BIN/bin/kv_write_bench" --config bench/configs/qwen3-8b.json --seq 32768 --iters 3 \
  2>&1 | tee "$OUT/rtextras_kv_write_bench.log" || status=1

grep -E "fold|hadamard2|RESULT|PASSED|FAILED" "$OUT"/rtextras_*.log > "$OUT/rtextras_summary.txt" || true
exit $status
