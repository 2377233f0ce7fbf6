// Host parts of the runtime extras (runtime/engine.h):
//  * hadamard2 as an engine cache format stores exactly what eval's hadamard2 simulates: eval's oscar mode fed the
//    engine format's rotations gives bit-identical quantize-dequantize output to eval's hadamard2 mode;
//  * kv_footprint (`oscar info`): bytes per token and per context against hand-computed numbers for the Qwen3-8B
//    shape (bf16, int2, the engine's 64-token pages) and a bundle with per-layer (spectral) segment layouts.
#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <vector>

#include "formats/bundle.h"
#include "formats/error.h"
#include "formats/model_config.h"
#include "lib/eval/cache_modes.h"
#include "runtime/engine.h"

namespace oscar::rt {
namespace {

fmt::ModelConfig shape(int64_t layers, int64_t heads, int64_t kv_heads, int64_t d) {
  fmt::ModelConfig cfg;
  cfg.hidden_size = heads * d;
  cfg.intermediate_size = 2 * cfg.hidden_size;
  cfg.num_layers = layers;
  cfg.num_heads = heads;
  cfg.num_kv_heads = kv_heads;
  cfg.head_dim = d;
  cfg.vocab_size = 1000;
  cfg.max_position_embeddings = 1 << 17;
  return cfg;
}

TEST(RuntimeHadamard2, ParsesAndResolvesWithoutClipAndWithTheInt2Windows) {
  EXPECT_EQ(parse_cache_mode("hadamard2", "--cache"), CacheMode::Hadamard2);
  EXPECT_EQ(cache_mode_name(CacheMode::Hadamard2), "hadamard2");
  const fmt::ModelConfig cfg = shape(3, 4, 2, 128);
  const CacheFormat f = resolve_cache_format(cfg, CacheMode::Hadamard2, nullptr, std::nullopt, std::nullopt, "t", 7);
  EXPECT_TRUE(f.quantized);
  EXPECT_EQ(f.sink_tokens, 64);
  EXPECT_EQ(f.recent_tokens, 256);
  ASSERT_EQ(f.k_rotation.size(), 3u);
  for (size_t l = 0; l < 3; ++l) {
    EXPECT_EQ(f.k_clip_ratio[l], 1.f);
    EXPECT_EQ(f.v_clip_ratio[l], 1.f);
    ASSERT_EQ(f.k_rotation[l].size(), 128u * 128u);
    ASSERT_EQ(f.v_rotation[l].size(), 128u * 128u);
    EXPECT_NE(f.k_rotation[l], f.v_rotation[l]);  // K and V draw their own signs
  }
  EXPECT_NE(f.k_rotation[0], f.k_rotation[1]);  // and each layer its own
  const CacheFormat other = resolve_cache_format(cfg, CacheMode::Hadamard2, nullptr, std::nullopt, std::nullopt, "t", 8);
  EXPECT_NE(other.k_rotation[0], f.k_rotation[0]);  // the seed matters
  // The INT2 kernels take head_dim 64/128/256 only.
  EXPECT_THROW(resolve_cache_format(shape(2, 4, 2, 8), CacheMode::Hadamard2, nullptr, {}, {}, "t", 0), Error);
}

// eval's oscar mode with a bundle holding the engine format's rotations (clip 1, INT2 whole head) quantizes
// exactly as eval's hadamard2 mode iff the rotations are the same matrices.
TEST(RuntimeHadamard2, EngineRotationsAreTheCpuSimulationsBitForBit) {
  const int64_t d = 128, layers = 4, kv_heads = 2, tokens = 24;
  const fmt::ModelConfig cfg = shape(layers, 4, kv_heads, d);
  const uint64_t seed = 3;
  const CacheFormat f = resolve_cache_format(cfg, CacheMode::Hadamard2, nullptr, {}, {}, "t", seed);

  fmt::Bundle b;
  b.quant = fmt::KvQuantSpec::uniform(d, 2);
  b.rotation_groups = 1;
  for (int64_t l = 0; l < layers; ++l) {
    fmt::LayerCalibration lc;
    lc.k_rotation = f.k_rotation[static_cast<size_t>(l)];
    lc.v_rotation = f.v_rotation[static_cast<size_t>(l)];
    lc.k_clip_ratio = f.k_clip_ratio[static_cast<size_t>(l)];
    lc.v_clip_ratio = f.v_clip_ratio[static_cast<size_t>(l)];
    b.layers.push_back(lc);
  }
  eval::ModeOptions mo;
  mo.seed = seed;
  mo.bundle = &b;
  const auto cpu = eval::CacheFormat::create(eval::CacheMode::Hadamard2, cfg, mo);
  const auto engine_rotations = eval::CacheFormat::create(eval::CacheMode::Oscar, cfg, mo);
  mo.seed = seed + 1;
  const auto other_seed = eval::CacheFormat::create(eval::CacheMode::Hadamard2, cfg, mo);

  std::mt19937 rng(11);
  std::normal_distribution<float> n(0.f, 1.f);
  std::vector<float> x(static_cast<size_t>(tokens * d));
  for (float& v : x) v = n(rng);
  for (int i = 0; i < 8; ++i) x[static_cast<size_t>(i * 37)] *= 12.f;  // outliers: the rotation changes the codes
  int differs_from_other_seed = 0;
  for (int64_t l = 0; l < layers; ++l)
    for (int64_t h = 0; h < kv_heads; ++h) {
      std::vector<float> a(x.size()), e(x.size()), o(x.size());
      cpu->fake_quantize_keys(l, h, x, tokens, a);
      engine_rotations->fake_quantize_keys(l, h, x, tokens, e);
      other_seed->fake_quantize_keys(l, h, x, tokens, o);
      EXPECT_EQ(std::memcmp(a.data(), e.data(), a.size() * 4), 0) << "keys, layer " << l << " head " << h;
      differs_from_other_seed += a != o;
      cpu->fake_quantize_values(l, h, x, tokens, a);
      engine_rotations->fake_quantize_values(l, h, x, tokens, e);
      EXPECT_EQ(std::memcmp(a.data(), e.data(), a.size() * 4), 0) << "values, layer " << l << " head " << h;
    }
  EXPECT_EQ(differs_from_other_seed, layers * kv_heads);  // the comparison can fail: other signs, other codes
}

// ---- kv_footprint ----------------------------------------------------------------------------------------------

// Qwen3-8B attention: 36 layers, 8 KV heads, head_dim 128.
const int64_t kL = 36, kKv = 8, kD = 128;
const double kBf16PerToken = 2.0 * kL * kKv * kD * 2;  // 147 456 B
const double kInt2Record = kD / 4 + 4;                  // 32 code bytes + fp16 scale + fp16 zero = 36 B
const double kInt2PerToken = 2.0 * kL * kKv * kInt2Record;  // 20 736 B
// Engine pages (64 tokens, all layers, K and V, all KV heads).
const double kInt2Page = 2.0 * kL * kKv * (64 * kD / 4 + 64 * 4);  // 1 327 104 B
const double kBf16Page = 2.0 * kL * kKv * 64 * kD * 2;            // 9 437 184 B

TEST(KvFootprint, Qwen3_8BShapeBf16AndInt2MatchHandCountedBytes) {
  const fmt::ModelConfig cfg = shape(kL, 32, kKv, kD);
  const int64_t contexts[] = {100, 1024, 32768};
  EXPECT_EQ(kBf16PerToken, 147456.0);
  EXPECT_EQ(kInt2PerToken, 20736.0);

  const KvFootprint bf16 = kv_footprint(cfg, CacheMode::Bf16, nullptr, contexts, {}, {}, "t");
  EXPECT_EQ(bf16.bf16_bytes_per_token, kBf16PerToken);
  EXPECT_EQ(bf16.quant_bytes_per_token, kBf16PerToken);
  EXPECT_EQ(bf16.k_bits_per_element, 16.0);
  ASSERT_EQ(bf16.rows.size(), 3u);
  EXPECT_EQ(bf16.rows[1].stored_bytes, 1024 * kBf16PerToken);
  EXPECT_EQ(bf16.rows[0].engine_bytes, 2 * kBf16Page);       // 100 tokens: two whole pages
  EXPECT_EQ(bf16.rows[2].engine_bytes, 512 * kBf16Page);

  const KvFootprint int2 = kv_footprint(cfg, CacheMode::Int2, nullptr, contexts, {}, {}, "t");
  EXPECT_EQ(int2.sink_tokens, 64);
  EXPECT_EQ(int2.recent_tokens, 256);
  EXPECT_EQ(int2.quant_bytes_per_token, kInt2PerToken);
  EXPECT_DOUBLE_EQ(int2.k_bits_per_element, 2.25);
  EXPECT_EQ(int2.k_record_bytes.at(0), 36);
  EXPECT_EQ(int2.k_layout.at(0), "2b[0,128)");
  // 100 tokens: all inside sink + recent, all bf16.
  EXPECT_EQ(int2.rows[0].stored_bytes, 100 * kBf16PerToken);
  // 1024 tokens: 320 bf16 (64 sink + 256 recent), 704 INT2.
  EXPECT_EQ(int2.rows[1].stored_bytes, 320 * kBf16PerToken + 704 * kInt2PerToken);
  EXPECT_EQ(int2.rows[1].stored_bytes, 61784064.0);
  EXPECT_EQ(int2.rows[2].stored_bytes, 320 * kBf16PerToken + 32448 * kInt2PerToken);
  // Engine at 1024: 16 logical pages; INT2 pages for pages 1..15 (page 0 is all sink); bf16 for page 0 and the
  // window's pages 12..15 (tokens 768..1023).
  EXPECT_EQ(int2.rows[1].engine_bytes, 15 * kInt2Page + 5 * kBf16Page);
  EXPECT_EQ(int2.rows[1].engine_bytes, 67092480.0);
  // At 32K: INT2 pages 1..511, bf16 pages 0 and 508..511.
  EXPECT_EQ(int2.rows[2].engine_bytes, 511 * kInt2Page + 5 * kBf16Page);
  // 100 tokens: page 0 (sink) bf16 only, page 1 (tokens 64..99) INT2 + bf16 (in the window).
  EXPECT_EQ(int2.rows[0].engine_bytes, 1 * kInt2Page + 2 * kBf16Page);

  const KvFootprint had = kv_footprint(cfg, CacheMode::Hadamard2, nullptr, contexts, {}, {}, "t");
  EXPECT_EQ(had.rows[2].stored_bytes, int2.rows[2].stored_bytes);  // a rotation costs no bytes
  EXPECT_EQ(had.rows[2].engine_bytes, int2.rows[2].engine_bytes);

  // int4: 64 code bytes + fp16 scale/zero = 68 B per record; 4.25 bits/element; its pages follow the INT2 page
  // accounting with 68-byte records.
  const double kInt4PerToken = 2.0 * kL * kKv * (kD / 2 + 4);
  const double kInt4Page = 2.0 * kL * kKv * 64 * (kD / 2 + 4);
  const KvFootprint int4 = kv_footprint(cfg, CacheMode::Int4, nullptr, contexts, {}, {}, "t");
  EXPECT_EQ(int4.mode, "int4");
  EXPECT_EQ(int4.sink_tokens, 64);
  EXPECT_EQ(int4.recent_tokens, 256);
  EXPECT_EQ(int4.quant_bytes_per_token, kInt4PerToken);
  EXPECT_DOUBLE_EQ(int4.v_bits_per_element, 4.25);
  EXPECT_EQ(int4.k_record_bytes.at(5), 68);
  EXPECT_EQ(int4.k_layout.at(0), "4b[0,128)");
  EXPECT_EQ(int4.rows[1].stored_bytes, 320 * kBf16PerToken + 704 * kInt4PerToken);
  EXPECT_EQ(int4.rows[2].engine_bytes, 511 * kInt4Page + 5 * kBf16Page);

  // fp8: 128 e4m3 bytes + one fp16 scale = 130 B per record, 8.125 bits/element.
  const double kFp8PerToken = 2.0 * kL * kKv * (kD + 2);
  const double kFp8Page = 2.0 * kL * kKv * 64 * (kD + 2);
  const KvFootprint fp8 = kv_footprint(cfg, CacheMode::Fp8, nullptr, contexts, {}, {}, "t");
  EXPECT_EQ(fp8.mode, "fp8");
  EXPECT_EQ(fp8.quant_bytes_per_token, kFp8PerToken);
  EXPECT_DOUBLE_EQ(fp8.k_bits_per_element, 8.125);
  EXPECT_EQ(fp8.k_layout.at(0), "fp8");
  EXPECT_EQ(fp8.rows[1].stored_bytes, 320 * kBf16PerToken + 704 * kFp8PerToken);
  EXPECT_EQ(fp8.rows[2].engine_bytes, 511 * kFp8Page + 5 * kBf16Page);

  // Window overrides.
  const KvFootprint nowin = kv_footprint(cfg, CacheMode::Int2, nullptr, contexts, 0, 0, "t");
  EXPECT_EQ(nowin.rows[1].stored_bytes, 1024 * kInt2PerToken);
}

TEST(KvFootprint, SpectralBundleCountsEachLayersRecordLayout) {
  const int64_t d = 128, layers = 3, kv = 2;
  const fmt::ModelConfig cfg = shape(layers, 4, kv, d);
  fmt::Bundle b;
  b.quant = fmt::KvQuantSpec::int2_default(d);
  b.quant.sink_tokens = 32;
  b.quant.recent_tokens = 128;
  b.layers.resize(static_cast<size_t>(layers));
  for (auto& lc : b.layers) {
    lc.k_rotation.assign(static_cast<size_t>(d * d), 0.f);
    lc.v_rotation.assign(static_cast<size_t>(d * d), 0.f);
    for (int64_t i = 0; i < d; ++i) lc.k_rotation[i * d + i] = lc.v_rotation[i * d + i] = 1.f;
    lc.k_clip_ratio = lc.v_clip_ratio = 1.f;
  }
  // Layer 0 K: 4 bits on 32 dims + 2 bits on 96: codes 16 + 24 bytes, two fp16 pairs -> 48 B.
  b.layers[0].k_segments = {{0, 32, 4}, {32, 128, 2}};
  // Layer 1 V: 2 bits on 64 dims, the other 64 dropped: codes 16 bytes, one pair -> 20 B.
  b.layers[1].v_segments = {{0, 64, 2}, {64, 128, 0}};
  const int64_t contexts[] = {1000};
  const KvFootprint fp = kv_footprint(cfg, CacheMode::Oscar, &b, contexts, {}, {}, "t");
  EXPECT_EQ(fp.sink_tokens, 32);
  EXPECT_EQ(fp.recent_tokens, 128);
  EXPECT_EQ(fp.k_record_bytes, (std::vector<int64_t>{48, 36, 36}));
  EXPECT_EQ(fp.v_record_bytes, (std::vector<int64_t>{36, 20, 36}));
  EXPECT_EQ(fp.k_layout[0], "4b[0,32) 2b[32,128)");
  EXPECT_EQ(fp.v_layout[1], "2b[0,64) 0b[64,128)");
  const double per_token = kv * (48 + 36 + 36 + 36 + 20 + 36);  // 424 B
  EXPECT_EQ(fp.quant_bytes_per_token, per_token);
  EXPECT_DOUBLE_EQ(fp.k_bits_per_element, 8.0 * (48 + 36 + 36) / 128 / 3);
  const double bf16_pt = 2.0 * layers * kv * d * 2;
  EXPECT_EQ(fp.rows[0].stored_bytes, 160 * bf16_pt + 840 * per_token);
  // The engine reports pages only for formats it runs (its own admission check decides).
  bool engine_runs = true;
  try {
    resolve_cache_format(cfg, CacheMode::Oscar, &b, {}, {}, "t");
  } catch (const Error&) {
    engine_runs = false;
  }
  EXPECT_EQ(fp.rows[0].engine_bytes >= 0, engine_runs);

  EXPECT_THROW(kv_footprint(cfg, CacheMode::Oscar, nullptr, contexts, {}, {}, "t"), Error);  // no bundle
  const int64_t bad[] = {0};
  EXPECT_THROW(kv_footprint(cfg, CacheMode::Int2, nullptr, bad, {}, {}, "t"), Error);
}

}  // namespace
}  // namespace oscar::rt
