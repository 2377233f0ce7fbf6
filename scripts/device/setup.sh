# Sourced at the start of a device run (cwd = the repo copy there): makes the paths a build made here has baked in
# (/work/main, /work/shared/fixtures) exist, and exports BIN and OUT for the per-area scripts.
set -u
mkdir -p /work/shared
[ -e /work/main ] || ln -s "$PWD" /work/main
[ -d /work/shared/fixtures ] || tar -C /work/shared -xJf .devcarry/fixtures.tar.xz
[ -d .devcarry/pack ] || tar -C .devcarry -xJf .devcarry/pack.tar.xz
export BIN=$PWD/.devcarry/pack
export LD_LIBRARY_PATH=$BIN/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
