#!/usr/bin/env bash
# hE1 (issue #10: error-feedback tables in the bundle, format 1.2) on one H100. Expected GPU time: about 1.5 minutes
#   ~40 s  `oscar calibrate --device cuda` of qwen3-tiny-trained (8 x 512 calibration + 4 held-out, default method,
#          --error-feedback kv): the device path must write tables too (recorded as
#          ef_key_metric sigma_q: the device statistics' per-KV-head Σ_Q, as on the CPU), and the same run with --error-feedback off
#   ~40 s  CPU `oscar eval` of both bundles (python + linux docs, context 1024, 2 sequences) on the host cores:
#          only the calibration runs on the GPU
# Needs: $BIN (bin/ + lib/), fixtures at /work/shared/fixtures, $OUT, cwd = repo.
# Look for: in hE1_summary.txt "format 1.2" with "ef_key_metric = sigma_q" and "ef_tables = 12" for the
#   kv bundle and "format 1.1" for the off bundle; "KL>win" of the kv bundle below the off bundle's (CPU eval of the
#   cuda bundles; on the dev CPU the CPU-calibrated pair at 1K/3 seqs gave 3.19e-3 vs 4.20e-3). rc=0 for every step.
source scripts/device/common.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/hE1_device.txt"
F=/work/shared/fixtures; T=$F/text; M=$F/models/qwen3-tiny-trained; O=$BIN/bin/oscar
status=0
for ef in kv off; do
  timeout 240 "$O" calibrate --model $M --data $T/war-and-peace.txt $T/tiny-shakespeare.txt $T/code-llamacpp-mit.txt \
    $T/wikitext-2-raw-test.txt --num-seqs 8 --seq-len 512 --heldout-seqs 4 --device cuda --error-feedback $ef \
    --out /tmp/hE1-$ef.oscar > "$OUT/hE1_calib_$ef.log" 2>&1
  echo "calibrate $ef rc=$?" | tee -a "$OUT/hE1_summary.txt"; [ -f /tmp/hE1-$ef.oscar ] || status=1
  timeout 60 "$O" inspect /tmp/hE1-$ef.oscar > "$OUT/hE1_inspect_$ef.txt" 2>&1
  grep -E "^format|ef_|error feedback" "$OUT/hE1_inspect_$ef.txt" | sed "s/^/$ef: /" >> "$OUT/hE1_summary.txt"
  timeout 240 "$O" eval --model $M --bundle /tmp/hE1-$ef.oscar --data $T/python-docs-heldout.txt $T/linux-docs-heldout.txt \
    --modes bf16,oscar --context 1024 --num-seqs 2 --greedy-prompts 0 --device cpu --oscar-clip 0.96,0.92 \
    --out "$OUT/hE1_eval_$ef" > "$OUT/hE1_eval_$ef.log" 2>&1
  echo "eval $ef rc=$?" >> "$OUT/hE1_summary.txt"
  grep -E "KL>win|^oscar " "$OUT/hE1_eval_$ef.log" | sed "s/^/$ef: /" >> "$OUT/hE1_summary.txt"
done
cat "$OUT/hE1_summary.txt"
exit $status
