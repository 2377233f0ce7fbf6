#!/usr/bin/env bash
# segkern (issue #10 runtime: segmented / spectral KV pages) on one H100. Expected GPU time: about 2.5 minutes
#   ~10 s  test_gpu SegKvWriteGpu* / SegDecodeGpu* (kv_write bit-exact vs kv_write_ref; decode vs the double ref)
#   ~60 s  test_gpu EngineSpectral* (spectral calibration of qwen3-tiny on the host CPU with widths {0,1,2,4},
#          then 3 engines x 128 steps and the CPU simulation of 128 tokens)
#   ~10 s  test_gpu DecodeInt2Paths* (the INT2 kernel must be unchanged by the shared edits)
#   ~60 s  decode_attention_bench --max-context 32768: INT2 vs segmented (same bytes) in the same run
# Needs: $BIN (bin/ + lib/ from scripts/pack-portable.sh), fixtures at /work/shared/fixtures, $OUT, cwd = repo.
# Look for: "[  PASSED  ]" with no FAILED in segkern_test_gpu.log; the printed nmse of each SegDecodeGpu case
#   (<= 1e-5); the EngineSpectral lines "spectral engine vs CPU simulation: mean logits nmse ..., top-1 agreement"
#   and "greedy: first N of 16 tokens identical"; in segkern_bench.log the last two columns seg_us and seg/int2
#   (goal: seg/int2 <= 1.10x at the same bytes).
source scripts/device/common.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/segkern_device.txt"

status=0
timeout 300 "$BIN/bin/test_gpu" \
  --gtest_filter='*KvWriteGpu*:*SegDecodeGpu*:EngineSpectral*:*DecodeInt2Paths*' \
  2>&1 | tee "$OUT/segkern_test_gpu.log" || status=1

timeout 240 "$BIN/bin/decode_attention_bench" --max-context 32768 --iters 20 \
  2>&1 | tee "$OUT/segkern_bench.log" || status=1

grep -E "nmse|spectral engine|greedy|layer [0-9]|PASSED|FAILED|seg/int2|qwen3-8b|llama3-70b" "$OUT"/segkern_*.log \
  > "$OUT/segkern_summary.txt" || true
exit $status
