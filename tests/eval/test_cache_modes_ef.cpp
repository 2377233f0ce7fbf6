// The oscar mode with a bundle 1.2's error-feedback tables: the codes come from calib::error_feedback_codes_stored
// (the rounding every cache writer runs), a table without feedback is RTN bit for bit, real tables lower the
// error in the metric they were built for, and per-layer clip overrides (`oscar eval --oscar-clip`) still apply.
#include <gtest/gtest.h>

#include <cstdio>
#include <random>

#include "lib/calib/error_feedback.h"
#include "lib/calib/quantizer_ref.h"
#include "lib/calib/rotation.h"
#include "lib/eval/cache_modes.h"
#include "eval_test_config.h"

namespace oscar::eval {
namespace {

constexpr int64_t kD = 32, kTokens = 200;

fmt::ModelConfig config() { return test::small_config(kD); }

fmt::Bundle hadamard_bundle(const fmt::ModelConfig& cfg) {
  fmt::Bundle b;
  b.model.num_layers = cfg.num_layers;
  b.model.num_heads = cfg.num_heads;
  b.model.num_kv_heads = cfg.num_kv_heads;
  b.model.head_dim = kD;
  b.quant = fmt::KvQuantSpec::int2_default(kD);
  const auto h = calib::hadamard(kD);
  b.layers.resize(static_cast<size_t>(cfg.num_layers));
  for (auto& l : b.layers) {
    l.k_rotation.assign(h.begin(), h.end());
    l.v_rotation = l.k_rotation;
    l.k_clip_ratio = 0.96f;
    l.v_clip_ratio = 0.92f;
  }
  return b;
}

// A metric with strong off-diagonal structure in the original basis: M = A Aᵀ with A rank-4 + small identity.
std::vector<double> metric(uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> n(0.0, 1.0);
  std::vector<double> a(kD * 4), m(kD * kD, 0.0);
  for (auto& x : a) x = n(rng);
  for (int64_t i = 0; i < kD; ++i) {
    for (int64_t j = 0; j < kD; ++j)
      for (int64_t k = 0; k < 4; ++k) m[i * kD + j] += a[i * 4 + k] * a[j * 4 + k];
    m[i * kD + i] += 0.05;
  }
  return m;
}

double weighted_error(const std::vector<float>& x, const std::vector<float>& xq, const std::vector<double>& m) {
  double s = 0;
  for (int64_t t = 0; t < kTokens; ++t)
    for (int64_t i = 0; i < kD; ++i)
      for (int64_t j = 0; j < kD; ++j)
        s += (double(x[t * kD + i]) - xq[t * kD + i]) * m[i * kD + j] * (double(x[t * kD + j]) - xq[t * kD + j]);
  return s;
}

std::vector<float> tokens(uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<float> x(kTokens * kD);
  for (float& v : x) v = normal(rng);
  for (int64_t t = 0; t < kTokens; ++t) x[t * kD + 3] *= 6.f;  // an outlier channel, as real keys have
  return x;
}

TEST(CacheModesErrorFeedback, TableWithoutFeedbackIsRtnBitForBit) {
  const auto cfg = config();
  fmt::Bundle plain = hadamard_bundle(cfg), zero = plain;
  zero.ef_clip_feedback = false;  // target = the clipped vector, RTN's
  for (auto& l : zero.layers)
    for (auto* o : {&l.k_ef_order, &l.v_ef_order}) {
      o->resize(cfg.num_kv_heads * kD);
      for (size_t i = 0; i < o->size(); ++i) (*o)[i] = static_cast<int32_t>(i % kD);
    }
  for (auto& l : zero.layers) l.k_ef_weights.assign(cfg.num_kv_heads * kD * kD, 0.f), l.v_ef_weights = l.k_ef_weights;
  ModeOptions po, zo;
  po.bundle = &plain;
  zo.bundle = &zero;
  const auto a = CacheFormat::create(CacheMode::Oscar, cfg, po), b = CacheFormat::create(CacheMode::Oscar, cfg, zo);
  const auto x = tokens(1);
  std::vector<float> ra(x.size()), rb(x.size());
  for (int64_t layer = 0; layer < 2; ++layer)
    for (int64_t h = 0; h < 2; ++h) {
      a->fake_quantize_keys(layer, h, x, kTokens, ra);
      b->fake_quantize_keys(layer, h, x, kTokens, rb);
      ASSERT_EQ(ra, rb) << layer << " " << h;
      a->fake_quantize_values(layer, h, x, kTokens, ra);
      b->fake_quantize_values(layer, h, x, kTokens, rb);
      ASSERT_EQ(ra, rb) << layer << " " << h;
    }
  EXPECT_EQ(a->element_cost().key_bits, b->element_cost().key_bits);
}

TEST(CacheModesErrorFeedback, StoredTablesAreUsedAndLowerTheirMetricsError) {
  const auto cfg = config();
  fmt::Bundle plain = hadamard_bundle(cfg), ef = plain;
  ef.ef_clip_feedback = true;
  std::vector<std::vector<double>> mk(2);  // per KV head, layer 1 keys
  for (int64_t h = 0; h < 2; ++h) {
    mk[h] = metric(100 + h);
    const std::vector<double> r(ef.layers[1].k_rotation.begin(), ef.layers[1].k_rotation.end());
    const auto t = calib::error_feedback_table(calib::metric_in_basis(mk[h], r, kD), kD, {0.1, true, true}, "t");
    std::vector<int32_t> order(kD);
    std::vector<float> w(kD * kD);
    calib::stored_error_feedback(t, order, w);
    ef.layers[1].k_ef_order.insert(ef.layers[1].k_ef_order.end(), order.begin(), order.end());
    ef.layers[1].k_ef_weights.insert(ef.layers[1].k_ef_weights.end(), w.begin(), w.end());
  }
  ModeOptions po, eo;
  po.bundle = &plain;
  eo.bundle = &ef;
  const auto rtn = CacheFormat::create(CacheMode::Oscar, cfg, po);
  const auto fb = CacheFormat::create(CacheMode::Oscar, cfg, eo);
  const auto x = tokens(2);
  std::vector<float> r(x.size()), e(x.size());
  for (int64_t h = 0; h < 2; ++h) {
    // Bit-exact against the stored rounding run by hand.
    fb->fake_quantize_keys(1, h, x, kTokens, e);
    const auto& lc = ef.layers[1];
    std::vector<float> y(kD), deq(kD), back(kD);
    std::vector<uint8_t> codes(kD);
    for (int64_t t = 0; t < kTokens; ++t) {
      calib::rotate(std::span<const float>(x).subspan(t * kD, kD), lc.k_rotation, y);
      const auto p = calib::error_feedback_codes_stored(
          y, 0.96f, 2, std::span<const int32_t>(lc.k_ef_order).subspan(h * kD, kD),
          std::span<const float>(lc.k_ef_weights).subspan(h * kD * kD, kD * kD), true, codes);
      for (int64_t i = 0; i < kD; ++i) deq[i] = calib::int_dequant(codes[i], p);
      calib::unrotate(deq, lc.k_rotation, back);
      for (int64_t i = 0; i < kD; ++i) ASSERT_EQ(e[t * kD + i], back[i]) << h << " " << t << " " << i;
    }
    rtn->fake_quantize_keys(1, h, x, kTokens, r);
    const double er = weighted_error(x, r, mk[h]), ee = weighted_error(x, e, mk[h]);
    // RTN ignores M's directions; feedback pushes the error out of them (rank-4 M + 0.05 I: measured 0.05x).
    std::printf("KV head %lld: error in M, EF / RTN = %.3f\n", static_cast<long long>(h), ee / er);
    EXPECT_LT(ee, 0.2 * er) << "head " << h << ": EF " << ee << " vs RTN " << er;
    // Values and layer 0 have no table: RTN exactly.
    fb->fake_quantize_values(1, h, x, kTokens, e);
    rtn->fake_quantize_values(1, h, x, kTokens, r);
    ASSERT_EQ(e, r);
    fb->fake_quantize_keys(0, h, x, kTokens, e);
    rtn->fake_quantize_keys(0, h, x, kTokens, r);
    ASSERT_EQ(e, r);
  }
  // A clip override (what --oscar-clip writes into the bundle) reaches the EF path.
  fmt::Bundle tight = ef;
  tight.layers[1].k_clip_ratio = 0.75f;
  ModeOptions to;
  to.bundle = &tight;
  const auto clipped = CacheFormat::create(CacheMode::Oscar, cfg, to);
  clipped->fake_quantize_keys(1, 0, x, kTokens, r);
  fb->fake_quantize_keys(1, 0, x, kTokens, e);
  EXPECT_NE(r, e);
  std::vector<float> y(kD);
  std::vector<uint8_t> codes(kD);
  calib::rotate(std::span<const float>(x).first(kD), tight.layers[1].k_rotation, y);
  const auto p = calib::error_feedback_codes_stored(y, 0.75f, 2, std::span<const int32_t>(tight.layers[1].k_ef_order).first(kD),
                                                    std::span<const float>(tight.layers[1].k_ef_weights).first(kD * kD),
                                                    true, codes);
  std::vector<float> deq(kD), back(kD);
  for (int64_t i = 0; i < kD; ++i) deq[i] = calib::int_dequant(codes[i], p);
  calib::unrotate(deq, tight.layers[1].k_rotation, back);
  for (int64_t i = 0; i < kD; ++i) EXPECT_EQ(r[i], back[i]) << i;
}

}  // namespace
}  // namespace oscar::eval
