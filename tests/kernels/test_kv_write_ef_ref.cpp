// kv_write_ref with error-feedback tables (issue #10): the INT2 record of every token is calib's stored-table
// rounding (lib/calib/error_feedback.h, error_feedback_codes_stored) on the reference rotation, clip and params;
// without tables, or with all-zero weights, it is byte for byte today's RTN record. The GPU kernel
// (tests/gpu/test_kv_write_ef_gpu.cpp) is checked against this reference bit for bit.
#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <vector>

#include "formats/dtype.h"
#include "formats/error.h"
#include "formats/kv_layout.h"
#include "kernels/kv_quantize/kv_quantize_ref.h"
#include "kv_cache_test_util.h"
#include "kv_write_ef_util.h"
#include "kv_write_stress.h"
#include "lib/calib/error_feedback.h"
#include "lib/calib/quantizer_ref.h"

namespace oscar {
namespace {

struct EfCase {
  int d = 128, heads = 3, tokens = 40;
  const float* rot = nullptr;
  float ratio = 1.0f;
  const test::EfTables* tables = nullptr;
  bool clip_feedback = false;
  const fmt::SegmentedPageGeometry* geometry = nullptr;  // set: KvWriteMode::Segmented into these pages
};

std::vector<uint8_t> ef_pool(const EfCase& c, const std::vector<uint16_t>& x) {
  const fmt::Int2PageGeometry geo{c.d, 64};
  const int pages = (c.tokens + 63) / 64;
  std::vector<uint8_t> pool(static_cast<size_t>(pages) * c.heads * geo.page_bytes(), 0xab);
  std::vector<int32_t> slots(static_cast<size_t>(c.tokens));
  for (int t = 0; t < c.tokens; ++t) slots[static_cast<size_t>(t)] = t;
  kern::KvWriteParams p;
  p.x = x.data();
  p.tokens = c.tokens;
  p.token_stride = static_cast<int64_t>(c.heads) * c.d;
  p.num_kv_heads = c.heads;
  p.head_dim = c.d;
  p.page_tokens = 64;
  p.rotation = c.rot;
  p.clip_ratio = c.ratio;
  p.slots = slots.data();
  p.int2_pool = pool.data();
  if (c.tables) {
    p.ef_order = c.tables->order.data();
    p.ef_weights = c.tables->weights.data();
    p.ef_clip_feedback = c.clip_feedback;
  }
  p.geometry = c.geometry;
  const kern::KvWriteMode mode = c.geometry ? kern::KvWriteMode::Segmented : kern::KvWriteMode::Int2;
  EXPECT_EQ(kern::kv_write_can_implement(p, mode), kern::Status::Ok);
  kern::kv_write_ref(p, mode);
  return pool;
}

// Unpacked codes + params of token t, head h.
void record_at(const std::vector<uint8_t>& pool, int t, int h, int heads, int d, std::vector<uint8_t>& codes,
               uint16_t& scale, uint16_t& zero) {
  const fmt::Int2PageGeometry geo{d, 64};
  const uint8_t* block = pool.data() + fmt::page_block_offset(t / 64, h, heads, geo.page_bytes());
  codes.resize(static_cast<size_t>(d));
  calib::unpack_codes(std::span<const uint8_t>(block + (t % 64) * geo.code_row_bytes(), geo.code_row_bytes()), 2,
                      codes);
  std::memcpy(&scale, block + geo.params_offset() + (t % 64) * 4, 2);
  std::memcpy(&zero, block + geo.params_offset() + (t % 64) * 4 + 2, 2);
}

std::vector<float> head_vector(const std::vector<uint16_t>& x, int t, int h, int heads, int d) {
  std::vector<float> v(static_cast<size_t>(d));
  for (int i = 0; i < d; ++i) v[static_cast<size_t>(i)] = fmt::bf16_to_f32(x[(static_cast<size_t>(t) * heads + h) * d + i]);
  return v;
}

TEST(KvWriteRefEf, NoTablesIsQuantizeInt2ByteForByte) {
  const int d = 128, heads = 2, tokens = 70;  // two pages
  const auto rot = test::random_rotation(d, 3);
  const auto x = test::random_bf16(static_cast<size_t>(tokens) * heads * d, d, 4);
  const auto pool = ef_pool({d, heads, tokens, rot.data(), 0.96f, nullptr, false}, x);
  std::vector<uint8_t> got, want(static_cast<size_t>(d / 4)), want_codes(static_cast<size_t>(d));
  for (int t = 0; t < tokens; ++t)
    for (int h = 0; h < heads; ++h) {
      uint16_t scale, zero;
      record_at(pool, t, h, heads, d, got, scale, zero);
      calib::IntParams p;
      calib::quantize_int2(head_vector(x, t, h, heads, d), rot, 0.96f, want, p);
      calib::unpack_codes(want, 2, want_codes);
      ASSERT_EQ(got, want_codes) << "t " << t << " h " << h;
      ASSERT_EQ(scale, p.scale_f16);
      ASSERT_EQ(zero, p.zero_f16);
    }
}

// All-zero weights feed nothing back, whatever the order: the pool is the RTN pool byte for byte (stress vectors
// included). clip_feedback only with no clipping (then both targets are the same vector).
TEST(KvWriteRefEf, ZeroWeightsReproduceRtnBytes) {
  int compared = 0;
  for (int d : {64, 128, 256}) {
    const int heads = 2, tokens = test::kStressPatterns * 2;
    const auto rot = test::random_rotation(d, 10 + d);
    const auto tables = test::zero_ef_tables(d, heads, 11 + d);
    std::vector<uint16_t> x(static_cast<size_t>(tokens) * heads * d);
    std::mt19937 rng(static_cast<uint32_t>(d));
    for (int v = 0; v < tokens * heads; ++v)
      test::fill_stress_vector(v % test::kStressPatterns, d, rng, true, x.data() + static_cast<size_t>(v) * d);
    for (float ratio : {1.0f, 0.96f, 0.5f})
      for (bool feedback : {false, true}) {
        if (feedback && ratio != 1.0f) continue;
        const auto rtn = ef_pool({d, heads, tokens, rot.data(), ratio, nullptr, false}, x);
        const auto ef = ef_pool({d, heads, tokens, rot.data(), ratio, &tables, feedback}, x);
        ASSERT_EQ(ef, rtn) << "d " << d << " ratio " << ratio << " feedback " << feedback;
        ++compared;
      }
  }
  EXPECT_EQ(compared, 3 * 4);
}

// Real tables (calib::error_feedback_table of a correlated metric): every record equals calib's stored rounding,
// and the rounding does what it is for: a lower metric error eᵀ M e than RTN, with different codes.
TEST(KvWriteRefEf, RandomTablesMatchCalibStoredRoundingAndLowerTheMetricError) {
  for (int d : {64, 128}) {
    const int heads = 2, tokens = 48;
    const auto rot = test::random_rotation(d, 20 + d);
    const auto tables = test::random_ef_tables(d, heads, 21 + d);
    const auto x = test::random_bf16(static_cast<size_t>(tokens) * heads * d, d, 22 + d);
    for (float ratio : {1.0f, 0.92f})
      for (bool feedback : {false, true}) {
        const auto pool = ef_pool({d, heads, tokens, rot.data(), ratio, &tables, feedback}, x);
        const auto rtn = ef_pool({d, heads, tokens, rot.data(), ratio, nullptr, false}, x);
        double err_ef = 0, err_rtn = 0;
        int differing = 0;
        for (int h = 0; h < heads; ++h) {
          const auto metric = test::random_metric(d, 21 + d + 977u * h);
          const std::span<const int32_t> order(tables.order.data() + static_cast<size_t>(h) * d, static_cast<size_t>(d));
          const std::span<const float> weights(tables.weights.data() + static_cast<size_t>(h) * d * d,
                                               static_cast<size_t>(d) * d);
          for (int t = 0; t < tokens; ++t) {
            std::vector<float> y(static_cast<size_t>(d));
            calib::rotate(head_vector(x, t, h, heads, d), rot, y);
            std::vector<uint8_t> want(static_cast<size_t>(d)), got, base;
            const calib::IntParams p = calib::error_feedback_codes_stored(y, ratio, 2, order, weights, feedback, want);
            uint16_t scale, zero, rscale, rzero;
            record_at(pool, t, h, heads, d, got, scale, zero);
            record_at(rtn, t, h, heads, d, base, rscale, rzero);
            ASSERT_EQ(got, want) << "d " << d << " ratio " << ratio << " feedback " << feedback << " t " << t;
            ASSERT_EQ(scale, p.scale_f16);
            ASSERT_EQ(zero, p.zero_f16);
            ASSERT_EQ(scale, rscale);  // the params are RTN's: only the codes change
            ASSERT_EQ(zero, rzero);
            differing += got != base;
            // Error against the clipped target (the storage's), in the metric.
            std::vector<float> yc = y;
            calib::clip_in_place(yc, ratio);
            std::vector<double> e_ef(static_cast<size_t>(d)), e_rtn(static_cast<size_t>(d));
            for (int i = 0; i < d; ++i) {
              e_ef[static_cast<size_t>(i)] = yc[static_cast<size_t>(i)] - calib::int_dequant(got[static_cast<size_t>(i)], p);
              e_rtn[static_cast<size_t>(i)] = yc[static_cast<size_t>(i)] - calib::int_dequant(base[static_cast<size_t>(i)], p);
            }
            for (int i = 0; i < d; ++i)
              for (int j = 0; j < d; ++j) {
                const double m = metric[static_cast<size_t>(i) * d + j];
                err_ef += e_ef[static_cast<size_t>(i)] * m * e_ef[static_cast<size_t>(j)];
                err_rtn += e_rtn[static_cast<size_t>(i)] * m * e_rtn[static_cast<size_t>(j)];
              }
          }
        }
        EXPECT_GT(differing, tokens * heads / 2) << "d " << d;
        // Without clip feedback the target is the clipped vector itself, so the metric error must drop clearly.
        if (!feedback) {
          EXPECT_LT(err_ef, 0.8 * err_rtn) << "d " << d << " ratio " << ratio;
        }
        RecordProperty("err_ratio_d" + std::to_string(d) + "_r" + std::to_string(ratio) + (feedback ? "_fb" : ""),
                       std::to_string(err_ef / err_rtn));
      }
  }
}

TEST(KvWriteRefEf, CanImplementRejectsTablesItCannotUse) {
  const int d = 64;
  const auto tables = test::zero_ef_tables(d, 1, 1);
  std::vector<uint16_t> x(static_cast<size_t>(d));
  std::vector<int32_t> slots{0};
  alignas(16) static uint8_t pool[4096];
  kern::KvWriteParams p;
  p.x = x.data();
  p.tokens = 1;
  p.token_stride = d;
  p.num_kv_heads = 1;
  p.head_dim = d;
  p.slots = slots.data();
  p.int2_pool = pool;
  p.ef_order = tables.order.data();
  p.ef_weights = tables.weights.data();
  EXPECT_EQ(kern::kv_write_can_implement(p, kern::KvWriteMode::Int2), kern::Status::Ok);
  EXPECT_EQ(kern::kv_write_can_implement(p, kern::KvWriteMode::Segmented), kern::Status::Unsupported);
  p.int2_pool = nullptr;
  p.bf16_pool = reinterpret_cast<uint16_t*>(pool);
  EXPECT_EQ(kern::kv_write_can_implement(p, kern::KvWriteMode::Bf16), kern::Status::Unsupported);
  p.bf16_pool = nullptr;
  p.int2_pool = pool;
  p.ef_weights = nullptr;
  EXPECT_EQ(kern::kv_write_can_implement(p, kern::KvWriteMode::Int2), kern::Status::InvalidArgument);
  p.ef_weights = tables.weights.data() + 1;  // 4-byte aligned only
  EXPECT_EQ(kern::kv_write_can_implement(p, kern::KvWriteMode::Int2), kern::Status::Misaligned);
  // A table that is not a permutation: the reference names the problem (the kernel cannot check it).
  auto bad = tables;
  bad.order[3] = d;
  p.ef_order = bad.order.data();
  p.ef_weights = bad.weights.data();
  EXPECT_THROW(kern::kv_write_ref(p, kern::KvWriteMode::Int2), Error);
}

}  // namespace
}  // namespace oscar

namespace oscar {
namespace {

// rt::Engine writes a whole-head INT2 tensor of a segmented format (some other layer or tensor has a spectral
// layout) with the INT2 writer, tables and all, into that tensor's segmented pages. That is only right when a
// one-segment 2-bit page is byte for byte an INT2 page: the segmented reference writer and the INT2 one must fill
// the same bytes (page size, code rows, params) for every token, clip and rotation.
TEST(KvWriteRefEf, WholeHeadInt2SegmentedPagesAreInt2Pages) {
  for (int d : {64, 128, 256}) {
    const int heads = 3, tokens = 100;  // two pages, the second partly filled
    const auto rot = test::random_rotation(d, 30 + d);
    const auto x = test::random_bf16(static_cast<size_t>(tokens) * heads * d, d, 31 + d);
    const fmt::SegmentedPageGeometry seg = fmt::segmented_page_geometry({{0, d, 2}}, d, 64);
    ASSERT_EQ(seg.page_bytes(), (fmt::Int2PageGeometry{d, 64}.page_bytes())) << d;
    for (float ratio : {1.0f, 0.92f}) {
      const std::vector<uint8_t> int2 = ef_pool({d, heads, tokens, rot.data(), ratio, nullptr, false}, x);
      const std::vector<uint8_t> pool = ef_pool({d, heads, tokens, rot.data(), ratio, nullptr, false, &seg}, x);
      EXPECT_EQ(pool, int2) << "d " << d << " clip " << ratio;
    }
  }
}

}  // namespace
}  // namespace oscar
