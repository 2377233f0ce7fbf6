#include <algorithm>
#include <cmath>

#include "kernels/kv_quantize/kv_quantize.cuh"
#include "kernels/kv_quantize/kv_quantize.h"
#include "kernels/kv_quantize/kv_write_fp8.cuh"
#include "kernels/kv_quantize/kv_write_int2.cuh"
#include "kernels/kv_quantize/kv_write_int2_ef.cuh"
#include "kernels/kv_quantize/kv_write_variants.h"

namespace oscar::kern {
namespace {

// Same arithmetic as calib::clip_index (the published `_clip_index`); -1 disables the selection pass.
int32_t clip_rank(float clip_ratio, int32_t head_dim) {
  if (clip_ratio >= 1.0f) return -1;
  const auto idx = static_cast<int64_t>(std::floor(static_cast<double>(clip_ratio) * head_dim));
  return static_cast<int32_t>(std::clamp<int64_t>(idx, 0, head_dim - 1));
}

// INT2 through the tiled kernel (kv_write_int2.cuh): one persistent block of up to 16 warps per SM, since R (64 KiB
// at d = 128) is staged in shared memory once per block.
template <int kHeadDim, int kSelect>
Status launch_int2_tiled(const detail::KvWriteArgs& a, cudaStream_t stream) {
  using S = detail::Int2TileShape<kHeadDim>;
  const int64_t items = (a.tokens + S::kTokens - 1) / S::kTokens * a.num_kv_heads;
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess)
    return Status::CudaError;
  const int warps = static_cast<int>(std::min<int64_t>(detail::kInt2MaxWarps, items));
  const int64_t blocks = std::min<int64_t>((items + warps - 1) / warps, sms);
  const bool rotate = a.rotation != nullptr;
  const size_t smem = detail::int2_smem_bytes<kHeadDim>(rotate, warps);
  const auto kernel = rotate ? detail::kv_write_int2_kernel<kHeadDim, true, kSelect>
                             : detail::kv_write_int2_kernel<kHeadDim, false, kSelect>;
  // Above 48 KiB needs the opt-in; cheap, and per device, so set it on every launch rather than cache it.
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(detail::int2_smem_bytes<kHeadDim>(true, detail::kInt2MaxWarps))) !=
      cudaSuccess)
    return Status::CudaError;
  kernel<<<static_cast<unsigned>(std::max<int64_t>(blocks, 1)), warps * 32, smem, stream>>>(a);
  return detail::launch_status();
}

// INT2 with error-feedback rounding (kv_write_int2_ef.cuh): blocks per KV head (gridDim.y), each staging its head's
// table once, at most one block per SM over all heads (when there are fewer heads than SMs).
template <int kHeadDim>
Status launch_int2_ef(const detail::KvWriteArgs& a, cudaStream_t stream) {
  using S = detail::Int2TileShape<kHeadDim>;
  const int64_t tiles = (a.tokens + S::kTokens - 1) / S::kTokens;
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess)
    return Status::CudaError;
  if (a.num_kv_heads > 65535) return Status::Unsupported;
  // All the block's warps even for a decode step's few tokens: they stage R and the table (128 KiB at d = 128)
  // together, which is most of a small launch; warps without a tile leave after the staging.
  const int warps = detail::Int2EfShape<kHeadDim>::kWarps;
  // Floor, not ceil: one block fills an SM (shared memory), and a 133rd block would be a whole second wave.
  const int64_t per_head = std::max<int64_t>(1, sms / a.num_kv_heads);
  const int64_t blocks = std::min<int64_t>((tiles + warps - 1) / warps, per_head);
  const bool rotate = a.rotation != nullptr;
  const size_t smem = detail::int2_ef_smem_bytes<kHeadDim>(rotate, warps);
  // kSelect 0 as kv_write's RTN writer (bit-exact with the radix select anyway).
  const auto kernel = rotate ? detail::kv_write_int2_ef_kernel<kHeadDim, true, 0>
                             : detail::kv_write_int2_ef_kernel<kHeadDim, false, 0>;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(detail::int2_ef_smem_bytes<kHeadDim>(true, warps))) !=
      cudaSuccess)
    return Status::CudaError;
  const dim3 grid(static_cast<unsigned>(std::max<int64_t>(blocks, 1)), static_cast<unsigned>(a.num_kv_heads));
  kernel<<<grid, warps * 32, smem, stream>>>(a);
  return detail::launch_status();
}

template <int kHeadDim>
Status launch_legacy(const detail::KvWriteArgs& a, KvWriteMode mode, cudaStream_t stream) {
  const int64_t groups = (a.tokens + detail::kKvWriteTokens - 1) / detail::kKvWriteTokens;
  const int64_t warps_needed = groups * a.num_kv_heads;
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess)
    return Status::CudaError;
  // Grid-stride: enough blocks to fill every SM several times over, no more (R stays hot in L1 per SM).
  const int64_t blocks = std::min<int64_t>((warps_needed + detail::kKvWriteWarps - 1) / detail::kKvWriteWarps,
                                           static_cast<int64_t>(sms) * 8);
  const dim3 grid(static_cast<unsigned>(std::max<int64_t>(blocks, 1)));
  const dim3 block(detail::kKvWriteWarps * 32);
  if (mode == KvWriteMode::Int2)
    detail::kv_write_kernel<kHeadDim, detail::kKvWriteInt2><<<grid, block, 0, stream>>>(a);
  else if (mode == KvWriteMode::Segmented)
    detail::kv_write_kernel<kHeadDim, detail::kKvWriteSeg><<<grid, block, 0, stream>>>(a);
  else
    detail::kv_write_kernel<kHeadDim, detail::kKvWriteBf16><<<grid, block, 0, stream>>>(a);
  return detail::launch_status();
}

template <int kHeadDim>
Status launch(const detail::KvWriteArgs& a, KvWriteMode mode, KvWriteInt2Impl impl, cudaStream_t stream) {
  if (mode == KvWriteMode::Int2 && a.ef_order) return launch_int2_ef<kHeadDim>(a, stream);
  // The tiled RTN writer stages one R per persistent block for every head; per-head matrices go to the legacy
  // kernel (the same codes, bit for bit).
  if (mode == KvWriteMode::Int2 && a.rotation_head_stride != 0) return launch_legacy<kHeadDim>(a, mode, stream);
  if (mode == KvWriteMode::Int2 && impl == KvWriteInt2Impl::Tiled) return launch_int2_tiled<kHeadDim, 0>(a, stream);
  if (mode == KvWriteMode::Int2 && impl == KvWriteInt2Impl::TiledRadix) return launch_int2_tiled<kHeadDim, 1>(a, stream);
  return launch_legacy<kHeadDim>(a, mode, stream);
}

Status dispatch(const KvWriteParams& p, KvWriteMode mode, KvWriteInt2Impl impl, Stream stream) {
  if (Status s = kv_write_can_implement(p, mode); s != Status::Ok) return s;
  if (p.tokens == 0) return Status::Ok;
  if (mode == KvWriteMode::Fp8) return detail::launch_kv_write_fp8(p, detail::to_cuda(stream));
  detail::KvWriteArgs a{p.x,        p.tokens, p.token_stride, p.num_kv_heads,
                        p.page_tokens, p.rotation, clip_rank(p.clip_ratio, p.head_dim),
                        p.slots,    p.int2_pool, p.bf16_pool, {}};
  if (mode == KvWriteMode::Segmented) a.seg = *p.geometry;
  a.ef_order = p.ef_order;
  a.ef_weights = p.ef_weights;
  a.ef_clip_feedback = p.ef_clip_feedback;
  a.rotation_head_stride = p.rotation_head_stride;
  a.head_mean = p.head_mean;
  const cudaStream_t s = detail::to_cuda(stream);
  switch (p.head_dim) {
    case 64: return launch<64>(a, mode, impl, s);
    case 128: return launch<128>(a, mode, impl, s);
    case 256: return launch<256>(a, mode, impl, s);
    default: return Status::Unsupported;
  }
}

}  // namespace

Status kv_write(const KvWriteParams& p, KvWriteMode mode, Stream stream) {
  return dispatch(p, mode, KvWriteInt2Impl::Tiled, stream);
}

Status kv_write_int2_impl(const KvWriteParams& p, KvWriteInt2Impl impl, Stream stream) {
  return dispatch(p, KvWriteMode::Int2, impl, stream);
}

}  // namespace oscar::kern
