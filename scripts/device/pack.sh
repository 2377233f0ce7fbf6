#!/usr/bin/env bash
# Lead's tool for GPU runs: packs a Release build made here (binaries + the non-system libs a GPU host lacks) and
# the fixtures the device scripts read into .devcarry/ (git-ignored), which the device tool carries (64 MiB cap).
# Usage: scripts/device/pack.sh [BUILD_DIR]    then on the GPU host: source scripts/device/setup.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
build=${1:-build}
fx=../shared/fixtures
scripts/pack-portable.sh "$build" .devcarry/pack >/dev/null
# Test binaries the device scripts do not run stay behind (size cap).
keep="oscar test_gpu decode_attention_bench kv_write_bench calibrate_bench forward_bench prefill_attention_bench engine_step_bench"
for exe in .devcarry/pack/bin/*; do
  [[ " $keep " == *" $(basename "$exe") "* ]] || rm -f "$exe"
done
# xz -9e: its 64 MiB window spans all the binaries, which share most of their code (the static libraries): 8 MB
# instead of the 20 MB of tar -J's default level, leaving room under the device tool's 64 MiB carry limit.
tar -C .devcarry -cf - pack | xz -T2 -9e > .devcarry/pack.tar.xz && rm -rf .devcarry/pack
tar -C "$fx/.." -cJf .devcarry/fixtures.tar.xz \
  fixtures/PROVENANCE.md fixtures/golden fixtures/models/qwen3-tiny-trained \
  fixtures/models/tinystories-llama2c-280k-hf fixtures/models/llama2-tokenizer \
  fixtures/text
du -sh .devcarry/pack.tar.xz .devcarry/fixtures.tar.xz
du -sh .devcarry
