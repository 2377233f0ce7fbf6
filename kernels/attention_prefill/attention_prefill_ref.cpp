#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/attention_prefill/attention_prefill.h"

namespace oscar::kern {

void attention_prefill_ref(const PrefillAttentionRefArgs& a) {
  const int64_t d = a.head_dim;
  const int64_t group = a.num_heads / a.num_kv_heads;
  std::vector<double> scores;
  std::vector<double> acc(static_cast<size_t>(d));
  for (size_t s = 0; s + 1 < a.cu_seqlens.size(); ++s) {
    const int64_t begin = a.cu_seqlens[s], len = a.cu_seqlens[s + 1] - begin;
    scores.resize(static_cast<size_t>(std::max<int64_t>(len, 1)));
    for (int64_t h = 0; h < a.num_heads; ++h) {
      const int64_t kvh = h / group;
      for (int64_t i = 0; i < len; ++i) {
        const float* q = a.q + (begin + i) * a.q_row_stride + h * d;
        double max_score = -INFINITY;
        for (int64_t j = 0; j <= i; ++j) {
          const float* k = a.k + (begin + j) * a.k_row_stride + kvh * d;
          double dot = 0;
          for (int64_t c = 0; c < d; ++c) dot += static_cast<double>(q[c]) * k[c];
          scores[j] = dot * a.scale;
          max_score = std::max(max_score, scores[j]);
        }
        double denom = 0;
        for (int64_t j = 0; j <= i; ++j) denom += (scores[j] = std::exp(scores[j] - max_score));
        std::fill(acc.begin(), acc.end(), 0.0);
        for (int64_t j = 0; j <= i; ++j) {
          const float* v = a.v + (begin + j) * a.v_row_stride + kvh * d;
          for (int64_t c = 0; c < d; ++c) acc[c] += scores[j] * v[c];
        }
        float* out = a.out + (begin + i) * a.out_row_stride + h * d;
        for (int64_t c = 0; c < d; ++c) out[c] = static_cast<float>(acc[c] / denom);
      }
    }
  }
}

}  // namespace oscar::kern
