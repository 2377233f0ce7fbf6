#!/usr/bin/env bash
# streamcal (issue #9: layer-streaming + data-parallel calibration) on one H100. Expected GPU time: about 3 minutes
#   ~40 s  test_gpu LayerStream.* (random 4-layer config: resident vs streamed vs 1/2/3 sharded ranks, both value
#          weightings; depth 2 vs 16 peak memory; qwen3-tiny resident vs streamed vs 2 virtual ranks, whole bundles)
#   ~40 s  test_gpu GpuCalibration.* + FwdGpuModel.* (the resident path after the decoder-layer refactor)
#   ~15 s  oscar calibrate on qwen3-tiny: --device cuda vs --stream-layers vs --gpus 1 (bundle sha256 must match)
#   ~60 s  calibrate_bench, Llama-3-70B shape (80 layers, 8192 hidden, 64/8 heads, ffn 28672), random weights made
#          per layer on the GPU, --stream-layers, 32 x 2048 tokens (≈1e16 FLOP at ~500 TFLOP/s ≈ 20 s + setup)
# Needs: $BIN (bin/ + lib/ from scripts/pack-portable.sh), fixtures at /work/shared/fixtures, $OUT, cwd = repo.
# Look for: "[  PASSED  ]" with no FAILED tests in streamcal_test_gpu.log; three identical sha256 lines in
#   streamcal_cli.txt; in streamcal_bench70b.log the "streamed statistics" line (time, tok/s), "TFLOP/s", "peak device
#   memory" (expect ~10 GB, not 140), "host:" and "transfer overlap".
source scripts/device/common.sh
# NCCL is only dlopen'ed for --gpus > 1 on distinct devices (not run here: one GPU); make torch's copy findable anyway.
nccl_dir=$(python3 -c 'import nvidia.nccl, os; print(os.path.dirname(nvidia.nccl.__file__))' 2>/dev/null || true)
[ -n "$nccl_dir" ] && export LD_LIBRARY_PATH=$nccl_dir/lib:$LD_LIBRARY_PATH
export NCCL_NVLS_ENABLE=0
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/streamcal_device.txt"
fx=/work/shared/fixtures

status=0
timeout 200 "$BIN/bin/test_gpu" --gtest_filter='LayerStream.*:GpuCalibration.*:FwdGpuModel.*' \
  2>&1 | tee "$OUT/streamcal_test_gpu.log" || status=1

tmp=$(mktemp -d)
model=$fx/models/qwen3-tiny-trained
common=(--model "$model" --data "$fx/text/war-and-peace.txt" --num-seqs 16 --seq-len 512 --heldout-seqs 2
        --batch-tokens 2048 --device cuda --json --method published)
# --method published: the streamed/sharded statistics are what is compared; the spectral fit runs on the CPU
# after them and takes minutes, which the 60 s limit per run below would cut off.
{
  for variant in resident stream gpus1; do
    extra=()
    [ $variant = stream ] && extra=(--stream-layers)
    [ $variant = gpus1 ] && extra=(--gpus 1)
    timeout 60 "$BIN/bin/oscar" calibrate "${common[@]}" "${extra[@]}" --out "$tmp/$variant.oscar" > "$tmp/$variant.json" \
      || { echo "$variant: FAILED"; status=1; }
    echo "$variant $(sha256sum "$tmp/$variant.oscar" | cut -c1-64) $(grep -o '"seconds": [0-9.]*' "$tmp/$variant.json")"
  done
} 2>&1 | tee "$OUT/streamcal_cli.txt"
[ "$(awk '$1 ~ /^(resident|stream|gpus1)$/ {print $2}' "$OUT/streamcal_cli.txt" | sort -u | wc -l)" = 1 ] || { echo "bundles differ" | tee -a "$OUT/streamcal_cli.txt"; status=1; }

[ "${1:-}" = quick ] || timeout 240 "$BIN/bin/calibrate_bench" --config bench/configs/llama3-70b.json --stream-layers --num-seqs 32 \
  --seq-len 2048 2>&1 | tee "$OUT/streamcal_bench70b.log" || status=1

grep -E "PASSED|FAILED|peak|streamed statistics|TFLOP|host:|overlap|rank 0|bundles differ" \
  "$OUT"/streamcal_*.log "$OUT/streamcal_cli.txt" > "$OUT/streamcal_summary.txt" || true
rm -rf "$tmp"
exit $status
