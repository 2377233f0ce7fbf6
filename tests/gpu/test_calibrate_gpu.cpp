// The GPU calibration path (runtime/gpu_calibration.h) against the CPU one (lib/calib/calibrator.h):
//  * GpuStatisticsCollector on synthetic inputs vs calib::StatisticsCollector on the same numbers (fp32 GEMMs vs
//    fp64 loops: tight), and its NaN/Inf check;
//  * on real checkpoints (TinyStories llama2.c 280k, head_dim 8; qwen3-tiny-trained, head_dim 128, GQA 4q/2kv): GPU
//    statistics of the DeviceModel forward vs CPU statistics of the CPU reference forward (relative Frobenius
//    ≤ 1e-2: bf16 activations), and the attention-aware error of the GPU bundle's rotations + clips within 0.5% of
//    the CPU bundle's, both scored on the same CPU held-out data;
//  * cuSOLVER vs LAPACK (and the analytic spectrum) on matrices with well-separated eigenvalues.
// The CPU model gets the bf16-rounded weights the device holds (as test_fwd_model does), so differences measure
// arithmetic, not weight rounding.
#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <random>
#include <span>
#include <vector>

#include "formats/atomic_file.h"
#include "formats/bundle.h"
#include "formats/error.h"
#include "formats/safetensors.h"
#include "formats/tokenizer.h"
#include "lib/calib/calibrator.h"
#include "lib/calib/error_report.h"
#include "lib/calib/rotation.h"
#include "runtime/device_buffer.h"
#include "runtime/device_model.h"
#include "runtime/gpu_calibration.h"
#include "test_fwd_gpu_support.h"
#include "test_support.h"

namespace oscar::rt {
namespace {

namespace fs = std::filesystem;

double relative_frobenius(std::span<const double> got, std::span<const double> ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    num += (got[i] - ref[i]) * (got[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  return std::sqrt(num / den);
}

// ---- synthetic inputs -------------------------------------------------------------------------------------------

// Random attention inputs of one layer, token-major for the device and head-major for the CPU collector.
struct SyntheticLayer {
  int64_t T, H, Hkv, d;
  std::vector<float> q_tm, k_tm, v_tm;  // [T, heads, d]
  std::vector<float> q_hm, k_hm, v_hm;  // [heads, T, d]

  SyntheticLayer(int64_t T_, int64_t H_, int64_t Hkv_, int64_t d_, uint32_t seed) : T(T_), H(H_), Hkv(Hkv_), d(d_) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> n(0.f, 1.f);
    // Anisotropic channels (scale grows with the channel index) so the covariances have structure.
    const auto fill = [&](int64_t heads, std::vector<float>& tm, std::vector<float>& hm) {
      tm.resize(static_cast<size_t>(T * heads * d));
      hm.resize(tm.size());
      for (int64_t t = 0; t < T; ++t)
        for (int64_t h = 0; h < heads; ++h)
          for (int64_t i = 0; i < d; ++i) {
            const float x = n(rng) * (0.2f + static_cast<float>(i) / static_cast<float>(d)) * (1.f + 0.1f * h);
            tm[(t * heads + h) * d + i] = x;
            hm[(h * T + t) * d + i] = x;
          }
    };
    fill(H, q_tm, q_hm);
    fill(Hkv, k_tm, k_hm);
    fill(Hkv, v_tm, v_hm);
  }
};

void feed_gpu(GpuStatisticsCollector& c, const SyntheticLayer& s, int64_t layer, DeviceBuffer& q, DeviceBuffer& k,
              DeviceBuffer& v) {
  q = to_device(std::span<const float>(s.q_tm));
  k = to_device(std::span<const float>(s.k_tm));
  v = to_device(std::span<const float>(s.v_tm));
  DeviceAttentionInputs in;
  in.layer = layer;
  in.num_tokens = s.T;
  in.num_sequences = 1;
  in.num_heads = s.H;
  in.num_kv_heads = s.Hkv;
  in.head_dim = s.d;
  in.q = q.as<float>();
  in.k_pre_rope = k.as<float>();
  in.k = k.as<float>();
  in.v = v.as<float>();
  in.stream = nullptr;
  c.on_attention_inputs(in);
  c.check_finite();
}

void feed_cpu(calib::StatisticsCollector& c, const SyntheticLayer& s, int64_t layer) {
  model::AttentionInputs in;
  in.layer = layer;
  in.num_tokens = s.T;
  in.num_heads = s.H;
  in.num_kv_heads = s.Hkv;
  in.head_dim = s.d;
  in.q = s.q_hm.data();
  in.k_pre_rope = s.k_hm.data();
  in.k = s.k_hm.data();
  in.v = s.v_hm.data();
  c.on_attention_inputs(in);
}

TEST(GpuCalibration, StatisticsOfSyntheticInputsMatchTheCpuCollector) {
  OSCAR_REQUIRE_GPU();
  const calib::StatisticsShape shape{2, 8, 2, 64};
  const std::vector<SyntheticLayer> calls = {{300, 8, 2, 64, 1}, {200, 8, 2, 64, 2}};  // two forwards
  for (calib::ValueWeighting w : {calib::ValueWeighting::QueryEnergy, calib::ValueWeighting::Uniform}) {
    GpuStatisticsCollector gpu(shape, w);
    calib::StatisticsCollector cpu(shape, w);
    DeviceBuffer q, k, v;
    for (int pass = 0; pass < (w == calib::ValueWeighting::QueryEnergy ? 2 : 1); ++pass) {
      if (pass == 1) {
        gpu.start_value_pass();
        cpu.start_value_pass();
      }
      for (size_t c = 0; c < calls.size(); ++c) {
        cpu.begin_sequence(static_cast<int64_t>(c));
        for (int64_t l = 0; l < 2; ++l) {
          feed_gpu(gpu, calls[c], l, q, k, v);
          feed_cpu(cpu, calls[c], l);
        }
        cpu.finish_sequence();
      }
    }
    for (int64_t l = 0; l < 2; ++l)
      for (int64_t h = 0; h < 2; ++h) {
        const calib::HeadMoments g = gpu.head_moments(l, h), c = cpu.head_moments(l, h);
        EXPECT_LT(relative_frobenius(g.sigma_q, c.sigma_q), 2e-6) << "layer " << l << " head " << h;
        EXPECT_LT(relative_frobenius(g.sigma_v, c.sigma_v), 2e-5) << "layer " << l << " head " << h;
        EXPECT_EQ(g.query_vectors, c.query_vectors);
        EXPECT_EQ(g.value_tokens, c.value_tokens);
        EXPECT_NEAR(g.value_weight, c.value_weight, 1e-5 * c.value_weight);
      }
  }
}

TEST(GpuCalibration, NonFiniteInputsNameTheLayer) {
  OSCAR_REQUIRE_GPU();
  const calib::StatisticsShape shape{3, 4, 2, 16};
  GpuStatisticsCollector gpu(shape, calib::ValueWeighting::Uniform);
  SyntheticLayer s(40, 4, 2, 16, 7);
  DeviceBuffer q, k, v;
  feed_gpu(gpu, s, 0, q, k, v);
  s.v_tm[5] = NAN;
  s.v_tm[77] = INFINITY;
  try {
    feed_gpu(gpu, s, 1, q, k, v);
    FAIL() << "non-finite values accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.where(), "GpuStatisticsCollector (layer 1)");
    EXPECT_NE(std::string(e.what()).find("2 non-finite"), std::string::npos) << e.what();
  }
}

// ---- eigensolver ------------------------------------------------------------------------------------------------

TEST(GpuCalibration, CusolverMatchesLapackAndTheAnalyticSpectrum) {
  OSCAR_REQUIRE_GPU();
  for (int64_t d : {8, 64, 128}) {
    // Σ = U diag(λ) Uᵀ with λ_i = 1 + i (gaps of 1) and U an orthonormal basis (eigenvectors of a random matrix).
    std::mt19937 rng(static_cast<uint32_t>(d));
    std::normal_distribution<double> n(0.0, 1.0);
    std::vector<double> r(static_cast<size_t>(d * d));
    for (double& x : r) x = n(rng);
    const calib::SymmetricEigen basis = calib::symmetric_eigen(r, d, "random");
    std::vector<double> sigma(r.size(), 0.0);
    for (int64_t i = 0; i < d; ++i)
      for (int64_t j = 0; j < d; ++j)
        for (int64_t m = 0; m < d; ++m)
          sigma[i * d + j] += basis.vectors[i * d + m] * static_cast<double>(1 + m) * basis.vectors[j * d + m];
    const calib::SymmetricEigen cpu = calib::symmetric_eigen(sigma, d, "lapack");
    const std::vector<calib::SymmetricEigen> gpu = cusolver_symmetric_eigen(sigma, d, "gpu");
    ASSERT_EQ(gpu.size(), 1u);
    const calib::SymmetricEigen& g = gpu[0];
    double max_angle = 0, max_diff = 0;
    for (int64_t j = 0; j < d; ++j) {
      EXPECT_NEAR(g.values[j], static_cast<double>(d - j), 1e-9 * d) << "d " << d << " eigenvalue " << j;
      EXPECT_NEAR(g.values[j], cpu.values[j], 1e-10 * d);
      double dot = 0;
      for (int64_t i = 0; i < d; ++i) {
        dot += g.vectors[i * d + j] * cpu.vectors[i * d + j];
        max_diff = std::max(max_diff, std::abs(g.vectors[i * d + j] - cpu.vectors[i * d + j]));
      }
      max_angle = std::max(max_angle, std::acos(std::min(1.0, std::abs(dot))));
    }
    EXPECT_LE(max_angle, 1e-3) << "d " << d;
    // Same sign convention: the vectors agree entry by entry, not just up to sign.
    EXPECT_LE(max_diff, 1e-6) << "d " << d;
  }
}

// ---- real checkpoints -------------------------------------------------------------------------------------------

fs::path bf16_copy(const fs::path& src, const fs::path& dst) {
  fs::create_directories(dst);
  const fmt::TensorStore store = fmt::TensorStore::open(src);
  std::vector<std::vector<uint16_t>> keep;
  std::vector<fmt::TensorToWrite> tensors;
  const std::vector<std::string> names = store.names();
  keep.reserve(names.size());
  for (const std::string& name : names) {
    const fmt::TensorView& t = store.get(name);
    keep.push_back(fmt::to_bf16(t));
    tensors.push_back({name, fmt::DType::BF16, t.shape, std::as_bytes(std::span<const uint16_t>(keep.back()))});
  }
  fmt::write_safetensors(dst / "model.safetensors", tensors);
  fs::copy_file(src / "config.json", dst / "config.json", fs::copy_options::overwrite_existing);
  return dst;
}

struct ModelCase {
  const char* model;
  const char* text;
  int64_t num_seqs, seq_len, heldout;
};

void compare_with_cpu(const ModelCase& mc) {
  const fs::path dir = test::fixtures_dir() / mc.model;
  if (!fs::exists(dir / "config.json")) GTEST_SKIP() << "fixture not found: " << dir;
  if (!fs::exists(test::fixtures_dir() / mc.text)) GTEST_SKIP() << "fixture not found: " << mc.text;
  const fs::path cpu_dir = bf16_copy(dir, test::temp_dir_for_test() / "bf16");
  const auto seqs =
      test::fwd::text_sequences(dir, test::fixtures_dir() / mc.text, mc.num_seqs + mc.heldout, mc.seq_len);
  ASSERT_EQ(static_cast<int64_t>(seqs.size()), mc.num_seqs + mc.heldout);
  calib::CalibrationData data;
  data.seq_len = mc.seq_len;
  data.sequences.assign(seqs.begin(), seqs.begin() + mc.num_seqs);
  data.heldout.assign(seqs.begin() + mc.num_seqs, seqs.end());

  auto cpu_model = model::CpuModel::load(cpu_dir);
  auto gpu_model = DeviceModel::load(dir);
  const fmt::ModelConfig& cfg = cpu_model->config();
  const fmt::ModelFingerprint fp = calib::model_fingerprint(dir);
  calib::CalibrationOptions opt;
  opt.quant = fmt::KvQuantSpec::int2_default(cfg.head_dim);
  opt.quant.sink_tokens = 16;
  opt.quant.recent_tokens = 32;

  // Statistics: CPU collector on the CPU forward vs GPU collector on the device forward (3 sequences per batch).
  calib::CpuForwardRunner cpu_runner(*cpu_model);
  calib::StatisticsCollector cpu_stats = calib::collect_statistics(cpu_runner, fp, data, opt);
  GpuStatisticsCollector gpu_stats(calib::StatisticsShape::from_config(cfg), opt.value_weighting);
  for (int pass = 0; pass < 2; ++pass) {
    if (pass == 1) gpu_stats.start_value_pass();
    for (const auto& [first, last] : plan_batches(data.sequences, 3 * mc.seq_len)) {
      PackedBatch batch;
      for (int64_t i = first; i < last; ++i) batch.add_sequence(data.sequences[i]);
      DeviceForwardOptions fo;
      fo.observer = &gpu_stats;
      fo.rows = LogitsRows::None;
      gpu_model->forward(batch, fo);
      gpu_stats.check_finite();
    }
  }
  double worst_q = 0, worst_v = 0;
  for (int64_t l = 0; l < cfg.num_layers; ++l)
    for (int64_t h = 0; h < cfg.num_kv_heads; ++h) {
      const calib::HeadMoments g = gpu_stats.head_moments(l, h), c = cpu_stats.head_moments(l, h);
      worst_q = std::max(worst_q, relative_frobenius(g.sigma_q, c.sigma_q));
      worst_v = std::max(worst_v, relative_frobenius(g.sigma_v, c.sigma_v));
    }
  std::cout << mc.model << ": worst relative Frobenius Σ_Q " << worst_q << ", Σ_V " << worst_v << "\n";
  EXPECT_LE(worst_q, 1e-2);
  EXPECT_LE(worst_v, 1e-2);

  // Bundles from both paths, scored on the same (CPU) held-out samples with each bundle's rotations and clips.
  const calib::CalibrationResult cpu = calib::calibrate(cpu_runner, fp, data, opt);
  const calib::CalibrationResult gpu = calibrate_on_device(*gpu_model, fp, data, opt, {3 * mc.seq_len});
  const calib::CalibrationResult gpu_again = calibrate_on_device(*gpu_model, fp, data, opt, {3 * mc.seq_len});
  EXPECT_EQ(gpu.bundle.layers, gpu_again.bundle.layers) << "GPU calibration is not deterministic";
  calib::HeldoutCollector heldout(calib::StatisticsShape::from_config(cfg), opt.value_weighting,
                                  opt.quant.sink_tokens, opt.heldout_max_tokens);
  for (size_t i = 0; i < data.heldout.size(); ++i) {
    heldout.begin_sequence(static_cast<int64_t>(i));
    cpu_runner.run_sequence(data.heldout[i], heldout);
  }
  const std::vector<calib::HeldoutLayer> layers = heldout.finish();
  double k_cpu = 0, k_gpu = 0, v_cpu = 0, v_gpu = 0;
  for (int64_t l = 0; l < cfg.num_layers; ++l) {
    const auto score = [&](const fmt::Bundle& b, double& k, double& v) {
      const fmt::LayerCalibration& lc = b.layers[l];
      calib::RotatedHeldout r(layers[l], lc.k_rotation, lc.v_rotation, b.rotation_groups, b.quant);
      k += r.key_error(lc.k_clip_ratio) / static_cast<double>(cfg.num_layers);
      v += r.value_error(lc.v_clip_ratio) / static_cast<double>(cfg.num_layers);
    };
    score(cpu.bundle, k_cpu, v_cpu);
    score(gpu.bundle, k_gpu, v_gpu);
  }
  std::cout << mc.model << ": attention-aware error K cpu " << k_cpu << " gpu " << k_gpu << ", V cpu " << v_cpu
            << " gpu " << v_gpu << "\n";
  EXPECT_LE(std::abs(k_gpu - k_cpu), 0.005 * k_cpu);
  EXPECT_LE(std::abs(v_gpu - v_cpu), 0.005 * v_cpu);
  fmt::validate_bundle(gpu.bundle, "gpu bundle");
}

TEST(GpuCalibration, TinyStoriesGpuStatisticsAndBundleMatchCpu) {
  OSCAR_REQUIRE_GPU();
  compare_with_cpu({"models/tinystories-llama2c-280k-hf", "text/tinystories-sample.txt", 12, 128, 3});
}

TEST(GpuCalibration, Qwen3TinyGpuStatisticsAndBundleMatchCpu) {
  OSCAR_REQUIRE_GPU();
  compare_with_cpu({"models/qwen3-tiny-trained", "text/war-and-peace.txt", 8, 256, 2});
}

TEST(GpuCalibration, PlanBatchesPacksWholeSequences) {
  const std::vector<std::vector<int32_t>> seqs = {std::vector<int32_t>(5), std::vector<int32_t>(5),
                                                  std::vector<int32_t>(12), std::vector<int32_t>(3),
                                                  std::vector<int32_t>(3)};
  const auto b = plan_batches(seqs, 10);
  const std::vector<BatchRange> expected = {{0, 2}, {2, 3}, {3, 5}};
  EXPECT_EQ(b, expected);
}

}  // namespace
}  // namespace oscar::rt
