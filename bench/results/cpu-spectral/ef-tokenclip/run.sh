#!/usr/bin/env bash
# Per-token clip search under error feedback (docs/results.md, "Per-token clip search in H"). CPU, 2 cores.
# Run from the repo root: bash bench/results/cpu-spectral/ef-tokenclip/run.sh
set -euo pipefail
B=build/bin/error_feedback_bench
D=bench/results/cpu-spectral/ef-tokenclip
common="--model ../shared/fixtures/models/qwen3-tiny-trained --text ../shared/fixtures/text --fit-seqs 2 --fit-tokens 2048 --test-tokens 4096 --kl --clip-feedback --damps 0.1 --rotations hadamard"
clips=${1:-0.88,0.92,1.0}
$B $common --heldout-seqs 1 --token-clip-study $clips \
  --heldout-files python-docs-heldout.txt,linux-docs-heldout.txt,wikitext-2-raw-test.txt > $D/tc_${clips}_docs.txt
for f in moby-dick tinystories-sample; do
  $B $common --heldout-seqs 3 --heldout-files $f.txt --token-clip-study $clips > $D/tc_${clips}_$f.txt
done
# Per-token clips only looser than the tensor's (docs)
$B $common --heldout-seqs 1 --token-clip-study 0.98,1.0 \
  --heldout-files python-docs-heldout.txt,linux-docs-heldout.txt,wikitext-2-raw-test.txt > $D/tc_0.98,1.0_docs.txt
# Key metric weighted by each query's softmax mass on the quantized keys (km_<text>.txt)
$B $common --heldout-seqs 1 --key-metric-study \
  --heldout-files python-docs-heldout.txt,linux-docs-heldout.txt,wikitext-2-raw-test.txt > $D/km_docs.txt
for f in moby-dick tinystories-sample; do
  $B $common --heldout-seqs 3 --heldout-files $f.txt --key-metric-study > $D/km_$f.txt
done
# The bench's tables on python + linux docs only (eval's docs set), 2 sequences per file
$B $common --heldout-seqs 2 --refit-study 1 --heldout-files python-docs-heldout.txt,linux-docs-heldout.txt > $D/refit_pydocs_linux.txt
# Calibration text without wikitext-2 through oscar calibrate + eval: calib_data.sh (eval-nowiki-*.log); the
# moby-dick / tinystories-sample evals of those bundles: same eval flags with --data $T/<text>.txt
