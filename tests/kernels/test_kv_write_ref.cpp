// kv_write_ref (INT2) on the vectors that stress the clip select and the min/max (kv_write_stress.h), against the
// quantizer definition of lib/calib/quantizer_ref.h spelled out here step by step: a full sort for the order
// statistic, std::min/std::max clipping, first-minimum / last-maximum (std::minmax_element), fp16 params first.
// The GPU kernel (tests/gpu/test_kv_write_gpu.cpp) must reproduce exactly these records.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "formats/dtype.h"
#include "formats/kv_layout.h"
#include "kernels/kv_quantize/kv_quantize_ref.h"
#include "kv_cache_test_util.h"
#include "kv_write_stress.h"

namespace oscar {
namespace {

struct Record {
  std::vector<uint8_t> codes;
  uint16_t scale = 0, zero = 0;
};

Record spelled_out_int2(const uint16_t* xb, int d, const float* rot, float ratio) {
  std::vector<float> x(static_cast<size_t>(d)), y(static_cast<size_t>(d));
  for (int i = 0; i < d; ++i) x[static_cast<size_t>(i)] = fmt::bf16_to_f32(xb[i]);
  for (int j = 0; j < d; ++j) {
    if (!rot) {
      y[static_cast<size_t>(j)] = x[static_cast<size_t>(j)];
      continue;
    }
    float acc = 0.f;
    for (int i = 0; i < d; ++i) acc = std::fma(x[static_cast<size_t>(i)], rot[static_cast<size_t>(i) * d + j], acc);
    y[static_cast<size_t>(j)] = acc;
  }
  if (ratio < 1.0f) {
    std::vector<float> mag(y.size());
    for (size_t i = 0; i < y.size(); ++i) mag[i] = std::fabs(y[i]);
    std::sort(mag.begin(), mag.end());
    const float c = mag[static_cast<size_t>(std::min<int64_t>(static_cast<int64_t>(std::floor(double{ratio} * d)), d - 1))];
    for (float& v : y) {
      if (v < -c) v = -c;
      if (c < v) v = c;
    }
  }
  float lo = y[0], hi = y[0];
  for (float v : y) {
    if (v < lo) lo = v;     // first minimum
    if (!(v < hi)) hi = v;  // last maximum
  }
  Record r;
  r.scale = fmt::f32_to_f16((hi - lo) / 3.0f);
  r.zero = fmt::f32_to_f16(lo);
  const float scale = fmt::f16_to_f32(r.scale), zero = fmt::f16_to_f32(r.zero);
  r.codes.assign(static_cast<size_t>(d / 4), 0);
  for (int i = 0; i < d; ++i) {
    uint32_t code = 0;
    if (scale != 0.f) code = static_cast<uint32_t>(std::min(std::max(std::rint((y[static_cast<size_t>(i)] - zero) / scale), 0.f), 3.f));
    r.codes[static_cast<size_t>(i / 4)] |= static_cast<uint8_t>(code << (2 * (i % 4)));
  }
  return r;
}

// One token per head vector, slot = token; returns the INT2 pool kv_write_ref wrote.
std::vector<uint8_t> ref_pool(const std::vector<uint16_t>& x, int tokens, int heads, int d, const float* rot,
                              float ratio) {
  const fmt::Int2PageGeometry geo{d, 64};
  const int pages = (tokens + 63) / 64;
  std::vector<uint8_t> pool(static_cast<size_t>(pages) * heads * geo.page_bytes(), 0xab);
  std::vector<int32_t> slots(static_cast<size_t>(tokens));
  for (int t = 0; t < tokens; ++t) slots[static_cast<size_t>(t)] = t;
  kern::KvWriteParams p;
  p.x = x.data();
  p.tokens = tokens;
  p.token_stride = static_cast<int64_t>(heads) * d;
  p.num_kv_heads = heads;
  p.head_dim = d;
  p.page_tokens = 64;
  p.rotation = rot;
  p.clip_ratio = ratio;
  p.slots = slots.data();
  p.int2_pool = pool.data();
  kern::kv_write_ref(p, kern::KvWriteMode::Int2);
  return pool;
}

Record record_at(const std::vector<uint8_t>& pool, int t, int h, int heads, int d) {
  const fmt::Int2PageGeometry geo{d, 64};
  const uint8_t* block = pool.data() + fmt::page_block_offset(t / 64, h, heads, geo.page_bytes());
  Record r;
  r.codes.assign(block + (t % 64) * geo.code_row_bytes(), block + (t % 64 + 1) * geo.code_row_bytes());
  std::memcpy(&r.scale, block + geo.params_offset() + (t % 64) * 4, 2);
  std::memcpy(&r.zero, block + geo.params_offset() + (t % 64) * 4 + 2, 2);
  return r;
}

TEST(KvWriteRefInt2, MatchesTheSpelledOutDefinitionOnStressVectors) {
  const int heads = 2, reps = 3;
  int checked = 0;
  for (int d : {64, 128, 256}) {
    const auto perm = test::signed_permutation(d, 7 + d);
    const auto orth = test::random_rotation(d, 8 + d);
    for (int rot_kind = 0; rot_kind < 3; ++rot_kind) {
      const float* rot = rot_kind == 0 ? nullptr : rot_kind == 1 ? perm.data() : orth.data();
      for (float ratio : {1.0f, 0.999f, 0.96f, 0.92f, 0.8f, 0.5f, 0.01f}) {
        const bool finite_only = rot_kind != 0 || !test::inf_is_clipped(ratio, d);
        const int tokens = test::kStressPatterns * reps;
        std::vector<uint16_t> x(static_cast<size_t>(tokens) * heads * d);
        std::mt19937 rng(static_cast<uint32_t>(d * 100 + rot_kind));
        for (int v = 0; v < tokens * heads; ++v)
          test::fill_stress_vector(v % test::kStressPatterns, d, rng, finite_only, x.data() + static_cast<size_t>(v) * d);
        const auto pool = ref_pool(x, tokens, heads, d, rot, ratio);
        for (int t = 0; t < tokens; ++t)
          for (int h = 0; h < heads; ++h) {
            const Record want = spelled_out_int2(x.data() + (static_cast<size_t>(t) * heads + h) * d, d, rot, ratio);
            const Record got = record_at(pool, t, h, heads, d);
            ASSERT_EQ(got.codes, want.codes) << "d " << d << " rot " << rot_kind << " ratio " << ratio << " t " << t;
            ASSERT_EQ(got.scale, want.scale) << "d " << d << " rot " << rot_kind << " ratio " << ratio << " t " << t;
            ASSERT_EQ(got.zero, want.zero) << "d " << d << " rot " << rot_kind << " ratio " << ratio << " t " << t;
            ++checked;
          }
      }
    }
  }
  EXPECT_EQ(checked, 3 * 3 * 7 * test::kStressPatterns * reps * heads);
}

// With a clip threshold of 0 every value becomes ±0 (negative ones -0): the zero parameter is the FIRST zero in
// dim order and the scale takes (last zero - first zero) / 3, so the fp16 sign bits follow dim order. The GPU
// kernel reproduces this with a ballot over the lanes; pin it here so a change of the definition is deliberate.
TEST(KvWriteRefInt2, ZeroThresholdParamsTakeTheSignsOfTheFirstAndLastZero) {
  const int d = 64;
  for (const bool negative_first : {true, false}) {
    std::vector<uint16_t> x(static_cast<size_t>(d), fmt::f32_to_bf16(0.f));
    x[0] = fmt::f32_to_bf16(negative_first ? -5.f : 5.f);  // clips to -0 (or +0) in dim 0
    x[d - 1] = fmt::f32_to_bf16(negative_first ? 2.f : -2.f);
    const auto pool = ref_pool(x, 1, 1, d, nullptr, 0.5f);  // 62 of 64 |y| are 0: c = 0
    const Record r = record_at(pool, 0, 0, 1, d);
    // first zero: dim 0 (-0 or +0); last zero: dim d-1 (+0 or -0); scale = f16((hi - lo) / 3).
    EXPECT_EQ(r.zero, negative_first ? 0x8000 : 0x0000);
    EXPECT_EQ(r.scale, negative_first ? 0x0000 : 0x8000);  // (+0 - -0) = +0, (-0 - +0) = -0
    EXPECT_TRUE(std::all_of(r.codes.begin(), r.codes.end(), [](uint8_t c) { return c == 0; }));
  }
}

// Ties at the threshold: ten entries of 4 and the rest 1. Positions 0..9 from the top are all 4, so a threshold
// inside the run clips nothing (ties stay), one step past it clips the whole run to 1.
TEST(KvWriteRefInt2, ThresholdInsideARunOfTiesClipsNothing) {
  const int d = 128;
  std::vector<uint16_t> x(static_cast<size_t>(d), fmt::f32_to_bf16(1.f));
  for (int i = 0; i < 10; ++i) x[static_cast<size_t>(11 * i + 3)] = fmt::f32_to_bf16(i % 2 ? 4.f : -4.f);
  // top 9 (the last 4): ratio with floor(r * 128) = 118; top 10 (the first 1): floor = 117.
  ASSERT_EQ(test::clip_top(118.5f / 128, d), 9);
  ASSERT_EQ(test::clip_top(117.5f / 128, d), 10);
  const Record keep = record_at(ref_pool(x, 1, 1, d, nullptr, 118.5f / 128), 0, 0, 1, d);
  EXPECT_EQ(fmt::f16_to_f32(keep.zero), -4.f);
  EXPECT_EQ(keep.scale, fmt::f32_to_f16(8.f / 3.f));
  const Record clipped = record_at(ref_pool(x, 1, 1, d, nullptr, 117.5f / 128), 0, 0, 1, d);
  EXPECT_EQ(fmt::f16_to_f32(clipped.zero), -1.f);
  EXPECT_EQ(clipped.scale, fmt::f32_to_f16(2.f / 3.f));
}

// ±inf among the clipped top entries leave finite params; the record equals that of the same vector with the
// infinities replaced by the threshold value (they clip to ±c).
TEST(KvWriteRefInt2, InfinitiesAboveTheThresholdClipToIt) {
  const int d = 128;
  std::mt19937 rng(5);
  std::vector<uint16_t> x(static_cast<size_t>(d));
  test::fill_stress_vector(9, d, rng, false, x.data());
  const float ratio = 0.96f;  // top 5: the 4 infinities and the largest finite |x| are above the threshold
  const Record with_inf = record_at(ref_pool(x, 1, 1, d, nullptr, ratio), 0, 0, 1, d);
  EXPECT_TRUE(std::isfinite(fmt::f16_to_f32(with_inf.scale)));
  EXPECT_TRUE(std::isfinite(fmt::f16_to_f32(with_inf.zero)));
  std::vector<float> mag;
  for (uint16_t b : x) mag.push_back(std::fabs(fmt::bf16_to_f32(b)));
  std::sort(mag.begin(), mag.end());
  const float c = mag[122];
  ASSERT_TRUE(std::isfinite(c));
  auto y = x;
  for (auto& b : y)
    if (std::isinf(fmt::bf16_to_f32(b))) b = fmt::f32_to_bf16(fmt::bf16_to_f32(b) > 0 ? c : -c);
  const Record replaced = record_at(ref_pool(y, 1, 1, d, nullptr, ratio), 0, 0, 1, d);
  EXPECT_EQ(with_inf.codes, replaced.codes);
  EXPECT_EQ(with_inf.scale, replaced.scale);
  EXPECT_EQ(with_inf.zero, replaced.zero);
}

}  // namespace
}  // namespace oscar
