#!/usr/bin/env bash
# Issue #10, bundle 1.3: the DEFAULT bundle (no --ef-context; it stores the key metric) evaluated at 4096 with
# `oscar eval --ef-context auto` (the default) — the key tables are rebuilt for 4096 positions at eval time. Same
# calibration and evaluation as ../ef-context/run.sh's 4K rows; the result equals its `--ef-context 4096` row
# (fulldocs-base-kv-ctx4096-4k.log) digit for digit: KL>win 4.49e-03, PPL>win 18.430.
# Run from the repo root; O = build/bin/oscar, W = scratch.
set -euo pipefail
T=../shared/fixtures/text; M=../shared/fixtures/models/qwen3-tiny-trained; O=${O:-build/bin/oscar}; W=${W:-/tmp/hD}
D=bench/results/cpu-spectral/ef-context-auto
mkdir -p $W
CAL="--model $M --data $T/war-and-peace.txt $T/tiny-shakespeare.txt $T/code-llamacpp-mit.txt $T/wikitext-2-raw-test.txt --num-seqs 24 --seq-len 1024 --heldout-seqs 8 --device cpu --method published --rotation hadamard --error-feedback kv --ef-damp 0.1"
$O calibrate $CAL --out $W/base.oscar --json > $W/calib.json 2> $D/calib-base-kv.log
$O eval --model $M --bundle $W/base.oscar --data $T/python-docs-heldout.txt $T/linux-docs-heldout.txt \
  --modes bf16,oscar --context 4096 --num-seqs 4 --greedy-prompts 0 --device cpu --oscar-clip 0.96,0.92 \
  --out $W/auto-4k > $D/fulldocs-base-kv-auto-4k.log 2>&1
grep -h "^oscar" $D/fulldocs-base-kv-auto-4k.log bench/results/cpu-spectral/ef-context/fulldocs-base-kv-ctx4096-4k.log
