#!/usr/bin/env bash
# Issue #10: the (scale, zero) refit built into the bundle (format 1.3, --ef-refit) and every writer's stored
# rounding, measured through `oscar calibrate` + `oscar eval` exactly as ../ef-domain's base-mix rows: the same
# calibration text and flags (fiction + code + wikitext-2, 24 x 1024, Hadamard, EF kv, damp 0.1), eval at 1024 with
# --oscar-clip 0.96,0.92, KL beyond the window, 16 sequences. The yardstick (Hadamard RTN, `off`) and the EF rows
# without a refit are ../ef-domain's logs (same bytes: the bundle without a refit is unchanged).
# Run from the repo root; O = a copy of build/bin/oscar, W = scratch.
set -euo pipefail
T=../shared/fixtures/text; M=../shared/fixtures/models/qwen3-tiny-trained; O=${O:-/tmp/hR/oscar}; W=${W:-/tmp/hR}
D=bench/results/cpu-spectral/ef-refit-stored
mkdir -p $W
CAL="--model $M --data $T/war-and-peace.txt $T/tiny-shakespeare.txt $T/code-llamacpp-mit.txt $T/wikitext-2-raw-test.txt --num-seqs 24 --seq-len 1024 --heldout-seqs 8 --device cpu --method published --rotation hadamard --error-feedback kv --ef-damp 0.1"
for refit in ${REFITS:-k kv}; do
  n=base-kv-refit-$refit
  [ -f $W/$n.oscar ] || /usr/bin/time -f "calib $n %e s" $O calibrate $CAL --ef-refit $refit --out $W/$n.oscar --json > $W/calib-$n.json 2> $D/calib-$n.log
  for src in fulldocs:x moby:$T/moby-dick.txt tiny:$T/tinystories-sample.txt; do
    name=${src%%:*}; path=${src#*:}
    [ $name = fulldocs ] && path="$T/python-docs-heldout.txt $T/linux-docs-heldout.txt"
    $O eval --model $M --bundle $W/$n.oscar --data $path --modes bf16,oscar --context 1024 --num-seqs 16 \
      --greedy-prompts 0 --device cpu --oscar-clip 0.96,0.92 --out $W/$name-$n-16 > $D/$name-$n-16.log 2>&1
  done
done
for f in $D/*-16.log; do echo "$(basename $f) $(grep -h "^oscar" $f)"; done
