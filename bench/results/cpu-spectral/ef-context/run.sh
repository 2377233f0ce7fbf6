#!/usr/bin/env bash
# Issue #10: key tables for a serving context other than the calibration length (--ef-context, the post-RoPE Σ_Q
# carried from positions 0..T-1 to 0..T'-1, lib/calib/ef_calibration.h key_metrics_for_context). Same calibration
# text and flags as ../ef-domain's base mix (24 x 1024, Hadamard, EF kv, damp 0.1); evaluated like its 4K rows
# (context 4096, 4 sequences, --oscar-clip 0.96,0.92, KL beyond the window). The rows "1K tables" and "4K tables"
# (6 x 4096 calibration) and the Hadamard RTN yardstick are ../ef-domain's logs.
# Run from the repo root; O = a copy of build/bin/oscar, W = scratch.
set -euo pipefail
T=../shared/fixtures/text; M=../shared/fixtures/models/qwen3-tiny-trained; O=${O:-/tmp/hC/oscar}; W=${W:-/tmp/hC}
D=bench/results/cpu-spectral/ef-context
mkdir -p $W
CAL="--model $M --data $T/war-and-peace.txt $T/tiny-shakespeare.txt $T/code-llamacpp-mit.txt $T/wikitext-2-raw-test.txt --num-seqs 24 --seq-len 1024 --heldout-seqs 8 --device cpu --method published --rotation hadamard --error-feedback kv --ef-damp 0.1"
for ctx in ${CONTEXTS:-4096}; do
  n=base-kv-ctx$ctx
  [ -f $W/$n.oscar ] || /usr/bin/time -f "calib $n %e s" $O calibrate $CAL --ef-context $ctx --out $W/$n.oscar --json > $W/calib-$n.json 2> $D/calib-$n.log
  for src in fulldocs:x moby:$T/moby-dick.txt; do
    name=${src%%:*}; path=${src#*:}
    [ $name = fulldocs ] && path="$T/python-docs-heldout.txt $T/linux-docs-heldout.txt"
    $O eval --model $M --bundle $W/$n.oscar --data $path --modes bf16,oscar --context 4096 --num-seqs 4 \
      --greedy-prompts 0 --device cpu --oscar-clip 0.96,0.92 --out $W/$name-$n-4k > $D/$name-$n-4k.log 2>&1
  done
done
for f in $D/*-4k.log; do echo "$(basename $f) $(grep -h "^oscar" $f)"; done
# Added after the first row: which context to carry to. 2048 and 8192 evaluated at 4096 as above, and 2048 / 4096
# evaluated at 1024 (16 sequences, ../ef-domain's 1K evaluation) to see what a context longer than served costs.
if [ -n "${SWEEP:-}" ]; then
  for ctx in 2048 8192; do
    CONTEXTS=$ctx SWEEP= bash $0
  done
  for ctx in 2048 4096; do
    n=base-kv-ctx$ctx
    for src in fulldocs:x moby:$T/moby-dick.txt; do
      name=${src%%:*}; path=${src#*:}
      [ $name = fulldocs ] && path="$T/python-docs-heldout.txt $T/linux-docs-heldout.txt"
      $O eval --model $M --bundle $W/$n.oscar --data $path --modes bf16,oscar --context 1024 --num-seqs 16 \
        --greedy-prompts 0 --device cpu --oscar-clip 0.96,0.92 --out $W/$name-$n-16 > $D/$name-$n-16.log 2>&1
    done
  done
  for f in $D/*-16.log; do echo "$(basename $f) $(grep -h "^oscar" $f)"; done
fi
