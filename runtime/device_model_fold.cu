// DeviceModel::fold_value_rotation (runtime/device_model.h): R_v folded into v_proj / o_proj on the device.
//
// Both folds are "a d-vector of weights times R": a v_proj column slice of KV head h (y·R_v = x·(W_vᵀ R_v), so
// column c of the head's rows becomes (W[h·d + i][c])_i · R) and an o_proj row slice of query head j (the
// attention output arrives as a·R_v, and (a·R_v)·(R_vᵀ W_oᵀ) = a·W_oᵀ, so row n of the head's columns becomes
// (W[n][j·d + i])_i · R). One kernel serves both through strides. Written against the public weights() view
// rather than DeviceModel::Impl, so this file does not depend on how the model stores its buffers.
#include <cuda_runtime.h>

#include <algorithm>
#include <string>
#include <vector>

#include "formats/error.h"
#include "kernels/common/device_utils.cuh"
#include "runtime/device_buffer.h"
#include "runtime/device_model.h"

namespace oscar::rt {
namespace {

constexpr int kSegmentsPerBlock = 8;  // each R element loaded once serves this many weight slices

// Segment s = a·b_count + b has d bf16 elements at w[a·stride_a + b·stride_b + i·stride_i], i < d. It is
// replaced by seg·R_g, g = (group_on_a ? a : b) / group_div when groups > 1, else 0. In place: a block reads its
// segments into shared memory before writing. fp64 accumulation: a bf16 × fp32 product is exact in fp64, so the
// folded weight (fp64 -> fp32 -> bf16 RNE, as the test and torch round) matches the fp64 product except within
// ~1e-14 of a rounding midpoint. fp32 accumulation was 2-4 bf16 ulp off where the sum cancels heavily (first H100
// run of FoldValueRotation); the fold runs once at load, so fp64's lower rate costs nothing that matters.
__global__ void fold_segments_kernel(uint16_t* __restrict__ w, int d, int64_t segments, int64_t b_count,
                                     int64_t stride_a, int64_t stride_b, int64_t stride_i,
                                     const float* __restrict__ rotation, int64_t groups, bool group_on_a,
                                     int64_t group_div) {
  extern __shared__ float seg[];  // [kSegmentsPerBlock][d]
  const int j = static_cast<int>(threadIdx.x);
  for (int64_t first = static_cast<int64_t>(blockIdx.x) * kSegmentsPerBlock; first < segments;
       first += static_cast<int64_t>(gridDim.x) * kSegmentsPerBlock) {
    const int count = static_cast<int>(segments - first < kSegmentsPerBlock ? segments - first : kSegmentsPerBlock);
    int64_t base[kSegmentsPerBlock];
    int64_t group[kSegmentsPerBlock];
    for (int k = 0; k < kSegmentsPerBlock; ++k) {
      const int64_t s = first + (k < count ? k : 0);
      const int64_t a = s / b_count, b = s - a * b_count;
      base[k] = a * stride_a + b * stride_b;
      group[k] = groups > 1 ? (group_on_a ? a : b) / group_div : 0;
    }
    __syncthreads();  // the previous iteration's readers of seg are done
    for (int k = 0; k < count; ++k)
      if (j < d) seg[k * d + j] = kern::detail::bf16_bits_to_float(w[base[k] + j * stride_i]);
    __syncthreads();
    if (j < d) {
      double acc[kSegmentsPerBlock];
      for (int k = 0; k < kSegmentsPerBlock; ++k) acc[k] = 0.0;
      const bool one_group = groups == 1;
      for (int i = 0; i < d; ++i) {
        if (one_group) {
          const double r = rotation[static_cast<int64_t>(i) * d + j];
          for (int k = 0; k < kSegmentsPerBlock; ++k) acc[k] = fma(static_cast<double>(seg[k * d + i]), r, acc[k]);
        } else {
          for (int k = 0; k < kSegmentsPerBlock; ++k)
            acc[k] = fma(static_cast<double>(seg[k * d + i]),
                         static_cast<double>(rotation[(group[k] * d + i) * d + j]), acc[k]);
        }
      }
      for (int k = 0; k < count; ++k)
        w[base[k] + j * stride_i] = kern::detail::float_to_bf16_bits(static_cast<float>(acc[k]));
    }
  }
}

void fold_segments(uint16_t* w, int64_t d, int64_t segments, int64_t b_count, int64_t stride_a, int64_t stride_b,
                   int64_t stride_i, const float* rotation, int64_t groups, bool group_on_a, int64_t group_div,
                   cudaStream_t stream, const std::string& where) {
  const int64_t blocks = std::min<int64_t>((segments + kSegmentsPerBlock - 1) / kSegmentsPerBlock, 65536);
  const int threads = static_cast<int>((d + 31) / 32 * 32);
  const size_t smem = static_cast<size_t>(kSegmentsPerBlock * d) * sizeof(float);
  fold_segments_kernel<<<static_cast<unsigned>(blocks), threads, smem, stream>>>(
      w, static_cast<int>(d), segments, b_count, stride_a, stride_b, stride_i, rotation, groups, group_on_a,
      group_div);
  check_cuda(cudaGetLastError(), where);
}

}  // namespace

void DeviceModel::fold_value_rotation(int64_t layer, std::span<const float> rotation, int64_t groups) {
  const fmt::ModelConfig& c = config();
  const std::string where = "DeviceModel::fold_value_rotation: layer " + std::to_string(layer);
  if (layer < 0 || layer >= c.num_layers)
    throw Error(where, "outside the model's " + std::to_string(c.num_layers) + " layers");
  if (groups != 1 && groups != c.num_kv_heads)
    throw Error(where, "rotation groups " + std::to_string(groups) + " must be 1 or num_kv_heads " +
                           std::to_string(c.num_kv_heads));
  const int64_t d = c.head_dim, H = c.hidden_size, qd = c.q_dim(), kvd = c.kv_dim();
  if (static_cast<int64_t>(rotation.size()) != groups * d * d)
    throw Error(where, "rotation has " + std::to_string(rotation.size()) + " values, expected groups x " +
                           std::to_string(d) + " x " + std::to_string(d));
  const DeviceWeights w = weights();
  const DeviceLayerWeights& L = w.layers[static_cast<size_t>(layer)];
  // The model owns these buffers; weights() hands them out read-only to executors, and this is the model's own
  // one-time rewrite before any of them runs.
  auto* qkv = const_cast<uint16_t*>(L.qkv);
  auto* o = const_cast<uint16_t*>(L.o);
  const auto st = reinterpret_cast<cudaStream_t>(stream());
  const DeviceBuffer r = to_device(rotation, "fold R_v");

  // v_proj rows of KV head h: segments (h, column c), elements along the head's rows (stride H).
  fold_segments(qkv + (qd + kvd) * H, d, c.num_kv_heads * H, H, d * H, 1, H, r.as<float>(), groups,
                /*group_on_a=*/true, 1, st, where + ": v_proj");
  // o_proj columns of query head j: segments (row n, head j), contiguous elements; KV head of j = j / group.
  fold_segments(o, d, H * c.num_heads, c.num_heads, qd, d, 1, r.as<float>(), groups, /*group_on_a=*/false,
                c.group_size(), st, where + ": o_proj");
  if (L.qkv_bias) {
    auto* bias = const_cast<float*>(L.qkv_bias) + qd + kvd;
    std::vector<float> b(static_cast<size_t>(kvd)), out(static_cast<size_t>(kvd));
    check_cuda(cudaMemcpyAsync(b.data(), bias, b.size() * 4, cudaMemcpyDeviceToHost, st), where + ": v bias");
    check_cuda(cudaStreamSynchronize(st), where + ": v bias");
    for (int64_t h = 0; h < c.num_kv_heads; ++h) {
      const float* R = rotation.data() + (groups > 1 ? h : 0) * d * d;
      for (int64_t j = 0; j < d; ++j) {
        double s = 0;
        for (int64_t i = 0; i < d; ++i) s += static_cast<double>(b[h * d + i]) * R[i * d + j];
        out[h * d + j] = static_cast<float>(s);
      }
    }
    check_cuda(cudaMemcpyAsync(bias, out.data(), out.size() * 4, cudaMemcpyHostToDevice, st), where + ": v bias");
  }
  // `r` is freed on return: the kernels that read it must be done.
  check_cuda(cudaStreamSynchronize(st), where);
}

}  // namespace oscar::rt
