#!/usr/bin/env bash
# fp8 (issue #6: the FP8 e4m3 baseline cache format on the GPU: kv_write KvWriteMode::Fp8 + decode over
# Fp8PageGeometry pages) on one H100.
# Expected GPU time: about 2.5 minutes
#   ~30 s  test_gpu KvWriteFp8Gpu* / DecodeFp8Gpu* (new) + KvWriteGpu* / DecodeGpu* / DecodeInt2Paths* (INT2
#          regression: decode_attention.cu's launch path was edited); most of it is the CPU double reference
#   ~80 s  decode_attention_bench --max-context 32768: the new fp8_us and int4_us columns next to int2_us
#   ~40 s  compute-sanitizer memcheck of the new tests (and racecheck of one FP8 decode case: shared partials)
# Needs: $BIN (bin/ + lib/ from scripts/device/pack.sh), fixtures at /work/shared/fixtures, $OUT, cwd = repo.
# Look for:
#   fp8_test_gpu.log: "[  PASSED  ]" and no FAILED. KvWriteFp8Gpu/{0,1,2} = bit-exact pools (bf16 and fp32 rows) vs
#     kv_write_ref and HeadQuantizer. DecodeFp8Gpu cases print "nmse" (must be <= 1e-5; expect ~1e-12..1e-9 since
#     the kernel dequantizes exactly and accumulates in fp32).
#   fp8_bench.log: fp8_us and its "/int2" (FP8 moves ~3.6x the INT2 bytes, so expect ~2.5-4x int2_us at long
#     context; the trailing "(fp8 N GB/s P%)" says how close to the copy bandwidth it is), int4_us and "/int2".
#   fp8_memcheck.log / fp8_racecheck.log: "ERROR SUMMARY: 0 errors".
source scripts/device/common.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/fp8_device.txt"

status=0
timeout 200 "$BIN/bin/test_gpu" \
  --gtest_filter='*KvWriteFp8Gpu*:*DecodeFp8Gpu*:DecodeFp8GpuCheck*:*KvWriteGpu*:*DecodeGpu*:*DecodeInt2Paths*' \
  2>&1 | tee "$OUT/fp8_test_gpu.log" || status=1

timeout 200 "$BIN/bin/decode_attention_bench" --max-context 32768 --iters 20 \
  2>&1 | tee "$OUT/fp8_bench.log" || status=1

SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
if [ -n "$SAN" ]; then
  # The 14K-token cases are skipped under the sanitizer (their time is the CPU reference, the kernels are the same).
  timeout 150 "$SAN" --tool memcheck --leak-check no "$BIN/bin/test_gpu" \
    --gtest_filter='*KvWriteFp8Gpu*:*DecodeFp8Gpu*:DecodeFp8GpuCheck*:-*len14000*' \
    > "$OUT/fp8_memcheck.log" 2>&1 || status=1
  tail -3 "$OUT/fp8_memcheck.log"
  timeout 60 "$SAN" --tool racecheck "$BIN/bin/test_gpu" \
    --gtest_filter='*DecodeFp8Gpu*len4097_p64_w16_40_s3*' > "$OUT/fp8_racecheck.log" 2>&1 || status=1
  tail -3 "$OUT/fp8_racecheck.log"
else
  echo "no compute-sanitizer found" | tee "$OUT/fp8_sanitizer_missing.txt"
fi

grep -E "nmse|PASSED|FAILED|ERROR SUMMARY|/int2|qwen3-8b|llama3-70b" "$OUT"/fp8_*.log > "$OUT/fp8_summary.txt" || true
exit $status
