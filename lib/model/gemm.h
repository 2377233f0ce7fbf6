#pragma once
// Linear layers on weights as they are stored. A checkpoint's W [out, in] stays bf16/fp16 (memory-mapped) and
// is widened to fp32 a block of rows at a time right before OpenBLAS multiplies it, so the fp32 copy of a weight
// never exists in full; fp32 weights are multiplied in place.
#include <cstddef>
#include <cstdint>
#include <string>

#include "formats/dtype.h"

namespace oscar::model {

// A borrowed row-major matrix [rows, cols] of F32, BF16 or F16 elements.
struct WeightMatrix {
  std::string name;  // tensor name, for error messages
  fmt::DType dtype = fmt::DType::F32;
  const std::byte* data = nullptr;
  int64_t rows = 0;  // out features
  int64_t cols = 0;  // in features
};

// Widens rows [first_row, first_row + num_rows) of W to fp32 into `out` (num_rows * cols floats).
void widen_rows(const WeightMatrix& w, int64_t first_row, int64_t num_rows, float* out);

// Y[T, out] = X[T, in] · Wᵀ (+ bias[out] when bias != nullptr). X and Y are row-major fp32 and must not alias.
// Throws oscar::Error naming the tensor for an unsupported dtype.
void linear(const float* x, int64_t num_tokens, const WeightMatrix& w, const float* bias, float* y);

}  // namespace oscar::model
