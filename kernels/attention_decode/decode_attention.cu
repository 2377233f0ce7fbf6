#include "kernels/attention_decode/decode_attention.cuh"
#include "kernels/attention_decode/decode_attention.h"
#include "kernels/attention_decode/decode_attention_fp8.cuh"
#include "kernels/attention_decode/decode_attention_seg.cuh"

#include <algorithm>

namespace oscar::kern {
namespace {

// Window splits when INT2 tokens exist: about 32 tokens per block (the windows are a few hundred tokens and this
// kernel's time is pure latency), never more than the INT2 splits the workspace was sized for.
int32_t window_split_count(const DecodeAttentionParams& p, int32_t splits, bool int2_active) {
  if (!int2_active) return splits;  // bf16 baseline: the windows are the whole sequence
  const int64_t window = std::min<int64_t>(p.max_seq_len, p.sink_tokens + p.recent_tokens);
  return static_cast<int32_t>(std::clamp<int64_t>((window + 31) / 32, 1, splits));
}

// Per-block tables of a geometry already accepted by decode_attention_can_implement.
detail::SegDecodeLayout seg_decode_layout(const fmt::SegmentedPageGeometry& g) {
  detail::SegDecodeLayout L{};
  L.page_bytes = g.page_bytes();
  L.record_bytes = g.record_bytes();
  L.param_pairs = g.param_pairs;
  L.params_tile_off = 16 * g.code_bytes;
  for (int32_t s = 0; s < g.num_segments; ++s) {
    const int32_t bits = g.seg_bits[s];
    if (bits > 0) {
      L.region_rec_off[L.num_regions] = g.seg_code_offset[s];
      L.region_row_bytes[L.num_regions] = g.seg_code_bytes[s];
      ++L.num_regions;
    }
    for (int32_t blk = g.seg_begin[s] / 16; blk < g.seg_end[s] / 16; ++blk) {
      L.blk_bits[blk] = static_cast<int8_t>(bits);
      L.blk_param[blk] = static_cast<int8_t>(bits > 0 ? g.seg_param[s] : 0);
      L.blk_first[blk] = blk == g.seg_begin[s] / 16;
      L.blk_last[blk] = blk == g.seg_end[s] / 16 - 1;
      L.blk_tile_off[blk] = static_cast<int16_t>(16 * g.seg_code_offset[s] + (16 * blk - g.seg_begin[s]) * bits / 8);
      L.blk_row_bytes[blk] = static_cast<int16_t>(g.seg_code_bytes[s]);
    }
  }
  L.region_rec_off[L.num_regions] = g.code_bytes;
  L.region_row_bytes[L.num_regions] = 4 * g.param_pairs;
  if (g.param_pairs > 0) ++L.num_regions;
  return L;
}

// One instantiation of the segmented kernel (kKCode = kVCode = 0: the generic one, tables read at run time).
template <int kHeadDim, uint64_t kKCode, uint64_t kVCode>
Status launch_seg_kernel(const detail::DecodeArgs& a, int batch, cudaStream_t stream, size_t smem, int most) {
  // The opt-in limit covers static + dynamic shared memory, so the dynamic ceiling is what the kernel's static
  // arrays (softmax scratch) leave; asking for all of `most` makes cudaFuncSetAttribute fail.
  static const cudaError_t opted_in = [&] {
    cudaFuncAttributes attr{};
    cudaError_t e = cudaFuncGetAttributes(&attr, detail::decode_attention_seg_kernel<kHeadDim, kKCode, kVCode>);
    if (e != cudaSuccess) return e;
    return cudaFuncSetAttribute(detail::decode_attention_seg_kernel<kHeadDim, kKCode, kVCode>,
                                cudaFuncAttributeMaxDynamicSharedMemorySize,
                                most - static_cast<int>(attr.sharedSizeBytes));
  }();
  if (opted_in != cudaSuccess) return Status::CudaError;
  const dim3 grid(static_cast<unsigned>(a.int2_splits), static_cast<unsigned>(a.num_kv_heads),
                  static_cast<unsigned>(batch));
  detail::decode_attention_seg_kernel<kHeadDim, kKCode, kVCode><<<grid, detail::kDecodeWarps * 32, smem, stream>>>(a);
  return cudaGetLastError() == cudaSuccess ? Status::Ok : Status::CudaError;
}

// The compiled (K, V) layout pair that matches, else the generic kernel (detail::kSegCompiledLayouts128).
template <int kHeadDim, int kIndex = 0>
Status launch_seg_dispatch(const detail::DecodeArgs& a, int batch, cudaStream_t stream, size_t smem, int most,
                           uint64_t k_code, uint64_t v_code) {
  if constexpr (kHeadDim == 128 && kIndex < detail::kSegCompiledLayouts128Count) {
    constexpr detail::SegLayoutPair kPair = detail::kSegCompiledLayouts128[kIndex];
    if (k_code == kPair.k && v_code == kPair.v)
      return launch_seg_kernel<kHeadDim, kPair.k, kPair.v>(a, batch, stream, smem, most);
    return launch_seg_dispatch<kHeadDim, kIndex + 1>(a, batch, stream, smem, most, k_code, v_code);
  } else {
    return launch_seg_kernel<kHeadDim, 0, 0>(a, batch, stream, smem, most);
  }
}

template <int kHeadDim>
Status launch_seg(const detail::DecodeArgs& a, int batch, cudaStream_t stream) {
  // The ring (3 stages x 4 tiles x 16 tokens of both records per warp) doubles as the per-warp partials.
  const size_t ring = static_cast<size_t>(detail::kDecodeWarps) * detail::kInt2Stages * detail::kInt2TilesPerStage *
                      16 * static_cast<size_t>(a.k_seg.record_bytes + a.v_seg.record_bytes);
  const size_t partials = static_cast<size_t>(detail::kDecodeWarps) * 8 * kHeadDim * sizeof(float);
  const size_t smem = std::max(ring, partials);
  int device = 0, most = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&most, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess)
    return Status::CudaError;
  if (smem > static_cast<size_t>(most) - 1024) return Status::Unsupported;
  return launch_seg_dispatch<kHeadDim>(a, batch, stream, smem, most, detail::seg_layout_code(a.k_seg, kHeadDim / 16),
                                       detail::seg_layout_code(a.v_seg, kHeadDim / 16));
}

template <int kHeadDim, int kMaxGroup>
void launch_rotate_q(const detail::DecodeArgs& a, int batch, cudaStream_t stream) {
  detail::decode_rotate_q_kernel<kHeadDim, kMaxGroup>
      <<<dim3(kHeadDim / detail::kRotateColumns, static_cast<unsigned>(a.num_kv_heads), static_cast<unsigned>(batch)),
         detail::kRotateSlices * 32, 0, stream>>>(a);
}

template <int kHeadDim>
void launch_rotate_q_any_group(const detail::DecodeArgs& a, int batch, cudaStream_t stream) {
  if (a.group <= 1) launch_rotate_q<kHeadDim, 1>(a, batch, stream);
  else if (a.group <= 2) launch_rotate_q<kHeadDim, 2>(a, batch, stream);
  else if (a.group <= 4) launch_rotate_q<kHeadDim, 4>(a, batch, stream);
  else launch_rotate_q<kHeadDim, 8>(a, batch, stream);
}

// The device's SM count and shared-memory limits (block spreading, the opt-in, the default split count).
struct SmemLimits {
  int sms = 0, most_per_block = 0, per_sm = 0, reserved_per_block = 0;
};
SmemLimits query_smem_limits() {
  SmemLimits l;
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return l;
  if (cudaDeviceGetAttribute(&l.sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&l.most_per_block, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&l.per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&l.reserved_per_block, cudaDevAttrReservedSharedMemoryPerBlock, device) != cudaSuccess)
    return SmemLimits{};
  return l;
}

// Once per process: the launches run on the device current at first use (as the shared-memory opt-in assumes too);
// zeros when the query failed.
const SmemLimits& smem_limits() {
  static const SmemLimits limits = query_smem_limits();
  return limits;
}

// Fused variant: rotate_q, then the INT2 kernel with window share and last-block merge, launched as a
// programmatic dependent of rotate_q (it streams its first tiles while rotate_q finishes).
template <int kHeadDim, bool kNarrow>
Status launch_fused(const detail::DecodeArgs& a, int batch, cudaStream_t stream) {
  launch_rotate_q_any_group<kHeadDim>(a, batch, stream);
  if (cudaGetLastError() != cudaSuccess) return Status::CudaError;
  constexpr int kSmem = detail::Int2TileSmem<kHeadDim>::kBlockBytes;
  constexpr auto kernel = detail::decode_attention_int2_kernel<kHeadDim, true, kNarrow>;
  const SmemLimits& limits = smem_limits();
  // The kernel's static shared memory; unknown (the query failed) turns the spreading off.
  static const int64_t static_smem = [] {
    cudaFuncAttributes attr{};
    return cudaFuncGetAttributes(&attr, kernel) == cudaSuccess ? static_cast<int64_t>(attr.sharedSizeBytes) : -1;
  }();
  // Static + dynamic must stay within the per-block opt-in limit.
  static const int most_dynamic =
      static_smem < 0 ? kSmem : std::max(kSmem, limits.most_per_block - static_cast<int>(static_smem));
  static const cudaError_t opted_in =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, most_dynamic);
  if (opted_in != cudaSuccess) return Status::CudaError;
  const int64_t blocks = static_cast<int64_t>(a.int2_splits) * a.num_kv_heads * batch;
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(static_cast<unsigned>(a.int2_splits), static_cast<unsigned>(a.num_kv_heads),
                     static_cast<unsigned>(batch));
  cfg.blockDim = dim3(detail::kDecodeWarps * 32);
  cfg.dynamicSmemBytes = static_smem < 0 ? kSmem
                                          : decode_attention_spread_smem_bytes(
                                                kSmem, blocks, limits.sms, static_cast<size_t>(static_smem),
                                                most_dynamic, limits.per_sm, limits.reserved_per_block);
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  if (cudaLaunchKernelEx(&cfg, kernel, a) != cudaSuccess)
    return Status::CudaError;
  return detail::launch_status();
}

template <int kHeadDim, int kMaxGroup>
void launch_group_kernels(const detail::DecodeArgs& a, int batch, cudaStream_t stream) {
  launch_rotate_q<kHeadDim, kMaxGroup>(a, batch, stream);
  if (a.window_splits > 0) {
    const dim3 grid(static_cast<unsigned>(a.window_splits), static_cast<unsigned>(a.num_kv_heads),
                    static_cast<unsigned>(batch));
    detail::decode_attention_window_kernel<kHeadDim, kMaxGroup><<<grid, detail::kDecodeWarps * 32, 0, stream>>>(a);
  }
}

template <int kHeadDim>
Status launch(const detail::DecodeArgs& a, bool segmented, bool fp8, bool fused, bool wide, int batch,
              cudaStream_t stream) {
  if (fused) {
    if (a.group <= 4 && !wide) return launch_fused<kHeadDim, true>(a, batch, stream);
    return launch_fused<kHeadDim, false>(a, batch, stream);
  }
  // The group size is a runtime value; the template only bounds it so registers can hold every head's query.
  if (a.group <= 1) launch_group_kernels<kHeadDim, 1>(a, batch, stream);
  else if (a.group <= 2) launch_group_kernels<kHeadDim, 2>(a, batch, stream);
  else if (a.group <= 4) launch_group_kernels<kHeadDim, 4>(a, batch, stream);
  else launch_group_kernels<kHeadDim, 8>(a, batch, stream);
  if (cudaGetLastError() != cudaSuccess) return Status::CudaError;
  if (a.int2_splits > 0 && fp8) {
    detail::launch_decode_attention_fp8<kHeadDim>(a, batch, stream);
    if (cudaGetLastError() != cudaSuccess) return Status::CudaError;
  } else if (a.int2_splits > 0 && segmented) {
    if (Status st = launch_seg<kHeadDim>(a, batch, stream); st != Status::Ok) return st;
  } else if (a.int2_splits > 0) {
    constexpr int kSmem = detail::Int2TileSmem<kHeadDim>::kBlockBytes;
    // Above 48 KiB of dynamic shared memory a kernel must opt in, once per process.
    static const cudaError_t opted_in = cudaFuncSetAttribute(
        detail::decode_attention_int2_kernel<kHeadDim, false>, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
    if (opted_in != cudaSuccess) return Status::CudaError;
    const dim3 grid(static_cast<unsigned>(a.int2_splits), static_cast<unsigned>(a.num_kv_heads),
                    static_cast<unsigned>(batch));
    detail::decode_attention_int2_kernel<kHeadDim, false><<<grid, detail::kDecodeWarps * 32, kSmem, stream>>>(a);
    if (cudaGetLastError() != cudaSuccess) return Status::CudaError;
  }
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
    const int sms = smem_limits().sms;  // queried once, not on every decode step
    if (sms <= 0) return Status::CudaError;
    splits = decode_attention_num_splits(p.batch, p.num_q_heads, p.num_kv_heads, p.max_seq_len, p.page_tokens, sms);
  }
  if (splits > 65535) return Status::Unsupported;
  if (!p.workspace || p.workspace_bytes < decode_attention_workspace_bytes(p.batch, p.num_q_heads, p.head_dim, splits))
    return Status::InvalidArgument;
  if (reinterpret_cast<uintptr_t>(p.workspace) % 16 != 0) return Status::Misaligned;

  // INT2 tokens exist when some sequence is longer than its two windows; bf16 tokens when a window is non-empty.
  const bool int2_active = p.sink_tokens < p.max_seq_len && p.recent_tokens < p.max_seq_len - p.sink_tokens;
  const bool window_active = p.sink_tokens > 0 || p.recent_tokens > 0;

  const size_t rows = static_cast<size_t>(p.batch) * p.num_q_heads;
  float* ws = static_cast<float*>(p.workspace);
  detail::DecodeArgs a{};
  a.num_q_heads = p.num_q_heads;
  a.num_kv_heads = p.num_kv_heads;
  a.group = p.num_q_heads / p.num_kv_heads;
  a.page_tokens = p.page_tokens;
  a.page_magic = static_cast<uint32_t>((uint64_t{1} << 32) / static_cast<uint64_t>(p.page_tokens) + 1);
  a.q = p.q;
  a.rotation_k = p.rotation_k;
  a.rotation_v = p.rotation_v;
  a.rotation_k_head_stride = p.rotation_k_head_stride;
  a.rotation_v_head_stride = p.rotation_v_head_stride;
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
  // A segmented layer whose K and V are both one 2-bit segment has byte-identical INT2 pages: the INT2 kernel reads
  // them (an engine with any spectral layer passes geometries for every layer).
  const bool segmented =
      p.k_geometry != nullptr && !(p.k_geometry->whole_head_int2() && p.v_geometry->whole_head_int2());
  // Fused needs INT2 blocks to carry the window; all-window calls (bf16 baseline, short prompts), segmented and
  // FP8 layers run the separate kernels.
  const bool fp8 = p.quant_storage == fmt::KvStorage::Fp8E4M3;
  const bool fused = p.variant != DecodeAttentionVariant::Separate && int2_active && !segmented && !fp8;
  const bool wide = p.variant == DecodeAttentionVariant::FusedWide;
  a.int2_splits = int2_active ? splits : 0;
  a.window_splits = window_active && !fused ? window_split_count(p, splits, int2_active) : 0;
  a.slot_stride = 2 * splits;
  a.window_slot0 = splits;
  a.q_rot = ws;
  a.partial_ml = ws + rows * static_cast<size_t>(p.head_dim);
  a.partial_acc = a.partial_ml + rows * a.slot_stride * 2;
  a.out = p.out;
  a.out_bf16 = p.out_bf16;
  a.phase_trace = p.phase_trace;
  a.tickets = reinterpret_cast<unsigned int*>(a.partial_acc + rows * a.slot_stride * static_cast<size_t>(p.head_dim));
  if (segmented) {
    a.k_seg = seg_decode_layout(*p.k_geometry);
    a.v_seg = seg_decode_layout(*p.v_geometry);
  }
  const cudaStream_t s = detail::to_cuda(stream);
  switch (p.head_dim) {
    case 64: return launch<64>(a, segmented, fp8, fused, wide, p.batch, s);
    case 128: return launch<128>(a, segmented, fp8, fused, wide, p.batch, s);
    case 256: return launch<256>(a, segmented, fp8, fused, wide, p.batch, s);
    default: return Status::Unsupported;
  }
}

}  // namespace oscar::kern
