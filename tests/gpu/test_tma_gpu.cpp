// The cluster building blocks of kernels/common/tma.cuh (multicast TMA, remote mbarrier arrivals, cluster barriers)
// through kernels/probe/tma_probe: two CTAs stream tiles through a 2-stage ring as prefill attention v12 does, each
// CTA copying half of every tile into both. Each CTA's view of every tile must be the source, bit for bit: a wrong
// multicast mask leaves one half stale in one CTA, a wrong barrier count or phase hangs or reads a tile early (the
// previous round's data), a wrong swizzle scrambles 16-byte chunks.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstdio>
#include <vector>

#include "kernels/probe/tma_probe.h"
#include "tests/gpu/gpu_test_buffer.h"
#include "tests/gpu/gpu_test_data.h"

namespace oscar {
namespace {

using test::gpu::DeviceBuffer;
using test::gpu::random_bf16;

// Mismatching elements of both CTAs' views of `rounds` tiles; -1 where the device cannot run the probe.
int64_t run_probe(int32_t rounds) {
  constexpr int64_t kTile = 64 * 128;
  const auto src = random_bf16(static_cast<size_t>(rounds * kTile), 7 + rounds);
  DeviceBuffer<uint16_t> dsrc(src), ddst(static_cast<size_t>(2 * rounds * kTile));
  EXPECT_EQ(cudaMemset(ddst.ptr, 0xFF, ddst.count * sizeof(uint16_t)), cudaSuccess);
  kern::TmaClusterProbeArgs args;
  args.src = dsrc.ptr;
  args.dst = ddst.ptr;
  args.rounds = rounds;
  const kern::Status st = kern::tma_cluster_probe(args, nullptr);
  if (st == kern::Status::Unsupported) return -1;
  EXPECT_EQ(st, kern::Status::Ok);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const auto dst = ddst.download();
  int64_t wrong = 0;
  for (int64_t rank = 0; rank < 2; ++rank)
    for (int64_t i = 0; i < rounds * kTile; ++i)
      wrong += dst[static_cast<size_t>(rank * rounds * kTile + i)] != src[static_cast<size_t>(i)];
  return wrong;
}

TEST(TmaGpu, ClusterMulticastRingDeliversEveryTileToBothCtas) {
  OSCAR_REQUIRE_DEVICE();
  // 1 round: no refill; 2: both stages once; 7: three phases of each stage's barriers, an odd count.
  for (const int32_t rounds : {1, 2, 7}) {
    const int64_t wrong = run_probe(rounds);
    if (wrong < 0) GTEST_SKIP() << "cluster TMA needs an sm_90 device and a driver with cuTensorMapEncodeTiled";
    std::printf("  %d rounds: %lld of %lld elements wrong\n", rounds, static_cast<long long>(wrong),
                static_cast<long long>(2 * rounds * 64 * 128));
    EXPECT_EQ(wrong, 0) << rounds << " rounds";
  }
}

TEST(TmaGpu, ClusterProbeRefusesBadArguments) {
  kern::TmaClusterProbeArgs args;
  EXPECT_EQ(kern::tma_cluster_probe(args, nullptr), kern::Status::InvalidArgument);
  uint16_t host[1] = {0};
  args.src = args.dst = host;  // never launched: rounds is checked first
  args.rounds = 0;
  EXPECT_EQ(kern::tma_cluster_probe(args, nullptr), kern::Status::InvalidArgument);
}

}  // namespace
}  // namespace oscar
