#pragma once
// Quantize-on-write into the paged KV cache (formats/kv_layout.h). One launch writes the new K (or V) head vectors
// of a batch of tokens of one layer: rotate by the layer's R, then either store bf16 (sink / recent window) or
// clip + INT2-quantize (the rest, and tokens leaving the recent window: pass the bf16 page rows back in with
// rotation = null since they are already rotated). Codes are bit-identical to lib/calib/quantizer_ref.h.
#include <cstdint>

#include "formats/kv_layout.h"
#include "kernels/common/status.h"

namespace oscar::kern {

// Segmented: per-segment widths and (scale, zero) pairs of `geometry` (formats/kv_layout.h SegmentedPageGeometry),
// the same clip over the whole head as Int2; codes bit-identical to calib::HeadQuantizer::encode.
// Fp8: the eval baseline KvStorage::Fp8E4M3 (no rotation, no clip): e4m3 codes + one fp16 scale per head vector into
// fmt::Fp8PageGeometry pages of int2_pool, bit-identical to HeadQuantizer::encode of that spec (kv_write_fp8.cuh).
enum class KvWriteMode { Int2, Bf16, Segmented, Fp8 };

struct KvWriteParams {
  const uint16_t* x = nullptr;  // bf16 bits, head vector of token t and KV head h at x[t * token_stride + h * head_dim]
  const float* x_f32 = nullptr;  // KvWriteMode::Fp8 only: fp32 rows instead of x (same indexing; exactly one of both)
  int64_t tokens = 0;
  int64_t token_stride = 0;     // elements between tokens (>= num_kv_heads * head_dim; lets x be a slice of QKV)
  int32_t num_kv_heads = 0;
  int32_t head_dim = 128;
  int32_t page_tokens = 64;
  const float* rotation = nullptr;  // [head_dim, head_dim] row-major fp32 (y = x · R), null = identity
  // Per-KV-head matrices (bundle format 2.0 storage transforms, y = (x − μ)·A): KV head h uses
  // rotation + h * rotation_head_stride (0 = one matrix for every head, head_dim² = one per head), and subtracts
  // head_mean[h * head_dim ..] (fp32, then the rotation) when head_mean is set. Not with Fp8 (Unsupported).
  int64_t rotation_head_stride = 0;
  const float* head_mean = nullptr;  // [num_kv_heads, head_dim] or null
  float clip_ratio = 1.0f;          // Int2 only; see quantizer_ref.h for the order statistic
  const int32_t* slots = nullptr;   // [tokens]: page * page_tokens + offset in page; negative = skip the token
  uint8_t* int2_pool = nullptr;     // KvWriteMode::Int2 destination: Int2PageGeometry pages (Segmented: geometry's,
                                    // Fp8: Fp8PageGeometry's)
  const fmt::SegmentedPageGeometry* geometry = nullptr;  // Segmented only; host memory, read at launch
  uint16_t* bf16_pool = nullptr;    // KvWriteMode::Bf16 destination: Bf16PageGeometry pages
  // Error-feedback rounding (Int2 only; issue #10, lib/calib/error_feedback.h "stored form"): per KV head h the
  // bundle's tables as stored, order [num_kv_heads, head_dim] (a permutation of 0..d-1 per head: the caller checks
  // it, the kernel cannot) and weights [num_kv_heads, head_dim, head_dim] (16-byte aligned). Both null = RTN codes.
  // Same rotation, clip and fp16 (scale, zero) as RTN; only the codes differ (calib::error_feedback_codes_stored).
  const int32_t* ef_order = nullptr;
  const float* ef_weights = nullptr;
  bool ef_clip_feedback = false;  // rounding target = the unclipped rotated vector (Bundle::ef_clip_feedback)
};

// Checks what the kernel implements: head_dim in {64, 128, 256}, 16-byte aligned x rows and pools, clip_ratio in
// (0, 1]; error-feedback tables only with Int2 (Unsupported otherwise), both or neither (InvalidArgument), weights
// 16-byte aligned; Segmented: a geometry of head_dim and page_tokens with 1..16 segments of widths 0, 1, 2, 3, 4 or 8; Fp8: no
// rotation and clip_ratio 1 (Unsupported otherwise: the baseline has neither), x or x_f32. Host-only, touches no
// device memory.
Status kv_write_can_implement(const KvWriteParams& p, KvWriteMode mode);

// Device pointers. Launches on `stream`; returns the can_implement status or the launch status.
Status kv_write(const KvWriteParams& p, KvWriteMode mode, Stream stream);

}  // namespace oscar::kern
