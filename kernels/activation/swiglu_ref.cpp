#include <cmath>

#include "kernels/activation/swiglu.h"

namespace oscar::kern {

void swiglu_ref(const float* gate_up, int64_t rows, int64_t inter, float* out) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < inter; ++i) {
      const float g = gate_up[r * 2 * inter + i];
      const float u = gate_up[r * 2 * inter + inter + i];
      out[r * inter + i] = g / (1.f + std::exp(-g)) * u;
    }
}

}  // namespace oscar::kern
