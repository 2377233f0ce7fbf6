#!/usr/bin/env bash
# Issue #10 on the llama2.c fixtures: the feedback method (Hadamard + error-feedback tables), without and with the
# whitening transforms (the default since 2026-12-07), against the Hadamard
# RTN yardstick (--method published --rotation hadamard --error-feedback off), same calibration and windows as
# docs/results.md "llama2.c fixtures" (lines 1-2000 of tinystories-sample calibrate, 2001-2502 evaluate; sink 4,
# recent 32; clip fixed at the published 0.96 / 0.92 in both). Run from the repo root; O = build/bin/oscar.
set -euo pipefail
O=${O:-build/bin/oscar}; W=${W:-/tmp/l2}; D=bench/results/cpu-eval/feedback
mkdir -p $W
head -n 2000 ../shared/fixtures/text/tinystories-sample.txt > $W/ts-calib.txt
tail -n +2001 ../shared/fixtures/text/tinystories-sample.txt > $W/ts-heldout.txt
for mc in karpathy-stories-llama2c-260k:512 tinystories-llama2c-280k:256; do
  M=${mc%%:*}; CTX=${mc#*:}
  # feedback: the tables alone (the default until 2026-12-07, now --transform none); transform: the CLI default
  # since (tables + per-KV-head whitening transforms, bundle 2.0); rtn: the yardstick.
  for v in ${VARIANTS:-feedback rtn transform}; do
    flags=(); [ $v = rtn ] && flags=(--method published --rotation hadamard --error-feedback off)
    [ $v = feedback ] && flags=(--transform none)
    $O calibrate --model ../shared/fixtures/models/$M-hf --data $W/ts-calib.txt --out $W/$M-$v.oscar "${flags[@]}" \
      --num-seqs 64 --seq-len $CTX --heldout-seqs 8 --sink 4 --recent 32 --device cpu > $W/calib-$M-$v.log 2>&1
    $O eval --model ../shared/fixtures/models/$M-hf --bundle $W/$M-$v.oscar --data $W/ts-heldout.txt \
      --modes bf16,oscar --context $CTX --num-seqs 16 --greedy-prompts 0 --sink 4 --recent 32 \
      --oscar-clip 0.96,0.92 --out $W/eval-$M-$v > $D/eval-$M-$v.log 2>&1
  done
done
for f in $D/eval-*.log; do echo "$(basename $f) $(grep -h '^oscar' $f)"; done
