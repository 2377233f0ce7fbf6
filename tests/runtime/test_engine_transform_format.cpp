// rt::resolve_cache_format with bundle 2.0 storage transforms: the engine takes each layer's per-KV-head A and μ_K
// as stored for its writers, and builds the decode kernel's matrices A⁻ᵀ (q' = q·A_K⁻ᵀ, o = o'·A_V⁻¹), so that a
// key written as (x − μ)·A and read with them gives q·(x − μ); a 1.x bundle leaves all of it empty.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>

#include "../kernels/kv_transform_test_util.h"
#include "formats/bundle.h"
#include "formats/error.h"
#include "lib/calib/quantizer_ref.h"
#include "runtime/engine.h"
#include "runtime_test_config.h"

namespace oscar::rt {
namespace {

constexpr int kD = 64, kLayers = 2, kKvHeads = 2;

fmt::ModelConfig config() { return test_attention_config(kLayers, kKvHeads, kD); }

fmt::Bundle bundle(bool transforms) {
  fmt::Bundle b;
  b.quant = fmt::KvQuantSpec::int2_default(kD);
  for (int l = 0; l < kLayers; ++l) {
    fmt::LayerCalibration lc;
    lc.k_rotation = test::random_rotation(kD, 10 + l);
    lc.v_rotation = test::random_rotation(kD, 20 + l);
    lc.k_clip_ratio = 0.96f;
    lc.v_clip_ratio = 0.92f;
    if (transforms) {
      const auto k = test::random_head_transforms(kD, kKvHeads, 30 + l), v = test::random_head_transforms(kD, kKvHeads, 40 + l);
      lc.k_transform = k.a;
      lc.k_transform_inverse = k.a_inv;
      lc.k_mean = k.mean;
      if (l == 0) lc.v_transform = v.a, lc.v_transform_inverse = v.a_inv;  // layer 1: values keep R
    }
    b.layers.push_back(lc);
  }
  return b;
}

TEST(EngineTransformFormat, WritersGetAAndTheMeanReadersGetTheInverseTranspose) {
  const fmt::Bundle b = bundle(true);
  const CacheFormat f = resolve_cache_format(config(), CacheMode::Oscar, &b, {}, {}, "w");
  ASSERT_TRUE(f.storage_transforms());
  ASSERT_EQ(f.k_transform.size(), static_cast<size_t>(kLayers));
  EXPECT_EQ(f.k_transform[1], b.layers[1].k_transform);
  EXPECT_EQ(f.k_mean[1], b.layers[1].k_mean);
  EXPECT_EQ(f.v_transform[0], b.layers[0].v_transform);
  EXPECT_TRUE(f.v_transform[1].empty());
  EXPECT_TRUE(f.v_read[1].empty());
  EXPECT_EQ(f.k_rotation[1], b.layers[1].k_rotation);  // kept for the record; the writers use A
  // A key written as y = (x − μ)·A (fp32, as kv_write) and read as (q·M)·y with the format's M = A⁻ᵀ of its head
  // gives q·(x − μ); a value read as o'·Mᵀ gives back v.
  std::mt19937 rng(3);
  std::normal_distribution<float> n(0.f, 1.f);
  for (int h = 0; h < kKvHeads; ++h) {
    std::vector<float> x(kD), q(kD), xc(kD), y(kD), qm(kD), v(kD), yv(kD), back(kD);
    for (int i = 0; i < kD; ++i) x[i] = n(rng), q[i] = n(rng), v[i] = n(rng);
    const float* mu = f.k_mean[0].data() + h * kD;
    for (int i = 0; i < kD; ++i) xc[i] = x[i] - mu[i];
    calib::rotate(xc, std::span<const float>(f.k_transform[0].data() + h * kD * kD, kD * kD), y);
    calib::rotate(q, std::span<const float>(f.k_read[0].data() + h * kD * kD, kD * kD), qm);
    double got = 0, want = 0;
    for (int i = 0; i < kD; ++i) got += double(qm[i]) * y[i], want += double(q[i]) * xc[i];
    EXPECT_NEAR(got, want, 1e-4 * (1 + std::abs(want))) << "head " << h;
    calib::rotate(v, std::span<const float>(f.v_transform[0].data() + h * kD * kD, kD * kD), yv);
    calib::unrotate(yv, std::span<const float>(f.v_read[0].data() + h * kD * kD, kD * kD), back);  // o'·Mᵀ
    for (int i = 0; i < kD; ++i) EXPECT_NEAR(back[i], v[i], 1e-4) << "head " << h << " dim " << i;
  }
  const fmt::Bundle plain = bundle(false);
  const CacheFormat plain_format = resolve_cache_format(config(), CacheMode::Oscar, &plain, {}, {}, "w");
  EXPECT_FALSE(plain_format.storage_transforms());
  // What the engine's --fold-v check asks: R_v present in both; per-head value transforms only in the 2.0 one.
  EXPECT_TRUE(f.value_transforms());
  EXPECT_FALSE(plain_format.value_transforms());
  EXPECT_TRUE(f.value_rotations());
  EXPECT_TRUE(plain_format.value_rotations());
  EXPECT_FALSE(resolve_cache_format(config(), CacheMode::Int2, nullptr, {}, {}, "w").value_rotations());
}

// What the engine keeps on the device per format, counted by hand: a transformed tensor uploads A and A⁻ᵀ per KV
// head (and μ_K for keys) instead of its layer's R; the other tensors their R.
TEST(EngineTransformFormat, DeviceBytesCountTheTransformsInsteadOfTheirRotations) {
  const int64_t matrix = int64_t{kD} * kD * 4, head_matrices = kKvHeads * matrix, mean = int64_t{kKvHeads} * kD * 4;
  const fmt::Bundle plain = bundle(false);
  EXPECT_EQ(resolve_cache_format(config(), CacheMode::Oscar, &plain, {}, {}, "w").device_bytes(),
            2 * kLayers * matrix);  // R_k and R_v per layer
  const fmt::Bundle b = bundle(true);
  CacheFormat f = resolve_cache_format(config(), CacheMode::Oscar, &b, {}, {}, "w");
  EXPECT_TRUE(f.has_transform(0, true));
  EXPECT_FALSE(f.has_transform(1, true));
  // Keys of both layers: A, A⁻ᵀ and μ_K; values of layer 0: A, A⁻ᵀ; values of layer 1: R_v.
  const int64_t want = kLayers * (2 * head_matrices + mean) + 2 * head_matrices + matrix;
  EXPECT_EQ(f.device_bytes(), want);
  f.v_rotation_folded = true;  // a folded R_v is in the weights
  EXPECT_EQ(f.device_bytes(), want - matrix);
  const int64_t contexts[] = {1024};
  EXPECT_EQ(kv_footprint(config(), CacheMode::Oscar, &b, contexts, {}, {}, "w").engine_format_bytes, want);
}

TEST(EngineTransformFormat, AShortTransformIsRefusedNamingTheLayer) {
  fmt::Bundle b = bundle(true);
  b.layers[1].k_mean.pop_back();
  try {
    resolve_cache_format(config(), CacheMode::Oscar, &b, {}, {}, "--cache oscar");
    FAIL() << "a short key mean was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("layer 1"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("K storage transform"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace oscar::rt
