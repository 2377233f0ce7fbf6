#!/usr/bin/env bash
# Issue #10: damp 0.03 vs the default 0.1 at 16 sequences (the ef-sweep's 3-sequence comparison could not separate
# them), on the base mix of ../ef-domain (24 x 1024, Hadamard, EF kv) at 1024, and with --ef-context 4096 at 4096
# (4 sequences, as ../ef-context). The damp 0.1 rows are ../ef-domain's *-base-kv-16 and ../ef-context's ctx4096 logs.
# Run from the repo root; O = a copy of build/bin/oscar, W = scratch.
set -euo pipefail
T=../shared/fixtures/text; M=../shared/fixtures/models/qwen3-tiny-trained; O=${O:-/tmp/hD3/oscar}; W=${W:-/tmp/hD3}
D=bench/results/cpu-spectral/ef-damp16
mkdir -p $W
CAL="--model $M --data $T/war-and-peace.txt $T/tiny-shakespeare.txt $T/code-llamacpp-mit.txt $T/wikitext-2-raw-test.txt --num-seqs 24 --seq-len 1024 --heldout-seqs 8 --device cpu --method published --rotation hadamard --error-feedback kv --ef-damp 0.03"
n=damp003
[ -f $W/$n.oscar ] || $O calibrate $CAL --out $W/$n.oscar > $D/calib-$n.log 2>&1
for src in fulldocs:x moby:$T/moby-dick.txt tiny:$T/tinystories-sample.txt; do
  name=${src%%:*}; path=${src#*:}
  [ $name = fulldocs ] && path="$T/python-docs-heldout.txt $T/linux-docs-heldout.txt"
  $O eval --model $M --bundle $W/$n.oscar --data $path --modes bf16,oscar --context 1024 --num-seqs 16 \
    --greedy-prompts 0 --device cpu --oscar-clip 0.96,0.92 --out $W/$name-$n-16 > $D/$name-$n-16.log 2>&1
done
n=damp003-ctx4096
[ -f $W/$n.oscar ] || $O calibrate $CAL --ef-context 4096 --out $W/$n.oscar > $D/calib-$n.log 2>&1
for src in fulldocs:x moby:$T/moby-dick.txt; do
  name=${src%%:*}; path=${src#*:}
  [ $name = fulldocs ] && path="$T/python-docs-heldout.txt $T/linux-docs-heldout.txt"
  $O eval --model $M --bundle $W/$n.oscar --data $path --modes bf16,oscar --context 4096 --num-seqs 4 \
    --greedy-prompts 0 --device cpu --oscar-clip 0.96,0.92 --out $W/$name-$n-4k > $D/$name-$n-4k.log 2>&1
done
for f in $D/*-16.log $D/*-4k.log; do echo "$(basename $f) $(grep -h "^oscar" $f)"; done
