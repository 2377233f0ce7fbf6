// Layer-streaming and data-parallel calibration (runtime/layer_stream.h) against the resident GPU path: the
// statistics must be bit-identical (same kernels per layer, same batches, same fp64 addition order), for
//  * a random Llama-shaped config (weights generated per layer vs DeviceModel::random), both value weightings;
//  * qwen3-tiny-trained (weights read per layer vs DeviceModel::load), down to byte-identical .oscar bundles;
//  * the sharded reduction with one rank and with two virtual ranks on the one GPU (per-batch partials gathered and
//    added in batch order);
// and the streamed peak device memory must not grow with depth.
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <random>
#include <string>
#include <vector>

#include "formats/bundle.h"
#include "formats/tokenizer.h"
#include "lib/calib/calibrator.h"
#include "runtime/device_model.h"
#include "runtime/gpu_calibration.h"
#include "runtime/layer_stream.h"
#include "test_fwd_gpu_support.h"
#include "test_support.h"

namespace oscar::rt {
namespace {

namespace fs = std::filesystem;

fmt::ModelConfig small_config(int64_t layers) {
  fmt::ModelConfig c;
  c.arch = fmt::Arch::Llama;
  c.hidden_size = 256;
  c.num_layers = layers;
  c.num_heads = 8;
  c.num_kv_heads = 2;
  c.head_dim = 32;
  c.intermediate_size = 512;
  c.vocab_size = 1000;
  c.max_position_embeddings = 4096;
  c.rms_norm_eps = 1e-5;
  c.tie_word_embeddings = false;
  return c;
}

std::vector<std::vector<int32_t>> random_sequences(int64_t n, int64_t len, int64_t vocab, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int32_t> id(0, static_cast<int32_t>(vocab - 1));
  std::vector<std::vector<int32_t>> out(static_cast<size_t>(n));
  for (int64_t s = 0; s < n; ++s) {
    const int64_t l = len - (s % 3) * 7;  // uneven lengths: batches of different sizes
    for (int64_t t = 0; t < l; ++t) out[s].push_back(id(rng));
  }
  return out;
}

// The resident path's statistics, exactly as calibrate_on_device collects them.
std::unique_ptr<GpuStatisticsCollector> resident_statistics(DeviceModel& model,
                                                            const std::vector<std::vector<int32_t>>& seqs,
                                                            calib::ValueWeighting w, int64_t batch_tokens) {
  auto stats = std::make_unique<GpuStatisticsCollector>(calib::StatisticsShape::from_config(model.config()), w);
  for (int pass = 0; pass < (w == calib::ValueWeighting::QueryEnergy ? 2 : 1); ++pass) {
    if (pass == 1) stats->start_value_pass();
    for (const auto& [first, last] : plan_batches(seqs, batch_tokens)) {
      PackedBatch batch;
      for (int64_t i = first; i < last; ++i) batch.add_sequence(seqs[i]);
      DeviceForwardOptions fo;
      fo.observer = stats.get();
      fo.rows = LogitsRows::None;
      model.forward(batch, fo);
      stats->check_finite();
    }
  }
  return stats;
}

bool same_bits(const std::vector<double>& a, const std::vector<double>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(double)) == 0;
}

void expect_identical(GpuStatisticsCollector& ref, GpuStatisticsCollector& got, const fmt::ModelConfig& cfg,
                      const std::string& what) {
  int64_t mismatches = 0;
  for (int64_t l = 0; l < cfg.num_layers; ++l)
    for (int64_t h = 0; h < cfg.num_kv_heads; ++h) {
      const calib::HeadMoments a = ref.head_moments(l, h), b = got.head_moments(l, h);
      const bool ok = same_bits(a.sigma_q, b.sigma_q) && same_bits(a.sigma_v, b.sigma_v) &&
                      a.query_vectors == b.query_vectors && a.value_tokens == b.value_tokens &&
                      std::memcmp(&a.value_weight, &b.value_weight, sizeof(double)) == 0;
      if (!ok && mismatches++ < 3) {
        double worst = 0;
        for (size_t i = 0; i < a.sigma_v.size(); ++i) worst = std::max(worst, std::abs(a.sigma_v[i] - b.sigma_v[i]));
        ADD_FAILURE() << what << ": layer " << l << " kv head " << h << " differs (max |ΔΣ_V| " << worst
                      << ", n_q " << a.query_vectors << " vs " << b.query_vectors << ", w " << a.value_weight
                      << " vs " << b.value_weight << ")";
      }
    }
  EXPECT_EQ(mismatches, 0) << what;
}

TEST(LayerStream, RandomConfigStreamedAndShardedEqualResidentBitForBit) {
  OSCAR_REQUIRE_GPU();
  const fmt::ModelConfig cfg = small_config(4);
  const uint64_t seed = 11;
  const auto seqs = random_sequences(10, 96, cfg.vocab_size, 3);
  const int64_t batch_tokens = 200;  // 2 sequences per batch, 5 batches
  auto model = DeviceModel::random(cfg, seed);
  for (calib::ValueWeighting w : {calib::ValueWeighting::QueryEnergy, calib::ValueWeighting::Uniform}) {
    const std::string name = w == calib::ValueWeighting::QueryEnergy ? "query" : "uniform";
    auto ref = resident_statistics(*model, seqs, w, batch_tokens);
    LayerStreamOptions o;
    o.batch_tokens = batch_tokens;
    LayerStreamReport rep;
    auto streamed = streamed_statistics(LayerSource::random(cfg, seed), seqs, w, o, &rep);
    expect_identical(*ref, *streamed, cfg, name + ": streamed");
    EXPECT_EQ(rep.batches, 5);
    EXPECT_GT(rep.h2d_bytes, 0);
    o.sharded_reduction = true;
    auto one = streamed_statistics(LayerSource::random(cfg, seed), seqs, w, o);
    expect_identical(*ref, *one, cfg, name + ": sharded, 1 rank");
    o.devices = {0, 0};
    auto two = streamed_statistics(LayerSource::random(cfg, seed), seqs, w, o, &rep);
    EXPECT_EQ(rep.ranks, 2);
    expect_identical(*ref, *two, cfg, name + ": 2 virtual ranks");
    o.devices = {0, 0, 0};
    auto three = streamed_statistics(LayerSource::random(cfg, seed), seqs, w, o);
    expect_identical(*ref, *three, cfg, name + ": 3 virtual ranks");
  }
}

TEST(LayerStream, PeakDeviceMemoryDoesNotGrowWithDepth) {
  OSCAR_REQUIRE_GPU();
  const auto seqs = random_sequences(6, 128, 1000, 4);
  LayerStreamOptions o;
  o.batch_tokens = 256;
  double peak[2] = {0, 0};
  const int64_t depth[2] = {2, 16};
  for (int i = 0; i < 2; ++i) {
    LayerStreamReport rep;
    streamed_statistics(LayerSource::random(small_config(depth[i]), 1), seqs, calib::ValueWeighting::QueryEnergy, o,
                        &rep);
    peak[i] = rep.peak_device_bytes;
    std::cout << depth[i] << " layers: peak " << peak[i] / 1e6 << " MB, one layer " << rep.layer_weight_bytes / 1e6
              << " MB\n";
  }
  // The statistics sums grow with depth (L · Hkv · d² · 16 B: 0.5 MB here); weights and activations must not.
  const double sums_growth = static_cast<double>(depth[1] - depth[0]) * 2 * 32 * 32 * 8 * 2 + (4 << 20);
  EXPECT_LE(peak[1], peak[0] + sums_growth) << "streamed peak grows with depth";
}

std::string file_bytes(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

TEST(LayerStream, Qwen3TinyStreamedAndShardedBundlesAreByteIdentical) {
  OSCAR_REQUIRE_GPU();
  const fs::path dir = test::fixtures_dir() / "models/qwen3-tiny-trained";
  const fs::path text = test::fixtures_dir() / "text/war-and-peace.txt";
  if (!fs::exists(dir / "config.json") || !fs::exists(text)) GTEST_SKIP() << "fixture not found: " << dir;
  const int64_t n = 8, len = 256, heldout = 2, batch_tokens = 3 * len;
  const auto seqs = test::fwd::text_sequences(dir, text, n + heldout, len);
  ASSERT_EQ(static_cast<int64_t>(seqs.size()), n + heldout);
  calib::CalibrationData data;
  data.seq_len = len;
  data.sequences.assign(seqs.begin(), seqs.begin() + n);
  data.heldout.assign(seqs.begin() + n, seqs.end());
  auto model = DeviceModel::load(dir);
  const fmt::ModelConfig& cfg = model->config();

  auto ref = resident_statistics(*model, data.sequences, calib::ValueWeighting::QueryEnergy, batch_tokens);
  LayerStreamOptions o;
  o.batch_tokens = batch_tokens;
  const LayerSource src = LayerSource::from_checkpoint(dir);
  auto streamed = streamed_statistics(src, data.sequences, calib::ValueWeighting::QueryEnergy, o);
  expect_identical(*ref, *streamed, cfg, "qwen3-tiny streamed");

  const fmt::ModelFingerprint fp = calib::model_fingerprint(dir);
  calib::CalibrationOptions opt;
  opt.quant = fmt::KvQuantSpec::int2_default(cfg.head_dim);
  opt.quant.sink_tokens = 16;
  opt.quant.recent_tokens = 32;
  const fs::path tmp = test::temp_dir_for_test();
  const calib::CalibrationResult resident = calibrate_on_device(*model, fp, data, opt, {batch_tokens});
  fmt::write_bundle(tmp / "resident.oscar", resident.bundle);
  const std::string want = file_bytes(tmp / "resident.oscar");
  ASSERT_FALSE(want.empty());
  for (const std::vector<int>& devices : {std::vector<int>{0}, std::vector<int>{0, 0}}) {
    o.devices = devices;
    o.sharded_reduction = devices.size() > 1;
    const calib::CalibrationResult r = calibrate_streamed(src, fp, data, opt, o);
    const fs::path out = tmp / ("streamed" + std::to_string(devices.size()) + ".oscar");
    fmt::write_bundle(out, r.bundle);
    EXPECT_TRUE(file_bytes(out) == want) << devices.size() << " rank(s): bundle differs from the resident one";
    EXPECT_EQ(r.report, resident.report);
  }
}

}  // namespace
}  // namespace oscar::rt
