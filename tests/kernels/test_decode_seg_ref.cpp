// Segmented (spectral) pages on the CPU: kv_write_ref in KvWriteMode::Segmented against the record encoder of
// calib::HeadQuantizer (bit-exact, every width incl. 3 bits and segments off 16-dim boundaries), the one-segment
// INT2 layout against the INT2 page (byte-identical), decode_attention_ref over segmented pages against a naive
// double attention in the original basis over HeadQuantizer-dequantized K/V, and what can_implement refuses.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "formats/dtype.h"
#include "formats/kv_layout.h"
#include "kernels/attention_decode/decode_attention_ref.h"
#include "kernels/kv_quantize/kv_quantize_ref.h"
#include "kv_cache_test_util.h"
#include "lib/calib/quantizer_ref.h"
#include "test_support.h"

namespace oscar {
namespace {

using Segs = std::vector<fmt::QuantSegment>;

fmt::TensorQuantSpec int_spec(const Segs& segs) {
  fmt::TensorQuantSpec t;
  t.storage = fmt::KvStorage::Int;
  t.segments = segs;
  return t;
}

// Writes `tokens` tokens of `heads` KV heads through kv_write_ref (pages 3, 2, ... in reverse, token 5 skipped).
std::vector<uint8_t> write_pages(const std::vector<uint16_t>& x, int d, int heads, int tokens,
                                 const std::vector<float>& r, float clip, kern::KvWriteMode mode,
                                 const fmt::SegmentedPageGeometry* geo, int32_t page_bytes,
                                 std::vector<int32_t>& slots) {
  std::vector<uint8_t> pool(static_cast<size_t>(4) * heads * page_bytes, 0);
  slots.assign(static_cast<size_t>(tokens), 0);
  for (int t = 0; t < tokens; ++t) slots[t] = t == 5 ? -1 : (3 - t / 64) * 64 + t % 64;
  kern::KvWriteParams w;
  w.x = x.data();
  w.tokens = tokens;
  w.token_stride = static_cast<int64_t>(heads) * d;
  w.num_kv_heads = heads;
  w.head_dim = d;
  w.rotation = r.empty() ? nullptr : r.data();
  w.clip_ratio = clip;
  w.slots = slots.data();
  w.int2_pool = pool.data();
  w.geometry = geo;
  kern::kv_write_ref(w, mode);
  return pool;
}

TEST(KvWriteSegRef, OneTwoBitSegmentIsByteIdenticalToTheInt2Page) {
  for (int d : {64, 128, 256}) {
    const int heads = 2, tokens = 100;
    const auto r = test::random_rotation(d, 3);
    const auto x = test::random_bf16(static_cast<size_t>(tokens) * heads * d, d, 4);
    const Segs segs{{0, d, 2}};
    const auto geo = fmt::segmented_page_geometry(segs, d, 64);
    const fmt::Int2PageGeometry int2{d, 64};
    ASSERT_EQ(geo.page_bytes(), int2.page_bytes());
    std::vector<int32_t> slots;
    const auto a = write_pages(x, d, heads, tokens, r, 0.96f, kern::KvWriteMode::Int2, nullptr, int2.page_bytes(), slots);
    const auto b = write_pages(x, d, heads, tokens, r, 0.96f, kern::KvWriteMode::Segmented, &geo, geo.page_bytes(), slots);
    EXPECT_EQ(a, b) << "d " << d;
    EXPECT_TRUE(std::any_of(a.begin(), a.end(), [](uint8_t v) { return v != 0; }));
  }
}

struct SegWriteCase {
  int d;
  Segs segs;
};

class KvWriteSegRefLayouts : public ::testing::TestWithParam<SegWriteCase> {};

TEST_P(KvWriteSegRefLayouts, PageRegionsHoldTheHeadQuantizerRecord) {
  const int d = GetParam().d, heads = 3, tokens = 70;
  const Segs& segs = GetParam().segs;
  const auto r = test::random_rotation(d, 5);
  const auto x = test::random_bf16(static_cast<size_t>(tokens) * heads * d, d, 6);
  const auto geo = fmt::segmented_page_geometry(segs, d, 64);
  ASSERT_EQ(geo.num_segments, static_cast<int32_t>(segs.size()));
  std::vector<int32_t> slots;
  const auto pool = write_pages(x, d, heads, tokens, r, 0.9f, kern::KvWriteMode::Segmented, &geo, geo.page_bytes(), slots);

  calib::HeadQuantizer hq(int_spec(segs), d);
  ASSERT_EQ(hq.record_bytes(), geo.record_bytes());
  std::vector<float> xf(d);
  std::vector<uint8_t> want(static_cast<size_t>(hq.record_bytes())), got(want.size());
  for (int t = 0; t < tokens; ++t) {
    for (int h = 0; h < heads; ++h) {
      const uint8_t* block = pool.data() + fmt::page_block_offset(3 - t / 64, h, heads, geo.page_bytes());
      // Reassemble the token's record from the segment regions and the pair rows.
      for (int s = 0; s < geo.num_segments; ++s)
        std::memcpy(got.data() + geo.seg_code_offset[s], block + geo.code_row_offset(s, t % 64), geo.seg_code_bytes[s]);
      for (int pr = 0; pr < geo.param_pairs; ++pr)
        std::memcpy(got.data() + geo.code_bytes + 4 * pr, block + geo.param_offset(t % 64, pr), 4);
      if (t == 5) {
        EXPECT_TRUE(std::all_of(got.begin(), got.end(), [](uint8_t v) { return v == 0; })) << "skipped token written";
        continue;
      }
      for (int i = 0; i < d; ++i) xf[i] = fmt::bf16_to_f32(x[(static_cast<size_t>(t) * heads + h) * d + i]);
      hq.encode(xf, r, 0.9f, want);
      ASSERT_EQ(got, want) << "t " << t << " h " << h;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Layouts, KvWriteSegRefLayouts,
    ::testing::Values(SegWriteCase{128, {{0, 48, 4}, {48, 112, 2}, {112, 128, 0}}},
                      SegWriteCase{128, {{0, 16, 4}, {16, 48, 3}, {48, 96, 2}, {96, 112, 1}, {112, 128, 0}}},
                      SegWriteCase{64, {{0, 16, 1}, {16, 64, 4}}},
                      SegWriteCase{64, {{0, 40, 3}, {40, 64, 8}}},  // off 16-dim boundaries: kv_write only
                      SegWriteCase{256, {{0, 32, 4}, {32, 160, 2}, {160, 224, 1}, {224, 256, 0}}}));

// ---- decode over segmented pages ----------------------------------------------------------------------------

struct SegDecodeCase {
  int d;
  Segs k, v;
  std::vector<int32_t> lens;
  int q_heads, kv_heads;
  int64_t sink, recent;
};

std::vector<double> naive_attention(const test::HostPagedCache& c, const SegDecodeCase& dc,
                                    const std::vector<uint16_t>& q, const std::vector<float>& rk,
                                    const std::vector<float>& rv) {
  return test::naive_attention(c, int_spec(dc.k), int_spec(dc.v), dc.q_heads, dc.kv_heads, dc.sink, dc.recent, q,
                               rk, rv);
}

class DecodeSegRef : public ::testing::TestWithParam<SegDecodeCase> {};

TEST_P(DecodeSegRef, MatchesNaiveAttentionOverDequantizedCache) {
  const auto& dc = GetParam();
  const int d = dc.d;
  const auto rk = test::random_rotation(d, 41), rv = test::random_rotation(d, 42);
  const auto kg = fmt::segmented_page_geometry(dc.k, d, 64), vg = fmt::segmented_page_geometry(dc.v, d, 64);
  test::HostPagedCache c;
  c.k_geo = &kg;
  c.v_geo = &vg;
  c.build(dc.lens, dc.kv_heads, d, rk, rv, 0.96f, 0.92f, 9);
  const auto q = test::random_bf16(dc.lens.size() * dc.q_heads * d, d, 77, 3.0f);
  auto p = c.params(c.k_int2.data(), c.v_int2.data(), c.k_bf16.data(), c.v_bf16.data(), c.int2_table.data(),
                    c.bf16_table.data(), c.lens.data());
  p.num_q_heads = dc.q_heads;
  p.q = q.data();
  p.rotation_k = rk.data();
  p.rotation_v = rv.data();
  p.sink_tokens = dc.sink;
  p.recent_tokens = dc.recent;
  std::vector<float> out(dc.lens.size() * dc.q_heads * d);
  p.out = out.data();
  kern::decode_attention_ref(p);
  const auto want = naive_attention(c, dc, q, rk, rv);
  EXPECT_LE(test::nmse(out, want), 1e-10);
  // The segmented pages really are read: the same cache decoded with every token in bf16 differs.
  p.sink_tokens = 1 << 20;
  std::vector<float> wide(out.size());
  p.out = wide.data();
  kern::decode_attention_ref(p);
  EXPECT_GT(test::nmse(out, std::vector<double>(wide.begin(), wide.end())), 1e-6);
}

const Segs kK128{{0, 48, 4}, {48, 112, 2}, {112, 128, 0}};
const Segs kV128{{0, 16, 4}, {16, 80, 2}, {80, 112, 1}, {112, 128, 0}};
INSTANTIATE_TEST_SUITE_P(Cases, DecodeSegRef,
                         ::testing::Values(SegDecodeCase{128, kK128, kV128, {300}, 8, 2, 16, 32},
                                           SegDecodeCase{128, kV128, kK128, {300, 17, 130}, 4, 1, 4, 40},
                                           SegDecodeCase{64, {{0, 16, 1}, {16, 64, 4}}, {{0, 64, 2}}, {200}, 8, 1, 0, 0},
                                           // 3-bit segments (what the GPU kernel's 3-bit unpack is checked against)
                                           SegDecodeCase{128, {{0, 48, 3}, {48, 128, 1}},
                                                         {{0, 32, 3}, {32, 96, 2}, {96, 128, 0}}, {300}, 8, 2, 16, 32}));

TEST(DecodeSegRef, CanImplementRefusesWhatTheKernelDoesNotRead) {
  const int d = 128;
  const auto ok = fmt::segmented_page_geometry(kK128, d, 64);
  const auto three = fmt::segmented_page_geometry(Segs{{0, 64, 3}, {64, 128, 2}}, d, 64);
  const auto eight = fmt::segmented_page_geometry(Segs{{0, 64, 8}, {64, 128, 2}}, d, 64);
  const auto off16 = fmt::segmented_page_geometry(Segs{{0, 40, 4}, {40, 128, 2}}, d, 64);
  const auto d64 = fmt::segmented_page_geometry(Segs{{0, 64, 2}}, 64, 64);
  kern::DecodeAttentionParams p;
  p.batch = 0;
  p.num_q_heads = 8;
  p.num_kv_heads = 2;
  p.head_dim = d;
  p.k_geometry = &ok;
  p.v_geometry = &ok;
  EXPECT_EQ(kern::decode_attention_can_implement(p), kern::Status::Ok);
  p.v_geometry = nullptr;
  EXPECT_EQ(kern::decode_attention_can_implement(p), kern::Status::InvalidArgument);  // both or neither
  p.v_geometry = &three;
  EXPECT_EQ(kern::decode_attention_can_implement(p), kern::Status::Ok);  // 3-bit: read since the 3-bit unpack
  p.v_geometry = &eight;
  EXPECT_EQ(kern::decode_attention_can_implement(p), kern::Status::Unsupported);  // 8-bit
  p.v_geometry = &off16;
  EXPECT_EQ(kern::decode_attention_can_implement(p), kern::Status::Unsupported);  // not 16-aligned
  p.v_geometry = &d64;
  EXPECT_EQ(kern::decode_attention_can_implement(p), kern::Status::InvalidArgument);  // other head_dim
}

TEST(KvWriteSegRef, CanImplementChecksTheGeometry) {
  const auto geo = fmt::segmented_page_geometry(kK128, 128, 64);
  kern::KvWriteParams w;
  w.tokens = 0;
  w.num_kv_heads = 1;
  w.head_dim = 128;
  w.token_stride = 128;
  EXPECT_EQ(kern::kv_write_can_implement(w, kern::KvWriteMode::Segmented), kern::Status::Ok);  // nothing to write
  std::vector<uint16_t> x(128);
  int32_t slot = 0;
  w.tokens = 1;
  w.x = x.data();
  w.slots = &slot;
  w.int2_pool = nullptr;
  EXPECT_EQ(kern::kv_write_can_implement(w, kern::KvWriteMode::Segmented), kern::Status::InvalidArgument);
  std::vector<uint8_t> buf(4096);
  w.int2_pool = buf.data() + (16 - reinterpret_cast<uintptr_t>(buf.data()) % 16) % 16;
  EXPECT_EQ(kern::kv_write_can_implement(w, kern::KvWriteMode::Segmented), kern::Status::InvalidArgument);  // no geometry
  w.geometry = &geo;
  EXPECT_EQ(kern::kv_write_can_implement(w, kern::KvWriteMode::Segmented), kern::Status::Ok);
  const auto other = fmt::segmented_page_geometry(Segs{{0, 64, 2}}, 64, 64);
  w.geometry = &other;
  EXPECT_EQ(kern::kv_write_can_implement(w, kern::KvWriteMode::Segmented), kern::Status::InvalidArgument);
}

}  // namespace
}  // namespace oscar
