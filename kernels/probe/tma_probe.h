#pragma once
// Device check of the cluster building blocks in kernels/common/tma.cuh (multicast TMA copies, remote mbarrier
// arrivals, cluster barriers), before prefill attention v12 relies on them. One cluster of two CTAs streams `rounds`
// tiles of 64 rows × 128 bf16 columns through a 2-stage ring the way v12 streams K/V: rank 0 copies columns 0..63 and
// rank 1 columns 64..127 of each tile, each multicast into both CTAs' stage; every warp of both CTAs arrives on the
// stage's empty barrier in both CTAs, and each CTA's thread 0 refills a stage only after all 16 arrivals. Each CTA
// writes what it saw, un-swizzled, to dst[rank][round], so a test can compare both CTAs' copies with the source
// bit for bit. Needs an sm_90 device; otherwise Unsupported.
#include <cstdint>

#include "kernels/common/status.h"

namespace oscar::kern {

struct TmaClusterProbeArgs {
  const uint16_t* src = nullptr;  // device, bf16 [rounds * 64][128] row-major
  uint16_t* dst = nullptr;        // device, bf16 [2][rounds][64][128]: CTA rank, round, the tile as that CTA saw it
  int32_t rounds = 0;             // tiles streamed, >= 1
};

Status tma_cluster_probe(const TmaClusterProbeArgs& args, Stream stream);

}  // namespace oscar::kern
