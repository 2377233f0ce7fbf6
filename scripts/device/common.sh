# Sourced first by every per-area device script (cwd = the repo copy on the GPU host): strict mode, the packed
# binaries (setup.sh when run on its own rather than through run.sh), their libraries, and the output folder.
set -uo pipefail
[ -f scripts/device/setup.sh ] && [ -z "${BIN:-}" ] && source scripts/device/setup.sh
: "${BIN:?set BIN to the packed binaries}" "${OUT:?set OUT}"
export LD_LIBRARY_PATH=$BIN/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
mkdir -p "$OUT"
