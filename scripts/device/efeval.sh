#!/usr/bin/env bash
# efeval (issue #10): error-feedback rounding end to end on the GPU path. Calibrates qwen3-tiny-trained on the device
# (default method, the calibration of docs/results.md "More varied calibration text": 24 x 1024 + 8 held-out) with
# --error-feedback kv and off, then `oscar eval --device cuda` (the engine's EF writer, not the CPU simulation) of both
# on held-out docs (python + linux) and moby-dick at 1K and 4K, with more sequences than the CPU runs could afford.
# Expected GPU time: ~3 min. Needs: $BIN, fixtures at /work/shared/fixtures, $OUT, cwd = repo.
# Look for: efeval_summary.txt, KL>win of kv vs off per text and context.
source scripts/device/common.sh
F=/work/shared/fixtures; T=$F/text; M=$F/models/qwen3-tiny-trained; O=$BIN/bin/oscar
status=0
for ef in kv off; do
  timeout 200 "$O" calibrate --model $M --data $T/war-and-peace.txt $T/tiny-shakespeare.txt $T/code-llamacpp-mit.txt \
    $T/wikitext-2-raw-test.txt --num-seqs 24 --seq-len 1024 --heldout-seqs 8 --device cuda --error-feedback $ef \
    --out /tmp/efeval-$ef.oscar > "$OUT/efeval_calib_$ef.log" 2>&1 || status=1
done
: > "$OUT/efeval_summary.txt"
for text in docs moby; do
  data="$T/python-docs-heldout.txt $T/linux-docs-heldout.txt"; [ $text = moby ] && data=$T/moby-dick.txt
  for ctx_seqs in 1024:16 4096:8; do
    ctx=${ctx_seqs%%:*}; seqs=${ctx_seqs#*:}
    for ef in kv off; do
      name=efeval_${text}_${ctx}_$ef
      timeout 200 "$O" eval --model $M --bundle /tmp/efeval-$ef.oscar --data $data --modes bf16,oscar,hadamard2 \
        --context $ctx --num-seqs $seqs --greedy-prompts 0 --device cuda --gpu-batch 8 --oscar-clip 0.96,0.92 \
        --out "$OUT/$name" > "$OUT/$name.log" 2>&1 || status=1
      grep -E "^(oscar|hadamard2) " "$OUT/$name.log" | sed "s/^/$text $ctx ef=$ef: /" >> "$OUT/efeval_summary.txt"
    done
  done
done
cat "$OUT/efeval_summary.txt"
exit $status
