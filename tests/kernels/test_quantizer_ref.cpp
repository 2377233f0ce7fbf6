// lib/calib/quantizer_ref + formats/kv_layout + formats/kv_quant_spec: packing, the quantizer's analytic
// properties, and the record layout.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "formats/dtype.h"
#include "formats/error.h"
#include "formats/kv_layout.h"
#include "formats/kv_quant_spec.h"
#include "kv_cache_test_util.h"
#include "lib/calib/quantizer_ref.h"
#include "test_support.h"

namespace oscar {
namespace {

using calib::Basis;

std::vector<float> gaussian(size_t n, uint32_t seed, float sigma = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, sigma);
  std::vector<float> v(n);
  for (auto& x : v) x = nd(rng);
  return v;
}

TEST(KvLayout, PackUnpackRoundTripsRandomCodesAtEveryWidth) {
  std::mt19937 rng(1);
  for (int bits : {1, 2, 3, 4, 8}) {
    for (int n : {1, 7, 16, 64, 128, 131}) {
      std::uniform_int_distribution<int> code(0, (1 << bits) - 1);
      std::vector<uint8_t> codes(static_cast<size_t>(n)), back(static_cast<size_t>(n));
      for (auto& c : codes) c = static_cast<uint8_t>(code(rng));
      std::vector<uint8_t> packed(static_cast<size_t>(fmt::packed_bytes(n, bits)) + 1, 0xAB);
      calib::pack_codes(codes, bits, packed);
      EXPECT_EQ(packed.back(), 0xAB) << "wrote past packed_bytes for bits " << bits << " n " << n;
      calib::unpack_codes(packed, bits, back);
      EXPECT_EQ(codes, back) << "bits " << bits << " n " << n;
    }
  }
}

TEST(KvLayout, Int2DimJSitsInByteJOver4AtBits2TimesJMod4) {
  // Analytic layout check: one code of 3 at dim j and zeros elsewhere sets exactly bits 2(j%4)..+1 of byte j/4.
  for (int j = 0; j < 128; ++j) {
    std::vector<uint8_t> codes(128, 0), packed(32, 0);
    codes[static_cast<size_t>(j)] = 3;
    calib::pack_codes(codes, 2, packed);
    for (int byte = 0; byte < 32; ++byte)
      EXPECT_EQ(packed[static_cast<size_t>(byte)], byte == j / 4 ? (3 << (2 * (j % 4))) : 0) << "dim " << j;
  }
  EXPECT_EQ(fmt::Int2PageGeometry({128, 64}).page_bytes(), 64 * 32 + 64 * 4);
}

TEST(KvQuantSpec, BitsPerElementAndValidation) {
  const auto spec = fmt::KvQuantSpec::int2_default(128);
  EXPECT_DOUBLE_EQ(spec.k.bits_per_element(128), 2.25);
  EXPECT_EQ(spec.k.packed_code_bytes(), 32);
  EXPECT_FLOAT_EQ(spec.k.clip_ratio, 0.96f);
  EXPECT_FLOAT_EQ(spec.v.clip_ratio, 0.92f);
  EXPECT_NO_THROW(spec.validate("spec"));
  EXPECT_DOUBLE_EQ(fmt::KvQuantSpec::uniform(128, 4).v.bits_per_element(128), 4.25);

  auto mixed = spec;
  mixed.k.segments = {{0, 32, 4}, {32, 96, 2}, {96, 128, 0}};
  EXPECT_NO_THROW(mixed.validate("mixed"));
  EXPECT_DOUBLE_EQ(mixed.k.bits_per_element(128), (32 * 4 + 64 * 2 + 64) / 128.0);
  EXPECT_EQ(mixed.k.packed_code_bytes(), 16 + 16);
  const auto layout = fmt::RecordLayout::from_spec(mixed.k, 128, "mixed");
  EXPECT_EQ(layout.code_bytes, 32);
  EXPECT_EQ(layout.param_count, 4);
  EXPECT_EQ(layout.segments[2].param_index, -1);

  auto gap = spec;
  gap.k.segments = {{0, 60, 2}, {64, 128, 2}};
  EXPECT_THROW(gap.validate("gap"), Error);
  auto bad_bits = spec;
  bad_bits.v.segments = {{0, 128, 5}};
  EXPECT_THROW(bad_bits.validate("bits"), Error);
}

TEST(QuantizerRef, ClipIndexMatchesPublishedKernel) {
  // int(ratio * d) clamped to [0, d - 1], as in the published `_clip_index`.
  EXPECT_EQ(calib::clip_index(0.96f, 128), 122);
  EXPECT_EQ(calib::clip_index(0.92f, 128), 117);
  EXPECT_EQ(calib::clip_index(1.0f, 128), 127);
  EXPECT_EQ(calib::clip_index(0.5f, 64), 32);
}

TEST(QuantizerRef, ClipKeepsExactlyTheExpectedNumberUnclipped) {
  const int d = 128;
  auto y = gaussian(d, 3);  // distinct with probability 1
  for (float ratio : {0.5f, 0.8f, 0.92f, 0.96f}) {
    auto c = y;
    const float thr = calib::clip_in_place(c, ratio);
    const auto idx = calib::clip_index(ratio, d);
    int unchanged = 0;
    for (int i = 0; i < d; ++i) {
      if (c[static_cast<size_t>(i)] == y[static_cast<size_t>(i)]) ++unchanged;
      else EXPECT_EQ(std::fabs(c[static_cast<size_t>(i)]), thr);
    }
    EXPECT_EQ(unchanged, idx + 1) << "ratio " << ratio;  // sorted |y| positions 0..idx survive
  }
  auto none = y;
  EXPECT_TRUE(std::isinf(calib::clip_in_place(none, 1.0f)));
  EXPECT_EQ(none, y);
}

TEST(QuantizerRef, RotationThenTransposeRecoversX) {
  const int d = 128;
  const auto r = test::random_rotation(d, 11);
  const auto x = gaussian(d, 12, 3.0f);
  std::vector<float> y(d), back(d);
  calib::rotate(x, r, y);
  calib::unrotate(y, r, back);
  for (int i = 0; i < d; ++i) EXPECT_NEAR(back[static_cast<size_t>(i)], x[static_cast<size_t>(i)], 1e-5f);
  double nx = 0, ny = 0;
  for (int i = 0; i < d; ++i) nx += x[i] * x[i], ny += y[i] * y[i];
  EXPECT_NEAR(ny / nx, 1.0, 1e-6);  // orthogonal: norm preserved
}

TEST(QuantizerRef, Int2ErrorIsAtMostHalfAStepInsideTheGrid) {
  for (uint32_t seed = 0; seed < 50; ++seed) {
    const auto y = gaussian(128, 100 + seed, 2.0f);
    const auto p = calib::int_params(y, 2);
    // fp16 parameters: what is stored is what codes are computed from.
    const float lo = *std::min_element(y.begin(), y.end());
    const float hi = *std::max_element(y.begin(), y.end());
    EXPECT_EQ(p.zero_f16, fmt::f32_to_f16(lo));
    EXPECT_EQ(p.scale_f16, fmt::f32_to_f16((hi - lo) / 3.0f));
    std::vector<uint8_t> codes(y.size());
    calib::int_codes(y, 2, p, codes);
    const float s = p.scale(), z = p.zero();
    for (size_t i = 0; i < y.size(); ++i) {
      const float deq = calib::int_dequant(codes[i], p);
      ASSERT_LE(codes[i], 3);
      if (y[i] >= z && y[i] <= z + 3 * s)
        EXPECT_LE(std::fabs(y[i] - deq), 0.5f * s * (1 + 1e-6f)) << "seed " << seed << " i " << i;
      else  // outside the fp16-rounded grid: clamped to the nearest end
        EXPECT_NEAR(deq, y[i] < z ? z : std::fma(3.0f, s, z), 1e-6f * s);
    }
  }
}

TEST(QuantizerRef, RoundsHalfToEven) {
  // Grid 0, 1, 2, 3 (scale 1, zero 0 exactly representable): 0.5 -> 0, 1.5 -> 2, 2.5 -> 2.
  const std::vector<float> y = {0.0f, 0.5f, 1.5f, 2.5f, 3.0f};
  const auto p = calib::int_params(y, 2);
  EXPECT_EQ(p.scale(), 1.0f);
  EXPECT_EQ(p.zero(), 0.0f);
  std::vector<uint8_t> codes(y.size());
  calib::int_codes(y, 2, p, codes);
  EXPECT_EQ(codes, (std::vector<uint8_t>{0, 0, 2, 2, 3}));
}

TEST(QuantizerRef, ConstantVectorDequantizesToItsValue) {
  const std::vector<float> y(64, 0.7f);
  const auto p = calib::int_params(y, 2);
  EXPECT_EQ(p.scale(), 0.0f);
  std::vector<uint8_t> codes(y.size(), 9);
  calib::int_codes(y, 2, p, codes);
  for (size_t i = 0; i < y.size(); ++i) {
    EXPECT_EQ(codes[i], 0);
    EXPECT_EQ(calib::int_dequant(codes[i], p), fmt::f16_to_f32(fmt::f32_to_f16(0.7f)));
  }
}

TEST(QuantizerRef, E4M3KnownValuesAndRoundTrip) {
  EXPECT_EQ(calib::f32_to_e4m3(1.0f), 0x38);
  EXPECT_EQ(calib::f32_to_e4m3(448.0f), 0x7e);
  EXPECT_EQ(calib::f32_to_e4m3(1000.0f), 0x7e);  // saturates
  EXPECT_EQ(calib::f32_to_e4m3(-2.0f), 0xc0);
  EXPECT_EQ(calib::f32_to_e4m3(std::ldexp(1.0f, -9)), 0x01);  // smallest subnormal
  EXPECT_EQ(calib::f32_to_e4m3(1.0625f), 0x38);  // halfway between 1 and 1.125: ties to even
  EXPECT_EQ(calib::f32_to_e4m3(1.1875f), 0x3a);  // halfway between 1.125 and 1.25: ties to even (1.25)
  for (int c = 0; c < 256; ++c) {
    if ((c & 0x7f) == 0x7f) continue;  // NaN
    const float f = calib::e4m3_to_f32(static_cast<uint8_t>(c));
    if (c == 0x80) continue;  // -0 maps to the +0 pattern's sign bit: checked by value below
    EXPECT_EQ(calib::f32_to_e4m3(f), c) << c;
  }
  EXPECT_EQ(calib::e4m3_to_f32(0x80), 0.0f);
}

TEST(HeadQuantizer, EncodeDecodeMatchesBuildingBlocksAndRotates) {
  const int d = 128;
  const auto r = test::random_rotation(d, 5);
  const auto spec = fmt::KvQuantSpec::int2_default(d);
  calib::HeadQuantizer hq(spec.k, d);
  ASSERT_EQ(hq.record_bytes(), 36);
  const auto x = gaussian(d, 6, 1.5f);
  std::vector<uint8_t> record(36);
  hq.encode(x, r, 0.96f, record);

  std::vector<float> y(d);
  calib::rotate(x, r, y);
  calib::clip_in_place(y, 0.96f);
  const auto p = calib::int_params(y, 2);
  std::vector<uint8_t> codes(d), packed(32);
  calib::int_codes(y, 2, p, codes);
  calib::pack_codes(codes, 2, packed);
  EXPECT_TRUE(std::equal(packed.begin(), packed.end(), record.begin()));
  uint16_t scale, zero;
  std::memcpy(&scale, record.data() + 32, 2);
  std::memcpy(&zero, record.data() + 34, 2);
  EXPECT_EQ(scale, p.scale_f16);
  EXPECT_EQ(zero, p.zero_f16);

  std::vector<float> rot_out(d), orig_out(d), back(d);
  hq.decode(record, r, Basis::Rotated, rot_out);
  hq.decode(record, r, Basis::Original, orig_out);
  calib::unrotate(rot_out, r, back);
  for (int i = 0; i < d; ++i) {
    EXPECT_EQ(rot_out[static_cast<size_t>(i)], calib::int_dequant(codes[static_cast<size_t>(i)], p));
    EXPECT_EQ(orig_out[static_cast<size_t>(i)], back[static_cast<size_t>(i)]);
  }

  // fake_quantize over [T, d] rows equals row-wise encode/decode, in place.
  std::vector<float> rows = gaussian(3 * d, 8);
  std::vector<float> expect(rows.size());
  for (int t = 0; t < 3; ++t) {
    std::vector<float> row(rows.begin() + t * d, rows.begin() + (t + 1) * d), out(d);
    hq.encode(row, r, 0.9f, record);
    hq.decode(record, r, Basis::Original, out);
    std::copy(out.begin(), out.end(), expect.begin() + t * d);
  }
  hq.fake_quantize(rows, 3, r, 0.9f, Basis::Original, rows);
  EXPECT_EQ(rows, expect);
}

TEST(HeadQuantizer, SegmentedAndFp8AndBf16Records) {
  const int d = 64;
  fmt::TensorQuantSpec seg;
  seg.segments = {{0, 16, 4}, {16, 48, 2}, {48, 64, 0}};
  calib::HeadQuantizer hq(seg, d);
  const auto x = gaussian(d, 21);
  std::vector<float> out(d);
  std::vector<uint8_t> record(static_cast<size_t>(hq.record_bytes()));
  hq.encode(x, {}, 1.0f, record);
  hq.decode(record, {}, Basis::Original, out);
  for (int i = 48; i < 64; ++i) EXPECT_EQ(out[static_cast<size_t>(i)], 0.0f);
  const auto p4 = calib::int_params(std::span<const float>(x.data(), 16), 4);
  for (int i = 0; i < 16; ++i) EXPECT_LE(std::fabs(out[static_cast<size_t>(i)] - x[static_cast<size_t>(i)]), 0.5f * p4.scale() + 1e-3f);

  fmt::TensorQuantSpec fp8;
  fp8.storage = fmt::KvStorage::Fp8E4M3;
  calib::HeadQuantizer h8(fp8, d);
  record.assign(static_cast<size_t>(h8.record_bytes()), 0);
  EXPECT_EQ(h8.record_bytes(), d + 2);
  h8.encode(x, {}, 1.0f, record);
  h8.decode(record, {}, Basis::Original, out);
  for (int i = 0; i < d; ++i)  // e4m3 has 3 mantissa bits: relative error <= 2^-4 above the subnormal range
    EXPECT_NEAR(out[static_cast<size_t>(i)], x[static_cast<size_t>(i)], std::fabs(x[static_cast<size_t>(i)]) / 16 + 1e-2f);

  fmt::TensorQuantSpec bf;
  bf.storage = fmt::KvStorage::BF16;
  calib::HeadQuantizer hb(bf, d);
  record.assign(static_cast<size_t>(hb.record_bytes()), 0);
  hb.encode(x, {}, 0.5f, record);  // bf16 ignores clipping
  hb.decode(record, {}, Basis::Original, out);
  for (int i = 0; i < d; ++i) EXPECT_EQ(out[static_cast<size_t>(i)], fmt::bf16_to_f32(fmt::f32_to_bf16(x[static_cast<size_t>(i)])));
}

}  // namespace
}  // namespace oscar
