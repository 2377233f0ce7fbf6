#pragma once
// Rotary position embedding in transformers' rotate_half convention: dimension i pairs with i + d/2.
#include <cstdint>
#include <span>
#include <vector>

#include "formats/model_config.h"

namespace oscar::model {

// rope_inv_freq (declared in lib/model/cpu_model.h) computes the inverse frequencies; these apply them.

// cos and sin tables [T, d/2] for positions pos0 .. pos0+T-1. The angle is rounded to fp32 before cos/sin
// exactly as torch forms it (fp32 inv_freq × fp32 position), because at positions in the thousands that rounding
// moves the angle by far more than 1e-3 and transformers' numbers include it.
struct RopeTables {
  int64_t num_tokens = 0;
  int64_t half_dim = 0;
  std::vector<float> cos, sin;
};
RopeTables rope_tables(std::span<const float> inv_freq, int64_t pos0, int64_t num_tokens);

// Rotates x [heads, T, d] in place: x·cos + rotate_half(x)·sin, rotate_half(x) = (-x[d/2:], x[:d/2]).
void apply_rope(float* x, int64_t heads, int64_t head_dim, const RopeTables& tables);

}  // namespace oscar::model
