// The host half of the paged KV cache (runtime/kv_cache.h) and of the engine's format resolution
// (runtime/engine.h): page allocator, budget planning, page tables checked against a shadow memory that plays the
// decode kernel's reads (fmt::is_high_precision_token), all-or-nothing allocation, bundle/model matching.
#include <gtest/gtest.h>

#include <map>
#include <random>
#include <utility>
#include <vector>

#include "formats/bundle.h"
#include "formats/error.h"
#include "formats/kv_layout.h"
#include "formats/model_config.h"
#include "runtime/engine.h"
#include "runtime/kv_cache.h"
#include "test_support.h"

namespace oscar::rt {
namespace {

TEST(PageAllocator, HandsOutInOrderReusesLastReleasedAndRefusesMisuse) {
  PageAllocator a(3);
  EXPECT_EQ(a.capacity(), 3);
  EXPECT_EQ(a.allocate(), 0);
  EXPECT_EQ(a.allocate(), 1);
  EXPECT_EQ(a.allocate(), 2);
  EXPECT_EQ(a.allocate(), -1);  // exhausted: a status, not a crash
  EXPECT_EQ(a.used_pages(), 3);
  a.release(0);
  a.release(2);
  EXPECT_EQ(a.free_pages(), 2);
  EXPECT_EQ(a.allocate(), 2);
  EXPECT_EQ(a.allocate(), 0);
  a.release(1);
  EXPECT_THROW(a.release(1), Error);   // double release
  EXPECT_THROW(a.release(3), Error);   // out of range
  EXPECT_THROW(a.release(-1), Error);
  EXPECT_EQ(a.free_pages(), 1);
}

KvCacheLayout small_layout(bool quantized, int64_t page_tokens = 16, int64_t sink = 4, int64_t recent = 16) {
  KvCacheLayout l;
  l.num_layers = 2;
  l.num_kv_heads = 2;
  l.head_dim = 64;
  l.page_tokens = page_tokens;
  l.quantized = quantized;
  l.sink_tokens = sink;
  l.recent_tokens = recent;
  return l;
}

TEST(KvCacheBudget, PageBytesFollowTheGeometry) {
  const KvCacheLayout l = small_layout(true, 64);
  // 2 layers x (K, V) x 2 heads = 8 page blocks; bf16 64 x 64 x 2 bytes; INT2 64 x (16 code bytes + 4 param bytes).
  EXPECT_EQ(l.bf16_page_bytes(), 8u * 8192u);
  EXPECT_EQ(l.int2_page_bytes(), 8u * 1280u);
  EXPECT_EQ(l.bf16_page_bytes() / 8, static_cast<size_t>(fmt::Bf16PageGeometry{64, 64}.page_bytes()));
  EXPECT_EQ(l.int2_page_bytes() / 8, static_cast<size_t>(fmt::Int2PageGeometry{64, 64}.page_bytes()));
  EXPECT_EQ(l.bf16_pages_per_sequence(), 1 + 1 + 1);  // sink 4 -> 1 page, recent 16 -> 1 page, + 1 misalignment
}

TEST(KvCacheBudget, SplitsTheBudgetAndStaysWithinIt) {
  const KvCacheLayout q = small_layout(true, 64);
  const KvCachePlan p = plan_kv_cache(q, size_t{1} << 20, 2, "--cache-budget");
  EXPECT_EQ(p.bf16_pages, 6);   // 2 sequences x 3 window pages
  EXPECT_EQ(p.int2_pages, 64);  // (1 MiB - 6 x 65536) / 10240
  EXPECT_EQ(p.bytes, 6u * 65536u + 64u * 10240u);
  EXPECT_LE(p.bytes, size_t{1} << 20);

  const KvCachePlan b = plan_kv_cache(small_layout(false, 64), size_t{1} << 20, 2, "--cache-budget");
  EXPECT_EQ(b.int2_pages, 0);
  EXPECT_EQ(b.bf16_pages, 16);
  EXPECT_EQ(b.bytes, size_t{1} << 20);

  try {
    plan_kv_cache(q, 3 * 65536, 1, "--cache-budget");  // windows fit, no byte left for one INT2 page
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_EQ(e.where(), "--cache-budget");
    EXPECT_NE(e.detail().find("196608"), std::string::npos) << e.what();
  }
  EXPECT_THROW(plan_kv_cache(small_layout(false, 64), 65535, 1, "--cache-budget"), Error);
  EXPECT_THROW(plan_kv_cache(q, size_t{1} << 20, 0, "--cache-budget"), Error);
}

// Plays the engine against KvPageTables: every extend is followed by "writing" each new token to the slots the
// tables report (a shadow memory remembers which (sequence, token) each slot holds), then every token of every
// live sequence is "read" the way the decode kernel reads it at the new length. A page shared by two sequences,
// released too early, or a wrong table entry makes a read find another token.
class ShadowCache {
 public:
  explicit ShadowCache(KvPageTables& t) : t_(t) {}

  void extend(const std::vector<int64_t>& seqs, const std::vector<int64_t>& lens) {
    std::vector<int64_t> old;
    for (int64_t s : seqs) old.push_back(t_.length(s));
    t_.extend(seqs, lens, "test");
    for (size_t i = 0; i < seqs.size(); ++i)
      for (int64_t t = old[i]; t < lens[i]; ++t) {
        if (int32_t slot = t_.bf16_slot(seqs[i], t); slot >= 0) bf16_[slot] = {seqs[i], t};
        if (int32_t slot = t_.int2_slot(seqs[i], t); slot >= 0) int2_[slot] = {seqs[i], t};
      }
  }

  void check_reads(const std::vector<int64_t>& live) const {
    const KvCacheLayout& l = t_.layout();
    const int32_t width = t_.table_width(live);
    std::vector<int32_t> int2_table(live.size() * width), bf16_table(live.size() * width);
    t_.fill_tables(live, width, int2_table.data(), bf16_table.data());
    for (size_t b = 0; b < live.size(); ++b) {
      const int64_t len = t_.length(live[b]);
      const int64_t sink = l.quantized ? l.sink_tokens : len;
      const int64_t recent = l.quantized ? l.recent_tokens : 0;
      for (int64_t t = 0; t < len; ++t) {
        const bool hp = fmt::is_high_precision_token(t, len, sink, recent);
        const auto& table = hp ? bf16_table : int2_table;
        const auto& memory = hp ? bf16_ : int2_;
        const int32_t page = table[b * width + static_cast<size_t>(t / l.page_tokens)];
        const int32_t slot = static_cast<int32_t>(page * l.page_tokens + t % l.page_tokens);
        auto it = memory.find(slot);
        ASSERT_TRUE(it != memory.end()) << "seq " << live[b] << " token " << t << " len " << len << " hp " << hp;
        ASSERT_EQ(it->second, std::make_pair(live[b], t)) << "seq " << live[b] << " token " << t << " len " << len
                                                         << " (" << (hp ? "bf16" : "INT2") << ")";
      }
      if (l.quantized) {
        EXPECT_LE(t_.bf16_pages_of(live[b]), l.bf16_pages_per_sequence());
      }
    }
  }

 private:
  KvPageTables& t_;
  std::map<int32_t, std::pair<int64_t, int64_t>> bf16_, int2_;
};

TEST(KvPageTables, PrefillWritesSinkAndWindowBf16AndEverythingPastTheSinkInt2) {
  KvPageTables t(small_layout(true), 64, 64);
  const int64_t s = t.create_sequence();
  t.extend(std::vector<int64_t>{s}, std::vector<int64_t>{40}, "test");
  // Pages of 16: [0,16) [16,32) [32,40). Sink 4, window [24, 40).
  EXPECT_EQ(t.int2_pages_of(s), 3);
  EXPECT_EQ(t.bf16_pages_of(s), 3);
  EXPECT_GE(t.bf16_slot(s, 3), 0);
  EXPECT_EQ(t.bf16_slot(s, 4), -1);   // quantized-only middle
  EXPECT_EQ(t.bf16_slot(s, 23), -1);
  EXPECT_GE(t.bf16_slot(s, 24), 0);
  EXPECT_EQ(t.int2_slot(s, 3), -1);   // the sink is never quantized
  EXPECT_GE(t.int2_slot(s, 4), 0);
  EXPECT_GE(t.int2_slot(s, 39), 0);   // quantized on write, also inside the window
  EXPECT_EQ(t.int2_slot(s, 40), -1);  // not written yet
  // Slot = page * page_tokens + offset: consecutive tokens of a page are consecutive slots.
  EXPECT_EQ(t.int2_slot(s, 5), t.int2_slot(s, 4) + 1);

  // At length 48 the window is [32, 48): page [16, 32) has left it and its bf16 page goes back.
  const int32_t free_before = t.bf16_pages().free_pages();
  for (int64_t len = 41; len <= 48; ++len) t.extend(std::vector<int64_t>{s}, std::vector<int64_t>{len}, "test");
  EXPECT_EQ(t.bf16_pages_of(s), 2);
  EXPECT_EQ(t.bf16_pages().free_pages(), free_before + 1);
  t.free_sequence(s);
  EXPECT_EQ(t.bf16_pages().free_pages(), 64);
  EXPECT_EQ(t.int2_pages().free_pages(), 64);
  EXPECT_THROW(t.length(s), Error);
}

TEST(KvPageTables, KernelReadsFindTheRightTokensThroughInterleavedGrowthAndFrees) {
  for (const bool quantized : {true, false}) {
    for (const auto& [sink, recent] : {std::pair<int64_t, int64_t>{4, 16}, {0, 0}, {20, 37}, {64, 256}}) {
      KvPageTables t(small_layout(quantized, 16, sink, recent), 4000, 4000);
      ShadowCache shadow(t);
      std::mt19937 rng(7);
      std::vector<int64_t> live;
      for (int round = 0; round < 60; ++round) {
        if (live.size() < 4 && rng() % 3 == 0) {  // a new sequence with a prompt of 1..90 tokens
          const int64_t s = t.create_sequence();
          shadow.extend({s}, {1 + static_cast<int64_t>(rng() % 90)});
          live.push_back(s);
        } else if (!live.empty() && rng() % 10 == 0) {  // a finished sequence
          const size_t i = rng() % live.size();
          t.free_sequence(live[i]);
          live.erase(live.begin() + static_cast<std::ptrdiff_t>(i));
        } else if (!live.empty()) {  // a decode step of all live sequences (one extend, as Engine::step)
          std::vector<int64_t> lens;
          for (int64_t s : live) lens.push_back(t.length(s) + 1);
          shadow.extend(live, lens);
        }
        shadow.check_reads(live);
        if (HasFatalFailure()) return;
      }
      for (int64_t s : live) t.free_sequence(s);
      EXPECT_EQ(t.bf16_pages().used_pages(), 0);
      EXPECT_EQ(t.int2_pages().used_pages(), 0);
    }
  }
}

TEST(KvPageTables, RunningOutIsAnErrorThatChangesNothing) {
  // 3 bf16 pages (one sequence's windows) and 2 INT2 pages of 16 tokens.
  KvPageTables t(small_layout(true), 2, 3);
  const int64_t a = t.create_sequence();
  t.extend(std::vector<int64_t>{a}, std::vector<int64_t>{30}, "test");  // INT2 pages 0, 1; bf16 pages 0, 1
  const int64_t b = t.create_sequence();
  try {
    t.extend(std::vector<int64_t>{a, b}, std::vector<int64_t>{31, 10}, "step");
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_EQ(e.where(), "step");
    EXPECT_NE(e.detail().find("out of INT2 pages"), std::string::npos) << e.what();
  }
  EXPECT_EQ(t.length(a), 30);
  EXPECT_EQ(t.length(b), 0);
  EXPECT_EQ(t.int2_pages().free_pages(), 0);
  EXPECT_EQ(t.bf16_pages().free_pages(), 1);
  // a alone still fits: its last INT2 page has room up to 32 tokens.
  t.extend(std::vector<int64_t>{a}, std::vector<int64_t>{32}, "step");
  EXPECT_THROW(t.extend(std::vector<int64_t>{a}, std::vector<int64_t>{33}, "step"), Error);
  EXPECT_THROW(t.extend(std::vector<int64_t>{a}, std::vector<int64_t>{32}, "step"), Error);  // not growing
  EXPECT_THROW(t.extend(std::vector<int64_t>{a, a}, std::vector<int64_t>{40, 41}, "step"), Error);
  t.free_sequence(a);
  t.extend(std::vector<int64_t>{b}, std::vector<int64_t>{10}, "step");
  EXPECT_EQ(t.length(b), 10);
}

// ---- engine format resolution (host half of runtime/engine.h) ----

fmt::ModelConfig config_with_head_dim(int64_t d, int64_t layers = 2) {
  fmt::ModelConfig c;
  c.num_layers = layers;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.head_dim = d;
  c.hidden_size = 4 * d;
  return c;
}

fmt::Bundle identity_bundle(int64_t d, int64_t layers) {
  fmt::Bundle b;
  b.quant = fmt::KvQuantSpec::int2_default(d);
  b.quant.sink_tokens = 8;
  b.quant.recent_tokens = 32;
  for (int64_t l = 0; l < layers; ++l) {
    fmt::LayerCalibration lc;
    lc.k_rotation.assign(static_cast<size_t>(d * d), 0.f);
    for (int64_t i = 0; i < d; ++i) lc.k_rotation[static_cast<size_t>(i * d + i)] = 1.f;
    lc.v_rotation = lc.k_rotation;
    lc.k_clip_ratio = 0.9f + 0.01f * static_cast<float>(l);
    lc.v_clip_ratio = 0.8f;
    b.layers.push_back(lc);
  }
  return b;
}

TEST(EngineFormat, ModesWindowsAndPadding) {
  EXPECT_EQ(parse_cache_mode("oscar", "--cache"), CacheMode::Oscar);
  EXPECT_EQ(cache_mode_name(CacheMode::Int2), "int2");
  try {
    parse_cache_mode("int3", "--cache");
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.where(), "--cache");
  }
  EXPECT_EQ(padded_cache_head_dim(8, "x"), 64);
  EXPECT_EQ(padded_cache_head_dim(64, "x"), 64);
  EXPECT_EQ(padded_cache_head_dim(96, "x"), 128);
  EXPECT_THROW(padded_cache_head_dim(320, "x"), Error);

  const CacheFormat bf16 = resolve_cache_format(config_with_head_dim(8), CacheMode::Bf16, nullptr, {}, {}, "w");
  EXPECT_FALSE(bf16.quantized);
  EXPECT_EQ(bf16.cache_head_dim, 64);
  EXPECT_THROW(resolve_cache_format(config_with_head_dim(8), CacheMode::Int2, nullptr, {}, {}, "w"), Error);

  const CacheFormat int2 = resolve_cache_format(config_with_head_dim(128), CacheMode::Int2, nullptr, {}, 100, "w");
  EXPECT_TRUE(int2.quantized);
  EXPECT_EQ(int2.sink_tokens, fmt::KvQuantSpec::int2_default(128).sink_tokens);
  EXPECT_EQ(int2.recent_tokens, 100);
  EXPECT_TRUE(int2.k_rotation[1].empty());
  EXPECT_EQ(int2.k_clip_ratio[1], 1.f);  // the int2 baseline does not clip
  EXPECT_FALSE(int2.segmented());

  // int4: eval's per-token INT4 baseline, one 4-bit segment per head through the segmented pages; no rotation, no
  // clip, int2's windows. Its page is 64 tokens x (64 code bytes + one fp16 scale/zero pair).
  EXPECT_EQ(parse_cache_mode("int4", "--cache"), CacheMode::Int4);
  EXPECT_EQ(cache_mode_name(CacheMode::Int4), "int4");
  EXPECT_THROW(resolve_cache_format(config_with_head_dim(8), CacheMode::Int4, nullptr, {}, {}, "w"), Error);
  const CacheFormat int4_mode = resolve_cache_format(config_with_head_dim(128), CacheMode::Int4, nullptr, {}, {}, "w");
  EXPECT_TRUE(int4_mode.quantized);
  EXPECT_TRUE(int4_mode.segmented());
  EXPECT_EQ(int4_mode.sink_tokens, fmt::KvQuantSpec::int2_default(128).sink_tokens);
  EXPECT_EQ(int4_mode.recent_tokens, fmt::KvQuantSpec::int2_default(128).recent_tokens);
  for (size_t l = 0; l < 2; ++l) {
    EXPECT_EQ(int4_mode.k_segments[l], (std::vector<fmt::QuantSegment>{{0, 128, 4}}));
    EXPECT_EQ(int4_mode.v_segments[l], (std::vector<fmt::QuantSegment>{{0, 128, 4}}));
    EXPECT_TRUE(int4_mode.k_rotation[l].empty());
    EXPECT_TRUE(int4_mode.v_rotation[l].empty());
    EXPECT_EQ(int4_mode.k_clip_ratio[l], 1.f);
    EXPECT_EQ(int4_mode.v_clip_ratio[l], 1.f);
  }
  const KvCacheLayout int4_layout = cache_layout(config_with_head_dim(128), int4_mode);
  ASSERT_EQ(int4_layout.k_page_bytes.size(), 2u);
  EXPECT_EQ(int4_layout.k_page_bytes[1], 64 * (64 + 4));
  EXPECT_EQ(int4_layout.v_page_bytes[0], 64 * (64 + 4));

  // fp8: eval's e4m3 baseline; fmt::Fp8PageGeometry pages (64 x 128 code bytes + 64 fp16 scales), not segmented.
  EXPECT_EQ(parse_cache_mode("fp8", "--cache"), CacheMode::Fp8);
  EXPECT_EQ(cache_mode_name(CacheMode::Fp8), "fp8");
  const CacheFormat fp8 = resolve_cache_format(config_with_head_dim(128), CacheMode::Fp8, nullptr, {}, 100, "w");
  EXPECT_TRUE(fp8.quantized);
  EXPECT_TRUE(fp8.fp8());
  EXPECT_FALSE(fp8.segmented());
  EXPECT_FALSE(int4_mode.fp8());
  EXPECT_EQ(fp8.recent_tokens, 100);
  EXPECT_TRUE(fp8.k_rotation[0].empty());
  EXPECT_EQ(fp8.v_clip_ratio[1], 1.f);
  const KvCacheLayout fp8_layout = cache_layout(config_with_head_dim(128), fp8);
  EXPECT_EQ(fp8_layout.k_page_bytes, (std::vector<int32_t>{8320, 8320}));
  EXPECT_EQ(fp8_layout.v_page_bytes, (std::vector<int32_t>{8320, 8320}));
  EXPECT_EQ(fp8_layout.int2_page_bytes(), static_cast<size_t>(fp8_layout.num_kv_heads) * 4 * 8320);
  EXPECT_THROW(resolve_cache_format(config_with_head_dim(8), CacheMode::Fp8, nullptr, {}, {}, "w"), Error);

  EXPECT_THROW(resolve_cache_format(config_with_head_dim(128), CacheMode::Oscar, nullptr, {}, {}, "w"), Error);
  const fmt::Bundle bundle = identity_bundle(128, 2);
  const CacheFormat oscar = resolve_cache_format(config_with_head_dim(128), CacheMode::Oscar, &bundle, {}, {}, "w");
  EXPECT_EQ(oscar.sink_tokens, 8);
  EXPECT_EQ(oscar.recent_tokens, 32);
  EXPECT_FLOAT_EQ(oscar.k_clip_ratio[1], 0.91f);
  EXPECT_EQ(oscar.v_clip_ratio[0], 0.8f);
  EXPECT_EQ(oscar.k_rotation[0].size(), 128u * 128u);

  fmt::Bundle per_head = bundle;
  per_head.rotation_groups = 2;
  EXPECT_THROW(resolve_cache_format(config_with_head_dim(128), CacheMode::Oscar, &per_head, {}, {}, "w"), Error);
  // Whole-head 4-bit and 3-bit K are one-segment layouts the segmented kernel reads (issue #10); 8 bits it does not.
  fmt::Bundle int4 = bundle;
  int4.quant.k.segments[0].bits = 4;
  const CacheFormat f4 = resolve_cache_format(config_with_head_dim(128), CacheMode::Oscar, &int4, {}, {}, "w");
  EXPECT_TRUE(f4.segmented());
  EXPECT_EQ(f4.k_segments[1], (std::vector<fmt::QuantSegment>{{0, 128, 4}}));
  EXPECT_FALSE(oscar.segmented());
  fmt::Bundle int3 = bundle;
  int3.quant.k.segments[0].bits = 3;
  const CacheFormat f3 = resolve_cache_format(config_with_head_dim(128), CacheMode::Oscar, &int3, {}, {}, "w");
  EXPECT_EQ(f3.k_segments[1], (std::vector<fmt::QuantSegment>{{0, 128, 3}}));
  fmt::Bundle int8 = bundle;
  int8.quant.k.segments[0].bits = 8;
  EXPECT_THROW(resolve_cache_format(config_with_head_dim(128), CacheMode::Oscar, &int8, {}, {}, "w"), Error);
  // Bundle 1.1 per-layer layouts: taken per layer; pages sized per layer; off-16 boundaries refused.
  fmt::Bundle spectral = bundle;
  spectral.layers[1].k_segments = {{0, 48, 4}, {48, 112, 2}, {112, 128, 0}};
  spectral.layers[1].v_segments = {{0, 64, 2}, {64, 128, 1}};
  const CacheFormat fs = resolve_cache_format(config_with_head_dim(128), CacheMode::Oscar, &spectral, {}, {}, "w");
  EXPECT_TRUE(fs.segmented());
  EXPECT_EQ(fs.k_segments[0], bundle.quant.k.segments);
  EXPECT_EQ(fs.k_segments[1], spectral.layers[1].k_segments);
  const KvCacheLayout lay = cache_layout(config_with_head_dim(128), fs);
  ASSERT_EQ(lay.k_page_bytes.size(), 2u);
  EXPECT_EQ(lay.k_page_bytes[0], 2304);            // INT2: 64 x 36
  EXPECT_EQ(lay.k_page_bytes[1], 64 * 48);         // 24 + 16 code bytes + 2 pairs
  EXPECT_EQ(lay.v_page_bytes[1], 64 * (24 + 8));   // 16 + 8 code bytes + 2 pairs
  EXPECT_EQ(lay.int2_page_bytes(), static_cast<size_t>(lay.num_kv_heads) * (2304 * 2 + 64 * 48 + 64 * 32));
  fmt::Bundle off16 = spectral;
  off16.layers[0].k_segments = {{0, 40, 4}, {40, 128, 2}};
  EXPECT_THROW(resolve_cache_format(config_with_head_dim(128), CacheMode::Oscar, &off16, {}, {}, "w"), Error);
  EXPECT_THROW(resolve_cache_format(config_with_head_dim(128, 3), CacheMode::Oscar, &bundle, {}, {}, "w"), Error);
  EXPECT_THROW(resolve_cache_format(config_with_head_dim(64), CacheMode::Oscar, &bundle, {}, {}, "w"), Error);
}

TEST(EngineFormat, BundleOfAnotherModelIsRefusedNamingBoth) {
  fmt::Bundle b;
  b.model.architecture = "Qwen3ForCausalLM";
  b.model.num_layers = 6;
  b.model.config_sha256 = std::string(64, 'a');
  b.model.attention_sha256 = std::string(64, 'b');
  fmt::ModelFingerprint m = b.model;
  EXPECT_NO_THROW(check_bundle_matches(b, m, "x.oscar", "models/q"));
  m.attention_sha256 = std::string(64, 'c');
  try {
    check_bundle_matches(b, m, "x.oscar", "models/q");
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.where(), "x.oscar");
    EXPECT_NE(e.detail().find("models/q"), std::string::npos);
    EXPECT_NE(e.detail().find("bbbbbbbbbbbb"), std::string::npos) << e.what();
    EXPECT_NE(e.detail().find("cccccccccccc"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace oscar::rt
