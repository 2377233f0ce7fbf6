#include "kernels/attention_decode/decode_attention.cuh"
#include "kernels/attention_decode/decode_attention.h"

namespace oscar::kern {
namespace {

template <int kHeadDim, int kMaxGroup>
void launch_split(const detail::DecodeArgs& a, int batch, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(a.splits), static_cast<unsigned>(a.num_kv_heads), static_cast<unsigned>(batch));
  detail::decode_attention_split_kernel<kHeadDim, kMaxGroup><<<grid, detail::kDecodeWarps * 32, 0, stream>>>(a);
}

template <int kHeadDim>
Status launch(const detail::DecodeArgs& a, int batch, cudaStream_t stream) {
  // The group size is a runtime value; the template only bounds it so registers can hold every head's query.
  if (a.group <= 1) launch_split<kHeadDim, 1>(a, batch, stream);
  else if (a.group <= 2) launch_split<kHeadDim, 2>(a, batch, stream);
  else if (a.group <= 4) launch_split<kHeadDim, 4>(a, batch, stream);
  else launch_split<kHeadDim, 8>(a, batch, stream);
  if (cudaGetLastError() != cudaSuccess) return Status::CudaError;
  detail::decode_attention_merge_kernel<kHeadDim>
      <<<static_cast<unsigned>(batch) * static_cast<unsigned>(a.num_q_heads), kHeadDim, 0, stream>>>(a);
  return detail::launch_status();
}

}  // namespace

Status decode_attention(const DecodeAttentionParams& p, Stream stream) {
  if (Status s = decode_attention_can_implement(p); s != Status::Ok) return s;
  if (p.batch == 0) return Status::Ok;
  int32_t splits = p.num_splits;
  if (splits == 0) {
    int device = 0, sms = 0;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess)
      return Status::CudaError;
    splits = decode_attention_num_splits(p.batch, p.num_kv_heads, p.max_seq_len, p.page_tokens, sms);
  }
  if (splits > 65535) return Status::Unsupported;
  if (!p.workspace || p.workspace_bytes < decode_attention_workspace_bytes(p.batch, p.num_q_heads, p.head_dim, splits))
    return Status::InvalidArgument;
  if (reinterpret_cast<uintptr_t>(p.workspace) % 16 != 0) return Status::Misaligned;

  const size_t partials = static_cast<size_t>(p.batch) * p.num_q_heads * splits;
  float* ws = static_cast<float*>(p.workspace);
  detail::DecodeArgs a{};
  a.num_q_heads = p.num_q_heads;
  a.num_kv_heads = p.num_kv_heads;
  a.group = p.num_q_heads / p.num_kv_heads;
  a.page_tokens = p.page_tokens;
  a.q = p.q;
  a.rotation_k = p.rotation_k;
  a.rotation_v = p.rotation_v;
  a.q_scale = p.softmax_scale * detail::kLog2e;
  a.seq_lens = p.seq_lens;
  a.sink_tokens = p.sink_tokens;
  a.recent_tokens = p.recent_tokens;
  a.k_int2_pool = p.k_int2_pool;
  a.v_int2_pool = p.v_int2_pool;
  a.k_bf16_pool = p.k_bf16_pool;
  a.v_bf16_pool = p.v_bf16_pool;
  a.int2_page_table = p.int2_page_table;
  a.bf16_page_table = p.bf16_page_table;
  a.max_pages = p.max_pages;
  a.splits = splits;
  a.partial_ml = ws;
  a.partial_acc = ws + 2 * partials;
  a.out = p.out;
  a.out_bf16 = p.out_bf16;
  const cudaStream_t s = detail::to_cuda(stream);
  switch (p.head_dim) {
    case 64: return launch<64>(a, p.batch, s);
    case 128: return launch<128>(a, p.batch, s);
    case 256: return launch<256>(a, p.batch, s);
    default: return Status::Unsupported;
  }
}

}  // namespace oscar::kern
