// Bundle format 1.1: per-layer segment layouts round-trip, are validated, resolve through fmt::layer_spec, are
// absent from layers that use the global layout (so such a bundle has exactly the 1.0 objects), and reach eval's
// oscar cache mode.
#include <gtest/gtest.h>
#include <hdf5.h>

#include "formats/bundle.h"
#include "formats/error.h"
#include "formats/model_config.h"
#include "lib/calib/quantizer_ref.h"
#include "lib/calib/rotation.h"
#include "lib/eval/cache_modes.h"
#include "test_support.h"

namespace oscar::fmt {
namespace {

Bundle layered_bundle() {
  const int64_t d = 16, L = 2;
  Bundle b;
  b.producer = "oscar test";
  b.model = {"LlamaForCausalLM", L, 4, 2, d, 64, 512, std::string(64, 'a'), std::string(64, 'b')};
  b.quant = KvQuantSpec::int2_default(d);
  b.rotation_composition = "spectral";
  const auto h = calib::hadamard(d);
  for (int64_t l = 0; l < L; ++l) {
    LayerCalibration layer;
    layer.k_rotation.assign(h.begin(), h.end());
    layer.v_rotation.assign(h.begin(), h.end());
    layer.k_eigenvalues.assign(d, 0.0);
    layer.v_eigenvalues.assign(d, 0.0);
    layer.k_clip_ratio = 0.97f;
    layer.v_clip_ratio = 1.0f;
    if (l == 1) {
      layer.k_segments = {{0, 8, 3}, {8, 16, 0}};
      layer.v_segments = {{0, 16, 4}};
    }
    b.layers.push_back(std::move(layer));
  }
  return b;
}

bool has_object(const std::filesystem::path& file, const char* object) {
  const hid_t f = H5Fopen(file.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  const bool found = H5Lexists(f, "/layers/00000", H5P_DEFAULT) > 0 && H5Lexists(f, object, H5P_DEFAULT) > 0;
  H5Fclose(f);
  return found;
}

TEST(BundleLayerSegments, RoundTripAndResolve) {
  const auto dir = test::temp_dir_for_test();
  const Bundle b = layered_bundle();
  write_bundle(dir / "b.oscar", b);
  const Bundle r = read_bundle(dir / "b.oscar");
  EXPECT_EQ(r.format_minor, 1);
  EXPECT_EQ(r.layers, b.layers);
  EXPECT_TRUE(r.layers[0].k_segments.empty());
  EXPECT_FALSE(has_object(dir / "b.oscar", "/layers/00000/k_segments"));
  EXPECT_TRUE(has_object(dir / "b.oscar", "/layers/00001/k_segments"));
  const KvQuantSpec s0 = layer_spec(r, 0), s1 = layer_spec(r, 1);
  EXPECT_EQ(s0.k.segments, b.quant.k.segments);
  EXPECT_EQ(s1.k.segments, (std::vector<QuantSegment>{{0, 8, 3}, {8, 16, 0}}));
  EXPECT_FLOAT_EQ(s1.k.clip_ratio, 0.97f);
  // (8·3 + 32) / 16 and (16·4 + 32) / 16.
  EXPECT_DOUBLE_EQ(s1.k.bits_per_element(16), 3.5);
  EXPECT_DOUBLE_EQ(s1.v.bits_per_element(16), 6.0);
  EXPECT_THROW(layer_spec(r, 2), Error);
}

TEST(BundleLayerSegments, InvalidLayoutIsRefusedNamingTheLayer) {
  Bundle b = layered_bundle();
  b.layers[1].k_segments = {{0, 8, 3}, {9, 16, 2}};  // gap at dim 8
  try {
    write_bundle(test::temp_dir_for_test() / "bad.oscar", b);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("00001"), std::string::npos) << e.what();
  }
}

TEST(BundleLayerSegments, EvalOscarModeQuantizesEachLayerWithItsLayout) {
  const Bundle b = layered_bundle();
  ModelConfig cfg;
  cfg.num_layers = 2;
  cfg.num_heads = 4;
  cfg.num_kv_heads = 2;
  cfg.head_dim = 16;
  cfg.hidden_size = 64;
  cfg.vocab_size = 512;
  eval::ModeOptions mo;
  mo.bundle = &b;
  const auto f = eval::CacheFormat::create(eval::CacheMode::Oscar, cfg, mo);
  // The cost is the mean over layers: layer 0 uses the global INT2 (2 + 32/16 = 4 bits), layer 1 its own 3.5 / 6.
  EXPECT_DOUBLE_EQ(f->element_cost().key_bits, 0.5 * (4.0 + 3.5));
  EXPECT_DOUBLE_EQ(f->element_cost().value_bits, 0.5 * (4.0 + 6.0));
  std::vector<float> x(16), out(16), want(16);
  for (int i = 0; i < 16; ++i) x[i] = std::sin(0.7f * i) + 0.1f * i;
  f->fake_quantize_keys(1, 0, x, 1, out);
  const calib::HeadQuantizer q(layer_spec(b, 1).k, 16);
  const std::vector<float> r(b.layers[1].k_rotation.begin(), b.layers[1].k_rotation.end());
  q.fake_quantize(x, 1, r, 0.97f, calib::Basis::Original, want);
  EXPECT_EQ(out, want);
  f->fake_quantize_keys(0, 0, x, 1, out);
  const calib::HeadQuantizer q0(b.quant.k, 16);
  q0.fake_quantize(x, 1, r, 0.97f, calib::Basis::Original, want);
  EXPECT_EQ(out, want);
}

}  // namespace
}  // namespace oscar::fmt
