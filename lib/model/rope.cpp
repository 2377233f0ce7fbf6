#include "lib/model/rope.h"

#include <tbb/parallel_for.h>

#include <cmath>

#include "formats/error.h"
#include "lib/model/cpu_model.h"

namespace oscar::model {

std::vector<float> rope_inv_freq(const fmt::ModelConfig& cfg) {
  const int64_t d = cfg.head_dim;
  if (d <= 0 || d % 2 != 0) throw Error("head_dim", "RoPE needs a positive even head_dim, got " + std::to_string(d));
  const int64_t half = d / 2;
  std::vector<float> inv(static_cast<size_t>(half));
  // torch: 1.0 / (base ** (arange(0, d, 2).float() / d)) — every step in float32. The exponent is an fp32
  // quotient, the power is rounded to fp32, and so is the reciprocal; doing this in double instead shifts the
  // low frequencies by ~1 ulp, which becomes > 1e-3 of angle at long positions.
  const float base = static_cast<float>(cfg.rope.theta);
  for (int64_t i = 0; i < half; ++i) {
    const float exponent = static_cast<float>(2 * i) / static_cast<float>(d);
    const float power = static_cast<float>(std::pow(static_cast<double>(base), static_cast<double>(exponent)));
    inv[i] = 1.0f / power;
  }
  switch (cfg.rope.type) {
    case fmt::RopeType::Default:
      break;
    case fmt::RopeType::Linear: {
      const float factor = static_cast<float>(cfg.rope.factor);
      for (float& f : inv) f = f / factor;
      break;
    }
    case fmt::RopeType::Llama3: {
      // transformers' _compute_llama3_parameters, op by op in float32 (python scalars enter as float32).
      const float factor = static_cast<float>(cfg.rope.factor);
      const float low = static_cast<float>(cfg.rope.low_freq_factor);
      const float old_ctx = static_cast<float>(cfg.rope.original_max_position_embeddings);
      const double low_freq_wavelen = static_cast<double>(cfg.rope.original_max_position_embeddings) /
                                      cfg.rope.low_freq_factor;
      const double high_freq_wavelen = static_cast<double>(cfg.rope.original_max_position_embeddings) /
                                       cfg.rope.high_freq_factor;
      const float two_pi = static_cast<float>(2.0 * M_PI);
      const float span = static_cast<float>(cfg.rope.high_freq_factor - cfg.rope.low_freq_factor);
      for (float& f : inv) {
        const float wavelen = two_pi / f;
        const float scaled = wavelen > static_cast<float>(low_freq_wavelen) ? f / factor : f;
        const bool medium = !(wavelen < static_cast<float>(high_freq_wavelen)) &&
                            !(wavelen > static_cast<float>(low_freq_wavelen));
        if (medium) {
          const float smooth = (old_ctx / wavelen - low) / span;
          f = (1.0f - smooth) * scaled / factor + smooth * scaled;
        } else {
          f = scaled;
        }
      }
      break;
    }
  }
  return inv;
}

RopeTables rope_tables(std::span<const float> inv_freq, int64_t pos0, int64_t num_tokens) {
  RopeTables t;
  t.num_tokens = num_tokens;
  t.half_dim = static_cast<int64_t>(inv_freq.size());
  t.cos.resize(static_cast<size_t>(num_tokens * t.half_dim));
  t.sin.resize(t.cos.size());
  tbb::parallel_for(int64_t{0}, num_tokens, [&](int64_t tok) {
    const float pos = static_cast<float>(pos0 + tok);
    for (int64_t i = 0; i < t.half_dim; ++i) {
      const float angle = inv_freq[i] * pos;  // rounded to fp32, as torch's fp32 matmul produces it
      t.cos[tok * t.half_dim + i] = static_cast<float>(std::cos(static_cast<double>(angle)));
      t.sin[tok * t.half_dim + i] = static_cast<float>(std::sin(static_cast<double>(angle)));
    }
  });
  return t;
}

void apply_rope(float* x, int64_t heads, int64_t head_dim, const RopeTables& tables) {
  const int64_t half = head_dim / 2;
  if (half != tables.half_dim) throw Error("apply_rope", "head_dim/2 does not match the RoPE tables");
  const int64_t T = tables.num_tokens;
  tbb::parallel_for(int64_t{0}, heads * T, [&](int64_t row) {
    float* v = x + row * head_dim;
    const float* c = tables.cos.data() + (row % T) * half;
    const float* s = tables.sin.data() + (row % T) * half;
    for (int64_t i = 0; i < half; ++i) {
      const float a = v[i], b = v[i + half];
      v[i] = a * c[i] - b * s[i];
      v[i + half] = b * c[i] + a * s[i];
    }
  });
}

}  // namespace oscar::model
