// Cache formats and the window/mask rule of the eval simulation.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>

#include "formats/bundle.h"
#include "formats/dtype.h"
#include "formats/error.h"
#include "formats/kv_layout.h"
#include "lib/eval/cache_modes.h"
#include "eval_test_config.h"
#include "lib/eval/metrics.h"
#include "test_support.h"

namespace oscar::eval {
namespace {

using test::small_config;

TEST(Windows, HandWorkedMask) {
  const CacheWindows w{4, 8};
  // Query 20: sink 0..3 bf16, 4..12 quantized (12 <= 20 - 8), 13..20 in the recent window.
  for (int64_t j = 0; j <= 20; ++j) EXPECT_EQ(reads_quantized(20, j, w), j >= 4 && j <= 12) << j;
  // Groups of 4 from the end of the sink: [4,8) [8,12) [12,16); query 20's window starts at 13, so [12,16) is
  // not yet complete outside it and stays bf16.
  for (int64_t j = 0; j <= 20; ++j) EXPECT_EQ(reads_quantized(20, j, w, 4), j >= 4 && j <= 11) << j;
  EXPECT_EQ(first_query_reading_quantized(w), 12);     // query 12 reads key 4 quantized
  EXPECT_TRUE(reads_quantized(12, 4, w));
  EXPECT_FALSE(reads_quantized(11, 4, w));
  EXPECT_EQ(first_query_reading_quantized(w, 4), 15);  // group [4,8) leaves the window at query 15
  EXPECT_TRUE(reads_quantized(15, 7, w, 4));
  EXPECT_FALSE(reads_quantized(14, 4, w, 4));
  // No windows: every key, including the query's own, is quantized.
  EXPECT_TRUE(reads_quantized(0, 0, CacheWindows{0, 0}));
}

TEST(Windows, AgreesWithTheLayoutRuleOfTheDecodeCache) {
  // formats/kv_layout.h states which tokens a cache of seq_len tokens keeps in bf16; at query t the cache holds
  // t + 1 tokens. An independent statement of the same rule, checked exhaustively on small windows.
  for (int64_t sink : {0, 1, 3})
    for (int64_t recent : {0, 1, 5})
      for (int64_t t = 0; t < 40; ++t)
        for (int64_t j = 0; j <= t; ++j)
          EXPECT_EQ(reads_quantized(t, j, {sink, recent}), !fmt::is_high_precision_token(j, t + 1, sink, recent))
              << sink << " " << recent << " " << t << " " << j;
}

TEST(CacheModes, ParseNamesAndErrors) {
  const auto modes = parse_cache_modes("bf16, int2,kivi2", "--modes");
  ASSERT_EQ(modes.size(), 3u);
  EXPECT_EQ(modes[2], CacheMode::Kivi2);
  EXPECT_THROW(parse_cache_modes("int2,int2", "--modes"), Error);
  EXPECT_THROW(parse_cache_modes("int3", "--modes"), Error);
  EXPECT_THROW(parse_cache_modes("int2,", "--modes"), Error);
  for (CacheMode m : kAllCacheModes) EXPECT_EQ(parse_cache_mode(cache_mode_name(m), "x"), m);
}

TEST(CacheModes, OscarNeedsABundle) {
  try {
    CacheFormat::create(CacheMode::Oscar, small_config(16), ModeOptions{});
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("bundle"), std::string::npos) << e.what();
  }
}

TEST(CacheModes, Bf16ModeIsBf16Rounding) {
  const auto f = CacheFormat::create(CacheMode::BF16, small_config(16), ModeOptions{});
  std::vector<float> x = {1.0f, 1.00390625f /* tie: rounds to even (1.0) */, 1.01171875f /* tie: up */, -3.14159f};
  x.resize(16, 0.3f);
  std::vector<float> out(16);
  f->fake_quantize_keys(0, 0, x, 1, out);
  EXPECT_EQ(out[0], 1.0f);
  EXPECT_EQ(out[1], 1.0f);
  EXPECT_EQ(out[2], 1.015625f);
  EXPECT_EQ(out[3], -3.140625f);
  EXPECT_EQ(out[4], 0.30078125f);
}

TEST(CacheModes, HadamardIsOrthogonalAndSeeded) {
  const int64_t d = 16;
  const auto r1 = random_sign_hadamard(d, 7), r2 = random_sign_hadamard(d, 7), r3 = random_sign_hadamard(d, 8);
  EXPECT_EQ(r1, r2);
  EXPECT_NE(r1, r3);
  for (int64_t i = 0; i < d; ++i)
    for (int64_t j = 0; j < d; ++j) {
      double dot = 0;
      for (int64_t k = 0; k < d; ++k) dot += static_cast<double>(r1[i * d + k]) * r1[j * d + k];
      EXPECT_NEAR(dot, i == j ? 1.0 : 0.0, 1e-6);
    }
}

TEST(CacheModes, KiviKeysArePerChannelOverTokenGroups) {
  // Channel c of a 4-token group holds c·{0, 1, 2, 3} (+ an offset): exactly the four INT2 levels of that channel's
  // own range, so per-channel quantization reproduces it with no error, whatever the other channels hold.
  // (Scales c are small integers, exact in fp16.)
  const int64_t d = 32;
  ModeOptions opt;
  opt.kivi_key_group_tokens = 4;
  const auto f = CacheFormat::create(CacheMode::Kivi2, small_config(d), opt);
  EXPECT_EQ(f->key_group_tokens(), 4);
  std::vector<float> x(4 * d);
  for (int64_t t = 0; t < 4; ++t)
    for (int64_t c = 0; c < d; ++c) x[t * d + c] = static_cast<float>(c * ((t * 3) % 4)) - 8.0f;  // codes 0,3,2,1
  std::vector<float> out(x.size());
  f->fake_quantize_keys(1, 1, x, 4, out);
  for (size_t i = 0; i < x.size(); ++i) EXPECT_EQ(out[i], x[i]) << i;
  // The same tokens quantized per token (int2) cannot: each token spans 32 distinct values.
  const auto per_token = CacheFormat::create(CacheMode::Int2, small_config(d), ModeOptions{});
  per_token->fake_quantize_keys(1, 1, x, 4, out);
  double err = 0;
  for (size_t i = 0; i < x.size(); ++i) err += std::fabs(out[i] - x[i]);
  EXPECT_GT(err, 10.0);
  // Keys come in whole groups only.
  EXPECT_THROW(f->fake_quantize_keys(0, 0, std::span<const float>(x).first(3 * d), 3, std::span<float>(out).first(3 * d)),
               Error);
}

TEST(CacheModes, KiviOnAHeadNarrowerThanItsChannelGroupUsesTheWholeHead) {
  // llama2.c checkpoints have head_dim 8 / 16 < KIVI's 32-channel value group: the head is one group, so kivi2's
  // values are exactly per-token INT2 (bit for bit), and the cost is 2 + 32/8 bits.
  const int64_t d = 8;
  const auto kivi = CacheFormat::create(CacheMode::Kivi2, small_config(d), ModeOptions{});
  const auto int2 = CacheFormat::create(CacheMode::Int2, small_config(d), ModeOptions{});
  std::mt19937_64 rng(11);
  std::normal_distribution<float> normal(0.f, 2.f);
  std::vector<float> x(64 * d);
  for (float& v : x) v = normal(rng);
  std::vector<float> a(x.size()), b(x.size());
  kivi->fake_quantize_values(1, 0, x, 64, a);
  int2->fake_quantize_values(1, 0, x, 64, b);
  for (size_t i = 0; i < x.size(); ++i) ASSERT_EQ(a[i], b[i]) << i;
  double err = 0;
  for (size_t i = 0; i < x.size(); ++i) err += std::fabs(a[i] - x[i]);
  EXPECT_GT(err, 1.0);  // it did quantize
  EXPECT_DOUBLE_EQ(kivi->element_cost().value_bits, 2.0 + 32.0 / 8);
  // A group that fits but does not divide the head is still refused.
  ModeOptions odd;
  odd.kivi_value_group_channels = 3;
  EXPECT_THROW(CacheFormat::create(CacheMode::Kivi2, small_config(d), odd), Error);
}

TEST(CacheModes, OscarWithoutRotationAndClipIsInt2AndClipOverridesTakeEffect) {
  // The ablation's corner "rotation none, clip off" must be the int2 baseline bit for bit, and the per-layer clip
  // ratios (what `oscar eval --oscar-clip` rewrites) must be what the oscar mode quantizes with.
  const int64_t d = 32;
  const auto cfg = small_config(d);
  fmt::Bundle b;
  b.quant = fmt::KvQuantSpec::int2_default(d);
  b.layers.resize(static_cast<size_t>(cfg.num_layers));
  for (auto& l : b.layers) {
    l.k_rotation.assign(static_cast<size_t>(d * d), 0.f);
    for (int64_t i = 0; i < d; ++i) l.k_rotation[static_cast<size_t>(i * d + i)] = 1.f;
    l.v_rotation = l.k_rotation;
    l.k_clip_ratio = l.v_clip_ratio = 1.0f;
  }
  ModeOptions opt;
  opt.bundle = &b;
  std::mt19937_64 rng(5);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<float> x(50 * d);
  for (float& v : x) v = normal(rng);
  const auto int2 = CacheFormat::create(CacheMode::Int2, cfg, ModeOptions{});
  std::vector<float> ref_k(x.size()), ref_v(x.size()), out(x.size());
  int2->fake_quantize_keys(1, 1, x, 50, ref_k);
  int2->fake_quantize_values(1, 1, x, 50, ref_v);
  {
    const auto oscar = CacheFormat::create(CacheMode::Oscar, cfg, opt);
    oscar->fake_quantize_keys(1, 1, x, 50, out);
    for (size_t i = 0; i < x.size(); ++i) ASSERT_EQ(out[i], ref_k[i]) << i;
    oscar->fake_quantize_values(1, 1, x, 50, out);
    for (size_t i = 0; i < x.size(); ++i) ASSERT_EQ(out[i], ref_v[i]) << i;
  }
  // Layer 1's key clip at 0.75 (the 24th largest |y| of 32): every token's largest elements are clipped.
  b.layers[1].k_clip_ratio = 0.75f;
  const auto clipped = CacheFormat::create(CacheMode::Oscar, cfg, opt);
  clipped->fake_quantize_keys(1, 1, x, 50, out);
  float max_ref = 0, max_out = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    max_ref = std::max(max_ref, std::fabs(ref_k[i]));
    max_out = std::max(max_out, std::fabs(out[i]));
  }
  EXPECT_LT(max_out, 0.9f * max_ref);
  clipped->fake_quantize_keys(0, 1, x, 50, out);  // layer 0 keeps clip 1
  for (size_t i = 0; i < x.size(); ++i) ASSERT_EQ(out[i], ref_k[i]) << i;
}

TEST(CacheModes, Int4IsCloserThanInt2AndFp8Closer) {
  const int64_t d = 64;
  std::mt19937_64 rng(3);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<float> x(100 * d);
  for (float& v : x) v = normal(rng);
  auto mse = [&](CacheMode m) {
    const auto f = CacheFormat::create(m, small_config(d), ModeOptions{});
    std::vector<float> out(x.size());
    f->fake_quantize_values(0, 0, x, 100, out);
    double e = 0;
    for (size_t i = 0; i < x.size(); ++i) e += (out[i] - x[i]) * (out[i] - x[i]);
    return e / static_cast<double>(x.size());
  };
  const double e2 = mse(CacheMode::Int2), e4 = mse(CacheMode::Int4), e8 = mse(CacheMode::Fp8);
  // Uniform quantization of N(0,1) over a ~±2.4σ per-token range: INT2 steps of ~1.6 (MSE ~0.2), INT4 ~0.3.
  EXPECT_GT(e2, 0.1);
  EXPECT_LT(e4, e2 / 10);
  EXPECT_LT(e8, e4);
}

TEST(Footprint, HandComputedInt2AndBf16) {
  const auto cfg = small_config(128);  // 2 layers x 2 KV heads
  ModeOptions opt;                    // sink 64, recent 256
  const auto int2 = CacheFormat::create(CacheMode::Int2, cfg, opt);
  const KvFootprint f = kv_footprint(*int2, 1024);
  // 704 of 1024 tokens quantized at 2 + 32/128 = 2.25 bits, 320 in bf16; K and V alike.
  const double bits_per_elem = (320 * 16.0 + 704 * 2.25) / 1024;
  EXPECT_NEAR(f.bits_per_element, bits_per_elem, 1e-12);
  EXPECT_NEAR(f.bytes_per_token, bits_per_elem * 128 * 4 /*layer-heads*/ * 2 /*K,V*/ / 8, 1e-9);
  EXPECT_NEAR(f.quantized_fraction, 704.0 / 1024, 1e-12);
  // Short contexts fit in the windows: the whole cache is bf16.
  EXPECT_NEAR(kv_footprint(*int2, 300).bits_per_element, 16.0, 1e-12);
  const auto bf16 = CacheFormat::create(CacheMode::BF16, cfg, opt);
  EXPECT_NEAR(kv_footprint(*bf16, 4096).bytes_per_token, 128 * 4 * 2 * 2.0, 1e-9);
  // KIVI at head_dim 128: keys 2 + 32/32 bits per element, values 2 + 32/32 (groups of 32 channels).
  ModeOptions none = opt;
  none.windows = {0, 0};
  const auto kivi = CacheFormat::create(CacheMode::Kivi2, cfg, none);
  EXPECT_EQ(kivi->windows().recent, 128);  // KIVI's residual stays
  const KvFootprint k = kv_footprint(*kivi, 1024);
  EXPECT_NEAR(k.bits_per_element, (128 * 16.0 + 896 * 3.0) / 1024, 1e-12);
}

}  // namespace
}  // namespace oscar::eval
