#!/usr/bin/env bash
# K/V bit split at the same bytes as INT2: whole-head 3-bit keys + 1-bit values (2.25 bits/element each way, fp16
# scale/zero per token included) against 2/2 (docs/results.md, "The K/V split: 3-bit keys, 1-bit values"). CPU.
# Run from the repo root: bash bench/results/cpu-spectral/ef-split/run.sh
set -euo pipefail
B=build/bin/error_feedback_bench
D=bench/results/cpu-spectral/ef-split
common="--model ../shared/fixtures/models/qwen3-tiny-trained --text ../shared/fixtures/text --fit-seqs 2 --fit-tokens 2048 --test-tokens 4096 --kl --clip-feedback --damps 0.1 --rotations hadamard"
docs=python-docs-heldout.txt,linux-docs-heldout.txt,wikitext-2-raw-test.txt
for clips in 0.98,0.5 0.98,0.65 0.98,0.75 0.98,0.8 0.98,0.85 0.98,0.9 0.98,1.0 1.0,0.8; do
  $B $common --heldout-seqs 1 --split-study 3,1 --split-clips $clips --heldout-files $docs > $D/split31_${clips}_docs.txt
done
$B $common --heldout-seqs 3 --split-study 3,1 --split-clips 0.98,0.85 --heldout-files moby-dick.txt \
  > "$D/split31_0.98,0.85_moby-dick.txt"
# Tokens kept exact by their error in the fit metric (what a sparse bf16 side list would buy): outliers_docs.txt
$B $common --heldout-seqs 1 --split-study 2,2 --split-clips 0.96,0.92 --outlier-study 0.002,0.01,0.03 \
  --heldout-files $docs > $D/outliers_docs.txt
