// lib/calib/spectral_calibration.h and calibrate()'s --method spectral: the attention-output proxy against a
// brute-force softmax attention, and on the trained qwen3-tiny fixture (head_dim 128) a spectral bundle that is
// valid, within its bit budget, records its choice, and beats the published bundle on the attention-output error
// of text neither calibration saw.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "datasets/pack.h"
#include "formats/bundle.h"
#include "formats/error.h"
#include "formats/tokenizer.h"
#include "lib/calib/calibrator.h"
#include "lib/calib/quantizer_ref.h"
#include "lib/calib/spectral_calibration.h"
#include "test_support.h"

namespace oscar::calib {
namespace {

namespace fs = std::filesystem;

// Softmax attention of query row q over keys/values rows [0, n), fp64.
std::vector<double> attend(const float* q, const std::vector<float>& k, const std::vector<float>& v, int64_t n,
                           int64_t d) {
  std::vector<double> logit(n), o(d, 0.0);
  double m = -INFINITY, z = 0;
  for (int64_t t = 0; t < n; ++t) {
    double a = 0;
    for (int64_t j = 0; j < d; ++j) a += double(q[j]) * k[t * d + j];
    logit[t] = a / std::sqrt(double(d));
    m = std::max(m, logit[t]);
  }
  for (int64_t t = 0; t < n; ++t) z += (logit[t] = std::exp(logit[t] - m));
  for (int64_t t = 0; t < n; ++t)
    for (int64_t j = 0; j < d; ++j) o[j] += logit[t] / z * v[t * d + j];
  return o;
}

TEST(AttentionProxy, MatchesBruteForceAttention) {
  const int64_t H = 4, Hkv = 2, d = 16, T = 48, sink = 4, recent = 8;
  std::mt19937 rng(7);
  std::normal_distribution<float> nd;
  AttentionSequence s;
  s.tokens = T;
  for (int64_t i = 0; i < H * T * d; ++i) s.q.push_back(nd(rng));
  for (int64_t i = 0; i < Hkv * T * d; ++i) s.k.push_back(nd(rng) * (1.0f + float(i % d)));
  for (int64_t i = 0; i < Hkv * T * d; ++i) s.v.push_back(nd(rng));
  LayerQuantization lq;
  lq.k.storage = lq.v.storage = fmt::KvStorage::Int;
  lq.k.segments = {{0, 8, 3}, {8, 16, 1}};
  lq.v.segments = {{0, 16, 2}};
  lq.k.clip_ratio = 0.9f;
  lq.v.clip_ratio = 1.0f;
  std::vector<double> h = hadamard(d);
  lq.k_rotation.assign(h.begin(), h.end());
  lq.v_rotation.assign(static_cast<size_t>(d * d), 0.0f);
  for (int64_t i = 0; i < d; ++i) lq.v_rotation[i * d + i] = 1.0f;

  // Brute force: for each query s >= sink + recent, rebuild the cache it reads (sink and recent exact).
  const HeadQuantizer kq(lq.k, d), vq(lq.v, d);
  double err = 0, energy = 0;
  for (int64_t i = 0; i < H; ++i) {
    const int64_t kv = i / (H / Hkv);
    std::vector<float> k(s.k.begin() + kv * T * d, s.k.begin() + (kv + 1) * T * d);
    std::vector<float> v(s.v.begin() + kv * T * d, s.v.begin() + (kv + 1) * T * d);
    std::vector<float> kh(k.size()), vh(v.size());
    kq.fake_quantize(k, T, lq.k_rotation, 0.9f, Basis::Original, kh);
    vq.fake_quantize(v, T, lq.v_rotation, 1.0f, Basis::Original, vh);
    for (int64_t q = sink + recent; q < T; ++q) {
      std::vector<float> kc = k, vc = v;
      for (int64_t t = sink; t <= q - recent; ++t)
        for (int64_t j = 0; j < d; ++j) {
          kc[t * d + j] = kh[t * d + j];
          vc[t * d + j] = vh[t * d + j];
        }
      const auto o = attend(s.q.data() + (i * T + q) * d, k, v, q + 1, d);
      const auto oq = attend(s.q.data() + (i * T + q) * d, kc, vc, q + 1, d);
      for (int64_t j = 0; j < d; ++j) {
        err += (oq[j] - o[j]) * (oq[j] - o[j]);
        energy += o[j] * o[j];
      }
    }
  }
  const AttentionError got = attention_output_error({s}, H, Hkv, d, lq, sink, recent, 1000);
  EXPECT_GT(err, 0);
  EXPECT_NEAR(got.error, err, 1e-9 * err);
  EXPECT_NEAR(got.energy, energy, 1e-9 * energy);
  // No query reads the quantized cache when the windows cover the sequence.
  EXPECT_EQ(attention_output_error({s}, H, Hkv, d, lq, sink, T, 1000).energy, 0.0);
}

TEST(SpectralOptionsValidation, NamesTheFlag) {
  SpectralCalibrationOptions o;
  o.spectral.align = spectral_align(128);
  EXPECT_NO_THROW(validate_spectral_options(o, 128));
  auto fails = [&](SpectralCalibrationOptions bad, int64_t d, const std::string& flag) {
    bad.spectral.align = spectral_align(d);
    try {
      validate_spectral_options(bad, d);
      ADD_FAILURE() << "no error for " << flag;
    } catch (const Error& e) {
      EXPECT_EQ(e.where(), flag) << e.what();
    }
  };
  fails(o, 8, "--budget-bits");  // 2.28 cannot hold a segment + its scale/zero at head_dim 8
  SpectralCalibrationOptions w = o;
  w.spectral.widths = {0, 0, 2};
  fails(w, 128, "--widths");
  w.spectral.widths = {0};
  fails(w, 128, "--widths");
  SpectralCalibrationOptions k = o;
  k.k_weight_grid = {};
  fails(k, 128, "--k-weight-grid");
  k.k_weight = -2;
  fails(k, 128, "--k-weight");
  EXPECT_EQ(spectral_align(128), 16);
  EXPECT_EQ(spectral_align(8), 8);
}

constexpr const char* kQwen = "models/qwen3-tiny-trained";

std::vector<std::vector<int32_t>> pack(const fmt::Tokenizer& tok, const std::string& text, int64_t n, int64_t len) {
  data::PackOptions po;
  po.seq_len = len;
  po.num_seqs = n;
  po.shuffle = false;
  const auto ds = data::pack_dataset({(test::fixtures_dir() / "text" / text).string()}, &tok, {}, po);
  std::vector<std::vector<int32_t>> out;
  for (int64_t i = 0; i < ds.num_seqs(); ++i) {
    const auto s = ds.sequence(i);
    out.emplace_back(s.begin(), s.end());
  }
  return out;
}

TEST(SpectralCalibrate, QwenBundleIsValidWithinBudgetAndBeatsPublishedOnUnseenText) {
  OSCAR_REQUIRE_FIXTURE(kQwen);
  OSCAR_REQUIRE_FIXTURE("text/war-and-peace.txt");
  OSCAR_REQUIRE_FIXTURE("text/python-docs-heldout.txt");
  const fs::path dir = test::fixtures_dir() / kQwen;
  auto model = model::CpuModel::load(dir);
  auto tok = fmt::Tokenizer::load(dir);
  const int64_t len = 512;
  CalibrationData data;
  data.seq_len = len;
  auto seqs = pack(*tok, "war-and-peace.txt", 6, len);
  ASSERT_EQ(seqs.size(), 6u);
  data.sequences.assign(seqs.begin(), seqs.begin() + 2);
  data.heldout.assign(seqs.begin() + 2, seqs.end());  // 3 fit + 1 selection
  CalibrationOptions opt;
  opt.quant = fmt::KvQuantSpec::int2_default(128);  // sink 64, recent 256
  CpuForwardRunner runner(*model);
  const auto fp = model_fingerprint(dir);
  const CalibrationResult published = calibrate(runner, fp, data, opt);
  opt.method = Method::Spectral;
  opt.spectral.k_weight_grid = {1, 4};
  opt.spectral.spectral.widths = {1, 2, 3, 4};  // the CLI's default
  const CalibrationResult spectral = calibrate(runner, fp, data, opt);
  std::cout << spectral.report;

  const fmt::Bundle& b = spectral.bundle;
  fmt::validate_bundle(b, "spectral");
  EXPECT_EQ(b.rotation_composition, "spectral");
  std::string k_weight;
  for (const auto& [k, v] : b.calibration.options)
    if (k == "k_weight") k_weight = v;
  EXPECT_TRUE(k_weight == "1" || k_weight == "4") << k_weight;
  double bits = 0;
  for (size_t l = 0; l < b.layers.size(); ++l) {
    const fmt::KvQuantSpec s = fmt::layer_spec(b, l);
    s.validate("layer");
    const double layer_bits = 0.5 * (s.k.bits_per_element(128) + s.v.bits_per_element(128));
    EXPECT_LE(layer_bits, 2.28) << "layer " << l;
    bits += layer_bits / static_cast<double>(b.layers.size());
    // The calibration eigenvalues are kept (descending, not the spectral placeholders).
    EXPECT_GT(b.layers[l].k_eigenvalues[0], b.layers[l].k_eigenvalues[127]);
  }
  EXPECT_GT(bits, 2.0);  // the budget is used, not dropped

  // Unseen text (python docs), scored with the attention-output error both bundles are compared by.
  const auto test_seqs = pack(*tok, "python-docs-heldout.txt", 2, len);
  AttentionSequenceCollector collector(StatisticsShape::from_config(model->config()));
  for (const auto& s : test_seqs) {
    collector.begin_sequence();
    runner.run_sequence(s, collector);
  }
  const auto layers = collector.finish();
  const auto& cfg = model->config();
  double e_pub = 0, e_spec = 0;
  for (int64_t l = 0; l < cfg.num_layers; ++l) {
    e_pub += attention_output_error(layers[l], cfg.num_heads, cfg.num_kv_heads, 128,
                                    layer_quantization(published.bundle.layers[l], published.bundle.quant, 1), 64, 256,
                                    256)
                 .relative();
    e_spec += attention_output_error(layers[l], cfg.num_heads, cfg.num_kv_heads, 128,
                                     layer_quantization(b.layers[l], b.quant, 1), 64, 256, 256)
                  .relative();
  }
  std::cout << "attention-output error on python docs, mean over layers: published " << e_pub / cfg.num_layers
            << ", spectral " << e_spec / cfg.num_layers << "\n";
  EXPECT_LT(e_spec, e_pub);
}

}  // namespace
}  // namespace oscar::calib
