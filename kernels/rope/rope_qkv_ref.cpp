#include <cmath>
#include <vector>

#include "kernels/norm/rmsnorm.h"
#include "kernels/rope/rope_qkv.h"

namespace oscar::kern {

void rope_qkv_ref(const RopeQkvShape& s, const RopeQkvRefArgs& a) {
  const int64_t d = s.head_dim, half = d / 2;
  const int64_t slots = s.num_heads + 2 * s.num_kv_heads;
  std::vector<float> head(static_cast<size_t>(d));
  for (int64_t t = 0; t < s.num_tokens; ++t) {
    const float pos = static_cast<float>(a.positions[t]);
    for (int64_t slot = 0; slot < slots; ++slot) {
      const float* src = a.qkv + t * s.qkv_row_stride + slot * d;
      for (int64_t i = 0; i < d; ++i) head[i] = src[i] + (a.bias ? a.bias[slot * d + i] : 0.f);
      const bool is_q = slot < s.num_heads;
      const bool is_k = !is_q && slot < s.num_heads + s.num_kv_heads;
      if (!is_q && !is_k) {
        const int64_t h = slot - s.num_heads - s.num_kv_heads;
        for (int64_t i = 0; i < d; ++i) a.v_out[(t * s.num_kv_heads + h) * d + i] = head[i];
        continue;
      }
      const float* norm_w = is_q ? a.q_norm_weight : a.k_norm_weight;
      if (norm_w) head_rmsnorm_ref(head.data(), 1, d, 1, d, norm_w, a.norm_eps);
      const int64_t h = is_q ? slot : slot - s.num_heads;
      const int64_t heads = is_q ? s.num_heads : s.num_kv_heads;
      float* dst = (is_q ? a.q_out : a.k_out) + (t * heads + h) * d;
      if (is_k && a.k_pre_rope_out)
        for (int64_t i = 0; i < d; ++i) a.k_pre_rope_out[(t * heads + h) * d + i] = head[i];
      for (int64_t i = 0; i < half; ++i) {
        // The angle is the fp32 product, as torch forms it; cos/sin of that fp32 angle are taken in double.
        const float angle = a.inv_freq[i] * pos;
        const float c = static_cast<float>(std::cos(static_cast<double>(angle)));
        const float sn = static_cast<float>(std::sin(static_cast<double>(angle)));
        dst[i] = head[i] * c - head[i + half] * sn;
        dst[i + half] = head[i + half] * c + head[i] * sn;
      }
    }
  }
}

}  // namespace oscar::kern
