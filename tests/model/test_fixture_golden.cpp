// The CPU forward against transformers (fp32, eager) on the three real llama2.c checkpoints converted to HF:
// logits and the DynamicCache K/V for the first prompt, then final-position logits, top-5 per position and
// 32-token greedy continuations for all three prompts (golden files from fixtures/tools/hf_golden.py).
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>

#include "formats/safetensors.h"
#include "lib/model/cpu_model.h"
#include "lib/model/generate.h"
#include "test_support.h"

namespace oscar::model {
namespace {

namespace fs = std::filesystem;

std::vector<int32_t> read_i64_ids(const fmt::TensorView& t) {
  EXPECT_EQ(t.dtype, fmt::DType::I64);
  std::vector<int32_t> ids(static_cast<size_t>(t.numel()));
  for (size_t i = 0; i < ids.size(); ++i) {
    int64_t v;
    std::memcpy(&v, t.data + i * sizeof(int64_t), sizeof v);
    ids[i] = static_cast<int32_t>(v);
  }
  return ids;
}

float max_abs_diff(const float* a, const float* b, size_t n) {
  float m = 0;
  for (size_t i = 0; i < n; ++i) m = std::max(m, std::abs(a[i] - b[i]));
  return m;
}

// Records every layer's post-RoPE K so that it can be compared with the cache and with the golden keys.
class KeyRecorder : public Observer {
 public:
  void on_attention_inputs(const AttentionInputs& in) override {
    const size_t n = static_cast<size_t>(in.num_kv_heads * in.num_tokens * in.head_dim);
    keys.emplace_back(in.k, in.k + n);
    for (size_t i = 0; i < static_cast<size_t>(in.num_heads * in.num_tokens * in.head_dim); ++i)
      all_finite = all_finite && std::isfinite(in.q[i]);
  }
  std::vector<std::vector<float>> keys;
  bool all_finite = true;
};

class FixtureGolden : public ::testing::TestWithParam<std::string> {
 protected:
  fs::path model_dir() const { return oscar::test::fixtures_dir() / "models" / (GetParam() + "-hf"); }
  fs::path golden(const std::string& suffix) const {
    return oscar::test::fixtures_dir() / "golden" / (GetParam() + suffix);
  }
};

TEST_P(FixtureGolden, LogitsAndKvCacheMatchTransformers) {
  OSCAR_REQUIRE_FIXTURE("models/" + GetParam() + "-hf/model.safetensors");
  OSCAR_REQUIRE_FIXTURE("golden/" + GetParam() + "-hf-kv.safetensors");
  auto model = CpuModel::load(model_dir());
  const auto& cfg = model->config();
  auto gold = fmt::SafetensorsFile::open(golden("-hf-kv.safetensors"));
  const std::vector<int32_t> ids = read_i64_ids(*gold->find("input_ids"));
  const int64_t T = static_cast<int64_t>(ids.size());
  ASSERT_GT(T, 1);

  KvCache cache(cfg, T);  // capacity T: the cache rows are exactly the golden [n_kv, T, d] layout
  KeyRecorder recorder;
  ForwardOptions opt;
  opt.observer = &recorder;
  const std::vector<float> logits = model->forward(ids, cache, opt);
  EXPECT_EQ(cache.length(), T);

  const std::vector<float> gold_logits = fmt::to_f32(*gold->find("logits"));
  ASSERT_EQ(logits.size(), gold_logits.size());
  const float logit_err = max_abs_diff(logits.data(), gold_logits.data(), logits.size());
  EXPECT_LE(logit_err, 1e-3f);
  RecordProperty("max_abs_logit_diff", std::to_string(logit_err));
  std::printf("[%s] T=%lld  max |dlogit| = %.3g\n", GetParam().c_str(), static_cast<long long>(T), logit_err);

  ASSERT_EQ(static_cast<int64_t>(recorder.keys.size()), cfg.num_layers);
  EXPECT_TRUE(recorder.all_finite);
  float kv_err = 0;
  for (int64_t l = 0; l < cfg.num_layers; ++l) {
    const auto* gk = gold->find("layers." + std::to_string(l) + ".key");
    const auto* gv = gold->find("layers." + std::to_string(l) + ".value");
    ASSERT_NE(gk, nullptr);
    ASSERT_NE(gv, nullptr);
    ASSERT_EQ(gk->shape, (std::vector<int64_t>{cfg.num_kv_heads, T, cfg.head_dim}));
    const std::vector<float> key = fmt::to_f32(*gk), value = fmt::to_f32(*gv);
    const float ek = max_abs_diff(cache.k(l), key.data(), key.size());
    const float ev = max_abs_diff(cache.v(l), value.data(), value.size());
    const float eobs = max_abs_diff(recorder.keys[l].data(), key.data(), key.size());
    EXPECT_LE(ek, 1e-3f) << "layer " << l << " key";
    EXPECT_LE(ev, 1e-3f) << "layer " << l << " value";
    EXPECT_LE(eobs, 1e-3f) << "layer " << l << " observed key";
    kv_err = std::max({kv_err, ek, ev, eobs});
  }
  std::printf("[%s] max |dK|,|dV| over %lld layers = %.3g\n", GetParam().c_str(),
              static_cast<long long>(cfg.num_layers), kv_err);
}

TEST_P(FixtureGolden, PromptsLogitsTop5AndGreedyContinuations) {
  OSCAR_REQUIRE_FIXTURE("models/" + GetParam() + "-hf/model.safetensors");
  OSCAR_REQUIRE_FIXTURE("golden/" + GetParam() + "-hf.json");
  auto model = CpuModel::load(model_dir());
  const int64_t vocab = model->config().vocab_size;
  std::ifstream in(golden("-hf.json"));
  const nlohmann::json gold = nlohmann::json::parse(in);
  ASSERT_EQ(gold.at("prompts").size(), 3u);

  for (const auto& prompt : gold.at("prompts")) {
    SCOPED_TRACE(prompt.at("text").get<std::string>());
    const auto ids = prompt.at("input_ids").get<std::vector<int32_t>>();
    const int64_t T = static_cast<int64_t>(ids.size());
    KvCache cache(model->config(), T);
    const std::vector<float> logits = model->forward(ids, cache);

    // final_logits are rounded to 4 decimals: 5e-5 of rounding on top of the model's own error.
    const auto final_logits = prompt.at("final_logits").get<std::vector<float>>();
    ASSERT_EQ(static_cast<int64_t>(final_logits.size()), vocab);
    EXPECT_LE(max_abs_diff(logits.data() + (T - 1) * vocab, final_logits.data(), final_logits.size()), 1e-3f);

    const auto& top5 = prompt.at("top5_per_position");
    ASSERT_EQ(static_cast<int64_t>(top5.size()), T);
    for (int64_t t = 0; t < T; ++t) {
      const float* row = logits.data() + t * vocab;
      for (const auto& entry : top5[t]) {
        const int64_t id = entry.at(0).get<int64_t>();
        const float value = entry.at(1).get<float>();
        EXPECT_NEAR(row[id], value, 1e-3f) << "position " << t << " id " << id;
      }
      // The golden best token must be our argmax too (ties aside, the gap is far above the tolerance).
      EXPECT_EQ(std::max_element(row, row + vocab) - row, top5[t].at(0).at(0).get<int64_t>()) << "position " << t;
    }

    GenerateOptions gen;
    gen.max_new_tokens = 32;
    gen.stop_at_eos = false;  // the golden continuations are plain argmax, EOS included
    const GenerateResult out = generate(*model, ids, gen);
    EXPECT_EQ(out.tokens, prompt.at("greedy_32").get<std::vector<int32_t>>());
  }

  GenerateOptions gen;
  gen.max_new_tokens = 32;
  gen.stop_at_eos = false;
  const std::vector<int32_t> bos = {static_cast<int32_t>(model->config().bos_token_id.value_or(1))};
  EXPECT_EQ(generate(*model, bos, gen).tokens, gold.at("greedy_from_bos_32").at("ids").get<std::vector<int32_t>>());
}

INSTANTIATE_TEST_SUITE_P(LlamaTinyCheckpoints, FixtureGolden,
                         ::testing::Values("aidreams-llama2c-260k", "tinystories-llama2c-280k",
                                           "karpathy-stories-llama2c-260k"),
                         [](const auto& info) {
                           std::string n = info.param;
                           std::replace(n.begin(), n.end(), '-', '_');
                           return n;
                         });

}  // namespace
}  // namespace oscar::model
