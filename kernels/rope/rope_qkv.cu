#include "kernels/rope/rope_qkv.h"
#include "kernels/rope/rope_qkv.cuh"

namespace oscar::kern {

Status rope_qkv(const RopeQkvShape& s, const RopeQkvArgs& a, Stream stream) {
  if (s.num_tokens < 0 || s.num_heads <= 0 || s.num_kv_heads <= 0 || s.head_dim <= 0) return Status::InvalidArgument;
  if (s.head_dim % 2 != 0 || s.head_dim > 256) return Status::Unsupported;
  const int64_t slots = s.num_heads + 2 * s.num_kv_heads;
  if (s.qkv_row_stride < slots * s.head_dim) return Status::InvalidArgument;
  if (s.num_tokens == 0) return Status::Ok;
  if (!a.qkv || !a.positions || !a.inv_freq || !a.q_out || !a.k_out || !a.v_out) return Status::InvalidArgument;
  if ((a.q_norm_weight == nullptr) != (a.k_norm_weight == nullptr)) return Status::InvalidArgument;
  constexpr int kThreads = 256;
  const int64_t blocks = (s.num_tokens * slots * 32 + kThreads - 1) / kThreads;
  if (blocks > 0x7fffffff) return Status::Unsupported;
  detail::rope_qkv_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, detail::to_cuda(stream)>>>(s, a);
  return detail::launch_status();
}

}  // namespace oscar::kern
