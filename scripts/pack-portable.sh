#!/usr/bin/env bash
# Copies built executables (oscar, test and bench binaries) plus the shared libraries a GPU host may lack into one
# folder, so a build made here runs on another Linux (e.g. an Ubuntu GPU box without TBB or this spdlog/sentencepiece).
# Usage: scripts/pack-portable.sh BUILD_DIR OUT_DIR   then on the GPU host: LD_LIBRARY_PATH=OUT_DIR/lib OUT_DIR/bin/...
set -euo pipefail
build=${1:?build dir}; out=${2:?output dir}
rm -rf "$out"; mkdir -p "$out/bin" "$out/lib"
for exe in "$build"/bin/* "$build"/tests/test_*; do
  [ -f "$exe" ] && [ -x "$exe" ] && cp "$exe" "$out/bin/"
done
# Libraries whose soname or ABI differs between Debian 12 and Ubuntu 24.04 (or that are absent there), copied only
# when one of the packed binaries needs them.
needed=$(for exe in "$out"/bin/*; do ldd "$exe" 2>/dev/null; done | awk '{print $1}' | sort -u)
for lib in libtbb.so.12 libspdlog.so.1.10 libsentencepiece.so.0 libfmt.so.9 libutf8proc.so.2 libicuuc.so.72 libicudata.so.72; do
  grep -qx "$lib" <<<"$needed" || continue
  p=$(ldconfig -p | awk -v l="$lib" '$1 == l && !found {print $NF; found = 1}')  # no early exit: SIGPIPE + pipefail
  [ -n "$p" ] && cp -L "$p" "$out/lib/"
done
strip --strip-unneeded "$out"/bin/* 2>/dev/null || true
du -sh "$out"
