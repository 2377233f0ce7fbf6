#include "lib/model/gemm.h"

#include <cblas.h>
#include <tbb/parallel_for.h>

#include <algorithm>
#include <vector>

#include "formats/error.h"

namespace oscar::model {

namespace {

// About 4 MiB of widened fp32 per block: large enough that sgemm runs at full speed, small enough to stay in L2/L3
// next to the activations.
constexpr int64_t kBlockFloats = int64_t{1} << 20;

}  // namespace

void widen_rows(const WeightMatrix& w, int64_t first_row, int64_t num_rows, float* out) {
  const int64_t n = num_rows * w.cols;
  const int64_t first = first_row * w.cols;
  // Parallel over chunks of elements: widening is memory bound, and a bf16 block of a large matrix is
  // several MB, so two or more cores help; element order is irrelevant to the result.
  constexpr int64_t kChunk = 1 << 15;
  switch (w.dtype) {
    case fmt::DType::F32: {
      const float* src = reinterpret_cast<const float*>(w.data) + first;
      std::copy(src, src + n, out);
      return;
    }
    case fmt::DType::BF16: {
      const uint16_t* src = reinterpret_cast<const uint16_t*>(w.data) + first;
      tbb::parallel_for(int64_t{0}, (n + kChunk - 1) / kChunk, [&](int64_t c) {
        const int64_t b = c * kChunk, e = std::min(n, b + kChunk);
        for (int64_t i = b; i < e; ++i) out[i] = fmt::bf16_to_f32(src[i]);
      });
      return;
    }
    case fmt::DType::F16: {
      const uint16_t* src = reinterpret_cast<const uint16_t*>(w.data) + first;
      tbb::parallel_for(int64_t{0}, (n + kChunk - 1) / kChunk, [&](int64_t c) {
        const int64_t b = c * kChunk, e = std::min(n, b + kChunk);
        for (int64_t i = b; i < e; ++i) out[i] = fmt::f16_to_f32(src[i]);
      });
      return;
    }
    default:
      throw Error(w.name, "unsupported weight dtype " + std::string(fmt::dtype_name(w.dtype)) +
                              " (expected F32, BF16 or F16)");
  }
}

void linear(const float* x, int64_t num_tokens, const WeightMatrix& w, const float* bias, float* y) {
  const int64_t T = num_tokens, out_features = w.rows, in_features = w.cols;
  if (T <= 0 || out_features <= 0) return;
  if (w.dtype == fmt::DType::F32) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(T), static_cast<int>(out_features),
                static_cast<int>(in_features), 1.0f, x, static_cast<int>(in_features),
                reinterpret_cast<const float*>(w.data), static_cast<int>(in_features), 0.0f, y,
                static_cast<int>(out_features));
  } else {
    const int64_t rows_per_block = std::clamp<int64_t>(kBlockFloats / std::max<int64_t>(in_features, 1), 1, out_features);
    std::vector<float> block(static_cast<size_t>(rows_per_block * in_features));
    for (int64_t r0 = 0; r0 < out_features; r0 += rows_per_block) {
      const int64_t rows = std::min(rows_per_block, out_features - r0);
      widen_rows(w, r0, rows, block.data());
      // Y[:, r0:r0+rows] = X · block^T, written in place through ldc = out_features.
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(T), static_cast<int>(rows),
                  static_cast<int>(in_features), 1.0f, x, static_cast<int>(in_features), block.data(),
                  static_cast<int>(in_features), 0.0f, y + r0, static_cast<int>(out_features));
    }
  }
  if (bias) {
    tbb::parallel_for(int64_t{0}, T, [&](int64_t t) {
      float* row = y + t * out_features;
      for (int64_t o = 0; o < out_features; ++o) row[o] += bias[o];
    });
  }
}

}  // namespace oscar::model
