#include <cuda.h>

#include <cmath>
#include <cstdint>

#include "kernels/attention_prefill/attention_prefill.cuh"
#include "kernels/attention_prefill/attention_prefill.h"
#include "kernels/attention_prefill/attention_prefill_v2.cuh"
#include "kernels/attention_prefill/attention_prefill_v3.cuh"
#include "kernels/attention_prefill/attention_prefill_v4.cuh"
#include "kernels/common/tma_host.h"

namespace oscar::kern {

namespace {
// The wgmma kernel Auto runs at head_dim 128 on sm_90 (v2 everywhere else): the fastest of the family that has
// passed the whole GPU suite as the default (docs/results.md, "Prefill"). v6 (128-key tiles) passed it on
// 2026-12-07 (183 tests, bench/results/2026-12-07); v7 (v6's tiles loaded by TMA) is faster still in the same H100
// process (Qwen3-8B 1 x 32K: 1279 ms, attention 588 ms, vs v6 1510 / 869) and passes the kernel tests (NMSE 3e-6 vs
// the fp64 reference). Where v7's tensor maps cannot be made (no cuTensorMapEncodeTiled in the driver, row counts
// past its 32-bit coordinates) Auto runs v6 instead of refusing. v10 (v7 with lazy rescaling) took over on
// 2026-12-07: 1.3 % faster at 1 x 32K in the same process (1278 vs 1293-1298 ms; the kernel alone 3 % at the power
// cap), equal at 8 x 2048 (bench/results/2026-12-07c). v13 (v10 + tensor-core row sums + descriptors made once)
// took over on 2026-12-07: at 1 x 32K 1.0 % faster than v10 in the same process (1271 vs 1284 ms; 1258 vs 1271
// with timed GEMMs), the kernel alone 2 % faster than v11 at the power cap (bench/results/2026-12-07d).
constexpr PrefillKernel kAutoWgmma = PrefillKernel::V13;
constexpr PrefillKernel kAutoWgmmaWithoutTma = PrefillKernel::V6;

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <int kHeadDim>
Status launch(const PrefillAttentionArgs& a, cudaStream_t stream) {
  constexpr int kBytes = detail::PrefillSmem<kHeadDim>::kBytes;
  // Above 48 KB of dynamic shared memory a kernel must opt in; the attribute is per function, set every launch
  // because it is cheap and keeps the launcher stateless.
  if (cudaFuncSetAttribute(detail::attention_prefill_kernel<kHeadDim>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           kBytes) != cudaSuccess)
    return Status::CudaError;
  const dim3 grid((a.max_seqlen + detail::kPrefillBlockM - 1) / detail::kPrefillBlockM, a.num_heads, a.num_seqs);
  const float scale_log2 = a.scale * 1.4426950408889634f;  // exp(x) = exp2(x * log2 e)
  detail::attention_prefill_kernel<kHeadDim><<<grid, detail::kPrefillThreads, kBytes, stream>>>(a, scale_log2);
  return detail::launch_status();
}

// Query heads per v2 block: the largest power of two <= 8 that divides the GQA group, so a block's heads share
// one KV head and its token count (128 / pack) stays a multiple of the 16-row MMA tile.
int v2_pack(const PrefillAttentionArgs& a) {
  const int group = a.num_heads / a.num_kv_heads;
  int pack = 8;
  while (group % pack) pack /= 2;
  return pack;
}

// v12: two CTAs (a cluster) per GQA group, half of its query heads each, so that the pair shares every K/V tile.
// Needs a group of 2, 4, 8 or 16 (pack 1..8: 128..16 tokens per block); 0 where it has none.
int v12_pack(const PrefillAttentionArgs& a) {
  const int group = a.num_heads / a.num_kv_heads;
  return group == 2 || group == 4 || group == 8 || group == 16 ? group / 2 : 0;
}

#if defined(OSCAR_WGMMA)
// The table's traits and the device configurations must agree.
constexpr bool only_v12_uses_clusters() {
  for (const PrefillKernelInfo& info : kPrefillKernels)
    if (info.cluster != (info.kernel == PrefillKernel::V12)) return false;
  return true;
}
static_assert(only_v12_uses_clusters() && detail::V4Config<12>::kCluster && !detail::V4Config<11>::kCluster &&
                  !detail::V4Config<13>::kCluster,
              "kPrefillKernels' cluster column and V4Config::kCluster disagree");
#endif

int prefill_pack(const PrefillAttentionArgs& a) {
  return prefill_kernel_uses_clusters(a.kernel) ? v12_pack(a) : v2_pack(a);
}

// The v2-family grid: (query tiles × head packs × sequences), consecutive blocks = consecutive packs of one tile
// (so v12's cluster pairs are the two halves of one group).
int64_t v2_blocks(const PrefillAttentionArgs& a, int pack) {
  const int64_t tokens = detail::kV2BlockM / pack;
  return (a.max_seqlen + tokens - 1) / tokens * (a.num_heads / pack) * int64_t{a.num_seqs};
}

// v2 and v3 share the grid, the block size and the shared-memory layout; only the kernel body differs.
template <int kHeadDim, int kBlockN = 64, bool kV3 = false>
Status launch_v2(const PrefillAttentionArgs& a, cudaStream_t stream) {
  constexpr int kBytes = detail::PrefillV2Smem<kHeadDim, kBlockN>::kBytes;
  auto kernel = detail::attention_prefill_v2_kernel<kHeadDim, kBlockN>;
  if constexpr (kV3) kernel = detail::attention_prefill_v3_kernel<kHeadDim, kBlockN>;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kBytes) != cudaSuccess)
    return Status::CudaError;
  const int pack = v2_pack(a);
  const int tokens = detail::kV2BlockM / pack;
  const int num_q_tiles = (a.max_seqlen + tokens - 1) / tokens;
  const float scale_log2 = a.scale * 1.4426950408889634f;
  kernel<<<static_cast<unsigned>(v2_blocks(a, pack)), detail::kV2Threads, kBytes, stream>>>(a, scale_log2, pack,
                                                                                      num_q_tiles);
  return detail::launch_status();
}
// Whether this process can run the wgmma kernels: a build with sm_90a code (OSCAR_WGMMA) on a compute-capability 9
// device. Asked per launch (a process may switch devices); the attribute query is a cached driver lookup.
bool device_runs_wgmma() {
#if defined(OSCAR_WGMMA)
  int device = 0, major = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess)
    return false;
  return major == 9;
#else
  return false;
#endif
}

#if defined(OSCAR_WGMMA)
// v7's descriptor of K or V: [total_tokens rows][num_kv_heads × 128 columns] bf16 with the given row stride; a box
// is 64 columns (128 bytes, the swizzle span) × rows_per_box rows, 128B-swizzled as the wgmma descriptors expect.
bool encode_kv_map(CUtensorMap* map, const uint16_t* base, const PrefillAttentionArgs& a, int64_t row_stride,
                   uint32_t rows_per_box) {
  return detail::tma_encode_bf16_sw128(map, base, static_cast<uint64_t>(a.num_kv_heads) * a.head_dim,
                                       static_cast<uint64_t>(a.total_tokens), static_cast<uint64_t>(row_stride), 64,
                                       rows_per_box);
}
#endif

// Whether v7 can describe these q/k/v rows with tensor maps: the driver must have cuTensorMapEncodeTiled and the
// rows must fit its 32-bit coordinates (can_implement's v7 checks, asked without refusing).
bool v7_tensor_maps_possible(const PrefillAttentionArgs& a) {
#if defined(OSCAR_WGMMA)
  return detail::tma_encode_available() && a.total_tokens >= a.max_seqlen && a.total_tokens <= 0x7fffffff;
#else
  (void)a;
  return false;
#endif
}

template <int kVersion>
Status launch_v4(const PrefillAttentionArgs& a, cudaStream_t stream) {
#if defined(OSCAR_WGMMA)
  using Cfg = detail::V4Config<kVersion>;
  if (!device_runs_wgmma()) return Status::Unsupported;
  detail::PrefillTmaMaps maps{};
  if constexpr (Cfg::kTma) {
    if (!detail::tma_encode_available()) return Status::Unsupported;  // the driver has no cuTensorMapEncodeTiled
    // can_implement admitted the layout, so a refused descriptor is a bug here, not a missing feature: say so.
    if (!encode_kv_map(&maps.k, a.k, a, a.k_row_stride, Cfg::kBlockN) ||
        !encode_kv_map(&maps.v, a.v, a, a.v_row_stride, Cfg::kBlockN))
      return Status::InvalidArgument;
  }
  constexpr uint32_t kBytes = Cfg::kSmemBytes;
  if (cudaFuncSetAttribute(detail::attention_prefill_v4_kernel<kVersion>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           kBytes) != cudaSuccess)
    return Status::CudaError;
  const int pack = prefill_pack(a);
  const int tokens = detail::kV4BlockM / pack;
  const int num_q_tiles = (a.max_seqlen + tokens - 1) / tokens;
  const float scale_log2 = a.scale * 1.4426950408889634f;
  const unsigned blocks = static_cast<unsigned>(v2_blocks(a, pack));
  if constexpr (Cfg::kCluster) {  // blocks is even: the packs of a tile come in pairs
    detail::launch_cta_pairs(detail::attention_prefill_v4_kernel<kVersion>, blocks, detail::kV4Threads, kBytes, stream,
                             a, scale_log2, pack, num_q_tiles, maps);
  } else {
    detail::attention_prefill_v4_kernel<kVersion><<<blocks, detail::kV4Threads, kBytes, stream>>>(
        a, scale_log2, pack, num_q_tiles, maps);
  }
  return detail::launch_status();
#else
  (void)a;
  (void)stream;
  return Status::Unsupported;  // no sm_90a code in this build
#endif
}
}  // namespace

Status attention_prefill_can_implement(const PrefillAttentionArgs& a) {
  if (a.num_seqs < 0 || a.max_seqlen < 0 || a.num_heads <= 0 || a.num_kv_heads <= 0 || a.head_dim <= 0)
    return Status::InvalidArgument;
  if (a.num_heads % a.num_kv_heads != 0) return Status::InvalidArgument;
  if (!(a.scale > 0.f) || !std::isfinite(a.scale)) return Status::InvalidArgument;
  if (a.head_dim % 8 != 0 || a.head_dim > 128) return Status::Unsupported;
  if (a.num_heads > 65535 || a.num_seqs > 65535) return Status::Unsupported;  // grid.y / grid.z limits
  if (a.q_row_stride < int64_t{a.num_heads} * a.head_dim || a.out_row_stride < int64_t{a.num_heads} * a.head_dim ||
      a.k_row_stride < int64_t{a.num_kv_heads} * a.head_dim || a.v_row_stride < int64_t{a.num_kv_heads} * a.head_dim)
    return Status::InvalidArgument;
  if (a.kernel != PrefillKernel::Auto && prefill_kernel_info(a.kernel) == nullptr)  // not a kernel of the table
    return Status::InvalidArgument;
  if (prefill_kernel_uses_wgmma(a.kernel) && a.head_dim != 128) return Status::Unsupported;
  if (prefill_kernel_uses_clusters(a.kernel) && v12_pack(a) == 0)
    return Status::Unsupported;  // a group v12's clusters cannot split
  if (a.num_seqs == 0 || a.max_seqlen == 0) return Status::Ok;
  // The TMA kernels' tensor maps span the q/k/v rows, and the TMA coordinates are 32-bit.
  if (prefill_kernel_uses_tma(a.kernel) &&
      (a.total_tokens < a.max_seqlen || a.total_tokens > 0x7fffffff))
    return Status::InvalidArgument;
  // v2's 1-D grid: (query tiles × head packs × sequences) must fit a signed 32-bit block index.
  if (a.kernel != PrefillKernel::V1 && v2_blocks(a, prefill_pack(a)) > 0x7fffffff) return Status::Unsupported;
  if (!a.q || !a.k || !a.v || !a.out || !a.cu_seqlens) return Status::InvalidArgument;
  // 16-byte cp.async copies of 8 bf16: every row start and head start must be 16-byte aligned.
  if (!aligned16(a.q) || !aligned16(a.k) || !aligned16(a.v) || !aligned16(a.out)) return Status::Misaligned;
  if (a.q_row_stride % 8 || a.k_row_stride % 8 || a.v_row_stride % 8 || a.out_row_stride % 8)
    return Status::Misaligned;
  return Status::Ok;
}

PrefillKernel attention_prefill_auto_kernel(int32_t head_dim) {
  return head_dim == 128 && device_runs_wgmma() ? kAutoWgmma : PrefillKernel::V2;
}

Status attention_prefill(const PrefillAttentionArgs& args, Stream stream) {
  if (Status s = attention_prefill_can_implement(args); s != Status::Ok) return s;
  PrefillAttentionArgs a = args;
  if (a.kernel == PrefillKernel::Auto) {
    a.kernel = attention_prefill_auto_kernel(a.head_dim);
    if (prefill_kernel_uses_tma(a.kernel) && !v7_tensor_maps_possible(a))
      a.kernel = kAutoWgmmaWithoutTma;
  }
  if (a.num_seqs == 0 || a.max_seqlen == 0) return Status::Ok;
  const cudaStream_t s = detail::to_cuda(stream);
  // Dims are zero-padded to the instantiated width; three widths keep compile time down while covering the
  // tiny fixtures (8, 16), 64-dim heads and the 128-dim heads of every current 7-8B model.
  if (a.kernel == PrefillKernel::V1) {
    if (a.head_dim <= 32) return launch<32>(a, s);
    if (a.head_dim <= 64) return launch<64>(a, s);
    return launch<128>(a, s);
  }
  if (a.kernel == PrefillKernel::V4) return launch_v4<4>(a, s);
  if (a.kernel == PrefillKernel::V5) return launch_v4<5>(a, s);
  if (a.kernel == PrefillKernel::V6) return launch_v4<6>(a, s);
  if (a.kernel == PrefillKernel::V7) return launch_v4<7>(a, s);
  if (a.kernel == PrefillKernel::V8) return launch_v4<8>(a, s);
  if (a.kernel == PrefillKernel::V10) return launch_v4<10>(a, s);
  if (a.kernel == PrefillKernel::V11) return launch_v4<11>(a, s);
  if (a.kernel == PrefillKernel::V12) return launch_v4<12>(a, s);
  if (a.kernel == PrefillKernel::V13) return launch_v4<13>(a, s);
  if (a.kernel == PrefillKernel::V3) {
    if (a.head_dim <= 32) return launch_v2<32, 64, true>(a, s);
    if (a.head_dim <= 64) return launch_v2<64, 64, true>(a, s);
    return launch_v2<128, 64, true>(a, s);
  }
  if (a.head_dim <= 32) return launch_v2<32>(a, s);
  if (a.head_dim <= 64) return launch_v2<64>(a, s);
  if (a.kernel == PrefillKernel::V2Keys32) return launch_v2<128, 32>(a, s);
  return launch_v2<128>(a, s);
}

}  // namespace oscar::kern
