// rt::resolve_cache_format with bundle 1.2 error-feedback tables (issue #10): the engine takes them per layer and
// tensor as stored, and refuses every table its writer cannot use before anything is uploaded (the kernel reads
// the order unchecked, so a non-permutation would be an out-of-bounds access on the device).
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>

#include "../kernels/kv_write_ef_util.h"
#include "formats/bundle.h"
#include "formats/error.h"
#include "runtime/engine.h"
#include "runtime_test_config.h"

namespace oscar::rt {
namespace {

constexpr int64_t kD = 128, kLayers = 2, kKvHeads = 2;

fmt::ModelConfig config() { return test_attention_config(kLayers, kKvHeads, kD); }

fmt::Bundle bundle() {
  fmt::Bundle b;
  b.quant = fmt::KvQuantSpec::int2_default(kD);
  for (int64_t l = 0; l < kLayers; ++l) {
    fmt::LayerCalibration lc;
    lc.k_rotation.assign(static_cast<size_t>(kD * kD), 0.f);
    for (int64_t i = 0; i < kD; ++i) lc.k_rotation[static_cast<size_t>(i * kD + i)] = 1.f;
    lc.v_rotation = lc.k_rotation;
    lc.k_clip_ratio = 0.96f;
    lc.v_clip_ratio = 0.92f;
    b.layers.push_back(lc);
  }
  return b;
}

std::string message_of(const fmt::Bundle& b) {
  try {
    resolve_cache_format(config(), CacheMode::Oscar, &b, {}, {}, "--cache oscar");
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(EngineEfFormat, TablesAreTakenPerLayerAndTensor) {
  fmt::Bundle b = bundle();
  const CacheFormat plain = resolve_cache_format(config(), CacheMode::Oscar, &b, {}, {}, "w");
  EXPECT_FALSE(plain.error_feedback());
  const auto t = test::random_ef_tables(kD, kKvHeads, 5);
  b.layers[1].v_ef_order = t.order;
  b.layers[1].v_ef_weights = t.weights;
  b.ef_clip_feedback = false;
  const CacheFormat f = resolve_cache_format(config(), CacheMode::Oscar, &b, {}, {}, "w");
  EXPECT_TRUE(f.error_feedback());
  EXPECT_FALSE(f.ef_clip_feedback);
  ASSERT_EQ(f.v_ef_order.size(), 2u);
  EXPECT_TRUE(f.v_ef_order[0].empty());
  EXPECT_TRUE(f.k_ef_order[1].empty());
  EXPECT_EQ(f.v_ef_order[1], t.order);
  EXPECT_EQ(f.v_ef_weights[1], t.weights);
  b.ef_clip_feedback = true;
  EXPECT_TRUE(resolve_cache_format(config(), CacheMode::Oscar, &b, {}, {}, "w").ef_clip_feedback);
  // Other modes never carry tables.
  EXPECT_FALSE(resolve_cache_format(config(), CacheMode::Int2, nullptr, {}, {}, "w").error_feedback());
}

TEST(EngineEfFormat, UnusableTablesAreRefusedNamingLayerAndTensor) {
  const auto t = test::random_ef_tables(kD, kKvHeads, 6);
  fmt::Bundle good = bundle();
  good.layers[0].k_ef_order = t.order;
  good.layers[0].k_ef_weights = t.weights;

  fmt::Bundle b = good;
  b.layers[0].k_ef_weights.resize(t.weights.size() - 1);
  EXPECT_NE(message_of(b).find("layer 0 K error feedback"), std::string::npos) << message_of(b);

  b = good;
  b.layers[0].k_ef_order[kD + 3] = b.layers[0].k_ef_order[kD + 4];  // KV head 1 repeats a coordinate
  EXPECT_NE(message_of(b).find("not a permutation"), std::string::npos) << message_of(b);

  b = good;
  b.layers[0].k_ef_order[7] = static_cast<int32_t>(kD);
  EXPECT_NE(message_of(b).find("not a permutation"), std::string::npos) << message_of(b);

  b = good;
  b.layers[0].k_ef_weights[5] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_NE(message_of(b).find("not finite"), std::string::npos) << message_of(b);

  b = good;  // a table on a spectral (segmented) tensor
  b.layers[0].k_segments = {{0, 64, 4}, {64, 128, 2}};
  EXPECT_NE(message_of(b).find("whole-head INT2"), std::string::npos) << message_of(b);

  b = good;  // a table next to another layer's spectral layout: accepted, the tabled tensor is whole-head INT2
  b.layers[1].v_segments = {{0, 64, 2}, {64, 128, 1}};
  b.layers[1].v_ef_order.clear();
  b.layers[1].v_ef_weights.clear();
  EXPECT_EQ(message_of(b), "");
  const CacheFormat mixed = resolve_cache_format(config(), CacheMode::Oscar, &b, {}, {}, "w");
  EXPECT_TRUE(mixed.segmented());  // the cache uses segmented pages; engine.cu writes layer 0 K with the INT2 writer
  EXPECT_TRUE(mixed.error_feedback());
  EXPECT_FALSE(mixed.k_ef_order[0].empty());

  EXPECT_EQ(message_of(good), "");
}

}  // namespace
}  // namespace oscar::rt
