#!/bin/sh
# The measurement behind docs/results.md "Error-feedback rounding in the attention metric (CPU, 2026-12-06)".
# Run from the repo root after building error_feedback_bench (build dir as first argument, default build).
B=${1:-build}
F=../shared/fixtures
D=bench/results/cpu-spectral/error-feedback
$B/bin/error_feedback_bench --model $F/models/qwen3-tiny-trained --text $F/text --fit-seqs 2 --heldout-seqs 1 \
  --fit-tokens 2048 --test-tokens 4096 --kl > $D/full.txt 2> $D/full.err
$B/bin/error_feedback_bench --model $F/models/qwen3-tiny-trained --text $F/text --fit-seqs 2 --heldout-seqs 1 \
  --fit-tokens 2048 --test-tokens 4096 --kl --clip-feedback --rotations hadamard,eigen > $D/clip_feedback.txt 2> $D/clip_feedback.err
# Separates the clip from the rounding (added after the first run: the EF-retuned clip was the only KL win).
$B/bin/error_feedback_bench --model $F/models/qwen3-tiny-trained --text $F/text --fit-seqs 2 --heldout-seqs 1 \
  --fit-tokens 2048 --test-tokens 4096 --kl --clip-study --rotations hadamard,oscar > $D/clip_study.txt 2> $D/clip_study.err
$B/bin/error_feedback_bench --model $F/models/qwen3-tiny-trained --text $F/text --fit-seqs 2 --heldout-seqs 1 \
  --fit-tokens 2048 --test-tokens 4096 --kl --clip-study --clip-feedback --damps 0.1 --rotations hadamard,oscar > $D/clip_study_feedback.txt 2> $D/clip_study_feedback.err
# Another held-out domain (fiction not in the fit text), 3 sequences of moby-dick.
$B/bin/error_feedback_bench --model $F/models/qwen3-tiny-trained --text $F/text --fit-seqs 2 --heldout-seqs 3 \
  --fit-tokens 2048 --test-tokens 4096 --kl --clip-study --clip-feedback --damps 0.1 --rotations hadamard \
  --heldout-files moby-dick.txt > $D/clip_study_feedback_moby.txt 2> $D/clip_study_feedback_moby.err
