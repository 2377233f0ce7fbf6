#!/usr/bin/env bash
# Error-feedback variants on qwen3-tiny-trained (docs/results.md, "Error feedback: where the KL comes from, and a
# scale/zero refit"). CPU, 2 cores, ~1-3 min per command. Binary: build/bin/error_feedback_bench at 9d76bd4 (+ the
# refit_reround option for the v2 runs).
set -euo pipefail
B=build/bin/error_feedback_bench
common="--model ../shared/fixtures/models/qwen3-tiny-trained --text ../shared/fixtures/text --fit-seqs 2 --fit-tokens 2048 --test-tokens 4096 --kl --clip-feedback --damps 0.1 --rotations hadamard"
$B $common --heldout-seqs 1 --refit-study 3 > docs_refit3.txt
$B $common --heldout-seqs 1 --refit-study 1 --bias-study > docs_bias_decomposition.txt
$B $common --heldout-seqs 1 --refit-study 1 \
  --heldout-files python-docs-heldout.txt,linux-docs-heldout.txt,wikitext-2-raw-test.txt > v2_python-docs-heldout.txt
for f in moby-dick tinystories-sample; do
  $B $common --heldout-seqs 3 --heldout-files $f.txt --refit-study 1 > v2_$f.txt
done
# Other clips (K,V) under the same study (clips_<K>,<V>_<text>.txt)
for clips in 1.0,0.92 0.98,0.92 0.96,1.0; do
  $B $common --heldout-seqs 1 --refit-study 1 --study-clips $clips \
    --heldout-files python-docs-heldout.txt,linux-docs-heldout.txt,wikitext-2-raw-test.txt > clips_${clips}_python-docs-heldout.txt
  for f in moby-dick tinystories-sample; do
    $B $common --heldout-seqs 3 --heldout-files $f.txt --refit-study 1 --study-clips $clips > clips_${clips}_$f.txt
  done
done
# Refit on K only / V only (rows "refit 1 on K only", "on V only"; kv_<text>.txt, binary with refit_tensors)
$B $common --heldout-seqs 1 --refit-study 1 \
  --heldout-files python-docs-heldout.txt,linux-docs-heldout.txt,wikitext-2-raw-test.txt > kv_python-docs-heldout.txt
for f in moby-dick tinystories-sample; do
  $B $common --heldout-seqs 3 --heldout-files $f.txt --refit-study 1 > kv_$f.txt
done
