// Internal consistency of the CPU forward on random and real models: incremental decode equals a full forward,
// GQA equals MHA with repeated KV heads, attention against an independent double-precision reference, RoPE
// frequencies and rotation against their formulas, bf16 weights against their exact fp32 widening, load-time
// validation, and the trained Qwen3 fixture.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <random>

#include "formats/error.h"
#include "formats/safetensors.h"
#include "lib/model/cpu_model.h"
#include "lib/model/observer.h"
#include "lib/model/rope.h"
#include "test_support.h"

namespace oscar::model {
namespace {

namespace fs = std::filesystem;

fmt::ModelConfig small_config(fmt::Arch arch, int64_t heads, int64_t kv_heads) {
  fmt::ModelConfig c;
  c.arch = arch;
  c.hidden_size = 48;
  c.num_layers = 3;
  c.num_heads = heads;
  c.num_kv_heads = kv_heads;
  c.head_dim = 16;  // heads*head_dim != hidden for some heads, as Qwen3 allows
  c.intermediate_size = 80;
  c.vocab_size = 97;
  c.max_position_embeddings = 256;
  c.rms_norm_eps = 1e-6;
  c.rope.theta = 10000.0;
  c.tie_word_embeddings = true;
  if (arch == fmt::Arch::Qwen2) c.attention_bias = true;
  if (arch == fmt::Arch::Qwen3) c.qk_norm = true;
  return c;
}

std::vector<int32_t> random_ids(int64_t n, int64_t vocab, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int32_t> ids(static_cast<size_t>(n));
  for (auto& id : ids) id = static_cast<int32_t>(rng() % static_cast<uint64_t>(vocab));
  return ids;
}

float max_abs_diff(const float* a, const float* b, size_t n) {
  float m = 0;
  for (size_t i = 0; i < n; ++i) m = std::max(m, std::abs(a[i] - b[i]));
  return m;
}

// ---------------------------------------------------------------------------------------------------------
// Incremental decode == full forward.

struct DecodeCase {
  std::string name;
  fmt::ModelConfig cfg;
};

class IncrementalDecode : public ::testing::TestWithParam<DecodeCase> {};

TEST_P(IncrementalDecode, MatchesFullForward) {
  const fmt::ModelConfig& cfg = GetParam().cfg;
  auto model = CpuModel::random(cfg, 1234);
  const int64_t T = 40;
  const auto ids = random_ids(T, cfg.vocab_size, 99);

  KvCache full_cache(cfg, T);
  const std::vector<float> full = model->forward(ids, full_cache);
  ASSERT_EQ(static_cast<int64_t>(full.size()), T * cfg.vocab_size);

  // Prefill 17, one chunk of 5 (a multi-token call at pos0 > 0), then one token at a time.
  KvCache cache(cfg, 64);  // a larger capacity: the cache stride differs from the full run's
  std::vector<float> inc = model->forward(std::span(ids).first(17), cache);
  auto chunk = model->forward(std::span(ids).subspan(17, 5), cache);
  inc.insert(inc.end(), chunk.begin(), chunk.end());
  for (int64_t t = 22; t < T; ++t) {
    ForwardOptions opt;
    opt.last_logits_only = (t % 2 == 0);  // both output shapes of a single-token call
    auto row = model->forward(std::span(ids).subspan(t, 1), cache, opt);
    ASSERT_EQ(static_cast<int64_t>(row.size()), cfg.vocab_size);
    inc.insert(inc.end(), row.begin(), row.end());
  }
  ASSERT_EQ(inc.size(), full.size());
  EXPECT_EQ(cache.length(), T);
  EXPECT_LE(max_abs_diff(inc.data(), full.data(), full.size()), 1e-4f);

  for (int64_t l = 0; l < cfg.num_layers; ++l)
    for (int64_t g = 0; g < cfg.num_kv_heads; ++g) {
      const size_t n = static_cast<size_t>(T * cfg.head_dim);
      EXPECT_LE(max_abs_diff(cache.k(l) + g * 64 * cfg.head_dim, full_cache.k(l) + g * T * cfg.head_dim, n), 1e-5f);
      EXPECT_LE(max_abs_diff(cache.v(l) + g * 64 * cfg.head_dim, full_cache.v(l) + g * T * cfg.head_dim, n), 1e-5f);
    }

  // Logits of a random model still vary across the vocabulary (guards against a degenerate forward).
  const auto [lo, hi] = std::minmax_element(full.begin(), full.begin() + cfg.vocab_size);
  EXPECT_GT(*hi - *lo, 1e-3f);
}

std::vector<DecodeCase> decode_cases() {
  std::vector<DecodeCase> cases;
  cases.push_back({"llama_mha_group1", small_config(fmt::Arch::Llama, 4, 4)});
  cases.push_back({"llama_gqa_group2", small_config(fmt::Arch::Llama, 4, 2)});
  cases.push_back({"mistral_gqa_group4", small_config(fmt::Arch::Mistral, 4, 1)});
  cases.push_back({"qwen2_bias_group2", small_config(fmt::Arch::Qwen2, 6, 3)});
  cases.push_back({"qwen3_qknorm_group2", small_config(fmt::Arch::Qwen3, 4, 2)});
  auto llama3 = small_config(fmt::Arch::Llama, 8, 2);
  llama3.rope = {fmt::RopeType::Llama3, 500000.0, 8.0, 1.0, 4.0, 64};
  llama3.tie_word_embeddings = false;
  cases.push_back({"llama3_rope_untied_group4", llama3});
  auto linear = small_config(fmt::Arch::Llama, 2, 2);
  linear.rope.type = fmt::RopeType::Linear;
  linear.rope.factor = 2.0;
  cases.push_back({"linear_rope", linear});
  return cases;
}

INSTANTIATE_TEST_SUITE_P(RandomModels, IncrementalDecode, ::testing::ValuesIn(decode_cases()),
                         [](const auto& info) { return info.param.name; });

TEST(CpuModel, RandomIsDeterministicBySeed) {
  const auto cfg = small_config(fmt::Arch::Qwen3, 4, 2);
  const auto ids = random_ids(9, cfg.vocab_size, 5);
  KvCache c1(cfg, 9), c2(cfg, 9), c3(cfg, 9);
  const auto a = CpuModel::random(cfg, 7)->forward(ids, c1);
  const auto b = CpuModel::random(cfg, 7)->forward(ids, c2);
  const auto c = CpuModel::random(cfg, 8)->forward(ids, c3);
  EXPECT_EQ(a, b);
  EXPECT_GT(max_abs_diff(a.data(), c.data(), a.size()), 1e-3f);
}

TEST(CpuModel, RejectsCacheOverflowAndBadIds) {
  const auto cfg = small_config(fmt::Arch::Llama, 4, 2);
  auto model = CpuModel::random(cfg, 1);
  KvCache cache(cfg, 4);
  const auto ids = random_ids(5, cfg.vocab_size, 1);
  EXPECT_THROW(model->forward(ids, cache), Error);
  EXPECT_EQ(cache.length(), 0);
  const std::vector<int32_t> bad = {1, static_cast<int32_t>(cfg.vocab_size)};
  EXPECT_THROW(model->forward(bad, cache), Error);
}

// ---------------------------------------------------------------------------------------------------------
// Attention against a double-precision reference written from the definition.

class ExactAttentionGqa : public ::testing::TestWithParam<int64_t> {};

TEST_P(ExactAttentionGqa, MatchesDoublePrecisionReference) {
  const int64_t group = GetParam(), nkv = 2, nh = nkv * group, d = 12, pos0 = 7, T = 5, stride = 20;
  std::mt19937_64 rng(group);
  std::normal_distribution<float> normal;
  std::vector<float> q(nh * T * d), k(nkv * stride * d), v(k.size()), out(T * nh * d, -1.f);
  for (auto* vec : {&q, &k, &v})
    for (auto& x : *vec) x = 2.f * normal(rng);
  AttentionCall call{0, T, pos0, nh, nkv, d, stride, 1.0f / std::sqrt(float(d)), q.data(), k.data(), v.data(),
                     out.data()};
  exact_attention(call);

  double worst = 0;
  for (int64_t h = 0; h < nh; ++h)
    for (int64_t t = 0; t < T; ++t) {
      const int64_t g = h / group, n = pos0 + t + 1;
      std::vector<double> w(n);
      double mx = -1e300, sum = 0;
      for (int64_t j = 0; j < n; ++j) {
        double s = 0;
        for (int64_t i = 0; i < d; ++i) s += double(q[(h * T + t) * d + i]) * k[(g * stride + j) * d + i];
        w[j] = s / std::sqrt(double(d));
        mx = std::max(mx, w[j]);
      }
      for (auto& x : w) sum += (x = std::exp(x - mx));
      for (int64_t i = 0; i < d; ++i) {
        double o = 0;
        for (int64_t j = 0; j < n; ++j) o += w[j] / sum * v[(g * stride + j) * d + i];
        worst = std::max(worst, std::abs(o - out[t * nh * d + h * d + i]));
      }
    }
  EXPECT_LE(worst, 1e-5);
}

INSTANTIATE_TEST_SUITE_P(Groups, ExactAttentionGqa, ::testing::Values(1, 2, 4));

// ---------------------------------------------------------------------------------------------------------
// Checkpoints written here: GQA vs MHA with repeated KV heads, bf16 vs fp32, load validation.

struct Checkpoint {
  nlohmann::json config;
  std::map<std::string, std::pair<std::vector<int64_t>, std::vector<float>>> tensors;
};

Checkpoint random_checkpoint(int64_t hidden, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t inter,
                             int64_t vocab, int64_t layers, uint64_t seed) {
  Checkpoint ck;
  ck.config = {{"architectures", {"LlamaForCausalLM"}},
               {"model_type", "llama"},
               {"hidden_size", hidden},
               {"intermediate_size", inter},
               {"num_hidden_layers", layers},
               {"num_attention_heads", heads},
               {"num_key_value_heads", kv_heads},
               {"head_dim", head_dim},
               {"vocab_size", vocab},
               {"max_position_embeddings", 128},
               {"rms_norm_eps", 1e-5},
               {"rope_theta", 10000.0},
               {"tie_word_embeddings", false},
               {"bos_token_id", 1},
               {"eos_token_id", 2},
               {"torch_dtype", "float32"}};
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal;
  auto add = [&](const std::string& name, std::vector<int64_t> shape, float scale, float offset) {
    int64_t n = 1;
    for (auto s : shape) n *= s;
    std::vector<float> v(n);
    for (auto& x : v) x = offset + scale * normal(rng);
    ck.tensors[name] = {shape, v};
  };
  add("model.embed_tokens.weight", {vocab, hidden}, 0.5f, 0.f);
  add("lm_head.weight", {vocab, hidden}, 0.1f, 0.f);
  add("model.norm.weight", {hidden}, 0.1f, 1.f);
  for (int64_t l = 0; l < layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    add(p + "input_layernorm.weight", {hidden}, 0.1f, 1.f);
    add(p + "post_attention_layernorm.weight", {hidden}, 0.1f, 1.f);
    add(p + "self_attn.q_proj.weight", {heads * head_dim, hidden}, 0.2f, 0.f);
    add(p + "self_attn.k_proj.weight", {kv_heads * head_dim, hidden}, 0.2f, 0.f);
    add(p + "self_attn.v_proj.weight", {kv_heads * head_dim, hidden}, 0.2f, 0.f);
    add(p + "self_attn.o_proj.weight", {hidden, heads * head_dim}, 0.1f, 0.f);
    add(p + "mlp.gate_proj.weight", {inter, hidden}, 0.1f, 0.f);
    add(p + "mlp.up_proj.weight", {inter, hidden}, 0.1f, 0.f);
    add(p + "mlp.down_proj.weight", {hidden, inter}, 0.1f, 0.f);
  }
  return ck;
}

void write_checkpoint(const Checkpoint& ck, const fs::path& dir, bool bf16 = false) {
  fs::create_directories(dir);
  std::ofstream(dir / "config.json") << ck.config.dump(2);
  std::vector<std::vector<uint16_t>> bf16_storage;
  std::vector<fmt::TensorToWrite> out;
  for (const auto& [name, tensor] : ck.tensors) {
    if (bf16) {
      auto& bits = bf16_storage.emplace_back();
      for (float x : tensor.second) bits.push_back(fmt::f32_to_bf16(x));
      out.push_back({name, fmt::DType::BF16, tensor.first,
                     std::as_bytes(std::span<const uint16_t>(bits.data(), bits.size()))});
    } else {
      out.push_back(fmt::f32_tensor(name, tensor.first, tensor.second));
    }
  }
  fmt::write_safetensors(dir / "model.safetensors", out);
}

class GqaVsMha : public ::testing::TestWithParam<int64_t> {};

// A GQA model is an MHA model whose query head h reads KV head h / group; repeating each KV head's
// projection rows `group` times builds that MHA model explicitly, and the logits must agree.
TEST_P(GqaVsMha, RepeatedKvHeadsGiveTheSameLogits) {
  const int64_t group = GetParam(), heads = 4, kv_heads = heads / group, d = 8, hidden = 32;
  const auto dir = oscar::test::temp_dir_for_test();
  Checkpoint gqa = random_checkpoint(hidden, heads, kv_heads, d, 48, 61, 2, 42);
  Checkpoint mha = gqa;
  mha.config["num_key_value_heads"] = heads;
  for (int64_t l = 0; l < 2; ++l)
    for (const char* proj : {"k_proj", "v_proj"}) {
      const std::string name = "model.layers." + std::to_string(l) + ".self_attn." + proj + ".weight";
      const auto& src = gqa.tensors[name].second;
      std::vector<float> rep;
      for (int64_t h = 0; h < heads; ++h)
        rep.insert(rep.end(), src.begin() + (h / group) * d * hidden, src.begin() + (h / group + 1) * d * hidden);
      mha.tensors[name] = {{heads * d, hidden}, rep};
    }
  write_checkpoint(gqa, dir / "gqa");
  write_checkpoint(mha, dir / "mha");
  auto a = CpuModel::load(dir / "gqa");
  auto b = CpuModel::load(dir / "mha");
  EXPECT_EQ(a->config().group_size(), group);
  const auto ids = random_ids(23, 61, 3);
  KvCache ca(a->config(), 23), cb(b->config(), 23);
  const auto la = a->forward(ids, ca), lb = b->forward(ids, cb);
  EXPECT_LE(max_abs_diff(la.data(), lb.data(), la.size()), 1e-5f);
}

INSTANTIATE_TEST_SUITE_P(Groups, GqaVsMha, ::testing::Values(1, 2, 4));

// bf16 weights are widened block by block inside the GEMM; an fp32 checkpoint holding the exact widened values
// must give identical logits. The lm_head (vocab 2100 x hidden 512 > one 2^20-float block) spans two blocks.
TEST(CpuModelLoad, Bf16CheckpointEqualsItsExactFp32Widening) {
  const auto dir = oscar::test::temp_dir_for_test();
  Checkpoint ck = random_checkpoint(512, 4, 2, 32, 64, 2100, 1, 9);
  for (auto& [name, t] : ck.tensors)
    for (float& x : t.second) x = fmt::bf16_to_f32(fmt::f32_to_bf16(x));
  write_checkpoint(ck, dir / "bf16", /*bf16=*/true);
  write_checkpoint(ck, dir / "f32");
  auto a = CpuModel::load(dir / "bf16");
  auto b = CpuModel::load(dir / "f32");
  ASSERT_NE(a->weights(), nullptr);
  EXPECT_EQ(a->weights()->get("lm_head.weight").dtype, fmt::DType::BF16);
  const auto ids = random_ids(11, 2100, 4);
  KvCache ca(a->config(), 11), cb(b->config(), 11);
  const auto la = a->forward(ids, ca), lb = b->forward(ids, cb);
  EXPECT_LE(max_abs_diff(la.data(), lb.data(), la.size()), 1e-5f);
}

TEST(CpuModelLoad, MisshapedTensorErrorNamesTensorAndFile) {
  const auto dir = oscar::test::temp_dir_for_test();
  Checkpoint ck = random_checkpoint(32, 4, 2, 8, 48, 61, 2, 1);
  ck.tensors["model.layers.1.mlp.up_proj.weight"] = {{47, 32}, std::vector<float>(47 * 32, 0.f)};
  write_checkpoint(ck, dir);
  try {
    CpuModel::load(dir);
    FAIL() << "expected oscar::Error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("model.layers.1.mlp.up_proj.weight"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("model.safetensors"), std::string::npos) << e.what();
  }
}

TEST(CpuModelLoad, MissingTensorIsAnError) {
  const auto dir = oscar::test::temp_dir_for_test();
  Checkpoint ck = random_checkpoint(32, 4, 2, 8, 48, 61, 2, 1);
  ck.tensors.erase("model.layers.0.self_attn.v_proj.weight");
  write_checkpoint(ck, dir);
  try {
    CpuModel::load(dir);
    FAIL() << "expected oscar::Error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("model.layers.0.self_attn.v_proj.weight"), std::string::npos) << e.what();
  }
}

TEST(CpuModelLoad, QkvBiasesAreUsedWhenPresent) {
  // Qwen2 checkpoints carry q/k/v biases; the tensors decide. A bias on v shifts every attention output,
  // so the logits must change, and a config without attention_bias must not make them be ignored.
  const auto dir = oscar::test::temp_dir_for_test();
  Checkpoint ck = random_checkpoint(32, 4, 2, 8, 48, 61, 1, 2);
  write_checkpoint(ck, dir / "plain");
  ck.tensors["model.layers.0.self_attn.v_proj.bias"] = {{16}, std::vector<float>(16, 0.5f)};
  write_checkpoint(ck, dir / "bias");
  const auto ids = random_ids(6, 61, 8);
  auto a = CpuModel::load(dir / "plain");
  auto b = CpuModel::load(dir / "bias");
  KvCache ca(a->config(), 6), cb(b->config(), 6);
  const auto la = a->forward(ids, ca), lb = b->forward(ids, cb);
  EXPECT_GT(max_abs_diff(la.data(), lb.data(), la.size()), 1e-3f);
  // V = x·Wvᵀ + b exactly: the cached values differ from the bias-free model's by the bias.
  EXPECT_NEAR(cb.v(0)[3] - ca.v(0)[3], 0.5f, 1e-5f);
}

TEST(CpuModelLoad, SlidingWindowConfigIsRefused) {
  const auto dir = oscar::test::temp_dir_for_test();
  Checkpoint ck = random_checkpoint(32, 4, 2, 8, 48, 61, 1, 1);
  ck.config["architectures"] = {"MistralForCausalLM"};
  ck.config["model_type"] = "mistral";
  ck.config["sliding_window"] = 16;
  write_checkpoint(ck, dir);
  try {
    CpuModel::load(dir);
    FAIL() << "expected oscar::Error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("sliding"), std::string::npos) << e.what();
  }
}

// ---------------------------------------------------------------------------------------------------------
// RoPE.

fmt::ModelConfig rope_config(fmt::RopeSpec rope, int64_t head_dim) {
  fmt::ModelConfig c = small_config(fmt::Arch::Llama, 4, 4);
  c.head_dim = head_dim;
  c.rope = rope;
  return c;
}

TEST(Rope, DefaultAndLinearInvFreqMatchFormula) {
  const auto def = rope_inv_freq(rope_config({fmt::RopeType::Default, 1e6, 1.0}, 128));
  const auto lin = rope_inv_freq(rope_config({fmt::RopeType::Linear, 10000.0, 4.0}, 64));
  ASSERT_EQ(def.size(), 64u);
  ASSERT_EQ(lin.size(), 32u);
  for (int i = 0; i < 64; ++i) EXPECT_NEAR(def[i], std::pow(1e6, -2.0 * i / 128), 2e-6 * std::pow(1e6, -2.0 * i / 128));
  for (int i = 0; i < 32; ++i) {
    const double want = std::pow(1e4, -2.0 * i / 64) / 4.0;
    EXPECT_NEAR(lin[i], want, 2e-6 * want);
  }
}

TEST(Rope, Llama3InvFreqMatchesFormula) {
  // Llama-3.1 8B's rope_scaling: factor 8, low 1, high 4, original context 8192, theta 500000, head_dim 128.
  const fmt::RopeSpec spec{fmt::RopeType::Llama3, 500000.0, 8.0, 1.0, 4.0, 8192};
  const auto got = rope_inv_freq(rope_config(spec, 128));
  ASSERT_EQ(got.size(), 64u);
  const double low_wavelen = 8192 / 1.0, high_wavelen = 8192 / 4.0;
  int high_band = 0, low_band = 0, medium_band = 0;
  for (int i = 0; i < 64; ++i) {
    const double f = std::pow(500000.0, -2.0 * i / 128);
    const double wavelen = 2 * M_PI / f;
    double want;
    if (wavelen < high_wavelen) {
      want = f;  // high frequencies untouched
      ++high_band;
    } else if (wavelen > low_wavelen) {
      want = f / 8.0;  // low frequencies interpolated by the full factor
      ++low_band;
    } else {
      const double s = (8192 / wavelen - 1.0) / (4.0 - 1.0);
      want = (1 - s) * f / 8.0 + s * f;
      ++medium_band;
    }
    EXPECT_NEAR(got[i], want, 3e-6 * want) << "i=" << i;
  }
  // The case covers all three bands of the piecewise definition.
  EXPECT_GT(high_band, 0);
  EXPECT_GT(low_band, 0);
  EXPECT_GT(medium_band, 0);
}

TEST(Rope, RotationMatchesAnalyticAndIsRelative) {
  const int64_t d = 16;
  const auto inv = rope_inv_freq(rope_config({fmt::RopeType::Default, 10000.0}, d));
  // A unit vector e_i at position p becomes cos(p·θ_i) e_i + sin(p·θ_i) e_{i+d/2}.
  const int64_t pos = 37;
  const auto tables = rope_tables(inv, pos, 1);
  for (int64_t i = 0; i < d / 2; ++i) {
    std::vector<float> x(d, 0.f);
    x[i] = 1.f;
    apply_rope(x.data(), 1, d, tables);
    const double angle = pos * std::pow(10000.0, -2.0 * i / d);
    EXPECT_NEAR(x[i], std::cos(angle), 1e-5);
    EXPECT_NEAR(x[i + d / 2], std::sin(angle), 1e-5);
  }
  // <rope(q, m), rope(k, n)> depends only on m - n.
  std::mt19937_64 rng(3);
  std::normal_distribution<float> normal;
  std::vector<float> q(d), k(d);
  for (auto& x : q) x = normal(rng);
  for (auto& x : k) x = normal(rng);
  auto rotated_dot = [&](int64_t m, int64_t n) {
    auto qm = q, kn = k;
    apply_rope(qm.data(), 1, d, rope_tables(inv, m, 1));
    apply_rope(kn.data(), 1, d, rope_tables(inv, n, 1));
    double s = 0;
    for (int64_t i = 0; i < d; ++i) s += double(qm[i]) * kn[i];
    return s;
  };
  EXPECT_NEAR(rotated_dot(10, 3), rotated_dot(107, 100), 1e-4);
  EXPECT_GT(std::abs(rotated_dot(10, 3) - rotated_dot(10, 4)), 1e-3);
}

// ---------------------------------------------------------------------------------------------------------
// The trained Qwen3 fixture: 3 bf16 shards, head_dim 128, q/k norm.

TEST(Qwen3TinyTrained, LoadsShardsAndRuns64TokensDecodingConsistently) {
  OSCAR_REQUIRE_FIXTURE("models/qwen3-tiny-trained/model.safetensors.index.json");
  auto model = CpuModel::load(oscar::test::fixtures_dir() / "models/qwen3-tiny-trained");
  const auto& cfg = model->config();
  EXPECT_EQ(cfg.arch, fmt::Arch::Qwen3);
  EXPECT_TRUE(cfg.qk_norm);
  EXPECT_EQ(cfg.head_dim, 128);
  EXPECT_EQ(model->weights()->files().size(), 3u);
  EXPECT_EQ(model->weights()->get("model.layers.0.self_attn.q_norm.weight").dtype, fmt::DType::BF16);

  const auto ids = random_ids(64, cfg.vocab_size, 64);
  KvCache full_cache(cfg, 64);
  const auto logits = model->forward(ids, full_cache);
  ASSERT_EQ(static_cast<int64_t>(logits.size()), 64 * cfg.vocab_size);
  for (float x : logits) ASSERT_TRUE(std::isfinite(x));

  KvCache cache(cfg, 64);
  model->forward(std::span(ids).first(63), cache);
  const auto last = model->forward(std::span(ids).last(1), cache);
  EXPECT_LE(max_abs_diff(last.data(), logits.data() + 63 * cfg.vocab_size, last.size()), 1e-4f);
}

}  // namespace
}  // namespace oscar::model
