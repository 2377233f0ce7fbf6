// The separable stages of lib/calib/calibrator.h (statistics → spectra → bundle), the checkpoint key, the extra
// provenance, the non-finite check of the statistics path and the shared eigenvector sign convention.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <iterator>
#include <random>

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

// A fixed pseudo-random token stream cut into sequences (the model's vocabulary is 512).
std::vector<std::vector<int32_t>> sequences(int count, int len, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int32_t> id(3, 511);
  std::vector<std::vector<int32_t>> out(static_cast<size_t>(count), std::vector<int32_t>(static_cast<size_t>(len)));
  for (auto& s : out) {
    s[0] = 1;  // BOS
    for (size_t i = 1; i < s.size(); ++i) s[i] = id(rng);
  }
  return out;
}

class CalibratorStages : public ::testing::Test {
 protected:
  void SetUp() override {
    OSCAR_REQUIRE_FIXTURE(kModel);
    dir_ = test::fixtures_dir() / kModel;
    model_ = model::CpuModel::load(dir_);
    data_.sequences = sequences(5, 48, 1);
    data_.heldout = sequences(2, 48, 2);
    data_.seq_len = 48;
    opt_.quant = fmt::KvQuantSpec::int2_default(8);
    opt_.quant.sink_tokens = 8;
    opt_.quant.recent_tokens = 8;
  }
  fs::path dir_;
  std::unique_ptr<model::CpuModel> model_;
  CalibrationData data_;
  CalibrationOptions opt_;
};

TEST_F(CalibratorStages, StagesComposeToCalibrate) {
  CpuForwardRunner runner(*model_);
  const auto fp = model_fingerprint(dir_);
  opt_.per_head = true;
  const CalibrationResult whole = calibrate(runner, fp, data_, opt_);
  StatisticsCollector stats = collect_statistics(runner, fp, data_, opt_);
  const CalibrationMoments moments = group_moments(stats, true);
  ASSERT_EQ(moments.groups, 4);
  ASSERT_EQ(moments.moments.size(), 5u * 4);
  // Per-head moments are the collector's own.
  EXPECT_EQ(moments.at(3, 2).sigma_q, stats.head_moments(3, 2).sigma_q);
  const CalibrationSpectra spectra = solve_spectra(moments);
  const CalibrationResult staged = assemble_bundle(spectra, runner, fp, data_, opt_);
  EXPECT_EQ(staged.bundle.layers, whole.bundle.layers);
  EXPECT_EQ(staged.bundle.errors, whole.bundle.errors);
  // Spectra of another grouping are refused.
  opt_.per_head = false;
  EXPECT_THROW(assemble_bundle(spectra, runner, fp, data_, opt_), Error);
}

TEST_F(CalibratorStages, ExtraProvenanceIsRecordedSortedAndMayNotShadowAnOption) {
  CpuForwardRunner runner(*model_);
  const auto fp = model_fingerprint(dir_);
  opt_.tune_clip = false;
  opt_.extra_provenance = {{"seq_len", "48"}, {"device", "cpu"}};
  const CalibrationResult r = calibrate(runner, fp, data_, opt_);
  const auto& o = r.bundle.calibration.options;
  EXPECT_TRUE(std::is_sorted(o.begin(), o.end()));
  EXPECT_NE(std::find(o.begin(), o.end(), std::pair<std::string, std::string>{"device", "cpu"}), o.end());
  EXPECT_NE(std::find(o.begin(), o.end(), std::pair<std::string, std::string>{"seq_len", "48"}), o.end());
  EXPECT_EQ(o.size(), options_as_text(opt_).size() + 2);
  opt_.extra_provenance = {{"seed", "1"}};
  EXPECT_THROW(calibrate(runner, fp, data_, opt_), Error);
}

TEST_F(CalibratorStages, CheckpointOfOtherDataIsRefusedNamingTheFile) {
  CpuForwardRunner runner(*model_);
  const auto fp = model_fingerprint(dir_);
  const fs::path ckpt = test::temp_dir_for_test() / "stats.ckpt";
  opt_.checkpoint = ckpt;
  (void)collect_statistics(runner, fp, data_, opt_);
  ASSERT_TRUE(fs::exists(ckpt));
  opt_.resume = true;
  // Same data: resumes without a forward pass.
  int64_t forwards = 0;
  opt_.progress = [&](std::string_view, int64_t, int64_t) { ++forwards; };
  (void)collect_statistics(runner, fp, data_, opt_);
  EXPECT_EQ(forwards, 0);
  // One token changed: another key.
  CalibrationData other = data_;
  other.sequences[4][10] ^= 1;
  try {
    (void)collect_statistics(runner, fp, other, opt_);
    FAIL() << "checkpoint of other data accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.where(), ckpt.string());
  }
  // Another weighting: refused too.
  opt_.value_weighting = ValueWeighting::Uniform;
  EXPECT_THROW((void)collect_statistics(runner, fp, data_, opt_), Error);
}

TEST(StatisticsNonFinite, NaNOrInfInTheInputsNamesTheLayer) {
  const StatisticsShape shape{3, 2, 1, 4};
  StatisticsCollector c(shape, ValueWeighting::Uniform);
  std::vector<float> q(2 * 5 * 4, 0.5f), k(5 * 4, 0.25f), v(5 * 4, 1.0f);
  model::AttentionInputs in;
  in.layer = 2;
  in.num_tokens = 5;
  in.num_heads = 2;
  in.num_kv_heads = 1;
  in.head_dim = 4;
  in.q = q.data();
  in.k_pre_rope = k.data();
  in.k = k.data();
  in.v = v.data();
  c.begin_sequence(0);
  c.on_attention_inputs(in);  // finite: accepted
  q[7] = NAN;
  v[3] = INFINITY;
  v[4] = -INFINITY;
  try {
    c.on_attention_inputs(in);
    FAIL() << "non-finite inputs accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.where(), "StatisticsCollector (layer 2)");
    EXPECT_NE(std::string(e.what()).find("3 non-finite"), std::string::npos) << e.what();
  }
}

// eigen_from_ascending is the convention symmetric_eigen applies: feeding it LAPACK-style output of a known
// spectrum (a permuted, sign-flipped basis) gives descending values and positive largest-magnitude components.
TEST(EigenConvention, FromAscendingSortsDescendingAndFixesSigns) {
  const int64_t d = 3;
  const std::vector<double> values = {1.0, 2.0, 5.0};  // ascending
  // Columns (column-major): e2 flipped, e0, (e1 - 2 e0)/√5 flipped.
  const double s = 1.0 / std::sqrt(5.0);
  const std::vector<double> vectors = {0, 0, -1, /**/ 1, 0, 0, /**/ 2 * s, -s, 0};
  const SymmetricEigen e = eigen_from_ascending(values, vectors, d);
  EXPECT_EQ(e.values, (std::vector<double>{5.0, 2.0, 1.0}));
  // Column j of the row-major result: eigenvalue 5's vector (2, -1, 0)/√5 kept (largest |.| positive), then e0,
  // then e2 with its sign fixed.
  EXPECT_DOUBLE_EQ(e.vectors[0 * d + 0], 2 * s);
  EXPECT_DOUBLE_EQ(e.vectors[1 * d + 0], -s);
  EXPECT_DOUBLE_EQ(e.vectors[0 * d + 1], 1.0);
  EXPECT_DOUBLE_EQ(e.vectors[2 * d + 2], 1.0);
  EXPECT_THROW(eigen_from_ascending(values, std::vector<double>(8), d), Error);
}

}  // namespace
}  // namespace oscar::calib
