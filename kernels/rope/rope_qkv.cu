#include "kernels/rope/rope_qkv.h"
#include "kernels/rope/rope_qkv.cuh"

namespace oscar::kern {

namespace {
bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Threads per head slot of the vector kernel, or 0 when it cannot run: each lane takes 8 pairs, so d/2 must be a
// multiple of 8, the group must be a power of two (it reduces with xor shuffles inside one warp), and every
// pointer and row start must allow 16-byte accesses.
int vec_threads_per_head(const RopeQkvShape& s, const RopeQkvArgs& a) {
  const int64_t half = s.head_dim / 2;
  if (half % 8 != 0) return 0;
  const int64_t tph = half / 8;
  if (tph > 32 || (tph & (tph - 1)) != 0) return 0;
  if (s.qkv_row_stride % (a.qkv_bf16 ? 8 : 4) != 0) return 0;
  const void* ptrs[] = {a.qkv, a.qkv_bf16, a.bias, a.q_norm_weight, a.k_norm_weight, a.q_out, a.k_out,
                        a.v_out, a.q_f32, a.k_pre_rope_f32, a.k_f32, a.v_f32};
  for (const void* p : ptrs)
    if (p && !aligned16(p)) return 0;
  return static_cast<int>(tph);
}
}  // namespace

Status rope_qkv_can_implement(const RopeQkvShape& s, const RopeQkvArgs& a) {
  if (s.num_tokens < 0 || s.num_heads <= 0 || s.num_kv_heads <= 0 || s.head_dim <= 0) return Status::InvalidArgument;
  if (s.head_dim % 2 != 0 || s.head_dim > 256) return Status::Unsupported;
  const int64_t slots = s.num_heads + 2 * s.num_kv_heads;
  if (s.qkv_row_stride < slots * s.head_dim) return Status::InvalidArgument;
  if (s.num_tokens == 0) return Status::Ok;
  if ((a.qkv == nullptr) == (a.qkv_bf16 == nullptr)) return Status::InvalidArgument;  // exactly one input
  if (!a.positions || !a.inv_freq || !a.q_out || !a.k_out || !a.v_out) return Status::InvalidArgument;
  if ((a.q_norm_weight == nullptr) != (a.k_norm_weight == nullptr)) return Status::InvalidArgument;
  return Status::Ok;
}

Status rope_qkv(const RopeQkvShape& s, const RopeQkvArgs& a, Stream stream) {
  if (Status st = rope_qkv_can_implement(s, a); st != Status::Ok) return st;
  if (s.num_tokens == 0) return Status::Ok;
  const int64_t slots = s.num_heads + 2 * s.num_kv_heads;
  if (const int tph = vec_threads_per_head(s, a); tph > 0 && s.num_tokens <= 0x7fffffff && slots * tph <= (1 << 30)) {
    const size_t table_bytes = static_cast<size_t>(s.head_dim) * sizeof(float);
    const auto launch_vec = [&](const auto* qkv) {
      detail::rope_qkv_vec_kernel<<<static_cast<unsigned>(s.num_tokens), detail::kRopeVecThreads, table_bytes,
                                    detail::to_cuda(stream)>>>(s, a, qkv, tph);
    };
    if (a.qkv_bf16) launch_vec(a.qkv_bf16);
    else launch_vec(a.qkv);
    return detail::launch_status();
  }
  constexpr int kThreads = 256;
  const int64_t blocks = (s.num_tokens * slots * 32 + kThreads - 1) / kThreads;
  if (blocks > 0x7fffffff) return Status::Unsupported;
  const auto launch_warp = [&](const auto* qkv) {
    detail::rope_qkv_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, detail::to_cuda(stream)>>>(s, a, qkv);
  };
  if (a.qkv_bf16) launch_warp(a.qkv_bf16);
  else launch_warp(a.qkv);
  return detail::launch_status();
}

}  // namespace oscar::kern
