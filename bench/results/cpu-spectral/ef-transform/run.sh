#!/usr/bin/env bash
# A per-KV-head centering + partial whitening before the Hadamard, with the EF tables built in that basis
# (docs/results.md, "Beyond rotations: centering and partial whitening under error feedback"). CPU, 2 cores,
# ~2-3 min per line. Run from the repo root: bash bench/results/cpu-spectral/ef-transform/run.sh
set -euo pipefail
B=build/bin/error_feedback_bench
D=bench/results/cpu-spectral/ef-transform
common="--model ../shared/fixtures/models/qwen3-tiny-trained --text ../shared/fixtures/text --fit-seqs 2 --fit-tokens 2048 --test-tokens 4096 --kl --clip-feedback --damps 0.1 --rotations hadamard --split-study 2,2"
docs="--heldout-seqs 1 --heldout-files python-docs-heldout.txt,linux-docs-heldout.txt,wikitext-2-raw-test.txt"
$B $common $docs --transform-study 0,0.5 > $D/docs_kv-centered_a0,0.5.txt
$B $common $docs --transform-study 0.25,0.75,1 > "$D/docs_kv-centered_a0.25,0.75,1.txt"
$B $common $docs --transform-study 0.5 --transform-keys-only > $D/docs_k-only_kv-centered_a0.5.txt
for c in none k v; do
  $B $common $docs --transform-study 0.25,0.5 --transform-center $c > "$D/docs_${c}-centered_a0.25,0.5.txt"
done
$B $common $docs --transform-study 0.25,0.5 --transform-center k --transform-shared > "$D/docs_shared_k-centered_a0.25,0.5.txt"
for f in moby-dick tinystories-sample; do
  $B $common --heldout-seqs 3 --heldout-files $f.txt --transform-study 0.25,0.5 > "$D/${f}_kv-centered_a0.25,0.5.txt"
  $B $common --heldout-seqs 3 --heldout-files $f.txt --transform-study 0.25,0.5 --transform-center k > "$D/${f}_k-centered_a0.25,0.5.txt"
done
# Context 4096: statistics, tables and KL at 4096 (one fit sequence per training text; python + linux docs held out)
$B --model ../shared/fixtures/models/qwen3-tiny-trained --text ../shared/fixtures/text --fit-tokens 4096 \
  --test-tokens 4096 --kl --clip-feedback --damps 0.1 --rotations hadamard --seq-len 4096 --fit-seqs 1 \
  --heldout-seqs 1 --heldout-files python-docs-heldout.txt,linux-docs-heldout.txt --transform-study 0.25,0.5 \
  --transform-center k > "$D/docs4096_k-centered_a0.25,0.5.txt"
# A larger docs sample: python + linux docs, 8 sequences each
$B --model ../shared/fixtures/models/qwen3-tiny-trained --text ../shared/fixtures/text --fit-seqs 2 --fit-tokens 2048 \
  --test-tokens 4096 --kl --clip-feedback --damps 0.1 --rotations hadamard --heldout-seqs 8 --transform-study 0.25,0.5 \
  --transform-center k --heldout-files python-docs-heldout.txt,linux-docs-heldout.txt > "$D/docs16_k-centered_a0.25,0.5.txt"
# Damping and clips under the transform (docs, K centered, α 0.25 / 0.5)
tr="--heldout-seqs 1 --heldout-files python-docs-heldout.txt,linux-docs-heldout.txt,wikitext-2-raw-test.txt --transform-study 0.25,0.5 --transform-center k"
base="--model ../shared/fixtures/models/qwen3-tiny-trained --text ../shared/fixtures/text --fit-seqs 2 --fit-tokens 2048 --test-tokens 4096 --kl --clip-feedback --rotations hadamard"
for dp in 0.03 0.3; do $B $base $tr --damps $dp > $D/docs_k-centered_damp$dp.txt; done
for c in 0.98,0.96 1.0,1.0; do $B $base $tr --damps 0.1 --study-clips $c > "$D/docs_k-centered_clips$c.txt"; done
# Fitted at 1024, evaluated at 4096
$B --model ../shared/fixtures/models/qwen3-tiny-trained --text ../shared/fixtures/text --fit-seqs 2 --fit-tokens 2048 \
  --test-tokens 4096 --kl --clip-feedback --damps 0.1 --rotations hadamard --eval-seq-len 4096 --heldout-seqs 1 \
  --heldout-files python-docs-heldout.txt,linux-docs-heldout.txt --transform-study 0.25,0.5 --transform-center k \
  > "$D/docs4096-from1024_k-centered_a0.25,0.5.txt"
# Keys α 0.25, values α 0.5
base="--model ../shared/fixtures/models/qwen3-tiny-trained --text ../shared/fixtures/text --fit-seqs 2 --fit-tokens 2048 --test-tokens 4096 --kl --clip-feedback --damps 0.1 --rotations hadamard --transform-center k --transform-study 0.25 --transform-v-alpha 0.5"
$B $base --heldout-seqs 1 --heldout-files python-docs-heldout.txt,linux-docs-heldout.txt,wikitext-2-raw-test.txt > $D/docs_k-centered_a0.25_v0.5.txt
$B $base --heldout-seqs 3 --heldout-files moby-dick.txt > $D/moby-dick_k-centered_a0.25_v0.5.txt
