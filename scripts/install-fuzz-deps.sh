#!/usr/bin/env bash
# The fuzzing toolchain (scripts/fuzz.sh): clang with its compiler-rt runtimes (libFuzzer, ASan, UBSan) and
# llvm-symbolizer for readable crash stacks. Kept apart from install-deps.sh because it is ~500 MB and only
# fuzzing needs it. Idempotent, Debian packages only.
set -euo pipefail
PKGS=(clang libclang-rt-dev llvm)
source "$(dirname "$0")/apt-packages.sh"
install_debian_packages install-fuzz-deps "${PKGS[@]}"
