#pragma once
// KvQuantSpec — the one description of a KV-cache storage format. The CPU reference quantizer
// (lib/calib/quantizer_ref.h), the CUDA kernels, eval and the bundle all read it; no constant is repeated elsewhere.
//
// A head vector x (head_dim values of one token and one KV head) is stored as:
//   y = x · R              (R: the layer's orthogonal rotation for K or V; identity for "none")
//   per token: clip y to [-c, c], c = the clip_ratio-quantile of |y| (order statistic; ratio 1 = no clip)
//   per segment (a contiguous range of dims of y, the whole head by default): asymmetric min-max quantization to
//   `bits` bits with an fp16 scale and an fp16 zero (min); 0-bit segments are dropped (reconstructed as 0).
// The first `sink_tokens` and the last `recent_tokens` tokens of a sequence are kept in bf16.
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace oscar::fmt {

// How values are stored. Int is the OSCAR path (bits from the segments); the others are the baselines eval needs.
enum class KvStorage : uint8_t {
  BF16,     // no quantization
  Int,      // per-token asymmetric integer, segments of 1..8 bits (INT2 = one segment of 2 bits)
  Fp8E4M3,  // per-head-vector scale, e4m3 elements
};

// A contiguous range of rotated dims [begin, end) with its own bit width and scale/zero pair.
struct QuantSegment {
  int32_t begin = 0;
  int32_t end = 0;
  int32_t bits = 2;  // 0 (dropped), 1, 2, 3, 4, 8
  bool operator==(const QuantSegment&) const = default;
};

struct TensorQuantSpec {
  KvStorage storage = KvStorage::Int;
  std::vector<QuantSegment> segments;  // cover [0, head_dim) in order; default one segment of 2 bits
  float clip_ratio = 1.0f;             // default for layers that do not carry their own (bundle per-layer arrays)

  // Storage bits per element including the fp16 scale+zero of each segment (32 bits per segment per token).
  double bits_per_element(int64_t head_dim) const;
  int32_t packed_code_bytes() const;  // bytes of packed codes per head vector
  // One integer segment [0, head_dim) of 2 bits: the plain INT2 record (what error-feedback tables apply to).
  bool whole_head_int2(int64_t head_dim) const {
    return storage == KvStorage::Int && segments.size() == 1 && segments[0].begin == 0 &&
           segments[0].end == head_dim && segments[0].bits == 2;
  }
};

struct KvQuantSpec {
  int64_t head_dim = 128;
  TensorQuantSpec k;
  TensorQuantSpec v;
  int64_t sink_tokens = 64;     // first tokens kept in bf16
  int64_t recent_tokens = 256;  // most recent tokens kept in bf16

  // The published OSCAR defaults: INT2 over the whole head, K clip 0.96, V clip 0.92, sink 64, recent 256.
  static KvQuantSpec int2_default(int64_t head_dim);
  // Uniform `bits` over the whole head for K and V, no clipping (baselines: int2, int4).
  static KvQuantSpec uniform(int64_t head_dim, int32_t bits);
  // Throws oscar::Error(where, ...) when segments do not tile [0, head_dim) or a width is unsupported.
  void validate(const std::string& where) const;
};

}  // namespace oscar::fmt
