// End-to-end calibration on a real (tiny) checkpoint: TinyStories llama2.c 280k converted to HF (head_dim 8).
#include <gtest/gtest.h>

#include <fstream>
#include <iterator>

#include "formats/atomic_file.h"
#include "formats/bundle.h"
#include "formats/error.h"
#include "formats/tokenizer.h"
#include "lib/calib/calibrator.h"
#include "lib/calib/rotation.h"
#include "test_support.h"

namespace oscar::calib {
namespace {

namespace fs = std::filesystem;

constexpr const char* kModel = "models/tinystories-llama2c-280k-hf";
constexpr const char* kText = "text/tinystories-sample.txt";
constexpr int64_t kSeqLen = 96;

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// The first stories of the sample, tokenized and cut into sequences of kSeqLen tokens, each starting with BOS.
std::vector<std::vector<int32_t>> text_sequences(const fmt::Tokenizer& tok, int count, int skip) {
  std::ifstream in(test::fixtures_dir() / kText);
  std::string line, text;
  std::vector<int32_t> stream;
  while (std::getline(in, line) && static_cast<int64_t>(stream.size()) < (count + skip) * (kSeqLen - 1)) {
    const auto ids = tok.encode(line, /*add_special_tokens=*/false);
    stream.insert(stream.end(), ids.begin(), ids.end());
  }
  std::vector<std::vector<int32_t>> out;
  for (int s = skip; s < skip + count; ++s) {
    std::vector<int32_t> seq = {1};  // BOS
    seq.insert(seq.end(), stream.begin() + s * (kSeqLen - 1), stream.begin() + (s + 1) * (kSeqLen - 1));
    out.push_back(std::move(seq));
  }
  return out;
}

// An independent observer: Σ_t ‖q_t‖² and the number of query vectors, per layer.
class QueryEnergy : public model::Observer {
 public:
  std::vector<double> energy, count;
  void on_attention_inputs(const model::AttentionInputs& in) override {
    if (energy.size() <= size_t(in.layer)) {
      energy.resize(in.layer + 1, 0.0);
      count.resize(in.layer + 1, 0.0);
    }
    for (int64_t i = 0; i < in.num_heads * in.num_tokens * in.head_dim; ++i) energy[in.layer] += double(in.q[i]) * in.q[i];
    count[in.layer] += double(in.num_heads * in.num_tokens);
  }
};

class Calibrator : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!fs::exists(test::fixtures_dir() / kModel / "model.safetensors") || !fs::exists(test::fixtures_dir() / kText))
      GTEST_SKIP() << "fixture not found: " << test::fixtures_dir() / kModel;
    dir_ = test::fixtures_dir() / kModel;
    model_ = model::CpuModel::load(dir_);
    auto tok = fmt::Tokenizer::load(dir_);
    data_.sequences = text_sequences(*tok, 6, 0);
    data_.heldout = text_sequences(*tok, 2, 6);
    data_.seq_len = kSeqLen;
    data_.data_files = {{kText, fmt::sha256_file(test::fixtures_dir() / kText)}};
    opt_.quant = fmt::KvQuantSpec::int2_default(8);
    opt_.quant.sink_tokens = 16;
    opt_.quant.recent_tokens = 32;
    opt_.seed = 42;
  }
  fs::path dir_;
  std::unique_ptr<model::CpuModel> model_;
  CalibrationData data_;
  CalibrationOptions opt_;
};

TEST_F(Calibrator, ProducesAValidDeterministicBundle) {
  CpuForwardRunner runner(*model_);
  const fmt::ModelFingerprint fp = model_fingerprint(dir_);
  EXPECT_EQ(fp.config_sha256, fmt::sha256_file(dir_ / "config.json"));
  EXPECT_EQ(fp.attention_sha256.size(), 64u);
  EXPECT_EQ(fp.num_layers, 5);
  EXPECT_EQ(fp.head_dim, 8);

  const CalibrationResult a = calibrate(runner, fp, data_, opt_);
  const CalibrationResult b = calibrate(runner, fp, data_, opt_);
  const fs::path tmp = test::temp_dir_for_test();
  fmt::write_bundle(tmp / "a.oscar", a.bundle);
  fmt::write_bundle(tmp / "b.oscar", b.bundle);
  EXPECT_EQ(slurp(tmp / "a.oscar"), slurp(tmp / "b.oscar"));

  const fmt::Bundle read = fmt::read_bundle(tmp / "a.oscar");
  EXPECT_EQ(read.layers, a.bundle.layers);
  EXPECT_EQ(read.rotation_composition, "eigen*hadamard*bitrev");
  EXPECT_EQ(read.rotation_groups, 1);
  EXPECT_EQ(read.calibration.num_sequences, 6);
  EXPECT_EQ(read.calibration.num_tokens, 6 * kSeqLen);
  EXPECT_EQ(read.calibration.num_heldout_sequences, 2);
  EXPECT_EQ(read.calibration.seed, 42u);
  ASSERT_EQ(read.layers.size(), 5u);

  // Σ_Q's trace is the mean squared query norm: an independent observer over the same sequences must agree.
  QueryEnergy q;
  for (const auto& seq : data_.sequences) runner.run_sequence(seq, q);
  for (size_t l = 0; l < 5; ++l) {
    const auto& ev = read.layers[l].k_eigenvalues;
    double trace = 0;
    for (size_t i = 0; i < ev.size(); ++i) {
      trace += ev[i];
      if (i > 0) {
        EXPECT_LE(ev[i], ev[i - 1]);
      }
    }
    EXPECT_GT(ev.back(), -1e-9);  // positive semi-definite
    EXPECT_NEAR(trace, q.energy[l] / q.count[l], 1e-9 * trace) << "layer " << l;
  }

  // The report: 4 rotations × {clip 1, spec clip} + the tuned row; tuning never loses to the spec's ratios.
  ASSERT_EQ(read.errors.rows.size(), 9u);
  EXPECT_EQ(read.errors.rows.back(), "oscar+tuned_clip");
  for (int64_t l = 0; l < 5; ++l) {
    EXPECT_LE(read.errors.k_relative_error[8 * 5 + l], read.errors.k_relative_error[7 * 5 + l]);
    EXPECT_LE(read.errors.v_relative_error[8 * 5 + l], read.errors.v_relative_error[7 * 5 + l]);
    EXPECT_GE(read.layers[l].k_clip_ratio, 0.80f);
    EXPECT_LE(read.layers[l].k_clip_ratio, 1.00f);
  }
  EXPECT_NE(a.report.find("oscar+tuned_clip"), std::string::npos);
  std::cout << a.report;
}

TEST_F(Calibrator, PerHeadAndOtherWeightings) {
  CpuForwardRunner runner(*model_);
  opt_.per_head = true;
  opt_.value_weighting = ValueWeighting::AttentionMass;
  opt_.tune_clip = false;
  const CalibrationResult r = calibrate(runner, model_fingerprint(dir_), data_, opt_);
  EXPECT_EQ(r.bundle.rotation_groups, 4);
  EXPECT_EQ(r.bundle.layers[0].k_rotation.size(), 4u * 8 * 8);
  EXPECT_EQ(r.bundle.errors.rows.size(), 8u);
  for (const auto& l : r.bundle.layers) {
    EXPECT_EQ(l.k_clip_ratio, 0.96f);
    EXPECT_EQ(l.v_clip_ratio, 0.92f);
  }
  const auto& opts = r.bundle.calibration.options;
  EXPECT_NE(std::find(opts.begin(), opts.end(), std::pair<std::string, std::string>{"value_weighting", "attention_mass"}),
            opts.end());
  fmt::validate_bundle(r.bundle, "per-head");
}

TEST_F(Calibrator, ResumeFromACheckpointGivesTheSameBundle) {
  CpuForwardRunner runner(*model_);
  const fs::path tmp = test::temp_dir_for_test();
  const auto fp = model_fingerprint(dir_);
  const CalibrationResult plain = calibrate(runner, fp, data_, opt_);
  opt_.checkpoint = tmp / "stats.ckpt";
  opt_.checkpoint_every = 2;
  (void)calibrate(runner, fp, data_, opt_);
  ASSERT_TRUE(fs::exists(opt_.checkpoint));
  // The checkpoint now holds both passes; resuming runs no statistics forward pass at all.
  opt_.resume = true;
  int64_t statistics_sequences = 0;
  opt_.progress = [&](std::string_view stage, int64_t, int64_t) { statistics_sequences += stage != "heldout"; };
  const CalibrationResult resumed = calibrate(runner, fp, data_, opt_);
  EXPECT_EQ(statistics_sequences, 0);
  fmt::write_bundle(tmp / "a.oscar", plain.bundle);
  fmt::write_bundle(tmp / "b.oscar", resumed.bundle);
  EXPECT_EQ(slurp(tmp / "a.oscar"), slurp(tmp / "b.oscar"));
}

TEST_F(Calibrator, RejectsBadInputs) {
  CpuForwardRunner runner(*model_);
  const auto fp = model_fingerprint(dir_);
  CalibrationOptions bad = opt_;
  bad.quant = fmt::KvQuantSpec::int2_default(16);
  EXPECT_THROW(calibrate(runner, fp, data_, bad), Error);
  CalibrationData empty;
  EXPECT_THROW(calibrate(runner, fp, empty, opt_), Error);
  CalibrationData too_long = data_;
  too_long.sequences[1].resize(300, 5);  // max_position_embeddings is 256
  try {
    calibrate(runner, fp, too_long, opt_);
    FAIL() << "over-long sequence accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.where(), "calibration sequence 1");
  }
}

}  // namespace
}  // namespace oscar::calib
