#!/usr/bin/env bash
# efctx (issue #10): key tables for the serving context (calibrate --ef-context) on the GPU path, with more sequences
# than the CPU runs afford. Calibrates qwen3-tiny-trained on the device (24 x 1024 + 8 held-out, the base mix of
# docs/results.md: fiction + code + wikitext-2): the Hadamard RTN yardstick (--method published --rotation hadamard
# --error-feedback off), the default feedback bundle (tables for 1024 positions) and feedback with --ef-context 4096;
# then `oscar eval --device cuda` (the engine's EF writer) of each on held-out docs (python + linux), moby-dick and
# tinystories at 4096 (16 sequences; tinystories 8) and 1024 (32). Expected GPU time: ~7 min (H100: calibrate
# ~30 s each, eval ~22 s per 16 x 4096; 150 s covered the calibrations and two evals).
# Look for: efctx_summary.txt, KL>win per bundle, text and context.
source scripts/device/common.sh
F=/work/shared/fixtures; T=$F/text; M=$F/models/qwen3-tiny-trained; O=$BIN/bin/oscar
status=0
CAL="--model $M --data $T/war-and-peace.txt $T/tiny-shakespeare.txt $T/code-llamacpp-mit.txt $T/wikitext-2-raw-test.txt --num-seqs 24 --seq-len 1024 --heldout-seqs 8 --device cuda"
timeout 120 "$O" calibrate $CAL --method published --rotation hadamard --error-feedback off --out /tmp/efctx-off.oscar \
  > "$OUT/efctx_calib_off.log" 2>&1 || status=1
timeout 120 "$O" calibrate $CAL --out /tmp/efctx-fb1k.oscar > "$OUT/efctx_calib_fb1k.log" 2>&1 || status=1
timeout 120 "$O" calibrate $CAL --ef-context 4096 --out /tmp/efctx-fb4k.oscar > "$OUT/efctx_calib_fb4k.log" 2>&1 || status=1
: > "$OUT/efctx_summary.txt"
for text in docs moby tiny; do
  data="$T/python-docs-heldout.txt $T/linux-docs-heldout.txt"
  [ $text = moby ] && data=$T/moby-dick.txt
  [ $text = tiny ] && data=$T/tinystories-sample.txt
  for ctx_seqs in 4096:16 1024:32; do
    ctx=${ctx_seqs%%:*}; seqs=${ctx_seqs#*:}
    [ $text = tiny ] && [ $ctx = 4096 ] && seqs=8
    for b in off fb1k fb4k; do
      name=efctx_${text}_${ctx}_$b
      timeout 150 "$O" eval --model $M --bundle /tmp/efctx-$b.oscar --data $data --modes bf16,oscar \
        --context $ctx --num-seqs $seqs --greedy-prompts 0 --device cuda --gpu-batch 8 --oscar-clip 0.96,0.92 \
        --out "$OUT/$name" > "$OUT/$name.log" 2>&1 || status=1
      grep -E "^oscar " "$OUT/$name.log" | sed "s/^/$text $ctx $b: /" >> "$OUT/efctx_summary.txt"
    done
  done
done
cat "$OUT/efctx_summary.txt"
exit $status
