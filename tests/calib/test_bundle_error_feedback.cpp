// Bundle format 1.2: error-feedback tables (fmt::LayerCalibration::*_ef_order / *_ef_weights, Bundle::ef_clip_feedback)
// round trip, are written only when present (a bundle without them stays a 1.1 file), and every invalid table is an
// error naming the file and the object. Format 1.3: the stored key metric (k_ef_metric, ef_damp, ef_metric_positions,
// ef_key_context) likewise.
#include <gtest/gtest.h>
#include <hdf5.h>

#include <cmath>
#include <fstream>
#include <iterator>
#include <random>

#include "formats/atomic_file.h"
#include "formats/bundle.h"
#include "formats/error.h"
#include "lib/calib/error_feedback.h"
#include "lib/calib/rotation.h"
#include "test_support.h"

namespace oscar::fmt {
namespace {

namespace fs = std::filesystem;

constexpr int64_t kD = 8, kLayers = 2, kKvHeads = 2;

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// A random SPD metric's stored table (what `oscar calibrate` writes), per KV head.
void fill_table(std::vector<int32_t>& order, std::vector<float>& weights, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> n(0.0, 1.0);
  order.assign(kKvHeads * kD, 0);
  weights.assign(kKvHeads * kD * kD, 0.0f);
  for (int64_t h = 0; h < kKvHeads; ++h) {
    std::vector<double> a(kD * kD), m(kD * kD, 0.0);
    for (auto& x : a) x = n(rng);
    for (int64_t i = 0; i < kD; ++i)
      for (int64_t j = 0; j < kD; ++j)
        for (int64_t k = 0; k < kD; ++k) m[i * kD + j] += a[i * kD + k] * a[j * kD + k];
    const calib::ErrorFeedbackTable t = calib::error_feedback_table(m, kD, {0.1, true, true}, "test");
    calib::stored_error_feedback(t, std::span<int32_t>(order).subspan(h * kD, kD),
                                 std::span<float>(weights).subspan(h * kD * kD, kD * kD));
  }
}

Bundle ef_bundle(bool tables) {
  Bundle b;
  b.producer = "oscar test";
  b.model = {"Qwen3ForCausalLM", kLayers, 4, kKvHeads, kD, 64, 512, std::string(64, 'a'), std::string(64, 'b')};
  b.calibration.data_files = {{"data/train.txt", std::string(64, 'c')}};
  b.calibration.num_sequences = 2;
  b.calibration.seq_len = 16;
  b.quant = KvQuantSpec::int2_default(kD);
  b.rotation_composition = "hadamard";
  const auto h = calib::hadamard(kD);
  for (int64_t l = 0; l < kLayers; ++l) {
    LayerCalibration layer;
    layer.k_rotation.assign(h.begin(), h.end());
    layer.v_rotation.assign(h.begin(), h.end());
    layer.k_eigenvalues.assign(kD, 1.0);
    layer.v_eigenvalues.assign(kD, 1.0);
    layer.k_clip_ratio = 0.96f;
    layer.v_clip_ratio = 0.92f;
    if (tables) {
      fill_table(layer.k_ef_order, layer.k_ef_weights, 10 + static_cast<uint32_t>(l));
      if (l == 0) fill_table(layer.v_ef_order, layer.v_ef_weights, 20);  // layer 1: values RTN
    }
    b.layers.push_back(std::move(layer));
  }
  b.errors.num_layers = kLayers;
  b.ef_clip_feedback = false;  // not the default, so a dropped attribute would show
  return b;
}

bool has_object(const fs::path& file, const char* object) {
  const hid_t f = H5Fopen(file.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  const bool found = H5Lexists(f, "/layers", H5P_DEFAULT) > 0 && H5Lexists(f, "/layers/00000", H5P_DEFAULT) > 0 &&
                     H5Lexists(f, object, H5P_DEFAULT) > 0;
  H5Fclose(f);
  return found;
}
bool has_root_attr(const fs::path& file, const char* name) {
  const hid_t f = H5Fopen(file.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  const bool found = H5Aexists(f, name) > 0;
  H5Fclose(f);
  return found;
}

TEST(BundleErrorFeedback, RoundTripIsFormat12) {
  const fs::path dir = test::temp_dir_for_test();
  const Bundle b = ef_bundle(true);
  ASSERT_TRUE(has_error_feedback(b));
  EXPECT_EQ(required_format_minor(b), 2);
  write_bundle(dir / "b.oscar", b);
  const Bundle r = read_bundle(dir / "b.oscar");
  EXPECT_EQ(r.format_minor, 2);
  EXPECT_FALSE(r.ef_clip_feedback);
  EXPECT_EQ(r.layers, b.layers);  // bit-exact fp32 weights and orders
  EXPECT_TRUE(r.layers[1].v_ef_order.empty());
  EXPECT_TRUE(has_object(dir / "b.oscar", "/layers/00000/v_ef_weights"));
  EXPECT_FALSE(has_object(dir / "b.oscar", "/layers/00001/v_ef_order"));
  EXPECT_TRUE(has_root_attr(dir / "b.oscar", "ef_clip_feedback"));
  // Every new dataset carries a checksum that verifies.
  int ef_sets = 0;
  for (const DatasetChecksum& c : bundle_checksums(dir / "b.oscar"))
    if (c.object.find("_ef_") != std::string::npos) {
      ++ef_sets;
      EXPECT_TRUE(c.ok()) << c.object << " " << c.problem;
    }
  EXPECT_EQ(ef_sets, 6);  // layer 0: K and V (order + weights), layer 1: K
  // Same content, same bytes.
  write_bundle(dir / "c.oscar", b);
  EXPECT_EQ(slurp(dir / "b.oscar"), slurp(dir / "c.oscar"));
}

TEST(BundleErrorFeedback, WithoutTablesItIsA11FileAndReads) {
  const fs::path dir = test::temp_dir_for_test();
  const Bundle b = ef_bundle(false);
  EXPECT_FALSE(has_error_feedback(b));
  write_bundle(dir / "b.oscar", b);
  EXPECT_FALSE(has_root_attr(dir / "b.oscar", "ef_clip_feedback"));
  EXPECT_FALSE(has_object(dir / "b.oscar", "/layers/00000/k_ef_order"));
  const Bundle r = read_bundle(dir / "b.oscar");
  EXPECT_EQ(r.format_minor, 1);
  EXPECT_TRUE(r.ef_clip_feedback);  // the struct default; meaningless without tables
  EXPECT_EQ(r.layers, b.layers);
  // Stripping the tables from a 1.2 bundle gives the 1.1 bytes: the writer adds nothing else for them.
  Bundle stripped = ef_bundle(true);
  for (auto& l : stripped.layers) l.k_ef_order.clear(), l.k_ef_weights.clear(), l.v_ef_order.clear(), l.v_ef_weights.clear();
  write_bundle(dir / "s.oscar", stripped);
  EXPECT_EQ(slurp(dir / "b.oscar"), slurp(dir / "s.oscar"));
}

// Format 1.3: a symmetric metric per key table, the damping and both contexts.
Bundle metric_bundle() {
  Bundle b = ef_bundle(true);
  std::mt19937 rng(3);
  std::normal_distribution<double> n(0.0, 1.0);
  for (auto& l : b.layers) {
    l.k_ef_metric.assign(kKvHeads * kD * kD, 0.0);
    for (int64_t h = 0; h < kKvHeads; ++h)
      for (int64_t i = 0; i < kD; ++i)
        for (int64_t j = 0; j <= i; ++j)
          l.k_ef_metric[(h * kD + i) * kD + j] = l.k_ef_metric[(h * kD + j) * kD + i] = i == j ? 4.0 + n(rng) : n(rng);
  }
  b.ef_damp = 0.0625;
  b.ef_metric_positions = 16;
  b.ef_key_context = 4096;
  return b;
}

TEST(BundleErrorFeedback, KeyMetricRoundTripIsFormat13AndDroppingItGivesThe12Bytes) {
  const fs::path dir = test::temp_dir_for_test();
  const Bundle b = metric_bundle();
  ASSERT_TRUE(has_key_metric(b));
  EXPECT_EQ(required_format_minor(b), 3);
  write_bundle(dir / "m.oscar", b);
  const Bundle r = read_bundle(dir / "m.oscar");
  EXPECT_EQ(r.format_minor, 3);
  EXPECT_EQ(r.layers, b.layers);  // fp64 metric bit-exact
  EXPECT_EQ(r.ef_damp, 0.0625);
  EXPECT_EQ(r.ef_metric_positions, 16);
  EXPECT_EQ(r.ef_key_context, 4096);
  EXPECT_TRUE(has_object(dir / "m.oscar", "/layers/00001/k_ef_metric"));
  for (const DatasetChecksum& c : bundle_checksums(dir / "m.oscar"))
    if (c.object.find("k_ef_metric") != std::string::npos) EXPECT_TRUE(c.ok()) << c.object << " " << c.problem;
  // Without the metrics the same bundle is the 1.2 file, byte for byte: the attributes go with them.
  Bundle dropped = b;
  for (auto& l : dropped.layers) l.k_ef_metric.clear();
  write_bundle(dir / "d.oscar", dropped);
  write_bundle(dir / "e.oscar", ef_bundle(true));
  EXPECT_EQ(slurp(dir / "d.oscar"), slurp(dir / "e.oscar"));
  EXPECT_FALSE(has_root_attr(dir / "d.oscar", "ef_key_context"));
  EXPECT_EQ(read_bundle(dir / "d.oscar").format_minor, 2);
}

void expect_invalid(const Bundle& b, const std::string& object, const std::string& detail);

TEST(BundleErrorFeedback, InvalidKeyMetricNamesTheObject) {
  {
    Bundle b = metric_bundle();
    b.layers[1].k_ef_metric[kD * kD + 1] += 1e-9;  // KV head 1 [0, 1] vs [1, 0]
    expect_invalid(b, "/layers/00001/k_ef_metric", "KV head 1: not symmetric");
  }
  {
    Bundle b = metric_bundle();
    b.layers[0].k_ef_metric[0] = NAN;
    expect_invalid(b, "/layers/00000/k_ef_metric", "non-finite");
  }
  {
    Bundle b = metric_bundle();
    b.layers[0].k_ef_metric.resize(kD * kD);
    expect_invalid(b, "/layers/00000/k_ef_metric", "must hold [2, 8, 8]");
  }
  {
    Bundle b = metric_bundle();  // a metric is only kept beside the table it rebuilds
    b.layers[0].k_ef_order.clear();
    b.layers[0].k_ef_weights.clear();
    expect_invalid(b, "/layers/00000/k_ef_metric", "without a key table");
  }
  {
    Bundle b = metric_bundle();
    b.ef_damp = -1;
    expect_invalid(b, "mem.oscar", "ef_damp");
  }
  {
    Bundle b = metric_bundle();
    b.ef_metric_positions = 0;
    expect_invalid(b, "mem.oscar", "must be positive");
  }
}

void expect_invalid(const Bundle& b, const std::string& object, const std::string& detail) {
  try {
    validate_bundle(b, "mem.oscar");
    FAIL() << "accepted: " << object << " / " << detail;
  } catch (const Error& e) {
    EXPECT_NE(e.where().find("mem.oscar"), std::string::npos) << e.what();
    EXPECT_NE(e.where().find(object), std::string::npos) << e.what();
    EXPECT_NE(e.detail().find(detail), std::string::npos) << e.what();
  }
}

TEST(BundleErrorFeedback, InvalidTablesNameTheObject) {
  {
    Bundle b = ef_bundle(true);
    b.layers[1].k_ef_order[kD + 3] = b.layers[1].k_ef_order[kD + 4];  // KV head 1: a repeated coordinate
    expect_invalid(b, "/layers/00001/k_ef_order", "KV head 1: not a permutation");
  }
  {
    Bundle b = ef_bundle(true);
    b.layers[0].k_ef_order[2] = static_cast<int32_t>(kD);
    expect_invalid(b, "/layers/00000/k_ef_order", "not a permutation");
  }
  {
    Bundle b = ef_bundle(true);
    b.layers[0].v_ef_weights[3 * kD + 1] = 0.5f;  // below the diagonal
    expect_invalid(b, "/layers/00000/v_ef_weights", "strictly upper triangular");
  }
  {
    Bundle b = ef_bundle(true);
    b.layers[0].v_ef_weights[2 * kD + 2] = 1.0f;  // on the diagonal
    expect_invalid(b, "/layers/00000/v_ef_weights", "strictly upper triangular");
  }
  {
    Bundle b = ef_bundle(true);
    b.layers[0].k_ef_weights[kD * kD + 5] = NAN;  // KV head 1, row 0
    expect_invalid(b, "/layers/00000/k_ef_weights", "non-finite");
  }
  {
    Bundle b = ef_bundle(true);
    b.layers[0].k_ef_weights.resize(kD * kD);  // one head only
    expect_invalid(b, "/layers/00000/k_ef_weights", "must hold [2, 8, 8]");
  }
  {
    Bundle b = ef_bundle(true);
    b.layers[0].k_ef_order.pop_back();
    expect_invalid(b, "/layers/00000/k_ef_order", "must hold [2, 8]");
  }
  {
    Bundle b = ef_bundle(true);
    b.layers[0].v_ef_weights.clear();
    expect_invalid(b, "/layers/00000/v_ef_weights", "order without weights");
  }
  {
    Bundle b = ef_bundle(true);  // a segmented layer cannot carry a table
    b.layers[0].k_segments = {{0, 4, 3}, {4, 8, 1}};
    expect_invalid(b, "/layers/00000/k_ef_order", "whole-head INT2");
  }
  {
    Bundle b = ef_bundle(true);  // 4-bit whole head: the stored rounding is INT2's
    b.quant.k.segments = {{0, kD, 4}};
    expect_invalid(b, "/layers/00000/k_ef_order", "whole-head INT2");
  }
  // write_bundle refuses it too (same checks), naming the output file.
  Bundle b = ef_bundle(true);
  b.layers[1].k_ef_order[0] = -1;
  const fs::path out = test::temp_dir_for_test() / "bad.oscar";
  try {
    write_bundle(out, b);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(e.where().find(out.string() + ":/layers/00001/k_ef_order"), std::string::npos) << e.what();
  }
  EXPECT_FALSE(fs::exists(out));
}

// Damage in a file: a table half removed, a bad attribute, a corrupted weight.
TEST(BundleErrorFeedback, DamagedFileNamesFileAndObject) {
  const fs::path dir = test::temp_dir_for_test();
  const fs::path path = dir / "b.oscar";
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  auto expect_read_error = [&](const std::string& object, const std::string& detail) {
    try {
      read_bundle(path);
      FAIL() << "accepted: " << object;
    } catch (const Error& e) {
      EXPECT_NE(e.where().find(path.string()), std::string::npos) << e.what();
      EXPECT_NE(e.where().find(object), std::string::npos) << e.what();
      EXPECT_NE(e.detail().find(detail), std::string::npos) << e.what();
    }
  };
  write_bundle(path, ef_bundle(true));
  {
    const hid_t f = H5Fopen(path.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
    ASSERT_GE(H5Ldelete(f, "/layers/00001/k_ef_weights", H5P_DEFAULT), 0);
    H5Fclose(f);
  }
  expect_read_error("/layers/00001/k_ef_order", "without its k_ef_weights");

  write_bundle(path, ef_bundle(true));
  {
    const hid_t f = H5Fopen(path.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
    const int32_t two = 2;
    const hid_t a = H5Aopen(f, "ef_clip_feedback", H5P_DEFAULT);
    ASSERT_GE(H5Awrite(a, H5T_NATIVE_INT32, &two), 0);
    H5Aclose(a);
    H5Fclose(f);
  }
  expect_read_error("", "ef_clip_feedback is 2");

  // A weight below the diagonal, with its checksum recomputed: only validation can catch it.
  Bundle b = ef_bundle(true);
  b.layers[0].k_ef_weights[kD] = 0.25f;  // [0][1][0]
  const std::string stored = sha256_hex(std::as_bytes(std::span<const float>(b.layers[0].k_ef_weights)));
  write_bundle(path, ef_bundle(true));
  {
    const hid_t f = H5Fopen(path.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
    const hid_t ds = H5Dopen2(f, "/layers/00000/k_ef_weights", H5P_DEFAULT);
    ASSERT_GE(H5Dwrite(ds, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, b.layers[0].k_ef_weights.data()), 0);
    // Rewrite the sha256 attribute (same fixed-length width) so the read gets past the checksum.
    const hid_t a = H5Aopen(ds, "sha256", H5P_DEFAULT);
    const hid_t t = H5Aget_type(a);
    ASSERT_GE(H5Awrite(a, t, stored.data()), 0);
    H5Tclose(t);
    H5Aclose(a);
    H5Dclose(ds);
    H5Fclose(f);
  }
  expect_read_error("/layers/00000/k_ef_weights", "strictly upper triangular");
}

}  // namespace
}  // namespace oscar::fmt
