#pragma once
// Device code of kv_write in KvWriteMode::Fp8 (kv_quantize.h): head vectors -> fmt::Fp8PageGeometry pages, the
// bytes calib::HeadQuantizer::encode writes for the Fp8E4M3 spec (lib/calib/quantizer_ref.h step 4):
//   amax = max |x| (NaN ignored, as std::max and fmaxf both do), scale = f16_rne(amax / 448) (IEEE division, then
//   fp16 round-to-nearest-even), code = e4m3_rne_satfinite(x / scale) (IEEE division), all codes 0 when scale = 0.
// One warp per (token, KV head), lane l owning the d/32 contiguous dims [l*d/32, (l+1)*d/32): one max-reduction,
// and each lane stores its codes as one 2-, 4- or 8-byte word. The rule needs no rotation and no clip (the baseline
// has neither), so nothing is staged and the kernel is a pure streaming pass.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "formats/kv_layout.h"
#include "kernels/common/device_utils.cuh"
#include "kernels/kv_quantize/fp8_e4m3.h"
#include "kernels/kv_quantize/kv_quantize.h"

namespace oscar::kern::detail {

inline constexpr int kKvWriteFp8Warps = 8;

struct KvWriteFp8Args {
  const uint16_t* x;   // bf16 rows, or
  const float* x_f32;  // fp32 rows
  int64_t tokens;
  int64_t token_stride;
  int32_t num_kv_heads;
  int32_t page_tokens;
  const int32_t* slots;
  uint8_t* pool;
};

template <int N>
struct Fp8CodeWord;
template <>
struct Fp8CodeWord<2> {
  using type = uint16_t;
};
template <>
struct Fp8CodeWord<4> {
  using type = uint32_t;
};
template <>
struct Fp8CodeWord<8> {
  using type = unsigned long long;
};

template <int kHeadDim>
__global__ void __launch_bounds__(kKvWriteFp8Warps * 32) kv_write_fp8_kernel(KvWriteFp8Args a) {
  constexpr int kPerLane = kHeadDim / 32;
  using Word = typename Fp8CodeWord<kPerLane>::type;
  const int lane = threadIdx.x & 31;
  const int64_t items = a.tokens * a.num_kv_heads;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kKvWriteFp8Warps;
  const fmt::Fp8PageGeometry geo{kHeadDim, a.page_tokens};
  for (int64_t item = static_cast<int64_t>(blockIdx.x) * kKvWriteFp8Warps + (threadIdx.x >> 5); item < items;
       item += stride) {
    const int64_t t = item / a.num_kv_heads;
    const int head = static_cast<int>(item - t * a.num_kv_heads);
    const int32_t slot = a.slots[t];
    if (slot < 0) continue;  // warp-uniform
    const int64_t row = t * a.token_stride + static_cast<int64_t>(head) * kHeadDim + lane * kPerLane;
    float v[kPerLane];
    // Scalar loads: x may be a slice of the fused QKV buffer with no alignment beyond the element.
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) v[k] = a.x_f32 ? a.x_f32[row + k] : bf16_bits_to_float(a.x[row + k]);
    float amax = 0.f;
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) amax = fmaxf(amax, fabsf(v[k]));
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    const __half scale_h = __float2half_rn(__fdiv_rn(amax, 448.0f));
    const float scale = __half2float(scale_h);
    Word word = 0;
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
      const uint8_t code = scale == 0.f ? uint8_t{0} : e4m3_from_f32_bits(__float_as_uint(__fdiv_rn(v[k], scale)));
      word |= static_cast<Word>(code) << (8 * k);
    }
    const int32_t page = slot / a.page_tokens;
    const int32_t offset = slot - page * a.page_tokens;
    uint8_t* block = a.pool + fmt::page_block_offset(page, head, a.num_kv_heads, geo.page_bytes());
    *reinterpret_cast<Word*>(block + static_cast<size_t>(offset) * geo.code_row_bytes() + lane * kPerLane) = word;
    if (lane == 0)
      *reinterpret_cast<uint16_t*>(block + geo.scales_offset() + static_cast<size_t>(offset) * 2) = __half_as_ushort(scale_h);
  }
}

// Launch for params accepted by kv_write_can_implement(p, KvWriteMode::Fp8) with p.tokens > 0.
inline Status launch_kv_write_fp8(const KvWriteParams& p, cudaStream_t stream) {
  const KvWriteFp8Args a{p.x, p.x_f32, p.tokens, p.token_stride, p.num_kv_heads, p.page_tokens, p.slots, p.int2_pool};
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess)
    return Status::CudaError;
  const int64_t items = p.tokens * p.num_kv_heads;
  // Grid-stride, a few blocks per SM: enough warps in flight for a streaming kernel, no per-item block launch.
  const int64_t blocks =
      std::max<int64_t>(1, std::min<int64_t>((items + kKvWriteFp8Warps - 1) / kKvWriteFp8Warps, 8LL * sms));
  const dim3 grid(static_cast<unsigned>(blocks)), block(kKvWriteFp8Warps * 32);
  switch (p.head_dim) {
    case 64: kv_write_fp8_kernel<64><<<grid, block, 0, stream>>>(a); break;
    case 128: kv_write_fp8_kernel<128><<<grid, block, 0, stream>>>(a); break;
    case 256: kv_write_fp8_kernel<256><<<grid, block, 0, stream>>>(a); break;
    default: return Status::Unsupported;
  }
  return launch_status();
}

}  // namespace oscar::kern::detail
