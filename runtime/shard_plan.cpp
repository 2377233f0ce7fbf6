#include "runtime/shard_plan.h"

#include <algorithm>
#include <string>

#include "formats/error.h"

namespace oscar::rt {

int64_t ShardPlan::max_local() const {
  int64_t m = 0;
  for (int64_t r = 0; r < ranks; ++r) m = std::max(m, local_count(r));
  return m;
}

ShardPlan plan_shards(int64_t num_batches, int64_t ranks) {
  if (ranks < 1) throw Error("--gpus", "must be >= 1, got " + std::to_string(ranks));
  if (num_batches < 0) throw Error("plan_shards", "negative batch count");
  ShardPlan p;
  p.num_batches = num_batches;
  p.ranks = ranks;
  p.first.assign(static_cast<size_t>(ranks + 1), 0);
  const int64_t base = num_batches / ranks, extra = num_batches % ranks;
  for (int64_t r = 0; r < ranks; ++r) p.first[r + 1] = p.first[r] + base + (r < extra ? 1 : 0);
  return p;
}

void ordered_reduce_ref(std::span<const double> gathered, const ShardPlan& plan, int64_t stride,
                        std::span<double> out) {
  const int64_t slots = plan.max_local();
  if (static_cast<int64_t>(gathered.size()) < plan.ranks * slots * stride ||
      static_cast<int64_t>(out.size()) != stride)
    throw Error("ordered_reduce_ref", "buffer sizes do not match the plan");
  for (int64_t i = 0; i < stride; ++i) {
    double acc = 0;
    for (int64_t r = 0; r < plan.ranks; ++r)
      for (int64_t j = 0; j < plan.local_count(r); ++j) acc += gathered[static_cast<size_t>((r * slots + j) * stride + i)];
    out[static_cast<size_t>(i)] = acc;
  }
}

}  // namespace oscar::rt
