#!/usr/bin/env bash
# Quickstart: install dependencies, build, pick a model, and run OSCAR on it end to end.
#   scripts/quickstart.sh [--model DIR] [--prompt TEXT]
# Default model: ../shared/fixtures/models/qwen3-tiny-trained (a small trained Qwen3, head_dim 128) when it is
# there, else a synthetic checkpoint written by `oscar synth` into build/synth-model (random weights: the text it
# generates is noise, but every stage runs).
# Each stage is one `step` line below: install, build, info, generate, calibrate, eval.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=""
PROMPT="Once upon a time"
while [ $# -gt 0 ]; do
  case "$1" in
    --model) MODEL="$2"; shift 2 ;;
    --prompt) PROMPT="$2"; shift 2 ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "quickstart: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

OSCAR=build/bin/oscar
step() {
  local title="$1"; shift
  printf '\n==> %s\n    %s\n' "$title" "$*"
  "$@"
}

pick_model() {
  if [ -n "$MODEL" ]; then return; fi
  if [ -f ../shared/fixtures/models/qwen3-tiny-trained/config.json ]; then
    MODEL=../shared/fixtures/models/qwen3-tiny-trained
  else
    MODEL=build/synth-model
    step "no fixture model found: writing a synthetic one" "$OSCAR" synth --out "$MODEL" --arch qwen3 --seed 0
  fi
}

step "install dependencies" scripts/install-deps.sh
step "build"                scripts/build.sh
pick_model
step "model info"           "$OSCAR" info --model "$MODEL"
step "generate (CPU, greedy)" "$OSCAR" generate --model "$MODEL" --prompt "$PROMPT" --max-new-tokens 48

# Calibration: varied text (fiction, code, encyclopedic prose) — the rotations generalize with the variety of their
# calibration text (docs/method.md: on the held-out docs below KL>win 5.20e-3 with all four, 6.10e-3 with the two
# fiction files alone; both without error feedback). Small sizes so the CPU run takes about a minute; the GPU takes over when nvidia-smi sees one
# (and the build has CUDA).
CALIB_DEVICE=cpu
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1 && "$OSCAR" --version | grep -q "CUDA kernels built"; then
  CALIB_DEVICE=cuda
fi
CALIB_DATA=()
for f in war-and-peace tiny-shakespeare code-llamacpp-mit wikitext-2-raw-test; do
  [ -f "../shared/fixtures/text/$f.txt" ] && CALIB_DATA+=("../shared/fixtures/text/$f.txt")
done
if [ ${#CALIB_DATA[@]} -eq 0 ]; then
  printf 'quickstart: no calibration text under ../shared/fixtures/text; skipping calibrate\n'
else
  mkdir -p build/quickstart
  # The bundle carries error-feedback rounding tables (`--error-feedback kv`, calibrate's default; issue #10), which
  # the CPU simulation and the GPU engine's writer both apply.
  # The tables fit the positions of the calibration sequences, so they are calibrated at the context eval reads
  # below (docs/cli.md, --seq-len): 1024 on the CPU (12 x 1024 tokens), 2048 on a GPU (the middle of its three).
  CALIB_SIZE=(--num-seqs 12 --seq-len 1024)
  [ "$CALIB_DEVICE" = cuda ] && CALIB_SIZE=(--num-seqs 32 --seq-len 2048)
  step "calibrate ($CALIB_DEVICE)" "$OSCAR" calibrate --model "$MODEL" --data "${CALIB_DATA[@]}" \
    --out build/quickstart/qwen3-tiny.oscar "${CALIB_SIZE[@]}" --heldout-seqs 4 --device "$CALIB_DEVICE"
fi

# Eval: the accuracy gap against BF16 on held-out text the model never trained on (see the fixtures' PROVENANCE.md),
# OSCAR next to the plain INT2 baseline at the same bytes. Small on the CPU; three contexts on a GPU.
EVAL_DATA=()
for f in ../shared/fixtures/text/python-docs-heldout.txt ../shared/fixtures/text/linux-docs-heldout.txt; do
  [ -f "$f" ] && EVAL_DATA+=("$f")
done
if [ -f build/quickstart/qwen3-tiny.oscar ] && [ ${#EVAL_DATA[@]} -gt 0 ]; then
  if [ "$CALIB_DEVICE" = cuda ]; then
    EVAL_ARGS=(--modes bf16,oscar,int2 --context 1024,2048,4096 --num-seqs 8 --device cuda)
  else
    EVAL_ARGS=(--modes bf16,oscar,int2 --context 1024 --num-seqs 2 --greedy-prompts 1 --device cpu)
  fi
  step "eval ($CALIB_DEVICE)" "$OSCAR" eval --model "$MODEL" --bundle build/quickstart/qwen3-tiny.oscar \
    --data "${EVAL_DATA[@]}" "${EVAL_ARGS[@]}" --out build/quickstart/eval
else
  printf 'quickstart: no bundle or no held-out text; skipping eval\n'
fi

printf '\nquickstart: done (model: %s)\n' "$MODEL"
