#!/usr/bin/env bash
# Installs the Debian packages OSCAR builds against. Idempotent: packages already present are skipped,
# and apt is only touched when something is missing. Nothing is downloaded from anywhere but Debian.
set -euo pipefail
PKGS=(
  build-essential cmake ninja-build ccache pkg-config git
  libeigen3-dev libopenblas-dev liblapacke-dev
  libhdf5-dev libcli11-dev libtbb-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  nlohmann-json3-dev libfmt-dev libspdlog-dev libpcre2-dev libsentencepiece-dev libssl-dev libutf8proc-dev
  python3 python3-numpy
)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#PKGS[@]} packages present"
  exit 0
fi
echo "install-deps: installing ${missing[*]}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
