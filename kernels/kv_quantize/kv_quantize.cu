#include <algorithm>
#include <cmath>

#include "kernels/kv_quantize/kv_quantize.cuh"
#include "kernels/kv_quantize/kv_quantize.h"

namespace oscar::kern {
namespace {

// Same arithmetic as calib::clip_index (the published `_clip_index`); -1 disables the selection pass.
int32_t clip_rank(float clip_ratio, int32_t head_dim) {
  if (clip_ratio >= 1.0f) return -1;
  const auto idx = static_cast<int64_t>(std::floor(static_cast<double>(clip_ratio) * head_dim));
  return static_cast<int32_t>(std::clamp<int64_t>(idx, 0, head_dim - 1));
}

template <int kHeadDim>
Status launch(const detail::KvWriteArgs& a, KvWriteMode mode, cudaStream_t stream) {
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

}  // namespace

Status kv_write(const KvWriteParams& p, KvWriteMode mode, Stream stream) {
  if (Status s = kv_write_can_implement(p, mode); s != Status::Ok) return s;
  if (p.tokens == 0) return Status::Ok;
  detail::KvWriteArgs a{p.x,        p.tokens, p.token_stride, p.num_kv_heads,
                        p.page_tokens, p.rotation, clip_rank(p.clip_ratio, p.head_dim),
                        p.slots,    p.int2_pool, p.bf16_pool, {}};
  if (mode == KvWriteMode::Segmented) a.seg = *p.geometry;
  const cudaStream_t s = detail::to_cuda(stream);
  switch (p.head_dim) {
    case 64: return launch<64>(a, mode, s);
    case 128: return launch<128>(a, mode, s);
    case 256: return launch<256>(a, mode, s);
    default: return Status::Unsupported;
  }
}

}  // namespace oscar::kern
