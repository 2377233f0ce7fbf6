#pragma once
// RMSNorm as transformers' LlamaRMSNorm / Qwen3RMSNorm compute it in fp32: y = w * (x * rsqrt(mean(x²) + eps)).
// The residual stream stays fp32 on the device; normalized activations leave as bf16 because they feed bf16 GEMMs.
#include <cstdint>

#include "kernels/common/status.h"

namespace oscar::kern {

// x [rows, n] fp32, weight [n] bf16 bits, out [rows, n] bf16 bits. All device pointers.
Status rmsnorm(const float* x, int64_t rows, int64_t n, const uint16_t* weight, float eps, uint16_t* out,
               Stream stream);

// The residual-add variant used between sublayers: residual += delta (both fp32 [rows, n]), then
// out = rmsnorm(residual). Fusing saves one full read and write of the residual stream per sublayer.
Status add_rmsnorm(float* residual, const float* delta, int64_t rows, int64_t n, const uint16_t* weight, float eps,
                   uint16_t* out, Stream stream);

// Qwen3's per-head norm over head_dim, in place on fp32 x [rows, heads, head_dim] whose rows are row_stride
// elements apart (so it can run on a slice of a fused QKV buffer). weight [head_dim] is shared by all heads.
Status head_rmsnorm(float* x, int64_t rows, int64_t row_stride, int64_t heads, int64_t head_dim,
                    const uint16_t* weight, float eps, Stream stream);

// CPU references (host pointers, fp32 weight and output, double accumulation of the mean square).
void rmsnorm_ref(const float* x, int64_t rows, int64_t n, const float* weight, float eps, float* out);
void add_rmsnorm_ref(float* residual, const float* delta, int64_t rows, int64_t n, const float* weight, float eps,
                     float* out);
void head_rmsnorm_ref(float* x, int64_t rows, int64_t row_stride, int64_t heads, int64_t head_dim,
                      const float* weight, float eps);

}  // namespace oscar::kern
