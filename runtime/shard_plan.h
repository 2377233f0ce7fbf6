#pragma once
// Data-parallel calibration: which packed batches each rank runs, and the one fixed order in which per-batch
// statistics partials are summed. CUDA-free (the device reduction in runtime/layer_stream.cu has this host twin).
//
// Why per-batch partials: the single-device collector adds each batch's fp64 contribution s_b to its running sum,
// acc = ((0 + s_0) + s_1) + ... A rank that runs batches [first, last) produces p_b = 0 + s_b for each of them;
// gathered and added in global batch order they give the same chain of fp64 additions, so the totals (and the
// bundle) are bit-identical for any number of ranks, including one.
#include <cstdint>
#include <span>
#include <vector>

namespace oscar::rt {

struct ShardPlan {
  int64_t num_batches = 0;
  int64_t ranks = 1;
  std::vector<int64_t> first;  // [ranks + 1]: rank r runs batches [first[r], first[r + 1])

  int64_t local_count(int64_t rank) const { return first[rank + 1] - first[rank]; }
  // The per-rank slot count of the gathered buffer [ranks][max_local][stride] (short ranks are padded).
  int64_t max_local() const;
};

// Contiguous, balanced: the first num_batches % ranks ranks get one batch more. Throws oscar::Error for ranks < 1.
ShardPlan plan_shards(int64_t num_batches, int64_t ranks);

// Host twin of the device reduction: out[i] = ((0 + p_0[i]) + p_1[i]) + ... over global batches in order, where
// p_b is slot (b - first[r]) of rank r's block in `gathered` ([ranks][max_local][stride]). `out` has `stride` values.
void ordered_reduce_ref(std::span<const double> gathered, const ShardPlan& plan, int64_t stride, std::span<double> out);

}  // namespace oscar::rt
