#!/usr/bin/env bash
# xfeval (issue #10): the whitening storage transform (bundle 2.0, calibrate's default --transform auto) on the GPU
# path. Calibrates qwen3-tiny-trained on the device with the CLI defaults (Hadamard + error-feedback tables; 24 x 1024
# + 8 held-out, the calibration of docs/results.md "The whitening transform through the product") with the default
# transform and with --transform none, then `oscar eval --device cuda` (the engine's kv_write with a per-head matrix and
# key mean, decode_attention with A^-T; not the CPU simulation) of both next to Hadamard RTN (hadamard2) on held-out
# docs, moby-dick and tinystories at 1K (16 seqs) and docs + moby at 4K (8 seqs).
# Argument "quick": docs and moby at 1K only (~1.5 min). Expected GPU time: ~3 min. Needs: $BIN, fixtures at /work/shared/fixtures, $OUT, cwd = repo.
# Look for: xfeval_summary.txt, KL>win of auto (2.0) vs none (1.x) vs hadamard2 per text and context.
source scripts/device/common.sh
F=/work/shared/fixtures; T=$F/text; M=$F/models/qwen3-tiny-trained; O=$BIN/bin/oscar
status=0
for xf in auto none; do
  timeout 120 "$O" calibrate --model $M --data $T/war-and-peace.txt $T/tiny-shakespeare.txt $T/code-llamacpp-mit.txt \
    $T/wikitext-2-raw-test.txt --num-seqs 24 --seq-len 1024 --heldout-seqs 8 --device cuda --transform $xf \
    --out /tmp/xfeval-$xf.oscar > "$OUT/xfeval_calib_$xf.log" 2>&1 || status=1
  "$O" inspect /tmp/xfeval-$xf.oscar 2>&1 | head -12 > "$OUT/xfeval_inspect_$xf.txt"
done
: > "$OUT/xfeval_summary.txt"
jobs="docs:1024:16 moby:1024:16 tiny:1024:16 docs:4096:8 moby:4096:8"
[ "${1:-}" = quick ] && jobs="docs:1024:16 moby:1024:16"
for job in $jobs; do
  IFS=: read -r text ctx seqs <<< "$job"
  case $text in
    docs) data="$T/python-docs-heldout.txt $T/linux-docs-heldout.txt" ;;
    moby) data=$T/moby-dick.txt ;;
    tiny) data=$T/tinystories-sample.txt ;;
  esac
  for xf in auto none; do
    name=xfeval_${text}_${ctx}_$xf
    timeout 100 "$O" eval --model $M --bundle /tmp/xfeval-$xf.oscar --data $data --modes bf16,oscar,hadamard2 \
      --context $ctx --num-seqs $seqs --greedy-prompts 0 --device cuda --gpu-batch 8 --oscar-clip 0.96,0.92 \
      --out "$OUT/$name" > "$OUT/$name.log" 2>&1 || { status=1; tail -3 "$OUT/$name.log"; }
    grep -E "^(oscar|hadamard2) " "$OUT/$name.log" | sed "s/^/$text $ctx transform=$xf: /" >> "$OUT/xfeval_summary.txt"
  done
done
cat "$OUT/xfeval_summary.txt"
exit $status
