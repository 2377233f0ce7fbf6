#include <tbb/parallel_for.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "formats/error.h"
#include "lib/model/observer.h"

namespace oscar::model {

void exact_attention(const AttentionCall& c) {
  if (c.num_heads <= 0 || c.num_kv_heads <= 0 || c.num_heads % c.num_kv_heads != 0)
    throw Error("exact_attention", "num_heads must be a positive multiple of num_kv_heads");
  if (c.pos0 + c.num_tokens > c.cache_stride)
    throw Error("exact_attention", "keys beyond the cache capacity");
  const int64_t T = c.num_tokens, d = c.head_dim, group = c.num_heads / c.num_kv_heads;
  const int64_t out_stride = c.num_heads * d;
  // One task per (head, query): the work per query grows with its position, so finer tasks balance better
  // than one task per head. Each task reads its head's K/V in position order, so results do not depend on
  // the thread count.
  tbb::parallel_for(int64_t{0}, c.num_heads * T, [&](int64_t job) {
    const int64_t h = job / T, t = job % T;
    const int64_t kvh = h / group;  // GQA: query heads [kvh*group, (kvh+1)*group) share KV head kvh
    const int64_t num_keys = c.pos0 + t + 1;  // causal: keys 0 .. pos0+t
    const float* q = c.q + (h * T + t) * d;
    const float* k = c.k + kvh * c.cache_stride * d;
    const float* v = c.v + kvh * c.cache_stride * d;
    thread_local std::vector<float> scores;
    scores.resize(static_cast<size_t>(num_keys));
    float max_score = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < num_keys; ++j) {
      float dot = 0.f;
      const float* kj = k + j * d;
      for (int64_t i = 0; i < d; ++i) dot += q[i] * kj[i];
      // transformers eager: (q · kᵀ) * scaling, then softmax in fp32.
      scores[j] = dot * c.scale;
      max_score = std::max(max_score, scores[j]);
    }
    float sum = 0.f;
    for (int64_t j = 0; j < num_keys; ++j) {
      scores[j] = std::exp(scores[j] - max_score);
      sum += scores[j];
    }
    const float inv_sum = 1.0f / sum;
    float* out = c.out + t * out_stride + h * d;
    std::fill(out, out + d, 0.f);
    for (int64_t j = 0; j < num_keys; ++j) {
      const float p = scores[j] * inv_sum;
      const float* vj = v + j * d;
      for (int64_t i = 0; i < d; ++i) out[i] += p * vj[i];
    }
  });
}

}  // namespace oscar::model
