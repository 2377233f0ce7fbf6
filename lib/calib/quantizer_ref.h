#pragma once
// The reference KV quantizer: the one CPU definition of what a quantized head vector is. Calibration (clip
// tuning, error reports), eval and the CUDA kernels' tests all call it; the quantize kernel reproduces it bit
// for bit. Storage layout: formats/kv_layout.h. Format description: formats/kv_quant_spec.h.
//
// Exact definition for one head vector x (d floats) with rotation R (row-major d x d, or empty = identity):
//  1. y = x · R, y_j = sum_i x_i R[i][j] accumulated in fp32 with fma in increasing i (the kernel uses the same
//     order, which is what makes GPU and CPU codes identical).
//  2. Clip (Int and Fp8 storage): c = sorted(|y|)[clip_index(ratio, d)], ascending, 0-based, with
//     clip_index = min(floor(ratio * d), d - 1) — the published OSCAR kernels' `_clip_index`. Ratio 1 picks the
//     largest |y|, i.e. no clipping; at d = 128 ratio 0.96 picks index 122, so the 5 largest |y| are clipped
//     (ties at c stay unclipped). y_j = min(max(y_j, -c), c).
//  3. Int, per segment [b, e) of `bits` > 0: lo = min y, hi = max y over the segment;
//     scale = f16((hi - lo) / (2^bits - 1)), zero = f16(lo) (fp16 round-to-nearest-even, FIRST);
//     code = clamp(rint((y - float(zero)) / float(scale)), 0, 2^bits - 1) (round half to even, fp32 ops);
//     when float(scale) == 0 (hi == lo or a range below fp16 resolution) every code is 0.
//     dequant = fma(code, scale, zero). 0-bit segments dequantize to 0.
//  4. Fp8E4M3: scale = f16(amax / 448) (OCP e4m3fn, max finite 448), code = e4m3_rne_saturate(y / scale),
//     dequant = e4m3(code) * scale; amax == 0 gives scale 0 and all codes 0.
//  5. BF16: no clipping, y rounded to bf16 (round to nearest even).
// The published implementation differs in step 3 (fp32 scale, zero in code units, round half up); we round
// scale/zero to fp16 before computing codes because the cache stores fp16 and codes must match what decode reads.
#include <cmath>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "formats/kv_layout.h"
#include "formats/kv_quant_spec.h"

namespace oscar::calib {

// ---- building blocks (exposed for tests and for callers that need one step) ----

// Index into ascending sorted |y| of the clip threshold (see step 2).
int64_t clip_index(float clip_ratio, int64_t dim);
// The clip threshold c of `y` (does not modify y). Returns +inf when clip_ratio >= 1 (no clipping).
float clip_threshold(std::span<const float> y, float clip_ratio);
// Clamps y to [-c, c] in place; returns c.
float clip_in_place(std::span<float> y, float clip_ratio);

// y = x · R (R row-major d x d; empty R = copy). x and y must not alias.
void rotate(std::span<const float> x, std::span<const float> rotation, std::span<float> y);
// x = y · Rᵀ (inverse of rotate for orthogonal R; empty R = copy). x and y must not alias.
void unrotate(std::span<const float> y, std::span<const float> rotation, std::span<float> x);

struct IntParams {
  uint16_t scale_f16 = 0;
  uint16_t zero_f16 = 0;
  float scale() const;
  float zero() const;
};
// Step 3 for one segment: parameters, then one code per element (codes.size() == y.size(), not packed).
IntParams int_params(std::span<const float> y, int32_t bits);
void int_codes(std::span<const float> y, int32_t bits, IntParams params, std::span<uint8_t> codes);
inline float int_dequant(uint8_t code, IntParams params);

// LSB-first bitstream packing of codes (formats/kv_layout.h): out.size() >= fmt::packed_bytes(codes.size(), bits).
void pack_codes(std::span<const uint8_t> codes, int32_t bits, std::span<uint8_t> out);
void unpack_codes(std::span<const uint8_t> packed, int32_t bits, std::span<uint8_t> codes);

// OCP e4m3fn conversions: round to nearest even, saturating to ±448; NaN maps to 0x7f.
uint8_t f32_to_e4m3(float f);
float e4m3_to_f32(uint8_t code);

// ---- whole head vectors ----

// Which basis a decoded vector is returned in.
enum class Basis { Original, Rotated };

// Quantizes head vectors of one tensor (K or V) of one layer to the record layout of `spec`.
class HeadQuantizer {
 public:
  // Throws oscar::Error(where, ...) when spec is invalid for head_dim.
  HeadQuantizer(const fmt::TensorQuantSpec& spec, int64_t head_dim, const std::string& where = "quantizer");

  const fmt::RecordLayout& layout() const { return layout_; }
  int64_t head_dim() const { return head_dim_; }
  int32_t record_bytes() const { return layout_.record_bytes(); }

  // x (original basis, head_dim floats) -> record (record_bytes()). `rotation` empty = identity;
  // clip_ratio overrides spec.clip_ratio (the bundle carries per-layer ratios).
  void encode(std::span<const float> x, std::span<const float> rotation, float clip_ratio,
              std::span<uint8_t> record) const;
  // record -> values in the rotated basis, or back in the original basis via Rᵀ.
  void decode(std::span<const uint8_t> record, std::span<const float> rotation, Basis basis,
              std::span<float> out) const;

  // Quantize-dequantize `rows` head vectors stored as [rows, head_dim] (x and out may alias).
  void fake_quantize(std::span<const float> x, int64_t rows, std::span<const float> rotation, float clip_ratio,
                     Basis basis, std::span<float> out) const;

 private:
  fmt::TensorQuantSpec spec_;
  fmt::RecordLayout layout_;
  int64_t head_dim_ = 0;
};

// INT2 whole-head convenience for the paged cache (formats/kv_layout.h Int2Record): codes (d/4 bytes) + params.
void quantize_int2(std::span<const float> x, std::span<const float> rotation, float clip_ratio,
                   std::span<uint8_t> codes, IntParams& params);

inline float int_dequant(uint8_t code, IntParams params) {
  return std::fma(static_cast<float>(code), params.scale(), params.zero());
}

}  // namespace oscar::calib
