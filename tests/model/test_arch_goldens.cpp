// The CPU forward against transformers (fp32, eager attention) on small random-init checkpoints of every supported
// architecture: tests/data/golden/<name>/ holds a checkpoint saved by transformers' save_pretrained and
// golden.safetensors with its logits and DynamicCache K/V (made by scripts/golden/make_arch_goldens.py; see
// tests/data/golden/README.md). Each folder is one ctest entry.
#include <gtest/gtest.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <span>
#include <string>
#include <vector>

#include "formats/safetensors.h"
#include "lib/model/cpu_model.h"
#include "test_support.h"

namespace {

namespace fs = std::filesystem;
using oscar::fmt::DType;
using oscar::fmt::TensorStore;
using oscar::fmt::TensorView;
using oscar::model::CpuModel;
using oscar::model::KvCache;

// transformers fp32 and our fp32 differ only in summation order; 1e-3 leaves room for that over 300 tokens
// while any real mistake (a rope band, a missing bias, a norm, GQA head mapping) is off by far more.
constexpr double kTolerance = 1e-3;
// Prefill length before the token-by-token decode (capped at half of a shorter golden sequence); the rest of the
// sequence goes one token per forward call.
constexpr int64_t kPrefillTokens = 200;
constexpr const char* kGoldenFile = "golden.safetensors";
constexpr const char* kNoFolders = "";

fs::path golden_root() { return oscar::test::test_data_dir() / "golden"; }

std::vector<std::string> golden_folders() {
  std::vector<std::string> names;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(golden_root(), ec)) {
    if (entry.is_directory() && fs::exists(entry.path() / kGoldenFile)) names.push_back(entry.path().filename());
  }
  std::sort(names.begin(), names.end());
  // An empty parameter list would make gtest report an uninstantiated suite instead of a visible skip.
  if (names.empty()) names.push_back(kNoFolders);
  return names;
}

struct MaxDiff {
  double value = 0;
  int64_t index = -1;  // flat index of the worst element in the golden tensor
};

// NaN counts as an infinite difference, so a forward that produces NaN cannot pass.
void accumulate(MaxDiff& worst, double got, double want, int64_t index) {
  double d = std::abs(got - want);
  if (std::isnan(d)) d = std::numeric_limits<double>::infinity();
  if (worst.index < 0 || d > worst.value) worst = {d, index};
}

MaxDiff max_abs_diff(std::span<const float> got, std::span<const float> want) {
  MaxDiff worst;
  for (size_t i = 0; i < want.size(); ++i) accumulate(worst, got[i], want[i], static_cast<int64_t>(i));
  return worst;
}

// The cache stores each kv head's tokens at a stride of its capacity; the golden is [n_kv, T, d] densely.
MaxDiff max_abs_diff_cache(const float* cache, int64_t capacity, std::span<const float> want, int64_t num_kv_heads,
                           int64_t tokens, int64_t head_dim) {
  MaxDiff worst;
  for (int64_t h = 0; h < num_kv_heads; ++h)
    for (int64_t t = 0; t < tokens; ++t)
      for (int64_t i = 0; i < head_dim; ++i) {
        const int64_t g = (h * tokens + t) * head_dim + i;
        accumulate(worst, cache[(h * capacity + t) * head_dim + i], want[g], g);
      }
  return worst;
}

std::vector<int32_t> read_ids(const TensorView& t) {
  EXPECT_EQ(t.dtype, DType::I64) << t.file << ": input_ids";
  EXPECT_EQ(t.shape.size(), 1u) << t.file << ": input_ids";
  std::vector<int64_t> wide(static_cast<size_t>(t.numel()));
  std::memcpy(wide.data(), t.data, wide.size() * sizeof(int64_t));
  return {wide.begin(), wide.end()};
}

std::string describe(const char* what, const MaxDiff& d) {
  char buf[160];
  std::snprintf(buf, sizeof buf, "%s max|d| %.3g at flat index %lld", what, d.value, static_cast<long long>(d.index));
  return buf;
}

class ArchGolden : public ::testing::TestWithParam<std::string> {};

TEST_P(ArchGolden, ForwardAndIncrementalDecodeMatchTransformers) {
  if (GetParam() == kNoFolders) GTEST_SKIP() << "no golden folders under " << golden_root();
  const fs::path dir = golden_root() / GetParam();
  const TensorStore golden = TensorStore::open(dir / kGoldenFile);
  for (const auto& [key, value] : golden.files().front()->metadata())
    if (key == "transformers" || key == "torch" || key == "storage_dtype") RecordProperty(key, value);

  const auto model = CpuModel::load(dir);
  const auto& cfg = model->config();
  const std::vector<int32_t> ids = read_ids(golden.get("input_ids"));
  const auto tokens = static_cast<int64_t>(ids.size());
  ASSERT_GE(tokens, 2) << "input_ids";
  const int64_t prefill = std::min(kPrefillTokens, tokens / 2);

  const TensorView& logits_view = golden.get("logits");
  ASSERT_EQ(logits_view.shape, (std::vector<int64_t>{tokens, cfg.vocab_size})) << logits_view.file;
  const std::vector<float> want_logits = oscar::fmt::to_f32(logits_view);
  std::vector<std::vector<float>> want_k, want_v;
  for (int64_t l = 0; l < cfg.num_layers; ++l) {
    for (const char* kind : {"key", "value"}) {
      const TensorView& t = golden.get("layers." + std::to_string(l) + "." + kind);
      ASSERT_EQ(t.shape, (std::vector<int64_t>{cfg.num_kv_heads, tokens, cfg.head_dim})) << t.name;
      (kind[0] == 'k' ? want_k : want_v).push_back(oscar::fmt::to_f32(t));
    }
  }
  EXPECT_FALSE(golden.contains("layers." + std::to_string(cfg.num_layers) + ".key"))
      << "the golden has more layers than config.json";

  // RoPE frequencies first: if they are off, every K and logit below is off too, and this says why.
  // transformers computes them in float32 (a few ulp, more where the llama3 smooth band cancels); a wrong band
  // or factor is off by O(1).
  if (golden.contains("rope_inv_freq")) {
    const std::vector<float> want = oscar::fmt::to_f32(golden.get("rope_inv_freq"));
    const std::vector<float> got = oscar::model::rope_inv_freq(cfg);
    ASSERT_EQ(got.size(), want.size());
    for (size_t i = 0; i < want.size(); ++i)
      EXPECT_NEAR(got[i], want[i], 2e-6 * std::abs(want[i])) << "rope_inv_freq[" << i << "]";
  }

  // 1. The whole sequence in one forward call.
  KvCache cache(cfg, tokens);
  const std::vector<float> logits = model->forward(ids, cache);
  ASSERT_EQ(logits.size(), want_logits.size());
  ASSERT_EQ(cache.length(), tokens);
  const MaxDiff full = max_abs_diff(logits, want_logits);
  EXPECT_LE(full.value, kTolerance) << describe("logits (full forward)", full) << ", row "
                                    << full.index / cfg.vocab_size;
  double worst_kv = 0;
  for (int64_t l = 0; l < cfg.num_layers; ++l) {
    const MaxDiff dk = max_abs_diff_cache(cache.k(l), cache.capacity(), want_k[l], cfg.num_kv_heads, tokens,
                                          cfg.head_dim);
    const MaxDiff dv = max_abs_diff_cache(cache.v(l), cache.capacity(), want_v[l], cfg.num_kv_heads, tokens,
                                          cfg.head_dim);
    EXPECT_LE(dk.value, kTolerance) << "layer " << l << " " << describe("key", dk);
    EXPECT_LE(dv.value, kTolerance) << "layer " << l << " " << describe("value", dv);
    worst_kv = std::max({worst_kv, dk.value, dv.value});
  }

  // 2. Prefill, then one token per call reading the cache, as serving does. The cache is deliberately larger
  //    than the sequence so a kernel that assumes stride == length is caught.
  KvCache decode_cache(cfg, tokens + 7);
  std::vector<float> decoded = model->forward(std::span(ids).first(prefill), decode_cache);
  ASSERT_EQ(decoded.size(), static_cast<size_t>(prefill * cfg.vocab_size));
  oscar::model::ForwardOptions last_only;
  last_only.last_logits_only = true;
  for (int64_t t = prefill; t < tokens; ++t) {
    const std::vector<float> row = model->forward(std::span(ids).subspan(t, 1), decode_cache, last_only);
    ASSERT_EQ(row.size(), static_cast<size_t>(cfg.vocab_size)) << "token " << t;
    decoded.insert(decoded.end(), row.begin(), row.end());
  }
  ASSERT_EQ(decode_cache.length(), tokens);
  const MaxDiff incremental = max_abs_diff(decoded, want_logits);
  EXPECT_LE(incremental.value, kTolerance) << describe("logits (prefill + decode)", incremental) << ", row "
                                           << incremental.index / cfg.vocab_size;
  for (int64_t l = 0; l < cfg.num_layers; ++l) {
    const MaxDiff dk = max_abs_diff_cache(decode_cache.k(l), decode_cache.capacity(), want_k[l], cfg.num_kv_heads,
                                          tokens, cfg.head_dim);
    const MaxDiff dv = max_abs_diff_cache(decode_cache.v(l), decode_cache.capacity(), want_v[l],
                                          cfg.num_kv_heads, tokens, cfg.head_dim);
    EXPECT_LE(dk.value, kTolerance) << "decode, layer " << l << " " << describe("key", dk);
    EXPECT_LE(dv.value, kTolerance) << "decode, layer " << l << " " << describe("value", dv);
  }

  std::printf("[ golden   ] %-26s T=%lld logits max|d| %.2e (full) %.2e (prefill %lld + decode), K/V max|d| %.2e\n",
              GetParam().c_str(), static_cast<long long>(tokens), full.value, incremental.value,
              static_cast<long long>(prefill), worst_kv);
}

std::string folder_test_name(const ::testing::TestParamInfo<std::string>& info) {
  if (info.param == kNoFolders) return "NoGoldenFolders";
  std::string name = info.param;
  for (char& c : name)
    if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
  return name;
}

INSTANTIATE_TEST_SUITE_P(Transformers, ArchGolden, ::testing::ValuesIn(golden_folders()), folder_test_name);

}  // namespace
