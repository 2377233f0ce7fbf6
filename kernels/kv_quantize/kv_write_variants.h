#pragma once
// The INT2 quantize-on-write implementations side by side, for bench/kv_write_bench and the GPU tests; kv_write
// itself always uses KvWriteInt2Impl::Tiled (or, with error-feedback tables in the params, kv_write_int2_ef.cuh
// whatever the impl). Tiled and TiledRadix are bit-exact with kv_write_ref on finite inputs;
// Legacy only where a zero minimum/maximum has one sign (its fminf/fmaxf tree does not pick the first -0/+0 the
// way std::minmax_element does), so it is tested on Gaussian data only.
#include "kernels/kv_quantize/kv_quantize.h"

namespace oscar::kern {

enum class KvWriteInt2Impl {
  Tiled,       // kv_write_int2_kernel: GEMM-tiled rotation, pop-the-maximum select for ranks near the top
  TiledRadix,  // same, 31-round bitwise select always
  Legacy,      // kv_write_kernel<d, Int2>: per-warp matrix-vector rotation (the kernel before issue #6's rework)
};

// kv_write(p, KvWriteMode::Int2, stream) through the chosen implementation (same checks, same status codes).
Status kv_write_int2_impl(const KvWriteParams& p, KvWriteInt2Impl impl, Stream stream);

}  // namespace oscar::kern
