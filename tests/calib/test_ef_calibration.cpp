// lib/calib/ef_calibration.h: the value metric M_V = Σ_g W_gᵀW_g against a plain triple loop, and the tables
// add_error_feedback_tables stores against the stored_error_feedback of the table built directly from Rᵀ M R.
#include <gtest/gtest.h>

#include <Eigen/Dense>

#include <random>

#include "formats/error.h"
#include "lib/calib/ef_calibration.h"
#include "lib/calib/error_feedback.h"
#include "lib/calib/rotation.h"

namespace oscar::calib {
namespace {

std::vector<double> random_spd(int64_t d, std::mt19937& rng) {
  std::normal_distribution<double> n(0.0, 1.0);
  std::vector<double> a(d * d), m(d * d, 0.0);
  for (auto& x : a) x = n(rng);
  for (int64_t i = 0; i < d; ++i)
    for (int64_t j = 0; j < d; ++j)
      for (int64_t k = 0; k < d; ++k) m[i * d + j] += a[i * d + k] * a[j * d + k];
  return m;
}

TEST(EfCalibration, ValueMetricIsSumOfGroupOProjGram) {
  const int64_t hidden = 12, heads = 4, kv = 2, d = 4;
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  std::vector<float> w(hidden * heads * d);
  for (auto& x : w) x = u(rng);
  const std::vector<double> m = value_output_metric(w, hidden, heads, kv, d, "o_proj");
  ASSERT_EQ(m.size(), static_cast<size_t>(kv * d * d));
  for (int64_t h = 0; h < kv; ++h)
    for (int64_t i = 0; i < d; ++i)
      for (int64_t j = 0; j < d; ++j) {
        double want = 0;
        for (int64_t g = h * 2; g < h * 2 + 2; ++g)
          for (int64_t r = 0; r < hidden; ++r)
            want += double(w[r * heads * d + g * d + i]) * double(w[r * heads * d + g * d + j]);
        EXPECT_NEAR(m[(h * d + i) * d + j], want, 1e-9 * (1 + std::abs(want))) << h << " " << i << " " << j;
      }
  EXPECT_THROW(value_output_metric(std::span<const float>(w).first(w.size() - 1), hidden, heads, kv, d, "o_proj"),
               Error);
  EXPECT_THROW(value_output_metric(w, hidden, heads, 3, d, "o_proj"), Error);
}

TEST(EfCalibration, ModeNames) {
  EXPECT_EQ(parse_error_feedback_mode("kv", "--error-feedback"), ErrorFeedbackMode::KV);
  EXPECT_EQ(parse_error_feedback_mode("k", "--error-feedback"), ErrorFeedbackMode::K);
  EXPECT_EQ(parse_error_feedback_mode("off", "--error-feedback"), ErrorFeedbackMode::Off);
  try {
    parse_error_feedback_mode("on", "--error-feedback");
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.where(), "--error-feedback");
  }
}

fmt::Bundle bundle_for(int64_t d, int64_t kv, int64_t groups, int64_t layers) {
  fmt::Bundle b;
  b.model = {"Qwen3ForCausalLM", layers, 2 * kv, kv, d, 64, 512, std::string(64, 'a'), std::string(64, 'b')};
  b.quant = fmt::KvQuantSpec::int2_default(d);
  b.rotation_groups = groups;
  std::mt19937 rng(7);
  for (int64_t l = 0; l < layers; ++l) {
    fmt::LayerCalibration layer;
    for (int64_t g = 0; g < groups; ++g) {
      // An orthogonal rotation that is not the identity (eigenvectors of a random SPD matrix).
      const SymmetricEigen e = symmetric_eigen(random_spd(d, rng), d, "test");
      layer.k_rotation.insert(layer.k_rotation.end(), e.vectors.begin(), e.vectors.end());
      const auto h = hadamard(d);
      layer.v_rotation.insert(layer.v_rotation.end(), h.begin(), h.end());
    }
    layer.k_eigenvalues.assign(groups * d, 1.0);
    layer.v_eigenvalues.assign(groups * d, 1.0);
    layer.k_clip_ratio = 0.96f;
    layer.v_clip_ratio = 0.92f;
    b.layers.push_back(std::move(layer));
  }
  b.errors.num_layers = layers;
  return b;
}

TEST(EfCalibration, TablesAreTheStoredFormOfRtMR) {
  const int64_t d = 8, kv = 2, L = 3;
  std::mt19937 rng(11);
  std::vector<std::vector<double>> km(L), vm(L);
  for (int64_t l = 0; l < L; ++l)
    for (int64_t h = 0; h < kv; ++h) {
      const auto a = random_spd(d, rng), b = random_spd(d, rng);
      km[l].insert(km[l].end(), a.begin(), a.end());
      vm[l].insert(vm[l].end(), b.begin(), b.end());
    }
  for (int64_t groups : {int64_t{1}, kv}) {
    fmt::Bundle b = bundle_for(d, kv, groups, L);
    b.layers[2].k_segments = {{0, 4, 3}, {4, 8, 1}};  // segmented keys keep RTN
    ErrorFeedbackCalibration opt;
    opt.mode = ErrorFeedbackMode::KV;
    opt.damp = 0.1;
    opt.clip_feedback = false;
    opt.value_metrics = vm;
    fmt::Bundle again = b;
    EXPECT_EQ(add_error_feedback_tables(b, km, opt), 2 * L - 1);
    EXPECT_FALSE(b.ef_clip_feedback);
    EXPECT_TRUE(b.layers[2].k_ef_order.empty());
    EXPECT_FALSE(b.layers[2].v_ef_order.empty());
    fmt::validate_bundle(b, "ef bundle");
    for (int64_t l = 0; l < 2; ++l)
      for (int64_t h = 0; h < kv; ++h) {
        const int64_t g = groups == 1 ? 0 : h;
        const auto& lc = b.layers[l];
        const std::vector<double> r(lc.k_rotation.begin() + g * d * d, lc.k_rotation.begin() + (g + 1) * d * d);
        const ErrorFeedbackTable t = error_feedback_table(
            metric_in_basis(std::span<const double>(km[l]).subspan(h * d * d, d * d), r, d), d, {0.1, true, false}, "t");
        std::vector<int32_t> order(d);
        std::vector<float> w(d * d);
        stored_error_feedback(t, order, w);
        EXPECT_EQ(std::vector<int32_t>(lc.k_ef_order.begin() + h * d, lc.k_ef_order.begin() + (h + 1) * d), order);
        EXPECT_EQ(std::vector<float>(lc.k_ef_weights.begin() + h * d * d, lc.k_ef_weights.begin() + (h + 1) * d * d), w);
        // A non-identity rotation of a non-diagonal metric: real feedback weights.
        double off = 0;
        for (float x : w) off += std::abs(x);
        EXPECT_GT(off, 0.1);
      }
    // Deterministic: same inputs, same tables.
    EXPECT_EQ(add_error_feedback_tables(again, km, opt), 2 * L - 1);
    EXPECT_EQ(again.layers, b.layers);
    // Keys only.
    fmt::Bundle konly = bundle_for(d, kv, groups, L);
    opt.mode = ErrorFeedbackMode::K;
    EXPECT_EQ(add_error_feedback_tables(konly, km, opt), L);
    for (const auto& l : konly.layers) EXPECT_TRUE(l.v_ef_order.empty());
    // Off adds nothing.
    fmt::Bundle off = bundle_for(d, kv, groups, L);
    opt.mode = ErrorFeedbackMode::Off;
    EXPECT_EQ(add_error_feedback_tables(off, km, opt), 0);
    EXPECT_FALSE(fmt::has_error_feedback(off));
  }
  // Metrics of the wrong shape are an error naming the flag.
  fmt::Bundle b = bundle_for(d, kv, 1, L);
  ErrorFeedbackCalibration opt;
  opt.mode = ErrorFeedbackMode::KV;
  try {
    add_error_feedback_tables(b, km, opt);  // no value metrics
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.where(), "--error-feedback");
  }
}

}  // namespace
}  // namespace oscar::calib

namespace oscar::calib {
namespace {

// error_feedback_heldout_error scores RTN and the tables on held-out samples in the tables' metrics: all-zero
// weights are RTN exactly; tables built from the samples' own Σ_Q lower the key error; V uses M_V and the weights.
TEST(EfCalibration, HeldoutErrorIsRtnForZeroTablesAndLowerForRealOnes) {
  const int64_t d = 8, kv = 2, L = 2, n = 200;
  std::mt19937 rng(21);
  std::normal_distribution<float> nf(0.f, 1.f);
  std::vector<HeldoutLayer> heldout(L);
  std::vector<std::vector<double>> km(L), vm(L);
  for (int64_t l = 0; l < L; ++l) {
    HeldoutLayer& h = heldout[l];
    h.num_kv_heads = kv;
    h.head_dim = d;
    h.tokens = n;
    h.k.resize(kv * n * d);
    h.v.resize(kv * n * d);
    for (auto& x : h.k) x = nf(rng);
    for (auto& x : h.v) x = nf(rng);
    h.value_weight.assign(kv * n, 1.0);
    for (int64_t i = 0; i < kv * n; i += 3) h.value_weight[i] = 2.5;
    for (int64_t g = 0; g < kv; ++g) {
      const auto a = random_spd(d, rng), b = random_spd(d, rng);
      h.sigma_q.insert(h.sigma_q.end(), a.begin(), a.end());
      vm[l].insert(vm[l].end(), b.begin(), b.end());
    }
    km[l] = h.sigma_q;
  }
  fmt::Bundle b = bundle_for(d, kv, 1, L);
  ErrorFeedbackCalibration opt;
  opt.mode = ErrorFeedbackMode::KV;
  opt.value_metrics = vm;
  ASSERT_EQ(add_error_feedback_tables(b, km, opt), 2 * L);
  const ErrorFeedbackHeldout real = error_feedback_heldout_error(b, heldout, vm);
  EXPECT_EQ(real.k_layers, L);
  EXPECT_EQ(real.v_layers, L);
  EXPECT_GT(real.k_rtn, 0.0);
  EXPECT_LT(real.k_ef, 0.9 * real.k_rtn);  // the metric the tables minimize
  EXPECT_LT(real.v_ef, real.v_rtn);
  fmt::Bundle zero = b;
  for (auto& layer : zero.layers) {
    std::fill(layer.k_ef_weights.begin(), layer.k_ef_weights.end(), 0.f);
    std::fill(layer.v_ef_weights.begin(), layer.v_ef_weights.end(), 0.f);
  }
  const ErrorFeedbackHeldout same = error_feedback_heldout_error(zero, heldout, vm);
  EXPECT_EQ(same.k_ef, same.k_rtn);
  EXPECT_EQ(same.v_ef, same.v_rtn);
  EXPECT_EQ(same.k_rtn, real.k_rtn);  // RTN does not depend on the tables
  // A tensor without a table is not scored; a held-out set of the wrong depth is an error.
  zero.layers[1].v_ef_order.clear();
  zero.layers[1].v_ef_weights.clear();
  EXPECT_EQ(error_feedback_heldout_error(zero, heldout, vm).v_layers, 1);
  EXPECT_THROW(error_feedback_heldout_error(b, std::vector<HeldoutLayer>(1), vm), Error);
}

}  // namespace
}  // namespace oscar::calib

namespace oscar::calib {
namespace {

// The post-RoPE second moment of queries P_t q̃ (q̃ with a fixed pre-RoPE moment S) over positions 0..T-1, summed
// position by position (transformers' rotate_half pairing): the reference key_metrics_for_context must reproduce.
std::vector<double> post_rope_average(const std::vector<double>& s, const std::vector<float>& inv_freq, int64_t d,
                                      int64_t positions) {
  const int64_t h = d / 2;
  std::vector<double> out(static_cast<size_t>(d * d), 0.0), p(static_cast<size_t>(d * d));
  for (int64_t t = 0; t < positions; ++t) {
    std::fill(p.begin(), p.end(), 0.0);
    for (int64_t a = 0; a < h; ++a) {
      const double phi = static_cast<double>(inv_freq[static_cast<size_t>(a)]) * static_cast<double>(t);
      p[a * d + a] = std::cos(phi);
      p[a * d + a + h] = -std::sin(phi);
      p[(a + h) * d + a] = std::sin(phi);
      p[(a + h) * d + a + h] = std::cos(phi);
    }
    for (int64_t i = 0; i < d; ++i)
      for (int64_t j = 0; j < d; ++j) {
        double v = 0;
        for (int64_t k = 0; k < d; ++k)
          for (int64_t m = 0; m < d; ++m) v += p[i * d + k] * s[k * d + m] * p[j * d + m];
        out[static_cast<size_t>(i * d + j)] += v / static_cast<double>(positions);
      }
  }
  return out;
}

// With slow frequencies every part of the metric survives the calibration average, so carrying it from 16 to 64
// positions (and back) must give the 64-position average itself; with a fast pair the parts the 16-position average
// erased are zeroed, and what the 64-position average keeps of them is small (≤ ~T/(πT')).
TEST(EfCalibration, KeyMetricForContextMatchesThePositionAverage) {
  const int64_t d = 8;
  std::mt19937 rng(3);
  const std::vector<double> s = random_spd(d, rng);
  std::vector<float> slow = {0.05f, 0.02f, 0.01f, 0.004f};
  const auto at16 = post_rope_average(s, slow, d, 16), at64 = post_rope_average(s, slow, d, 64);
  double scale = 0;
  for (int64_t i = 0; i < d; ++i) scale = std::max(scale, std::abs(at64[i * d + i]));
  // Two KV heads, the second a scaled copy: heads are carried independently.
  std::vector<double> two(at16);
  for (double v : at16) two.push_back(2.0 * v);
  const auto carried = key_metrics_for_context({two}, slow, d, 16, 64);
  ASSERT_EQ(carried.size(), 1u);
  ASSERT_EQ(carried[0].size(), two.size());
  for (int64_t i = 0; i < d * d; ++i) {
    EXPECT_NEAR(carried[0][i], at64[i], 1e-9 * scale) << "entry " << i;
    EXPECT_NEAR(carried[0][d * d + i], 2.0 * at64[i], 2e-9 * scale) << "head 1 entry " << i;
  }
  // Back to fewer positions: only where the longer average kept every part (slower still: ωT < 2.6 at 64).
  std::vector<float> slower = {0.02f, 0.01f, 0.005f, 0.002f};
  const auto s16 = post_rope_average(s, slower, d, 16), s64 = post_rope_average(s, slower, d, 64);
  const auto back = key_metrics_for_context({s64}, slower, d, 64, 16);
  for (int64_t i = 0; i < d * d; ++i) EXPECT_NEAR(back[0][i], s16[i], 1e-9 * scale) << "entry " << i;
  EXPECT_EQ(key_metrics_for_context({at16}, slow, d, 16, 16)[0], at16);  // same context: unchanged

  std::vector<float> mixed = {1.0f, 0.02f, 0.01f, 0.004f};  // pair 0 turns a radian per position
  const auto m16 = post_rope_average(s, mixed, d, 16), m64 = post_rope_average(s, mixed, d, 64);
  const auto got = key_metrics_for_context({m16}, mixed, d, 16, 64)[0];
  double worst = 0;
  for (int64_t i = 0; i < d * d; ++i) worst = std::max(worst, std::abs(got[i] - m64[i]));
  EXPECT_LT(worst, (16.0 / (3.14159 * 64.0)) * scale);
  for (int64_t i = 0; i < d; ++i) EXPECT_GT(got[i * d + i], 0.0);  // the trace part of every pair is kept

  // A metric that is no position average at all (a random SPD matrix), carried to fewer positions with a fast
  // pair: the result stays positive semi-definite (negative eigenvalues are clipped), as the table needs.
  const auto shorter = key_metrics_for_context({s}, mixed, d, 64, 8)[0];
  const Eigen::Map<const Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>> sh(shorter.data(), d, d);
  EXPECT_GE(Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd>(sh).eigenvalues().minCoeff(), -1e-9 * scale);
  EXPECT_THROW(key_metrics_for_context({m16}, std::vector<float>(3, 0.1f), d, 16, 64), Error);
  EXPECT_THROW(key_metrics_for_context({std::vector<double>(d * d - 1, 0.0)}, mixed, d, 16, 64), Error);
  EXPECT_THROW(key_metrics_for_context({m16}, mixed, d, 0, 64), Error);
}

}  // namespace
}  // namespace oscar::calib
