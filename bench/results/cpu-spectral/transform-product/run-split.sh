#!/usr/bin/env bash
# Issue #10 follow-up (eleventh session): a key α and a value α of their own (`--transform-alpha K,V`) on the
# calibration and evaluation of run.sh (same flags, the same four sets at 16 x 1024), against α 0.5 for both (the
# default; run.sh's whiten-0.5 logs). Needs run.sh's $W/eval-docs (the docs second halves).
set -euo pipefail
T=../shared/fixtures/text; M=../shared/fixtures/models/qwen3-tiny-trained; O=${O:-/tmp/tp/oscar}; W=${W:-/tmp/tp}
D=bench/results/cpu-spectral/transform-product
CAL="--model $M --data $T/war-and-peace.txt $T/tiny-shakespeare.txt $T/code-llamacpp-mit.txt $T/wikitext-2-raw-test.txt --num-seqs 24 --seq-len 1024 --heldout-seqs 8 --device cpu --method published --rotation hadamard --error-feedback kv --ef-damp 0.1"
EV="--modes bf16,oscar --context 1024 --num-seqs 16 --greedy-prompts 0 --device cpu --oscar-clip 0.96,0.92"
for alphas in ${SPLITS-0.25,0.5 0.5,0.25 0.75,0.5 0.5,0.75}; do  # run as two passes (SPLITS=...), same result
  n=whiten-${alphas/,/-}
  /usr/bin/time -f "calib $n %e s" $O calibrate $CAL --transform whiten --transform-alpha $alphas --out $W/$n.oscar > $D/calib-$n.log 2>&1
  $O eval --model $M --bundle $W/$n.oscar --data $T/python-docs-heldout.txt $T/linux-docs-heldout.txt $EV --out $W/fulldocs-$n > $D/fulldocs-$n-16.log 2>&1
  $O eval --model $M --bundle $W/$n.oscar --data $W/eval-docs $EV --out $W/docs-$n > $D/docs-$n-16.log 2>&1
  $O eval --model $M --bundle $W/$n.oscar --data $T/moby-dick.txt $EV --out $W/moby-$n > $D/moby-$n-16.log 2>&1
  $O eval --model $M --bundle $W/$n.oscar --data $T/tinystories-sample.txt $EV --out $W/tiny-$n > $D/tiny-$n-16.log 2>&1
done
for f in $D/*-whiten-*-16.log; do echo "$(basename $f) $(grep -h "^oscar" $f)"; done
