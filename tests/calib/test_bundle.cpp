// The .oscar bundle (HDF5, format v1): round trip of every field, deterministic bytes, and the errors a damaged
// or too-new file must produce.
#include <gtest/gtest.h>
#include <hdf5.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <iterator>
#include <thread>

#include "formats/atomic_file.h"
#include "formats/bundle.h"
#include "formats/error.h"
#include "formats/safetensors.h"
#include "lib/calib/rotation.h"
#include "test_support.h"

namespace oscar::fmt {
namespace {

namespace fs = std::filesystem;

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}
void spit(const fs::path& p, const std::string& bytes) {
  std::ofstream out(p, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

constexpr double kMarker = 1234.5678125;  // a distinctive eigenvalue whose bytes the corruption test looks for

Bundle sample_bundle(int64_t groups = 1) {
  const int64_t d = 8, L = 3;
  Bundle b;
  b.producer = "oscar test";
  b.model = {"LlamaForCausalLM", L, 4, 2, d, 64, 512, std::string(64, 'a'), std::string(64, 'b')};
  b.calibration.data_files = {{"data/train.txt", std::string(64, 'c')}, {"data/more.jsonl", std::string(64, 'd')}};
  b.calibration.num_sequences = 16;
  b.calibration.num_tokens = 16 * 96;
  b.calibration.seq_len = 96;
  b.calibration.num_heldout_sequences = 4;
  b.calibration.seed = 0xfeedfacecafebeefull;  // above 2^63: the unsigned type must survive
  b.calibration.options = {{"per_head", groups > 1 ? "true" : "false"}, {"value_weighting", "query"}};
  b.quant = KvQuantSpec::int2_default(d);
  b.quant.k.segments = {{0, 4, 4}, {4, 8, 2}};
  b.quant.sink_tokens = 16;
  b.quant.recent_tokens = 32;
  b.rotation_groups = groups;
  b.rotation_composition = "eigen*hadamard*bitrev";
  const auto h = calib::hadamard(d);
  for (int64_t l = 0; l < L; ++l) {
    LayerCalibration layer;
    for (int64_t g = 0; g < groups; ++g) {
      for (int64_t i = 0; i < d * d; ++i) {
        layer.k_rotation.push_back(static_cast<float>(h[i]));
        // A permutation matrix: orthogonal, and different from K so a K/V swap would show.
        const int64_t r = i / d, c = i % d;
        layer.v_rotation.push_back(c == (r + l + g + 1) % d ? 1.0f : 0.0f);
      }
      for (int64_t i = 0; i < d; ++i) {
        layer.k_eigenvalues.push_back(l == 1 && g == 0 && i == 0 ? kMarker : 100.0 / double(i + 1 + l));
        layer.v_eigenvalues.push_back(50.0 / double(i + 2 + g));
      }
    }
    layer.k_clip_ratio = 0.95f - 0.01f * float(l);
    layer.v_clip_ratio = 0.90f + 0.02f * float(l);
    b.layers.push_back(std::move(layer));
  }
  b.errors.rows = {"none", "none+clip", "oscar", "oscar+clip", "oscar+tuned_clip"};
  b.errors.num_layers = L;
  for (size_t r = 0; r < b.errors.rows.size(); ++r)
    for (int64_t l = 0; l < L; ++l) {
      b.errors.k_relative_error.push_back(0.5 / double(r + 1) + 0.001 * double(l));
      b.errors.v_relative_error.push_back(0.25 / double(r + 1) + 0.002 * double(l));
    }
  return b;
}

void expect_equal(const Bundle& a, const Bundle& b) {
  EXPECT_EQ(a.format_major, b.format_major);
  EXPECT_EQ(a.format_minor, b.format_minor);
  EXPECT_EQ(a.producer, b.producer);
  EXPECT_EQ(a.model, b.model);
  EXPECT_EQ(a.calibration, b.calibration);
  EXPECT_EQ(a.quant.head_dim, b.quant.head_dim);
  EXPECT_EQ(a.quant.sink_tokens, b.quant.sink_tokens);
  EXPECT_EQ(a.quant.recent_tokens, b.quant.recent_tokens);
  for (auto [x, y] : {std::pair{&a.quant.k, &b.quant.k}, std::pair{&a.quant.v, &b.quant.v}}) {
    EXPECT_EQ(x->storage, y->storage);
    EXPECT_EQ(x->clip_ratio, y->clip_ratio);
    ASSERT_EQ(x->segments.size(), y->segments.size());
    for (size_t i = 0; i < x->segments.size(); ++i) {
      EXPECT_EQ(x->segments[i].begin, y->segments[i].begin);
      EXPECT_EQ(x->segments[i].end, y->segments[i].end);
      EXPECT_EQ(x->segments[i].bits, y->segments[i].bits);
    }
  }
  EXPECT_EQ(a.rotation_groups, b.rotation_groups);
  EXPECT_EQ(a.rotation_composition, b.rotation_composition);
  EXPECT_EQ(a.layers, b.layers);
  EXPECT_EQ(a.errors, b.errors);
}

TEST(Bundle, RoundTripsEveryField) {
  const fs::path dir = test::temp_dir_for_test();
  for (int64_t groups : {1, 2}) {
    const Bundle b = sample_bundle(groups);
    write_bundle(dir / "b.oscar", b);
    expect_equal(read_bundle(dir / "b.oscar"), b);
  }
  // No stray temp files next to the target.
  int files = 0;
  for (const auto& e : fs::directory_iterator(dir)) files += e.is_regular_file();
  EXPECT_EQ(files, 1);
}

TEST(Bundle, TwoWritesAreByteIdentical) {
  const fs::path dir = test::temp_dir_for_test();
  const Bundle b = sample_bundle();
  write_bundle(dir / "one.oscar", b);
  // HDF5 timestamps have one-second resolution: without the wait, timestamps could not make the writes differ.
  std::this_thread::sleep_for(std::chrono::milliseconds(1100));
  write_bundle(dir / "two.oscar", b);
  const std::string one = slurp(dir / "one.oscar");
  EXPECT_GT(one.size(), 1000u);
  EXPECT_EQ(one, slurp(dir / "two.oscar"));
  Bundle changed = b;
  changed.layers[2].v_clip_ratio = 0.5f;
  write_bundle(dir / "two.oscar", changed);
  EXPECT_NE(one, slurp(dir / "two.oscar"));
}

TEST(Bundle, CorruptedDatasetFailsItsChecksum) {
  const fs::path dir = test::temp_dir_for_test();
  const fs::path path = dir / "b.oscar";
  write_bundle(path, sample_bundle());
  std::string bytes = slurp(path);
  char marker[8];
  std::memcpy(marker, &kMarker, 8);
  const size_t at = bytes.find(std::string(marker, 8));
  ASSERT_NE(at, std::string::npos);
  bytes[at + 3] ^= 0x10;  // still a finite, plausible double: only the checksum can tell
  spit(path, bytes);
  try {
    read_bundle(path);
    FAIL() << "corrupted bundle accepted";
  } catch (const Error& e) {
    EXPECT_NE(e.where().find(path.string()), std::string::npos) << e.what();
    EXPECT_NE(e.where().find("/layers/00001/k_eigenvalues"), std::string::npos) << e.what();
    EXPECT_NE(e.detail().find("checksum"), std::string::npos) << e.what();
  }
}

TEST(Bundle, NewerMajorIsRefusedOlderMinorIsRead) {
  const fs::path dir = test::temp_dir_for_test();
  const fs::path path = dir / "b.oscar";
  const Bundle b = sample_bundle();
  auto set_version = [&](int32_t major, int32_t minor) {
    write_bundle(path, b);
    H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
    hid_t f = H5Fopen(path.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
    ASSERT_GE(f, 0);
    for (auto [name, value] : {std::pair{"format_major", major}, std::pair{"format_minor", minor}}) {
      hid_t a = H5Aopen(f, name, H5P_DEFAULT);
      ASSERT_GE(a, 0);
      ASSERT_GE(H5Awrite(a, H5T_NATIVE_INT32, &value), 0);
      H5Aclose(a);
    }
    H5Fclose(f);
  };
  set_version(kBundleFormatMajor + 1, 0);
  try {
    read_bundle(path);
    FAIL() << "newer major accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.where(), path.string());
    EXPECT_NE(e.detail().find("newer"), std::string::npos) << e.what();
  }
  // A later minor of our major (written by a newer oscar that only added objects) is still read.
  set_version(1, 7);
  const Bundle later = read_bundle(path);
  EXPECT_EQ(later.format_minor, 7);
  EXPECT_EQ(later.layers, b.layers);
  // And a file that says 2.x without any 2.0 object is read too (nothing in it needs the newer reader).
  set_version(2, 3);
  const Bundle two = read_bundle(path);
  EXPECT_EQ(two.format_major, 2);
  EXPECT_EQ(two.layers, b.layers);
}

TEST(Bundle, TruncatedFileIsAnErrorNamingIt) {
  const fs::path dir = test::temp_dir_for_test();
  const fs::path path = dir / "b.oscar";
  write_bundle(path, sample_bundle());
  const std::string bytes = slurp(path);
  for (size_t keep : {bytes.size() / 2, bytes.size() - 100, size_t{10}, size_t{0}}) {
    spit(path, bytes.substr(0, keep));
    try {
      read_bundle(path);
      FAIL() << "truncated bundle (" << keep << " bytes) accepted";
    } catch (const Error& e) {
      EXPECT_NE(e.where().find(path.string()), std::string::npos) << e.what();
    }
  }
  EXPECT_THROW(read_bundle(dir / "missing.oscar"), Error);
}

TEST(Bundle, WriteRefusesInconsistentBundles) {
  const fs::path dir = test::temp_dir_for_test();
  Bundle b = sample_bundle();
  b.layers[0].k_rotation[3] += 0.5f;  // no longer orthogonal
  EXPECT_THROW(write_bundle(dir / "x.oscar", b), Error);
  b = sample_bundle();
  b.layers.pop_back();
  EXPECT_THROW(write_bundle(dir / "x.oscar", b), Error);
  b = sample_bundle();
  b.errors.v_relative_error[1] = std::nan("");
  EXPECT_THROW(write_bundle(dir / "x.oscar", b), Error);
  EXPECT_FALSE(fs::exists(dir / "x.oscar"));
}

TEST(Bundle, TensorDigestDependsOnNamesAndBytes) {
  OSCAR_REQUIRE_FIXTURE("models/tinystories-llama2c-280k-hf/model.safetensors");
  const TensorStore store = TensorStore::open(test::fixtures_dir() / "models/tinystories-llama2c-280k-hf");
  const std::string q = "model.layers.0.self_attn.q_proj.weight", k = "model.layers.0.self_attn.k_proj.weight";
  const std::string qk = sha256_tensors(store, {q, k});
  EXPECT_EQ(qk.size(), 64u);
  EXPECT_EQ(qk, sha256_tensors(store, {q, k}));
  EXPECT_NE(qk, sha256_tensors(store, {k, q}));
  // Independent spelling of the manifest.
  const TensorView& tq = store.get(q);
  const TensorView& tk = store.get(k);
  auto line = [](const TensorView& t) {
    return t.name + "|" + std::string(dtype_name(t.dtype)) + "|" + std::to_string(t.shape[0]) + "," +
           std::to_string(t.shape[1]) + "|" + sha256_hex(std::span<const std::byte>(t.data, t.nbytes)) + "\n";
  };
  const std::string manifest = line(tq) + line(tk);
  EXPECT_EQ(qk, sha256_hex(std::as_bytes(std::span<const char>(manifest.data(), manifest.size()))));
  EXPECT_THROW(sha256_tensors(store, {"no.such.tensor"}), Error);
}

}  // namespace
}  // namespace oscar::fmt
