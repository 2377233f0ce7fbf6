#include "lib/calib/quantizer_ref.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "formats/dtype.h"
#include "formats/error.h"

namespace oscar::calib {
namespace {

constexpr float kE4M3Max = 448.0f;

void require(bool ok, const char* where, const std::string& what) {
  if (!ok) throw Error(where, what);
}

}  // namespace

int64_t clip_index(float clip_ratio, int64_t dim) {
  // Same arithmetic as the published `_clip_index`: int(ratio * d) in double, clamped to [0, d - 1].
  auto idx = static_cast<int64_t>(std::floor(static_cast<double>(clip_ratio) * static_cast<double>(dim)));
  return std::clamp<int64_t>(idx, 0, dim - 1);
}

float clip_threshold(std::span<const float> y, float clip_ratio) {
  if (clip_ratio >= 1.0f || y.empty()) return std::numeric_limits<float>::infinity();
  std::vector<float> mag(y.size());
  for (size_t i = 0; i < y.size(); ++i) mag[i] = std::fabs(y[i]);
  const auto k = clip_index(clip_ratio, static_cast<int64_t>(y.size()));
  std::nth_element(mag.begin(), mag.begin() + k, mag.end());
  return mag[static_cast<size_t>(k)];
}

float clip_in_place(std::span<float> y, float clip_ratio) {
  const float c = clip_threshold(y, clip_ratio);
  if (std::isinf(c)) return c;
  for (float& v : y) v = std::min(std::max(v, -c), c);
  return c;
}

void rotate(std::span<const float> x, std::span<const float> rotation, std::span<float> y) {
  const size_t d = x.size();
  require(y.size() == d, "quantizer_ref::rotate", "output size differs from input size");
  if (rotation.empty()) {
    std::copy(x.begin(), x.end(), y.begin());
    return;
  }
  require(rotation.size() == d * d, "quantizer_ref::rotate",
          ::fmt::format("rotation has {} values, expected {}x{}", rotation.size(), d, d));
  for (size_t j = 0; j < d; ++j) {
    float acc = 0.0f;
    for (size_t i = 0; i < d; ++i) acc = std::fma(x[i], rotation[i * d + j], acc);
    y[j] = acc;
  }
}

void unrotate(std::span<const float> y, std::span<const float> rotation, std::span<float> x) {
  const size_t d = y.size();
  require(x.size() == d, "quantizer_ref::unrotate", "output size differs from input size");
  if (rotation.empty()) {
    std::copy(y.begin(), y.end(), x.begin());
    return;
  }
  require(rotation.size() == d * d, "quantizer_ref::unrotate",
          ::fmt::format("rotation has {} values, expected {}x{}", rotation.size(), d, d));
  for (size_t j = 0; j < d; ++j) {
    float acc = 0.0f;
    for (size_t i = 0; i < d; ++i) acc = std::fma(y[i], rotation[j * d + i], acc);
    x[j] = acc;
  }
}

float IntParams::scale() const { return fmt::f16_to_f32(scale_f16); }
float IntParams::zero() const { return fmt::f16_to_f32(zero_f16); }

IntParams int_params(std::span<const float> y, int32_t bits) {
  require(bits >= 1 && bits <= 8, "quantizer_ref::int_params", ::fmt::format("unsupported bit width {}", bits));
  require(!y.empty(), "quantizer_ref::int_params", "empty segment");
  const auto [lo_it, hi_it] = std::minmax_element(y.begin(), y.end());
  const float levels = static_cast<float>((1 << bits) - 1);
  IntParams p;
  p.scale_f16 = fmt::f32_to_f16((*hi_it - *lo_it) / levels);
  p.zero_f16 = fmt::f32_to_f16(*lo_it);
  return p;
}

void int_codes(std::span<const float> y, int32_t bits, IntParams params, std::span<uint8_t> codes) {
  require(codes.size() == y.size(), "quantizer_ref::int_codes", "codes size differs from segment size");
  const float scale = params.scale();
  const float zero = params.zero();
  const float max_code = static_cast<float>((1 << bits) - 1);
  if (scale == 0.0f) {
    std::fill(codes.begin(), codes.end(), uint8_t{0});
    return;
  }
  for (size_t i = 0; i < y.size(); ++i) {
    // rint under the default rounding mode is round-half-to-even, the same as the kernel's __float2int_rn.
    const float q = std::rint((y[i] - zero) / scale);
    codes[i] = static_cast<uint8_t>(std::min(std::max(q, 0.0f), max_code));
  }
}

void pack_codes(std::span<const uint8_t> codes, int32_t bits, std::span<uint8_t> out) {
  const auto bytes = static_cast<size_t>(fmt::packed_bytes(static_cast<int32_t>(codes.size()), bits));
  require(out.size() >= bytes, "quantizer_ref::pack_codes", ::fmt::format("needs {} bytes, got {}", bytes, out.size()));
  std::fill(out.begin(), out.begin() + static_cast<std::ptrdiff_t>(bytes), uint8_t{0});
  const uint32_t mask = (1u << bits) - 1u;
  for (size_t i = 0; i < codes.size(); ++i) {
    const size_t bit = i * static_cast<size_t>(bits);
    const uint32_t v = (codes[i] & mask) << (bit % 8);  // at most 8 + 7 bits: spans two bytes
    out[bit / 8] |= static_cast<uint8_t>(v);
    if ((bit % 8) + static_cast<size_t>(bits) > 8) out[bit / 8 + 1] |= static_cast<uint8_t>(v >> 8);
  }
}

void unpack_codes(std::span<const uint8_t> packed, int32_t bits, std::span<uint8_t> codes) {
  const auto bytes = static_cast<size_t>(fmt::packed_bytes(static_cast<int32_t>(codes.size()), bits));
  require(packed.size() >= bytes, "quantizer_ref::unpack_codes",
          ::fmt::format("needs {} bytes, got {}", bytes, packed.size()));
  const uint32_t mask = (1u << bits) - 1u;
  for (size_t i = 0; i < codes.size(); ++i) {
    const size_t bit = i * static_cast<size_t>(bits);
    uint32_t v = packed[bit / 8];
    if ((bit % 8) + static_cast<size_t>(bits) > 8) v |= static_cast<uint32_t>(packed[bit / 8 + 1]) << 8;
    codes[i] = static_cast<uint8_t>((v >> (bit % 8)) & mask);
  }
}

float e4m3_to_f32(uint8_t code) {
  const int sign = code >> 7;
  const int exp = (code >> 3) & 0xf;
  const int man = code & 0x7;
  if (exp == 0xf && man == 0x7) return std::numeric_limits<float>::quiet_NaN();
  const float mag = exp == 0 ? std::ldexp(static_cast<float>(man), -9)  // subnormal: man/8 * 2^-6
                             : std::ldexp(1.0f + static_cast<float>(man) / 8.0f, exp - 7);
  return sign ? -mag : mag;
}

uint8_t f32_to_e4m3(float f) {
  if (std::isnan(f)) return 0x7f;
  const uint8_t sign = std::signbit(f) ? 0x80 : 0x00;
  const float a = std::fabs(f);
  if (a >= kE4M3Max) return sign | 0x7e;  // saturate (e4m3fn has no infinity)
  // Quantum of the binade of `a` (subnormals share the quantum 2^-9); rint rounds half to even on that grid,
  // which is exact because a / quantum fits in a float's mantissa.
  int e = 0;
  std::frexp(a, &e);  // a = m * 2^e, m in [0.5, 1)
  const int unbiased = std::max(e - 1, -6);
  const float quantum = std::ldexp(1.0f, unbiased - 3);
  const float r = std::rint(a / quantum) * quantum;
  if (r == 0.0f) return sign;
  if (r >= kE4M3Max) return sign | 0x7e;
  int re = 0;
  const float rm = std::frexp(r, &re);
  const int ue = re - 1;
  if (ue < -6) return static_cast<uint8_t>(sign | static_cast<uint8_t>(std::lrint(r / std::ldexp(1.0f, -9))));
  const auto man = static_cast<uint8_t>(std::lrint((rm * 2.0f - 1.0f) * 8.0f));
  return static_cast<uint8_t>(sign | ((ue + 7) << 3) | man);
}

HeadQuantizer::HeadQuantizer(const fmt::TensorQuantSpec& spec, int64_t head_dim, const std::string& where)
    : spec_(spec), layout_(fmt::RecordLayout::from_spec(spec, head_dim, where)), head_dim_(head_dim) {}

void HeadQuantizer::encode(std::span<const float> x, std::span<const float> rotation, float clip_ratio,
                           std::span<uint8_t> record) const {
  require(static_cast<int64_t>(x.size()) == head_dim_, "HeadQuantizer::encode",
          ::fmt::format("vector has {} values, head_dim is {}", x.size(), head_dim_));
  require(static_cast<int32_t>(record.size()) >= record_bytes(), "HeadQuantizer::encode", "record buffer too small");
  std::vector<float> y(x.size());
  rotate(x, rotation, y);
  uint8_t* params_out = record.data() + layout_.code_bytes;
  switch (layout_.storage) {
    case fmt::KvStorage::BF16:
      for (size_t i = 0; i < y.size(); ++i) {
        const uint16_t b = fmt::f32_to_bf16(y[i]);
        std::memcpy(record.data() + 2 * i, &b, 2);
      }
      return;
    case fmt::KvStorage::Fp8E4M3: {
      clip_in_place(y, clip_ratio);
      float amax = 0.0f;
      for (float v : y) amax = std::max(amax, std::fabs(v));
      const uint16_t scale_f16 = fmt::f32_to_f16(amax / kE4M3Max);
      const float scale = fmt::f16_to_f32(scale_f16);
      for (size_t i = 0; i < y.size(); ++i) record[i] = scale == 0.0f ? uint8_t{0} : f32_to_e4m3(y[i] / scale);
      std::memcpy(params_out, &scale_f16, 2);
      return;
    }
    case fmt::KvStorage::Int: break;
  }
  clip_in_place(y, clip_ratio);
  std::vector<uint8_t> codes;
  for (const auto& seg : layout_.segments) {
    if (seg.bits == 0) continue;
    std::span<const float> ys(y.data() + seg.begin, static_cast<size_t>(seg.end - seg.begin));
    const IntParams p = int_params(ys, seg.bits);
    codes.assign(ys.size(), 0);
    int_codes(ys, seg.bits, p, codes);
    pack_codes(codes, seg.bits, record.subspan(static_cast<size_t>(seg.code_offset), static_cast<size_t>(seg.code_bytes)));
    std::memcpy(params_out + 4 * seg.param_index, &p.scale_f16, 2);
    std::memcpy(params_out + 4 * seg.param_index + 2, &p.zero_f16, 2);
  }
}

void HeadQuantizer::decode(std::span<const uint8_t> record, std::span<const float> rotation, Basis basis,
                           std::span<float> out) const {
  require(static_cast<int64_t>(out.size()) == head_dim_, "HeadQuantizer::decode", "output size differs from head_dim");
  require(static_cast<int32_t>(record.size()) >= record_bytes(), "HeadQuantizer::decode", "record too small");
  std::vector<float> y(out.size());
  const uint8_t* params_in = record.data() + layout_.code_bytes;
  switch (layout_.storage) {
    case fmt::KvStorage::BF16:
      for (size_t i = 0; i < y.size(); ++i) {
        uint16_t b;
        std::memcpy(&b, record.data() + 2 * i, 2);
        y[i] = fmt::bf16_to_f32(b);
      }
      break;
    case fmt::KvStorage::Fp8E4M3: {
      uint16_t scale_f16;
      std::memcpy(&scale_f16, params_in, 2);
      const float scale = fmt::f16_to_f32(scale_f16);
      for (size_t i = 0; i < y.size(); ++i) y[i] = e4m3_to_f32(record[i]) * scale;
      break;
    }
    case fmt::KvStorage::Int: {
      std::vector<uint8_t> codes;
      for (const auto& seg : layout_.segments) {
        const auto n = static_cast<size_t>(seg.end - seg.begin);
        if (seg.bits == 0) {
          std::fill_n(y.begin() + seg.begin, n, 0.0f);
          continue;
        }
        IntParams p;
        std::memcpy(&p.scale_f16, params_in + 4 * seg.param_index, 2);
        std::memcpy(&p.zero_f16, params_in + 4 * seg.param_index + 2, 2);
        codes.assign(n, 0);
        unpack_codes(record.subspan(static_cast<size_t>(seg.code_offset), static_cast<size_t>(seg.code_bytes)),
                     seg.bits, codes);
        for (size_t i = 0; i < n; ++i) y[static_cast<size_t>(seg.begin) + i] = int_dequant(codes[i], p);
      }
      break;
    }
  }
  if (basis == Basis::Rotated)
    std::copy(y.begin(), y.end(), out.begin());
  else
    unrotate(y, rotation, out);
}

void HeadQuantizer::fake_quantize(std::span<const float> x, int64_t rows, std::span<const float> rotation,
                                  float clip_ratio, Basis basis, std::span<float> out) const {
  const auto d = static_cast<size_t>(head_dim_);
  require(x.size() == static_cast<size_t>(rows) * d && out.size() == x.size(), "HeadQuantizer::fake_quantize",
          ::fmt::format("expected {} x {} values", rows, head_dim_));
  std::vector<uint8_t> record(static_cast<size_t>(record_bytes()));
  std::vector<float> row(d);
  for (int64_t r = 0; r < rows; ++r) {
    std::copy_n(x.begin() + static_cast<std::ptrdiff_t>(r * d), d, row.begin());  // x and out may alias
    encode(row, rotation, clip_ratio, record);
    decode(record, rotation, basis, out.subspan(static_cast<size_t>(r) * d, d));
  }
}

void quantize_int2(std::span<const float> x, std::span<const float> rotation, float clip_ratio,
                   std::span<uint8_t> codes, IntParams& params) {
  const size_t d = x.size();
  require(d % 4 == 0 && codes.size() >= d / 4, "quantizer_ref::quantize_int2",
          ::fmt::format("head_dim {} needs {} code bytes, got {}", d, d / 4, codes.size()));
  std::vector<float> y(d);
  rotate(x, rotation, y);
  clip_in_place(y, clip_ratio);
  params = int_params(y, 2);
  std::vector<uint8_t> c(d);
  int_codes(y, 2, params, c);
  pack_codes(c, 2, codes);
}

}  // namespace oscar::calib
