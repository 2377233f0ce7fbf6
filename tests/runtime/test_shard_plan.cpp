// The data-parallel reduction order (runtime/shard_plan.h) on synthetic per-batch partials: for every rank count the
// gathered, ordered sum reproduces the single-device running sum bit for bit, and the test is sensitive enough to
// see that a natural alternative (each rank sums its shard, then the ranks are added) does not.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "formats/error.h"
#include "runtime/shard_plan.h"

namespace oscar::rt {
namespace {

// Per-batch partials with wildly different magnitudes, so fp64 addition order shows in the last bits.
std::vector<std::vector<double>> synthetic_partials(int64_t batches, int64_t stride, uint32_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> n(0.0, 1.0);
  std::vector<std::vector<double>> p(static_cast<size_t>(batches), std::vector<double>(static_cast<size_t>(stride)));
  for (int64_t b = 0; b < batches; ++b)
    for (int64_t i = 0; i < stride; ++i) p[b][i] = n(rng) * std::pow(10.0, static_cast<double>((b * 7 + i) % 13) - 6);
  return p;
}

// What GpuStatisticsCollector does on one device: acc += s_b, batch after batch, starting from 0.
std::vector<double> running_sum(const std::vector<std::vector<double>>& p, int64_t stride) {
  std::vector<double> acc(static_cast<size_t>(stride), 0.0);
  for (const auto& s : p)
    for (int64_t i = 0; i < stride; ++i) acc[i] += s[i];
  return acc;
}

// Each rank's partials in its slots of the gathered [ranks][max_local][stride] buffer (padding left as NaN: it must
// never be read).
std::vector<double> gather(const std::vector<std::vector<double>>& p, const ShardPlan& plan, int64_t stride) {
  const int64_t slots = plan.max_local();
  std::vector<double> g(static_cast<size_t>(plan.ranks * slots * stride), std::nan(""));
  for (int64_t r = 0; r < plan.ranks; ++r)
    for (int64_t j = 0; j < plan.local_count(r); ++j)
      for (int64_t i = 0; i < stride; ++i) g[(r * slots + j) * stride + i] = 0.0 + p[plan.first[r] + j][i];
  return g;
}

bool bit_equal(const std::vector<double>& a, const std::vector<double>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(double)) == 0;
}

TEST(ShardPlan, ContiguousBalancedShards) {
  const ShardPlan p = plan_shards(10, 4);
  EXPECT_EQ(p.first, (std::vector<int64_t>{0, 3, 6, 8, 10}));
  EXPECT_EQ(p.max_local(), 3);
  const ShardPlan few = plan_shards(2, 4);  // more ranks than batches: the last ranks idle
  EXPECT_EQ(few.first, (std::vector<int64_t>{0, 1, 2, 2, 2}));
  EXPECT_EQ(few.local_count(3), 0);
  EXPECT_THROW(plan_shards(4, 0), Error);
}

TEST(ShardPlan, OrderedReductionEqualsTheSingleDeviceRunningSumForAnyRankCount) {
  const int64_t batches = 37, stride = 96;
  const auto p = synthetic_partials(batches, stride, 5);
  const std::vector<double> reference = running_sum(p, stride);
  for (int64_t ranks : {1, 2, 3, 4, 5, 8, 37, 40}) {
    const ShardPlan plan = plan_shards(batches, ranks);
    std::vector<double> out(static_cast<size_t>(stride));
    ordered_reduce_ref(gather(p, plan, stride), plan, stride, out);
    EXPECT_TRUE(bit_equal(out, reference)) << ranks << " ranks";
  }
}

TEST(ShardPlan, PerRankSumsThenRanksIsNotBitExact) {
  // The tempting reduction (NCCL all-reduce of per-rank sums) changes the addition order; on these partials it
  // changes bits, which is why the partials are gathered per batch instead.
  const int64_t batches = 37, stride = 96;
  const auto p = synthetic_partials(batches, stride, 5);
  const std::vector<double> reference = running_sum(p, stride);
  const ShardPlan plan = plan_shards(batches, 4);
  std::vector<double> total(static_cast<size_t>(stride), 0.0);
  for (int64_t r = 0; r < plan.ranks; ++r) {
    std::vector<double> part(static_cast<size_t>(stride), 0.0);
    for (int64_t b = plan.first[r]; b < plan.first[r + 1]; ++b)
      for (int64_t i = 0; i < stride; ++i) part[i] += p[b][i];
    for (int64_t i = 0; i < stride; ++i) total[i] += part[i];
  }
  EXPECT_FALSE(bit_equal(total, reference));
  double worst = 0;
  for (int64_t i = 0; i < stride; ++i) worst = std::max(worst, std::abs(total[i] - reference[i]) / std::abs(reference[i]));
  EXPECT_LT(worst, 1e-12);  // different bits, same value to rounding: the order is all that differs
}

TEST(ShardPlan, ReductionRejectsMismatchedBuffers) {
  const ShardPlan plan = plan_shards(4, 2);
  std::vector<double> g(3), out(2);
  EXPECT_THROW(ordered_reduce_ref(g, plan, 2, out), Error);
}

}  // namespace
}  // namespace oscar::rt
