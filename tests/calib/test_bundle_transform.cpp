// Bundle format 2.0: per-KV-head storage transforms (fmt::LayerCalibration::k_transform / _inverse / k_mean,
// v_transform / _inverse). They round trip under major 2 while a bundle without them keeps its 1.x bytes; every
// damaged or inconsistent transform is an error naming the file and the object; calib::add_storage_transforms fits
// them from held-out samples (α = 0 gives the rotation itself, α > 0 evens out the covariance); the error-feedback
// tables are made in the transform's basis; and the CPU cache simulation (eval::CacheFormat, mode oscar) quantizes
// through the transform.
#include <gtest/gtest.h>
#include <hdf5.h>

#include <Eigen/Dense>

#include <cmath>
#include <fstream>
#include <iterator>
#include <random>

#include "formats/bundle.h"
#include "formats/error.h"
#include "formats/model_config.h"
#include "lib/calib/ef_calibration.h"
#include "lib/calib/error_feedback.h"
#include "lib/calib/kv_transform.h"
#include "lib/calib/rotation.h"
#include "lib/eval/cache_modes.h"
#include "test_support.h"

namespace oscar::calib {
namespace {

namespace fs = std::filesystem;
using RowMatD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

constexpr int64_t kD = 8, kLayers = 2, kKvHeads = 2, kTokens = 400;

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

fmt::Bundle base_bundle() {
  fmt::Bundle b;
  b.producer = "oscar test";
  b.model = {"Qwen3ForCausalLM", kLayers, 4, kKvHeads, kD, 64, 512, std::string(64, 'a'), std::string(64, 'b')};
  b.calibration.num_sequences = 2;
  b.calibration.seq_len = 16;
  b.quant = fmt::KvQuantSpec::int2_default(kD);
  b.rotation_composition = "hadamard";
  const auto h = hadamard(kD);
  for (int64_t l = 0; l < kLayers; ++l) {
    fmt::LayerCalibration layer;
    layer.k_rotation.assign(h.begin(), h.end());
    layer.v_rotation.assign(h.begin(), h.end());
    layer.k_eigenvalues.assign(kD, 1.0);
    layer.v_eigenvalues.assign(kD, 1.0);
    layer.k_clip_ratio = 0.96f;
    layer.v_clip_ratio = 0.92f;
    b.layers.push_back(std::move(layer));
  }
  b.errors.num_layers = kLayers;
  return b;
}

// Anisotropic held-out samples with a large key mean (post-RoPE keys have one in their low-frequency pairs):
// per KV head x = μ + z·S with S mixing coordinates at scales 8 .. 0.1.
std::vector<HeldoutLayer> anisotropic_heldout(uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> n(0.0, 1.0);
  std::uniform_real_distribution<double> u(0.2, 2.0);
  std::vector<HeldoutLayer> out;
  for (int64_t l = 0; l < kLayers; ++l) {
    HeldoutLayer hl;
    hl.num_kv_heads = kKvHeads;
    hl.head_dim = kD;
    hl.tokens = kTokens;
    hl.k.resize(kKvHeads * kTokens * kD);
    hl.v.resize(hl.k.size());
    hl.value_weight.resize(kKvHeads * kTokens);
    for (int64_t h = 0; h < kKvHeads; ++h) {
      RowMatD s(kD, kD);
      for (int64_t i = 0; i < kD; ++i)
        for (int64_t j = 0; j < kD; ++j) s(i, j) = n(rng) * 8.0 * std::pow(0.5, static_cast<double>(i));
      std::vector<double> mu(kD);
      for (auto& m : mu) m = 3.0 * n(rng);
      for (int64_t t = 0; t < kTokens; ++t) {
        Eigen::RowVectorXd z(kD);
        for (int64_t i = 0; i < kD; ++i) z(i) = n(rng);
        const Eigen::RowVectorXd x = z * s;
        for (int64_t i = 0; i < kD; ++i) {
          hl.k[(h * kTokens + t) * kD + i] = static_cast<float>(x(i) + mu[i]);
          hl.v[(h * kTokens + t) * kD + i] = static_cast<float>(0.5 * x(kD - 1 - i));
        }
        hl.value_weight[h * kTokens + t] = u(rng);
      }
    }
    hl.sigma_q.assign(kKvHeads * kD * kD, 0.0);
    for (int64_t h = 0; h < kKvHeads; ++h)
      for (int64_t i = 0; i < kD; ++i) hl.sigma_q[(h * kD + i) * kD + i] = 1.0 + static_cast<double>(i);
    out.push_back(std::move(hl));
  }
  return out;
}

fmt::Bundle transformed_bundle(double alpha = 0.25) {
  fmt::Bundle b = base_bundle();
  TransformCalibration opt;
  opt.enabled = true;
  opt.alpha = alpha;
  EXPECT_EQ(add_storage_transforms(b, anisotropic_heldout(7), opt), 2 * kLayers);
  return b;
}

void expect_error(const std::function<void()>& f, const std::string& where_part, const std::string& detail_part) {
  try {
    f();
    FAIL() << "no error (expected " << where_part << ": " << detail_part << ")";
  } catch (const Error& e) {
    EXPECT_NE(e.where().find(where_part), std::string::npos) << e.what();
    EXPECT_NE(e.detail().find(detail_part), std::string::npos) << e.what();
  }
}

TEST(BundleTransform, RoundTripIsFormat20AndWithoutTransformsStays1x) {
  const fs::path dir = test::temp_dir_for_test();
  const fmt::Bundle b = transformed_bundle();
  ASSERT_TRUE(fmt::has_storage_transform(b));
  EXPECT_EQ(fmt::required_format_major(b), 2);
  EXPECT_EQ(fmt::required_format_minor(b), 0);
  fmt::write_bundle(dir / "t.oscar", b);
  const fmt::Bundle r = fmt::read_bundle(dir / "t.oscar");
  EXPECT_EQ(r.format_major, 2);
  EXPECT_EQ(r.format_minor, 0);
  EXPECT_EQ(r.layers, b.layers);
  // Dropping the transforms gives the 1.1 file a bundle without them always had, byte for byte.
  fmt::Bundle plain = b;
  for (auto& l : plain.layers) {
    l.k_transform.clear(), l.k_transform_inverse.clear(), l.k_mean.clear();
    l.v_transform.clear(), l.v_transform_inverse.clear();
  }
  fmt::write_bundle(dir / "p.oscar", plain);
  fmt::write_bundle(dir / "base.oscar", base_bundle());
  EXPECT_EQ(slurp(dir / "p.oscar"), slurp(dir / "base.oscar"));
  EXPECT_EQ(fmt::read_bundle(dir / "p.oscar").format_major, 1);
  // A transform of one tensor only (values RTN in R's basis) is a valid 2.0 bundle too.
  fmt::Bundle k_only = b;
  for (auto& l : k_only.layers) l.v_transform.clear(), l.v_transform_inverse.clear();
  fmt::write_bundle(dir / "k.oscar", k_only);
  EXPECT_EQ(fmt::read_bundle(dir / "k.oscar").layers, k_only.layers);
}

TEST(BundleTransform, DamagedTransformsAreErrorsNamingTheObject) {
  const fs::path dir = test::temp_dir_for_test();
  const fs::path path = dir / "bad.oscar";
  {
    fmt::Bundle b = transformed_bundle();
    b.layers[1].k_transform_inverse[3] += 0.05f;  // no longer A⁻¹
    expect_error([&] { fmt::write_bundle(path, b); }, "/layers/00001/k_transform", "inverse");
    EXPECT_FALSE(fs::exists(path));
  }
  {
    fmt::Bundle b = transformed_bundle();
    b.layers[0].k_mean.clear();
    expect_error([&] { fmt::write_bundle(path, b); }, "/layers/00000/k_transform", "together");
  }
  {
    fmt::Bundle b = transformed_bundle();
    b.layers[0].v_transform_inverse.pop_back();
    expect_error([&] { fmt::write_bundle(path, b); }, "/layers/00000/v_transform", "must hold");
  }
  {
    fmt::Bundle b = transformed_bundle();
    b.layers[0].v_transform[5] = std::nanf("");
    expect_error([&] { fmt::write_bundle(path, b); }, "/layers/00000/v_transform", "non-finite");
  }
  {
    // A transform needs the whole-head INT2 tensor it was made for.
    fmt::Bundle b = transformed_bundle();
    b.layers[1].k_segments = {{0, 4, 3}, {4, static_cast<int32_t>(kD), 1}};
    expect_error([&] { fmt::write_bundle(path, b); }, "/layers/00001/k_transform", "whole-head INT2");
  }
  // Transform objects in a file that says 1.x: a 1.x reader would ignore them, so this reader refuses them.
  fmt::write_bundle(path, transformed_bundle());
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  const hid_t f = H5Fopen(path.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
  ASSERT_GE(f, 0);
  const hid_t a = H5Aopen(f, "format_major", H5P_DEFAULT);
  const int32_t one = 1;
  ASSERT_GE(H5Awrite(a, H5T_NATIVE_INT32, &one), 0);
  H5Aclose(a);
  H5Fclose(f);
  expect_error([&] { (void)fmt::read_bundle(path); }, path.string() + ":/layers/00000/k_transform", "format 1.0");
}

TEST(BundleTransform, FitAlphaZeroIsTheRotationAndPositiveAlphaEvensTheSpectrum) {
  const auto heldout = anisotropic_heldout(7);
  fmt::Bundle zero = base_bundle();
  TransformCalibration opt;
  opt.enabled = true;
  opt.alpha = 0.0;
  ASSERT_EQ(add_storage_transforms(zero, heldout, opt), 2 * kLayers);
  for (int64_t l = 0; l < kLayers; ++l) {
    const auto& lc = zero.layers[l];
    for (int64_t h = 0; h < kKvHeads; ++h) {
      // α = 0: A = R exactly, A⁻¹ = Rᵀ, μ_K the held-out keys' mean (fp32 of the fp64 mean).
      for (int64_t i = 0; i < kD * kD; ++i) {
        EXPECT_EQ(lc.k_transform[h * kD * kD + i], lc.k_rotation[i]);
        EXPECT_EQ(lc.v_transform[h * kD * kD + i], lc.v_rotation[i]);
        EXPECT_EQ(lc.k_transform_inverse[h * kD * kD + i], lc.k_rotation[(i % kD) * kD + i / kD]);
      }
      for (int64_t i = 0; i < kD; ++i) {
        double sum = 0;
        for (int64_t t = 0; t < kTokens; ++t) sum += heldout[l].k[(h * kTokens + t) * kD + i];
        EXPECT_EQ(lc.k_mean[h * kD + i], static_cast<float>(sum / kTokens));
      }
    }
  }
  // α = 0.5: the keys' covariance in y's basis is much closer to a multiple of I (each eigenvalue λ becomes
  // λ·(λ + ε)^(−1/2), so a spread of ~4e5 falls to ~6e3: the floor ε keeps the smallest ones from rising fully),
  // and the transformed keys are centered.
  const fmt::Bundle half = transformed_bundle(0.5);
  for (int64_t h = 0; h < kKvHeads; ++h) {
    const HeadTransform t = stored_transform(half.layers[0], true, h, kD, "test");
    MomentAccumulator raw(kD), white(kD);
    std::vector<float> xc(kD), y(kD);
    for (int64_t t_ = 0; t_ < kTokens; ++t_) {
      const float* x = heldout[0].k.data() + (h * kTokens + t_) * kD;
      raw.add(std::span<const float>(x, kD));
      for (int64_t i = 0; i < kD; ++i) xc[i] = x[i] - static_cast<float>(t.mean[i]);
      const std::vector<float> af(t.forward.begin(), t.forward.end());
      calib::rotate(xc, af, y);
      white.add(y);
    }
    const auto spread = [](const std::vector<double>& c) {
      const Eigen::SelfAdjointEigenSolver<RowMatD> es(Eigen::Map<const RowMatD>(c.data(), kD, kD));
      return es.eigenvalues().maxCoeff() / es.eigenvalues().minCoeff();
    };
    const double before = spread(raw.covariance(true)), after = spread(white.covariance(false));
    EXPECT_GT(before, 1e3) << "the synthetic keys should be strongly anisotropic";
    EXPECT_LT(after, before / 30.0) << "before " << before << " after " << after;
    for (double m : white.mean()) EXPECT_LT(std::abs(m), 1e-3);
  }
}

TEST(BundleTransform, TablesAreMadeInTheTransformBasisAndRetargetKeepsIt) {
  fmt::Bundle b = transformed_bundle();
  const auto heldout = anisotropic_heldout(7);
  std::vector<std::vector<double>> key_metrics;
  for (const auto& hl : heldout) key_metrics.push_back(hl.sigma_q);
  ErrorFeedbackCalibration ef;
  ef.mode = ErrorFeedbackMode::KV;
  ef.value_metrics = key_metrics;
  ASSERT_EQ(add_error_feedback_tables(b, key_metrics, ef), 2 * kLayers);
  ErrorFeedbackOptions eo;
  eo.damp = ef.damp;
  eo.act_order = true;
  eo.feedback_clip_error = ef.clip_feedback;
  for (int64_t l = 0; l < kLayers; ++l)
    for (int64_t h = 0; h < kKvHeads; ++h) {
      const HeadTransform t = stored_transform(b.layers[l], true, h, kD, "test");
      const ErrorFeedbackTable expect = error_feedback_table(
          metric_in_transform_basis(std::span<const double>(key_metrics[l]).subspan(h * kD * kD, kD * kD), t), kD, eo,
          "test");
      std::vector<int32_t> order(kD);
      std::vector<float> weights(kD * kD);
      stored_error_feedback(expect, order, weights);
      EXPECT_EQ(std::vector<int32_t>(b.layers[l].k_ef_order.begin() + h * kD, b.layers[l].k_ef_order.begin() + (h + 1) * kD),
                order);
      EXPECT_EQ(std::vector<float>(b.layers[l].k_ef_weights.begin() + h * kD * kD,
                                   b.layers[l].k_ef_weights.begin() + (h + 1) * kD * kD),
                weights);
    }
  // Storing the key metric and retargeting to the same context rebuilds the same (transform-basis) tables.
  store_key_metrics(b, key_metrics, 16, 16, ef.damp);
  fmt::Bundle again = b;
  again.ef_key_context = 32;  // force a rebuild at the stored positions
  const std::vector<float> inv_freq(kD / 2, 0.0f);  // position-independent RoPE: the carried metric is the stored one
  ASSERT_EQ(retarget_key_tables(again, inv_freq, 16), kLayers);
  for (int64_t l = 0; l < kLayers; ++l) {
    EXPECT_EQ(again.layers[l].k_ef_order, b.layers[l].k_ef_order);
    EXPECT_EQ(again.layers[l].k_ef_weights, b.layers[l].k_ef_weights);
  }
}

TEST(BundleTransform, CacheSimulationQuantizesThroughTheTransform) {
  fmt::Bundle b = transformed_bundle();
  const auto heldout = anisotropic_heldout(7);
  std::vector<std::vector<double>> key_metrics;
  for (const auto& hl : heldout) key_metrics.push_back(hl.sigma_q);
  ErrorFeedbackCalibration ef;
  ef.mode = ErrorFeedbackMode::K;  // keys with tables, values round to nearest: both branches
  ASSERT_EQ(add_error_feedback_tables(b, key_metrics, ef), kLayers);

  fmt::ModelConfig cfg;
  cfg.num_layers = kLayers;
  cfg.num_heads = 4;
  cfg.num_kv_heads = kKvHeads;
  cfg.head_dim = kD;
  eval::ModeOptions mo;
  mo.bundle = &b;
  const auto cache = eval::CacheFormat::create(eval::CacheMode::Oscar, cfg, mo);
  const int64_t n = 64;
  for (int64_t l = 0; l < kLayers; ++l)
    for (int64_t h = 0; h < kKvHeads; ++h) {
      const std::span<const float> xk(heldout[l].k.data() + h * kTokens * kD, n * kD);
      const std::span<const float> xv(heldout[l].v.data() + h * kTokens * kD, n * kD);
      std::vector<float> got_k(n * kD), got_v(n * kD), want_k(n * kD), want_v(n * kD);
      cache->fake_quantize_keys(l, h, xk, n, got_k);
      cache->fake_quantize_values(l, h, xv, n, got_v);
      // The reference: y = (x − μ)·A, the stored table's rounding (keys) / RTN (values) in y's basis, ŷ·A⁻¹ + μ.
      const HeadTable ht = head_table(b.layers[l].k_ef_order, b.layers[l].k_ef_weights, h, kD);
      transform_fake_quantize(stored_transform(b.layers[l], true, h, kD, "test"), xk, n,
                              [&](std::span<const float> y, int64_t rows, std::span<float> y_hat) {
                                error_feedback_fake_quantize_stored(y, rows, {}, 0.96f, 2, ht.order, ht.weights,
                                                                    b.ef_clip_feedback, y_hat);
                              },
                              want_k);
      const HeadQuantizer q(b.quant.v, kD, "test");
      transform_fake_quantize(stored_transform(b.layers[l], false, h, kD, "test"), xv, n,
                              [&](std::span<const float> y, int64_t rows, std::span<float> y_hat) {
                                q.fake_quantize(y, rows, {}, 0.92f, Basis::Original, y_hat);
                              },
                              want_v);
      EXPECT_EQ(got_k, want_k) << "layer " << l << " head " << h;
      EXPECT_EQ(got_v, want_v) << "layer " << l << " head " << h;
      // And it is a quantization, not a copy: the error is there, and it is much smaller than the signal.
      double err = 0, energy = 0;
      for (int64_t i = 0; i < n * kD; ++i) err += std::pow(got_k[i] - xk[i], 2), energy += xk[i] * xk[i];
      EXPECT_GT(err, 0.0);
      EXPECT_LT(err, 0.2 * energy);
    }
}

}  // namespace
}  // namespace oscar::calib
