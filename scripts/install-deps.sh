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
source "$(dirname "$0")/apt-packages.sh"
install_debian_packages install-deps "${PKGS[@]}"
