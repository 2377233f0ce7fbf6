#!/usr/bin/env bash
# Issue #10: in-domain calibration text, disjoint from the evaluation text. The docs held-out files are cut in
# two at a paragraph boundary near the middle: the first halves join the calibration mix of ../ef-sweep (fiction +
# code + wikitext-2), the second halves are the docs evaluation. Moby-Dick and TinyStories are evaluated whole, as
# before. Both bundles (EF tables `kv`, and `off` = the Hadamard RTN yardstick) come from the same calibration text,
# so the ratio compares the rounding only. Evaluated at 3 sequences (the earlier rows' size) and 8.
# Run from the repo root; O = a copy of build/bin/oscar, W = scratch.
set -euo pipefail
T=../shared/fixtures/text; M=../shared/fixtures/models/qwen3-tiny-trained; O=${O:-/tmp/hD/oscar}; W=${W:-/tmp/hD}
D=bench/results/cpu-spectral/ef-domain
mkdir -p $W/calib-docs $W/eval-docs
split_half() {  # file -> first half (calibration), second half (evaluation), cut at the blank line after the middle
  local f=$1 name; name=$(basename "$f" .txt)
  python3 - "$f" "$W/calib-docs/$name-first-half.txt" "$W/eval-docs/$name-second-half.txt" <<'PY'
import sys
src, first, second = sys.argv[1:]
text = open(src, encoding="utf-8").read()
cut = text.find("\n\n", len(text) // 2)
cut = len(text) // 2 if cut < 0 else cut + 2
open(first, "w", encoding="utf-8").write(text[:cut])
open(second, "w", encoding="utf-8").write(text[cut:])
print(f"{src}: {len(text)} chars, cut at {cut}")
PY
}
split_half $T/python-docs-heldout.txt
split_half $T/linux-docs-heldout.txt
sha256sum $W/calib-docs/* $W/eval-docs/* | tee $D/split.sha256
# mix "base": the ef-sweep calibration text; mix "docs": the same plus the docs first halves.
for mix in docs base; do
extra=; [ $mix = docs ] && extra=$W/calib-docs
CAL="--model $M --data $T/war-and-peace.txt $T/tiny-shakespeare.txt $T/code-llamacpp-mit.txt $T/wikitext-2-raw-test.txt $extra --num-seqs 24 --seq-len 1024 --heldout-seqs 8 --device cpu --method published --rotation hadamard"
for ef in kv off; do
  n=$mix-$ef
  /usr/bin/time -f "calib $n %e s" $O calibrate $CAL --error-feedback $ef --ef-damp 0.1 --out $W/$n.oscar --json > $W/calib-$n.json 2> $W/calib-$n.log
  for seqs in 3 8; do
    EV="--modes bf16,oscar --context 1024 --num-seqs $seqs --greedy-prompts 0 --device cpu --oscar-clip 0.96,0.92"
    $O eval --model $M --bundle $W/$n.oscar --data $W/eval-docs $EV --out $W/docs-$n-$seqs > $D/docs-$n-$seqs.log 2>&1
    $O eval --model $M --bundle $W/$n.oscar --data $T/moby-dick.txt $EV --out $W/moby-$n-$seqs > $D/moby-$n-$seqs.log 2>&1
    $O eval --model $M --bundle $W/$n.oscar --data $T/tinystories-sample.txt $EV --out $W/tiny-$n-$seqs > $D/tiny-$n-$seqs.log 2>&1
  done
done
done
for f in $D/*-[0-9].log; do echo "$(basename $f) $(grep -h "^oscar" $f)"; done
# Added after the first pass: 16 sequences with the base bundles, and the whole docs files at 8 and 16 (base mix
# only: the +docs bundle has seen their first halves).
for n in base-kv base-off; do
  for seqs in 8 16; do
    $O eval --model $M --bundle $W/$n.oscar --data $T/python-docs-heldout.txt $T/linux-docs-heldout.txt --modes bf16,oscar \
      --context 1024 --num-seqs $seqs --greedy-prompts 0 --device cpu --oscar-clip 0.96,0.92 --out $W/fulldocs-$n-$seqs > $D/fulldocs-$n-$seqs.log 2>&1
  done
  for src in docs:$W/eval-docs moby:$T/moby-dick.txt tiny:$T/tinystories-sample.txt; do
    name=${src%%:*}; path=${src#*:}
    $O eval --model $M --bundle $W/$n.oscar --data $path --modes bf16,oscar --context 1024 --num-seqs 16 \
      --greedy-prompts 0 --device cpu --oscar-clip 0.96,0.92 --out $W/$name-$n-16 > $D/$name-$n-16.log 2>&1
  done
done
# The CLI default (--method spectral, candidates spectral,hadamard, error feedback kv) on the base mix, same evals
# at 16 sequences: is the default the best variant?
CALD="--model $M --data $T/war-and-peace.txt $T/tiny-shakespeare.txt $T/code-llamacpp-mit.txt $T/wikitext-2-raw-test.txt --num-seqs 24 --seq-len 1024 --heldout-seqs 8 --device cpu"
/usr/bin/time -f "calib default %e s" $O calibrate $CALD --out $W/base-default.oscar --json > $W/calib-base-default.json 2> $W/calib-base-default.log
for src in fulldocs:$T/python-docs-heldout.txt docs:$W/eval-docs moby:$T/moby-dick.txt tiny:$T/tinystories-sample.txt; do
  name=${src%%:*}; path=${src#*:}
  [ $name = fulldocs ] && path="$T/python-docs-heldout.txt $T/linux-docs-heldout.txt"
  $O eval --model $M --bundle $W/base-default.oscar --data $path --modes bf16,oscar --context 1024 --num-seqs 16 \
    --greedy-prompts 0 --device cpu --oscar-clip 0.96,0.92 --out $W/$name-base-default-16 > $D/$name-base-default-16.log 2>&1
done
# Context 4096, 4 sequences, the base bundles (EF kv = feedback's bytes, and off = the Hadamard RTN yardstick).
for n in base-kv base-off; do
  for src in fulldocs:x moby:$T/moby-dick.txt; do
    name=${src%%:*}; path=${src#*:}
    [ $name = fulldocs ] && path="$T/python-docs-heldout.txt $T/linux-docs-heldout.txt"
    $O eval --model $M --bundle $W/$n.oscar --data $path --modes bf16,oscar --context 4096 --num-seqs 4 \
      --greedy-prompts 0 --device cpu --oscar-clip 0.96,0.92 --out $W/$name-$n-4k > $D/$name-$n-4k.log 2>&1
  done
done
# Tables fitted at the long context: 6 x 4096 calibration tokens (the same count as 24 x 1024), evaluated at 4096 and
# at 1024.
CAL4="--model $M --data $T/war-and-peace.txt $T/tiny-shakespeare.txt $T/code-llamacpp-mit.txt $T/wikitext-2-raw-test.txt --num-seqs 6 --seq-len 4096 --heldout-seqs 2 --device cpu --method published --rotation hadamard --error-feedback kv --ef-damp 0.1"
$O calibrate $CAL4 --out $W/cal4k-kv.oscar --json > $W/calib-cal4k-kv.json 2> $W/calib-cal4k-kv.log
for src in fulldocs:x moby:$T/moby-dick.txt; do
  name=${src%%:*}; path=${src#*:}
  [ $name = fulldocs ] && path="$T/python-docs-heldout.txt $T/linux-docs-heldout.txt"
  $O eval --model $M --bundle $W/cal4k-kv.oscar --data $path --modes bf16,oscar --context 4096 --num-seqs 4 \
    --greedy-prompts 0 --device cpu --oscar-clip 0.96,0.92 --out $W/$name-cal4k-kv-4k > $D/$name-cal4k-kv-4k.log 2>&1
  $O eval --model $M --bundle $W/cal4k-kv.oscar --data $path --modes bf16,oscar --context 1024 --num-seqs 16 \
    --greedy-prompts 0 --device cpu --oscar-clip 0.96,0.92 --out $W/$name-cal4k-kv-16 > $D/$name-cal4k-kv-16.log 2>&1
done
