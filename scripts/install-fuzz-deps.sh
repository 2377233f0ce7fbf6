#!/usr/bin/env bash
# The fuzzing toolchain (scripts/fuzz.sh): clang with its compiler-rt runtimes (libFuzzer, ASan, UBSan) and
# llvm-symbolizer for readable crash stacks. Kept apart from install-deps.sh because it is ~500 MB and only
# fuzzing needs it. Idempotent, Debian packages only.
set -euo pipefail
PKGS=(clang libclang-rt-dev llvm)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-fuzz-deps: all ${#PKGS[@]} packages present"
  exit 0
fi
echo "install-fuzz-deps: installing ${missing[*]}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
