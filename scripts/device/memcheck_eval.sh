#!/usr/bin/env bash
# memcheck_eval (issue #8): compute-sanitizer memcheck of the GPU eval and calibration paths through the CLI, at a
# size the sanitizer finishes. The EvalGpu / EvalGpuHadamard2 gtest suites do not: each teacher-forced token is one
# engine step (~15 launches per layer and mode), and at their 2 x 768 tokens and five modes memcheck had not finished
# one test after 330 s (2026-12-06). Same kernels and launch shapes here, fewer steps: context 160 with sink 16 and
# recent 64 (so tokens beyond the window are read from INT2 pages), 2 sequences decoded as one batch, every GPU mode,
# a bundle with error-feedback tables and storage transforms (the EF writer, per-KV-head matrices), and --fold-v. The numbers themselves are checked by the
# unsanitized suites (gpusuite.sh); here only the sanitizer's verdict counts.
# Expected GPU time: ~1 min calibration, then three sanitized runs side by side (limit MEMCHECK_EVAL_S, default 240 s).
# Needs: $BIN, fixtures at /work/shared/fixtures, $OUT, cwd = repo.
# Look for: memcheck_eval.txt, one line per run: rc=0 and "ERROR SUMMARY: 0 errors".
source scripts/device/common.sh
CS=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
[ -n "$CS" ] || { echo "no compute-sanitizer" | tee "$OUT/memcheck_eval.txt"; exit 1; }
F=/work/shared/fixtures; T=$F/text; M=$F/models/qwen3-tiny-trained; O=$BIN/bin/oscar
limit=${MEMCHECK_EVAL_S:-240}
# The default bundle (2.0: tables + per-KV-head storage transforms) for every mode, and the same calibration without
# the transforms (1.3) for --fold-v, which folds one orthogonal R_v per layer and refuses transforms.
for tf in auto none; do
  "$O" calibrate --model $M --data $T/war-and-peace.txt $T/code-llamacpp-mit.txt --num-seqs 4 --seq-len 256 \
    --heldout-seqs 2 --device cuda --error-feedback kv --transform $tf --out /tmp/mce-$tf.oscar > "$OUT/calibrate-$tf.log" 2>&1 ||
    { echo "calibrate --transform $tf rc=$?" | tee "$OUT/memcheck_eval.txt"; exit 1; }
done
common=(eval --model $M --data $T/python-docs-heldout.txt --context 160 --num-seqs 2 --sink 16 --recent 64
        --greedy-prompts 1 --greedy-tokens 8 --gpu-batch 2 --device cuda)
sanitize() {  # name, then the oscar command line
  local name=$1; shift
  local start=$SECONDS
  timeout "$limit" "$CS" --tool memcheck --error-exitcode 3 --print-limit 20 "$O" "$@" > "$OUT/memcheck_$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - start))s $(grep -E 'ERROR SUMMARY' "$OUT/memcheck_$name.log" | tail -1)"
}
: > "$OUT/memcheck_eval.txt"
sanitize eval_all "${common[@]}" --bundle /tmp/mce-auto.oscar --modes bf16,int2,oscar,int4,fp8,hadamard2 \
  --out /tmp/mce_all >> "$OUT/memcheck_eval.txt" &
sanitize eval_foldv "${common[@]}" --bundle /tmp/mce-none.oscar --modes oscar,hadamard2 --fold-v \
  --out /tmp/mce_fold >> "$OUT/memcheck_eval.txt" &
sanitize calibrate "calibrate" --model $M --data $T/war-and-peace.txt --num-seqs 2 --seq-len 256 --heldout-seqs 2 \
  --device cuda --error-feedback kv --out /tmp/mce_cal.oscar >> "$OUT/memcheck_eval.txt" &
wait
cat "$OUT/memcheck_eval.txt"
! grep -qv "rc=0 .*ERROR SUMMARY: 0 errors" "$OUT/memcheck_eval.txt"
