// oscar inspect / verify / diff / export, run as the built binary on bundles calibrated (calib::calibrate) on the
// tinystories-llama2c-280k-hf fixture, and on hand-made bundles whose answers are known analytically.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <numbers>
#include <cstdio>
#include <random>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include "formats/atomic_file.h"
#include "formats/bundle.h"
#include "formats/safetensors.h"
#include "lib/calib/calibrator.h"
#include "lib/calib/rotation.h"
#include "lib/model/cpu_model.h"
#include "run_oscar.h"
#include "test_support.h"

namespace oscar::test {
namespace {

namespace fs = std::filesystem;

constexpr const char* kModel = "models/tinystories-llama2c-280k-hf";
constexpr const char* kOtherModel = "models/karpathy-stories-llama2c-260k-hf";  // same shapes, other weights

std::string read_bytes(const fs::path& p) { return slurp(p); }
void write_bytes(const fs::path& p, const std::string& s) {
  std::ofstream out(p, std::ios::binary);
  out.write(s.data(), static_cast<std::streamsize>(s.size()));
}

// Deterministic token sequences (the fixture's vocabulary is 512; ids 0..2 are <unk>/<s>/</s>).
std::vector<std::vector<int32_t>> token_sequences(int n, int len, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int32_t> id(3, 511);
  std::vector<std::vector<int32_t>> out(n);
  for (auto& s : out) {
    s.push_back(1);
    while (static_cast<int>(s.size()) < len) s.push_back(id(rng));
  }
  return out;
}

fmt::Bundle calibrate_fixture(bool per_head) {
  const fs::path dir = fixtures_dir() / kModel;
  auto model = model::CpuModel::load(dir);
  calib::CpuForwardRunner runner(*model);
  calib::CalibrationData data;
  data.sequences = token_sequences(6, 96, 7);
  data.heldout = token_sequences(2, 96, 8);
  data.seq_len = 96;
  data.data_files = {{"synthetic-ids", std::string(64, '0')}};
  calib::CalibrationOptions opt;
  opt.per_head = per_head;
  opt.quant = fmt::KvQuantSpec::int2_default(model->config().head_dim);
  opt.quant.sink_tokens = 4;
  opt.quant.recent_tokens = 8;
  return calib::calibrate(runner, calib::model_fingerprint(dir), data, opt).bundle;
}

// Bundles are calibrated once for the whole suite (a few seconds of CPU forward).
class BundleCommands : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (!fs::exists(fixtures_dir() / kModel)) return;
    // Per process: ctest -j runs each test of this suite in its own process, each calibrating its own bundles.
    dir_ = fs::temp_directory_path() / "oscar-tests" / ("BundleCommands." + std::to_string(::getpid()));
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    shared_ = calibrate_fixture(false);
    per_head_ = calibrate_fixture(true);
    fmt::write_bundle(dir_ / "shared.oscar", shared_);
    fmt::write_bundle(dir_ / "per_head.oscar", per_head_);
  }
  void SetUp() override { OSCAR_REQUIRE_FIXTURE(kModel); }
  static void TearDownTestSuite() {
    std::error_code ec;
    if (!dir_.empty()) fs::remove_all(dir_, ec);
  }
  static fs::path model_dir() { return fixtures_dir() / kModel; }

  static inline fs::path dir_;
  static inline fmt::Bundle shared_, per_head_;
};

// ------------------------------------------------------------------------------------------------ inspect

TEST_F(BundleCommands, InspectJsonReportsTheBundle) {
  const fs::path path = dir_ / "shared.oscar";
  const RunResult r = run_oscar({"inspect", path.string(), "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["sha256"], fmt::sha256_file(path));
  EXPECT_EQ(j["model"]["attention_sha256"], shared_.model.attention_sha256);
  EXPECT_EQ(j["model"]["architecture"], "LlamaForCausalLM");
  EXPECT_EQ(j["rotation_composition"], "eigen*hadamard*bitrev");
  EXPECT_EQ(j["sizes"]["file_bytes"].get<double>(), static_cast<double>(fs::file_size(path)));
  // head_dim 8, 4 KV heads, 5 layers; INT2 + fp16 scale/zero = 2 + 32/8 = 6 bits per element for K and V.
  EXPECT_DOUBLE_EQ(j["sizes"]["kv_bytes_per_token"].get<double>(), 5 * 4 * 8 * (6.0 + 6.0) / 8);
  ASSERT_EQ(j["layers"].size(), 5u);
  for (size_t l = 0; l < 5; ++l) {
    const auto& layer = j["layers"][l];
    const auto& want = shared_.layers[l];
    EXPECT_FLOAT_EQ(layer["k_clip_ratio"].get<float>(), want.k_clip_ratio);
    EXPECT_FLOAT_EQ(layer["v_clip_ratio"].get<float>(), want.v_clip_ratio);
    const auto& g = layer["groups"][0];
    ASSERT_EQ(g["k_top_eigenvalues"].size(), 3u);
    for (size_t i = 0; i < 3; ++i) EXPECT_DOUBLE_EQ(g["k_top_eigenvalues"][i].get<double>(), want.k_eigenvalues[i]);
    EXPECT_DOUBLE_EQ(g["k_condition"].get<double>(), want.k_eigenvalues[0] / want.k_eigenvalues[7]);
  }
  ASSERT_EQ(j["error_report"].size(), shared_.errors.rows.size());
  EXPECT_EQ(j["error_report"].back()["row"], "oscar+tuned_clip");
}

TEST_F(BundleCommands, InspectTextNamesEverySection) {
  const RunResult r = run_oscar({"inspect", (dir_ / "per_head.oscar").string()});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  for (const char* s : {"LlamaForCausalLM", "config sha256", "calibration", "quant K", "windows", "rotations",
                        "4, one per KV head", "error report", "oscar+tuned_clip"})
    EXPECT_NE(r.out.find(s), std::string::npos) << s << "\n" << r.out;
  // One spectrum row per (layer, group): 5 x 4.
  int rows = 0;
  for (size_t p = r.out.find("\n    4     3"); p != std::string::npos; p = r.out.find("\n    4     3", p + 1)) ++rows;
  EXPECT_EQ(rows, 1);
}

TEST_F(BundleCommands, InspectRefusesANonBundle) {
  const fs::path bogus = temp_dir_for_test() / "x.oscar";
  write_bytes(bogus, "not hdf5 at all");
  const RunResult r = run_oscar({"inspect", bogus.string()});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_TRUE(is_one_error_line(r.err)) << r.err;
  EXPECT_NE(r.err.find("not an HDF5 bundle"), std::string::npos) << r.err;
}

// ------------------------------------------------------------------------------------------------ verify

TEST_F(BundleCommands, VerifyPassesAGoodBundleAgainstItsModel) {
  for (const char* name : {"shared.oscar", "per_head.oscar"}) {
    const RunResult r = run_oscar({"verify", (dir_ / name).string(), "--model", model_dir().string()});
    EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
    EXPECT_EQ(r.out.find("FAIL"), std::string::npos) << r.out;
    EXPECT_NE(r.out.find("PASS  fingerprint attention_sha256"), std::string::npos) << r.out;
  }
  const RunResult j = run_oscar({"verify", (dir_ / "per_head.oscar").string(), "--json"});
  ASSERT_EQ(j.exit_code, 0);
  const auto doc = nlohmann::json::parse(j.out);
  int orthogonality = 0, checksums = 0;
  for (const auto& c : doc["checks"]) {
    const std::string name = c["check"];
    orthogonality += name.starts_with("orthogonal ");
    checksums += name.starts_with("sha256 ");
  }
  EXPECT_EQ(orthogonality, 5 * 2 * 4);  // layers x {K, V} x groups
  // Per layer 5 datasets, the error report 2, the quant segments 2.
  EXPECT_EQ(checksums, 5 * 5 + 2 + 2);
  EXPECT_TRUE(doc["ok"].get<bool>());
}

TEST_F(BundleCommands, VerifyDetectsAFlippedByte) {
  const fs::path path = temp_dir_for_test() / "flipped.oscar";
  std::string bytes = read_bytes(dir_ / "shared.oscar");
  // The raw bytes of layer 2's V rotation are stored contiguously (HDF5 contiguous layout, little endian).
  const auto& rot = shared_.layers[2].v_rotation;
  const std::string needle(reinterpret_cast<const char*>(rot.data()), rot.size() * sizeof(float));
  const size_t at = bytes.find(needle);
  ASSERT_NE(at, std::string::npos);
  ASSERT_EQ(bytes.find(needle, at + 1), std::string::npos);
  bytes[at + 37] = static_cast<char>(bytes[at + 37] ^ 0x01);
  write_bytes(path, bytes);
  const RunResult r = run_oscar({"verify", path.string()});
  EXPECT_EQ(r.exit_code, 1) << r.out;
  EXPECT_NE(r.out.find("FAIL  sha256 /layers/00002/v_rotation"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("PASS  sha256 /layers/00002/k_rotation"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("FAIL  structure"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("FAILED"), std::string::npos);
}

TEST_F(BundleCommands, VerifyDetectsAnotherModel) {
  OSCAR_REQUIRE_FIXTURE(kOtherModel);
  const RunResult r =
      run_oscar({"verify", (dir_ / "shared.oscar").string(), "--model", (fixtures_dir() / kOtherModel).string()});
  EXPECT_EQ(r.exit_code, 1) << r.out;
  EXPECT_NE(r.out.find("FAIL  fingerprint attention_sha256"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("PASS  fingerprint head_dim"), std::string::npos) << r.out;
}

// A rotation 5e-5 away from orthogonal passes the reader (1e-4) but not verify's 1e-5.
TEST_F(BundleCommands, VerifyDetectsANearlyOrthogonalRotation) {
  fmt::Bundle b = shared_;
  // Scaling column 0 by 1 + ε makes (RᵀR)₀₀ = (1 + ε)²: an error of 2ε = 5e-5 at exactly one entry.
  for (int64_t r = 0; r < 8; ++r) b.layers[3].k_rotation[r * 8] *= 1.0f + 2.5e-5f;
  const fs::path path = temp_dir_for_test() / "skewed.oscar";
  fmt::write_bundle(path, b);
  const RunResult r = run_oscar({"verify", path.string()});
  EXPECT_EQ(r.exit_code, 1) << r.out;
  EXPECT_NE(r.out.find("FAIL  orthogonal layer 3 k group 0"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("PASS  orthogonal layer 3 v group 0"), std::string::npos) << r.out;
}

// ------------------------------------------------------------------------------------------------ diff

TEST_F(BundleCommands, DiffOfABundleWithItselfIsZero) {
  const std::string p = (dir_ / "per_head.oscar").string();
  const RunResult r = run_oscar({"diff", p, p, "--json", "--k", "3"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto j = nlohmann::json::parse(r.out);
  EXPECT_TRUE(j["differences"].empty());
  ASSERT_EQ(j["layers"].size(), 5u * 4u);
  for (const auto& l : j["layers"])
    for (const char* key : {"k_max_angle_columns_deg", "k_max_angle_eigen_deg", "v_max_angle_columns_deg",
                            "v_max_angle_eigen_deg"})
      EXPECT_LT(l[key].get<double>(), 1e-9) << key;
}

TEST_F(BundleCommands, DiffReportsSetupDifferences) {
  const RunResult r = run_oscar({"diff", (dir_ / "shared.oscar").string(), (dir_ / "per_head.oscar").string()});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("differs  rotation_groups"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("differs  option per_head"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("not comparable"), std::string::npos) << r.out;
}

// A Hadamard-composed bundle (like hadamard, none and spectral ones) stores no eigenbasis: diff compares its stored
// columns and reports the eigenspace angle as unavailable instead of refusing the pair.
TEST_F(BundleCommands, DiffComparesColumnsOfBundlesWithoutAnEigenbasis) {
  fmt::Bundle hadamard = shared_;
  hadamard.rotation_composition = "hadamard";
  const fs::path hp = dir_ / "hadamard.oscar";
  fmt::write_bundle(hp, hadamard);
  const RunResult j = run_oscar({"diff", (dir_ / "shared.oscar").string(), hp.string(), "--json", "--k", "3"});
  ASSERT_EQ(j.exit_code, 0) << j.err;
  const auto doc = nlohmann::json::parse(j.out);
  ASSERT_EQ(doc["layers"].size(), 5u);
  for (const auto& l : doc["layers"]) {
    EXPECT_TRUE(l["k_max_angle_eigen_deg"].is_null());
    EXPECT_TRUE(l["v_max_angle_eigen_deg"].is_null());
    EXPECT_LT(l["k_max_angle_columns_deg"].get<double>(), 1e-9);  // same stored matrices
  }
  const RunResult t = run_oscar({"diff", (dir_ / "shared.oscar").string(), hp.string()});
  ASSERT_EQ(t.exit_code, 0) << t.err;
  EXPECT_NE(t.out.find("n/a"), std::string::npos) << t.out;
  EXPECT_NE(t.out.find("differs  rotation_composition"), std::string::npos) << t.out;
}

// Hand-made bundles with known geometry: B's layer-1 K eigenbasis turns the top eigenvector by θ towards the
// (k+1)-th, so the leading-k eigenspaces meet at exactly θ; B's layer-0 V rotation mixes stored column 0 with
// column k by φ, so the leading-k stored columns meet at exactly φ.
TEST(BundleDiff, AnglesMatchConstructedRotations) {
  const int64_t d = 8, k = 2, L = 2;
  const double theta = 0.3, phi = 0.2;
  // A fixed orthogonal U (columns = eigenvectors, descending values): the normalized Hadamard is one.
  std::vector<double> u = calib::hadamard(d);
  auto eigen_with = [&](const std::vector<double>& vectors) {
    calib::SymmetricEigen e;
    e.dim = d;
    for (int64_t i = 0; i < d; ++i) e.values.push_back(8.0 - double(i));
    e.vectors = vectors;
    return e;
  };
  std::vector<double> u_turned = u;  // column 0 := cos θ u0 + sin θ u_k, column k := −sin θ u0 + cos θ u_k
  for (int64_t r = 0; r < d; ++r) {
    const double a = u[r * d + 0], b = u[r * d + k];
    u_turned[r * d + 0] = std::cos(theta) * a + std::sin(theta) * b;
    u_turned[r * d + k] = -std::sin(theta) * a + std::cos(theta) * b;
  }
  auto to_float = [](const std::vector<double>& v) { return std::vector<float>(v.begin(), v.end()); };
  auto make = [&](bool turned) {
    fmt::Bundle b;
    b.producer = "test";
    b.model = {"LlamaForCausalLM", L, 4, 2, d, 32, 100, std::string(64, 'a'), std::string(64, 'b')};
    b.quant = fmt::KvQuantSpec::int2_default(d);
    b.rotation_composition = "eigen*hadamard*bitrev";
    for (int64_t l = 0; l < L; ++l) {
      fmt::LayerCalibration layer;
      const auto eig = eigen_with(turned && l == 1 ? u_turned : u);
      layer.k_rotation = to_float(calib::build_rotation(calib::RotationKind::EigenHadamard, eig, d));
      auto v = calib::build_rotation(calib::RotationKind::EigenHadamard, eigen_with(u), d);
      if (turned && l == 0)
        for (int64_t r = 0; r < d; ++r) {
          const double a = v[r * d + 0], c = v[r * d + k];
          v[r * d + 0] = std::cos(phi) * a + std::sin(phi) * c;
          v[r * d + k] = -std::sin(phi) * a + std::cos(phi) * c;
        }
      layer.v_rotation = to_float(v);
      layer.k_eigenvalues = eig.values;
      layer.v_eigenvalues = eig.values;
      b.layers.push_back(layer);
    }
    b.errors.num_layers = L;
    return b;
  };
  const fs::path dir = temp_dir_for_test();
  fmt::write_bundle(dir / "a.oscar", make(false));
  fmt::write_bundle(dir / "b.oscar", make(true));
  const RunResult r =
      run_oscar({"diff", (dir / "a.oscar").string(), (dir / "b.oscar").string(), "--k", std::to_string(k), "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto j = nlohmann::json::parse(r.out);
  ASSERT_EQ(j["layers"].size(), 2u);
  constexpr double deg = 180.0 / std::numbers::pi;
  const auto& l0 = j["layers"][0];
  const auto& l1 = j["layers"][1];
  EXPECT_NEAR(l1["k_max_angle_eigen_deg"].get<double>(), theta * deg, 1e-3);
  EXPECT_NEAR(l0["v_max_angle_columns_deg"].get<double>(), phi * deg, 1e-3);
  EXPECT_LT(l0["k_max_angle_eigen_deg"].get<double>(), 1e-3);
  EXPECT_LT(l0["k_max_angle_columns_deg"].get<double>(), 1e-3);
  EXPECT_LT(l1["v_max_angle_columns_deg"].get<double>(), 1e-3);
}

// ------------------------------------------------------------------------------------------------ export

TEST_F(BundleCommands, ExportSafetensorsRoundTrips) {
  const fs::path out = temp_dir_for_test() / "export";
  const RunResult r = run_oscar({"export", (dir_ / "per_head.oscar").string(), "--format", "safetensors", "--out",
                                 out.string()});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto manifest = nlohmann::json::parse(slurp(out / "manifest.json"));
  EXPECT_EQ(manifest["files"]["oscar_rotations.safetensors"]["sha256"],
            fmt::sha256_file(out / "oscar_rotations.safetensors"));
  EXPECT_EQ(manifest["bundle"]["sha256"], fmt::sha256_file(dir_ / "per_head.oscar"));
  auto file = fmt::SafetensorsFile::open(out / "oscar_rotations.safetensors");
  EXPECT_EQ(file->tensors().size(), manifest["tensors"].size());
  EXPECT_EQ(file->tensors().size(), 5u * 4u + 4u);
  for (size_t l = 0; l < 5; ++l) {
    const auto* v = file->find("layers." + std::to_string(l) + ".v_rotation");
    ASSERT_NE(v, nullptr);
    EXPECT_EQ(v->shape, (std::vector<int64_t>{4, 8, 8}));
    EXPECT_EQ(fmt::to_f32(*v), per_head_.layers[l].v_rotation);
    const auto* e = file->find("layers." + std::to_string(l) + ".k_eigenvalues");
    ASSERT_NE(e, nullptr);
    ASSERT_EQ(e->dtype, fmt::DType::F64);
    std::vector<double> ev(e->numel());
    std::memcpy(ev.data(), e->data, e->nbytes);
    EXPECT_EQ(ev, per_head_.layers[l].k_eigenvalues);
  }
  const auto* clips = file->find("v_clip_ratio");
  ASSERT_NE(clips, nullptr);
  const auto c = fmt::to_f32(*clips);
  for (size_t l = 0; l < 5; ++l) EXPECT_EQ(c[l], per_head_.layers[l].v_clip_ratio);
  // Only the two outputs, no temp files left behind.
  int entries = 0;
  for ([[maybe_unused]] const auto& e : fs::directory_iterator(out)) ++entries;
  EXPECT_EQ(entries, 2);
}

TEST_F(BundleCommands, ExportSglangWritesRawTensorsAndManifest) {
  const fs::path out = temp_dir_for_test() / "sglang";
  const RunResult r = run_oscar({"export", (dir_ / "shared.oscar").string(), "--format", "sglang-oscar", "--out",
                                 out.string()});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto m = nlohmann::json::parse(slurp(out / "manifest.json"));
  EXPECT_TRUE(m["server"]["supported"].get<bool>());
  EXPECT_EQ(m["server"]["env"]["SGLANG_MIXED_KV_PREFIX_TOKENS"], "4");
  const auto& t = m["tensors"]["k_rotation"];
  EXPECT_EQ(t["shape"], (std::vector<int64_t>{5, 1, 8, 8}));
  const std::string raw = slurp(out / t["file"].get<std::string>());
  EXPECT_EQ(t["sha256"], fmt::sha256_hex(std::as_bytes(std::span(raw.data(), raw.size()))));
  ASSERT_EQ(raw.size(), 5u * 64u * 4u);
  std::vector<float> layer3(64);
  std::memcpy(layer3.data(), raw.data() + 3 * 64 * 4, 64 * 4);
  EXPECT_EQ(layer3, shared_.layers[3].k_rotation);
  // The converter's validation runs without torch.
  const fs::path script = fs::path(OSCAR_BINARY_DIR).parent_path() / "scripts/export/to_sglang_oscar.py";
  const std::string python = python_with("numpy");
  if (fs::exists(script) && !python.empty()) {
    const std::string cmd = python + " " + script.string() + " " + out.string() + " --check-only >/dev/null 2>&1";
    EXPECT_EQ(std::system(cmd.c_str()), 0) << cmd;
    // An edited tensor file must be refused (sha256 against the manifest).
    std::string bytes = slurp(out / "v_rotation.bin");
    bytes[5] = static_cast<char>(bytes[5] ^ 0x10);
    write_bytes(out / "v_rotation.bin", bytes);
    EXPECT_NE(std::system(cmd.c_str()), 0) << cmd;
  } else {
    std::printf("skipped the converter check: no python3 with numpy\n");
  }
}

// Fold: the folded checkpoint computes the same logits, its K cache is unchanged and its V cache is V·R_v.
class KvCapture : public model::Observer {
 public:
  void on_attention_inputs(const model::AttentionInputs& in) override {
    const size_t n = static_cast<size_t>(in.num_kv_heads * in.num_tokens * in.head_dim);
    k.emplace_back(in.k, in.k + n);
    v.emplace_back(in.v, in.v + n);
  }
  std::vector<std::vector<float>> k, v;
};

struct ForwardResult {
  std::vector<float> logits;
  KvCapture kv;
};

ForwardResult run_forward(const fs::path& dir, const std::vector<int32_t>& ids) {
  auto model = model::CpuModel::load(dir);
  ForwardResult r;
  model::KvCache cache(model->config(), static_cast<int64_t>(ids.size()));
  model::ForwardOptions opt;
  opt.observer = &r.kv;
  r.logits = model->forward(ids, cache, opt);
  return r;
}

TEST_F(BundleCommands, FoldVIsExact) {
  const std::vector<int32_t> ids = token_sequences(1, 40, 99)[0];
  const ForwardResult base = run_forward(model_dir(), ids);
  for (const auto* bundle : {&shared_, &per_head_}) {
    const bool per_head = bundle == &per_head_;
    const fs::path out = temp_dir_for_test() / (per_head ? "per_head" : "shared");
    const RunResult r = run_oscar({"export", (dir_ / (per_head ? "per_head.oscar" : "shared.oscar")).string(),
                                   "--format", "safetensors", "--fold-v", "--model", model_dir().string(), "--out",
                                   out.string()});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    for (const char* f : {"config.json", "tokenizer.json", "model.safetensors"}) EXPECT_TRUE(fs::exists(out / f)) << f;
    EXPECT_EQ(slurp(out / "config.json"), slurp(model_dir() / "config.json"));
    const ForwardResult folded = run_forward(out, ids);
    ASSERT_EQ(folded.logits.size(), base.logits.size());
    double worst_logit = 0;
    for (size_t i = 0; i < base.logits.size(); ++i)
      worst_logit = std::max(worst_logit, double(std::abs(folded.logits[i] - base.logits[i])));
    EXPECT_LE(worst_logit, 1e-4) << (per_head ? "per-head" : "shared");
    const int64_t d = 8, T = static_cast<int64_t>(ids.size()), groups = bundle->rotation_groups;
    // Layer 0's K depends on nothing the fold touches; later layers see the residual stream through the folded
    // o_proj, so their K and V carry fp32 rounding (values here reach |70|, so 1e-4 is ~1e-6 relative).
    EXPECT_EQ(folded.kv.k[0], base.kv.k[0]);
    double worst_v = 0, worst_k = 0;
    for (size_t l = 0; l < 5; ++l) {
      for (size_t i = 0; i < base.kv.k[l].size(); ++i)
        worst_k = std::max(worst_k, double(std::abs(folded.kv.k[l][i] - base.kv.k[l][i])));
      for (int64_t h = 0; h < 4; ++h) {
        const float* rot = bundle->layers[l].v_rotation.data() + (groups == 1 ? 0 : h) * d * d;
        for (int64_t t = 0; t < T; ++t)
          for (int64_t j = 0; j < d; ++j) {
            double want = 0;
            for (int64_t i = 0; i < d; ++i) want += double(base.kv.v[l][(h * T + t) * d + i]) * rot[i * d + j];
            worst_v = std::max(worst_v, std::abs(want - folded.kv.v[l][(h * T + t) * d + j]));
          }
      }
    }
    EXPECT_LE(worst_v, 1e-4);
    EXPECT_LE(worst_k, 1e-4);
    // The fold is not the identity (else the test would prove nothing).
    EXPECT_NE(folded.kv.v[0], base.kv.v[0]);
  }
}

TEST_F(BundleCommands, FoldVRefusesAnotherModel) {
  OSCAR_REQUIRE_FIXTURE(kOtherModel);
  const fs::path out = temp_dir_for_test() / "other";
  const RunResult r = run_oscar({"export", (dir_ / "shared.oscar").string(), "--format", "safetensors", "--fold-v",
                                 "--model", (fixtures_dir() / kOtherModel).string(), "--out", out.string()});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_TRUE(is_one_error_line(r.err)) << r.err;
  EXPECT_NE(r.err.find("fingerprint differs"), std::string::npos) << r.err;
  EXPECT_FALSE(fs::exists(out / "model.safetensors"));
}

TEST_F(BundleCommands, ExportFlagMisuseIsAnError) {
  const std::string b = (dir_ / "shared.oscar").string();
  const fs::path out = temp_dir_for_test();
  EXPECT_EQ(run_oscar({"export", b, "--format", "sglang-oscar", "--fold-v", "--out", out.string()}).exit_code, 1);
  EXPECT_EQ(run_oscar({"export", b, "--format", "onnx", "--out", out.string()}).exit_code, 2);
}

}  // namespace
}  // namespace oscar::test
