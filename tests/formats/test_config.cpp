// config.json -> ModelConfig for the four supported architectures in both layouts (classic rope_theta/rope_scaling/
// torch_dtype and transformers-5 rope_parameters/dtype), the fixture configs, and every refusal.
#include <gtest/gtest.h>

#include <fstream>

#include <nlohmann/json.hpp>

#include "formats/error.h"
#include "formats/model_config.h"
#include "test_support.h"

namespace oscar::fmt {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

const std::string kWhere = "some/model/config.json";

ModelConfig parse(const std::string& text) { return ModelConfig::from_json(json::parse(text), kWhere); }

::testing::AssertionResult refuses(const std::string& text, std::initializer_list<std::string> keywords) {
  try {
    parse(text);
    return ::testing::AssertionFailure() << "accepted: " << text;
  } catch (const Error& e) {
    if (e.where() != kWhere) return ::testing::AssertionFailure() << "where() is " << e.where();
    for (const auto& k : keywords)
      if (std::string(e.what()).find(k) == std::string::npos)
        return ::testing::AssertionFailure() << "'" << k << "' not in: " << e.what();
    return ::testing::AssertionSuccess();
  }
}

// Meta-Llama-3.1-8B's config.json (classic layout, llama3 rope_scaling, eos list).
const char* kLlama31 = R"({
  "architectures": ["LlamaForCausalLM"], "attention_bias": false, "bos_token_id": 128000,
  "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu", "hidden_size": 4096,
  "intermediate_size": 14336, "max_position_embeddings": 131072, "model_type": "llama",
  "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
  "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192, "rope_type": "llama3"},
  "rope_theta": 500000.0, "tie_word_embeddings": false, "torch_dtype": "bfloat16", "vocab_size": 128256})";

TEST(ModelConfig, Llama31ClassicLayout) {
  const ModelConfig c = parse(kLlama31);
  EXPECT_EQ(c.arch, Arch::Llama);
  EXPECT_EQ(c.hidden_size, 4096);
  EXPECT_EQ(c.num_layers, 32);
  EXPECT_EQ(c.num_heads, 32);
  EXPECT_EQ(c.num_kv_heads, 8);
  EXPECT_EQ(c.head_dim, 128);  // derived: 4096 / 32
  EXPECT_EQ(c.group_size(), 4);
  EXPECT_EQ(c.kv_dim(), 1024);
  EXPECT_EQ(c.intermediate_size, 14336);
  EXPECT_EQ(c.vocab_size, 128256);
  EXPECT_EQ(c.max_position_embeddings, 131072);
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-5);
  EXPECT_EQ(c.rope.type, RopeType::Llama3);
  EXPECT_DOUBLE_EQ(c.rope.theta, 500000.0);
  EXPECT_DOUBLE_EQ(c.rope.factor, 8.0);
  EXPECT_DOUBLE_EQ(c.rope.low_freq_factor, 1.0);
  EXPECT_DOUBLE_EQ(c.rope.high_freq_factor, 4.0);
  EXPECT_EQ(c.rope.original_max_position_embeddings, 8192);
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_FALSE(c.attention_bias);
  EXPECT_FALSE(c.qk_norm);
  EXPECT_EQ(c.dtype, DType::BF16);
  EXPECT_EQ(c.bos_token_id, 128000);
  EXPECT_EQ(c.eos_token_id, 128001);  // first of the list
  EXPECT_FALSE(c.sliding_window);
}

TEST(ModelConfig, Llama31TransformersFiveLayout) {
  json j = json::parse(kLlama31);
  j.erase("rope_scaling");
  j.erase("rope_theta");
  j.erase("torch_dtype");
  j["dtype"] = "float16";
  j["rope_parameters"] = {{"rope_theta", 250000.0}, {"rope_type", "llama3"}, {"factor", 32.0},
                          {"low_freq_factor", 2.0}, {"high_freq_factor", 8.0},
                          {"original_max_position_embeddings", 4096}};
  const ModelConfig c = ModelConfig::from_json(j, kWhere);
  EXPECT_EQ(c.rope.type, RopeType::Llama3);
  EXPECT_DOUBLE_EQ(c.rope.theta, 250000.0);
  EXPECT_DOUBLE_EQ(c.rope.factor, 32.0);
  EXPECT_DOUBLE_EQ(c.rope.low_freq_factor, 2.0);
  EXPECT_DOUBLE_EQ(c.rope.high_freq_factor, 8.0);
  EXPECT_EQ(c.rope.original_max_position_embeddings, 4096);
  EXPECT_EQ(c.dtype, DType::F16);
}

TEST(ModelConfig, LinearRopeBothSpellingsAndDefaults) {
  const char* base = R"({"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2,
                         "num_attention_heads": 4, "intermediate_size": 128, "vocab_size": 100 %s})";
  auto with = [&](const std::string& extra) {
    char buf[1024];
    std::snprintf(buf, sizeof buf, base, extra.c_str());
    return parse(buf);
  };
  ModelConfig c = with(R"(, "rope_scaling": {"type": "linear", "factor": 4.0}, "rope_theta": 20000)");
  EXPECT_EQ(c.rope.type, RopeType::Linear);
  EXPECT_DOUBLE_EQ(c.rope.factor, 4.0);
  EXPECT_DOUBLE_EQ(c.rope.theta, 20000.0);
  c = with(R"(, "rope_parameters": {"rope_type": "linear", "factor": 2.5, "rope_theta": 1e4}, "dtype": "float32")");
  EXPECT_EQ(c.rope.type, RopeType::Linear);
  EXPECT_DOUBLE_EQ(c.rope.factor, 2.5);
  // Nothing given: LlamaConfig's defaults.
  c = with("");
  EXPECT_EQ(c.rope.type, RopeType::Default);
  EXPECT_DOUBLE_EQ(c.rope.theta, 10000.0);
  EXPECT_EQ(c.num_kv_heads, 4);
  EXPECT_EQ(c.head_dim, 16);
  EXPECT_EQ(c.max_position_embeddings, 2048);
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-6);
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_EQ(c.dtype, DType::F32);
  EXPECT_FALSE(c.bos_token_id);
  c = with(R"(, "rope_scaling": {"rope_type": "default"}, "attention_bias": true, "num_key_value_heads": null)");
  EXPECT_EQ(c.rope.type, RopeType::Default);
  EXPECT_TRUE(c.attention_bias);
  EXPECT_EQ(c.num_kv_heads, 4);
  EXPECT_EQ(std::string(rope_type_name(RopeType::Llama3)), "llama3");
}

TEST(ModelConfig, Qwen2AlwaysHasBiasAndSlidingWindowNeedsTheSwitch) {
  // Qwen2.5-0.5B's config.json (it carries no attention_bias key; its q/k/v still have biases).
  const char* qwen25 = R"({
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
    "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 24, "model_type": "qwen2",
    "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": true, "torch_dtype": "bfloat16",
    "use_cache": true, "use_sliding_window": false, "vocab_size": 151936})";
  ModelConfig c = parse(qwen25);
  EXPECT_EQ(c.arch, Arch::Qwen2);
  EXPECT_TRUE(c.attention_bias);
  EXPECT_FALSE(c.qk_norm);
  EXPECT_EQ(c.head_dim, 64);
  EXPECT_EQ(c.group_size(), 7);
  EXPECT_TRUE(c.tie_word_embeddings);
  EXPECT_DOUBLE_EQ(c.rope.theta, 1e6);
  EXPECT_FALSE(c.sliding_window);  // present but switched off

  json j = json::parse(qwen25);
  j["attention_bias"] = false;  // ignored by transformers' Qwen2Attention, so by us
  j["use_sliding_window"] = true;
  j["sliding_window"] = 4096;
  c = ModelConfig::from_json(j, kWhere);
  EXPECT_TRUE(c.attention_bias);
  EXPECT_EQ(c.sliding_window, 4096);
}

TEST(ModelConfig, MistralSlidingWindow) {
  // Mistral-7B-v0.1's config.json.
  const char* mistral = R"({
    "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 32768,
    "model_type": "mistral", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": false,
    "torch_dtype": "bfloat16", "use_cache": true, "vocab_size": 32000})";
  ModelConfig c = parse(mistral);
  EXPECT_EQ(c.arch, Arch::Mistral);
  EXPECT_EQ(c.sliding_window, 4096);
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_EQ(c.num_kv_heads, 8);
  EXPECT_FALSE(c.attention_bias);
  // Mistral-7B-v0.3 style: sliding_window null means full attention.
  json j = json::parse(mistral);
  j["sliding_window"] = nullptr;
  j["attention_bias"] = true;  // MistralAttention has no biases whatever the config says
  c = ModelConfig::from_json(j, kWhere);
  EXPECT_FALSE(c.sliding_window);
  EXPECT_FALSE(c.attention_bias);
}

TEST(ModelConfig, Qwen3DefaultsAndModelTypeFallback) {
  const char* qwen3 = R"({"model_type": "qwen3", "hidden_size": 1024, "num_hidden_layers": 28,
    "num_attention_heads": 16, "num_key_value_heads": 8, "intermediate_size": 3072, "vocab_size": 151936,
    "rope_theta": 1000000, "tie_word_embeddings": true, "eos_token_id": 151645, "sliding_window": null})";
  const ModelConfig c = parse(qwen3);
  EXPECT_EQ(c.arch, Arch::Qwen3);
  EXPECT_EQ(c.head_dim, 128);  // Qwen3Config's default, not 1024 / 16
  EXPECT_EQ(c.q_dim(), 2048);
  EXPECT_TRUE(c.qk_norm);
  EXPECT_FALSE(c.attention_bias);
  EXPECT_EQ(c.max_position_embeddings, 32768);
  EXPECT_EQ(c.eos_token_id, 151645);
  EXPECT_FALSE(c.sliding_window);
  EXPECT_EQ(parse(R"({"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
                      "intermediate_size": 8, "vocab_size": 4})")
                .arch,
            Arch::Llama);
}

TEST(ModelConfig, FixtureConfigs) {
  struct Expected {
    const char* dir;
    int64_t hidden, inter, layers, heads, kv, head_dim, max_pos;
  };
  // Values from the PROVENANCE.md tables, not from the files.
  const Expected llamas[] = {{"aidreams-llama2c-260k-hf", 64, 172, 4, 4, 4, 16, 128},
                             {"tinystories-llama2c-280k-hf", 64, 192, 5, 8, 4, 8, 256},
                             {"karpathy-stories-llama2c-260k-hf", 64, 172, 5, 8, 4, 8, 512}};
  for (const Expected& e : llamas) {
    const fs::path dir = test::fixtures_dir() / "models" / e.dir;
    if (!fs::exists(dir / "config.json")) GTEST_SKIP() << "fixture not found: " << dir;
    const ModelConfig c = ModelConfig::from_dir(dir);
    EXPECT_EQ(c.arch, Arch::Llama) << e.dir;
    EXPECT_EQ(c.hidden_size, e.hidden) << e.dir;
    EXPECT_EQ(c.intermediate_size, e.inter) << e.dir;
    EXPECT_EQ(c.num_layers, e.layers) << e.dir;
    EXPECT_EQ(c.num_heads, e.heads) << e.dir;
    EXPECT_EQ(c.num_kv_heads, e.kv) << e.dir;
    EXPECT_EQ(c.head_dim, e.head_dim) << e.dir;
    EXPECT_EQ(c.max_position_embeddings, e.max_pos) << e.dir;
    EXPECT_EQ(c.vocab_size, 512);
    EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-5);
    EXPECT_EQ(c.rope.type, RopeType::Default);
    EXPECT_DOUBLE_EQ(c.rope.theta, 10000.0);
    EXPECT_TRUE(c.tie_word_embeddings);
    EXPECT_EQ(c.bos_token_id, 1);
    EXPECT_EQ(c.eos_token_id, 2);
    EXPECT_EQ(c.dtype, DType::F32);
  }
  const fs::path qwen = test::fixtures_dir() / "models/qwen3-tiny-trained";
  if (!fs::exists(qwen / "config.json")) GTEST_SKIP() << "fixture not found: " << qwen;
  const ModelConfig q = ModelConfig::from_dir(qwen);
  EXPECT_EQ(q.arch, Arch::Qwen3);
  EXPECT_EQ(q.hidden_size, 512);
  EXPECT_EQ(q.num_layers, 6);
  EXPECT_EQ(q.num_heads, 4);
  EXPECT_EQ(q.num_kv_heads, 2);
  EXPECT_EQ(q.head_dim, 128);
  EXPECT_EQ(q.intermediate_size, 1024);
  EXPECT_EQ(q.vocab_size, 4096);
  EXPECT_EQ(q.max_position_embeddings, 4096);
  EXPECT_DOUBLE_EQ(q.rope.theta, 1e6);  // from rope_parameters (transformers-5 layout)
  EXPECT_EQ(q.rope.type, RopeType::Default);
  EXPECT_TRUE(q.tie_word_embeddings);
  EXPECT_TRUE(q.qk_norm);
  EXPECT_FALSE(q.attention_bias);
  EXPECT_FALSE(q.sliding_window);
  EXPECT_EQ(q.dtype, DType::BF16);
  EXPECT_EQ(q.bos_token_id, 0);
  EXPECT_EQ(q.eos_token_id, 0);
}

TEST(ModelConfig, Refusals) {
  const std::string ok = R"("hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                            "intermediate_size": 128, "vocab_size": 100)";
  const std::string llama = R"({"architectures": ["LlamaForCausalLM"], )";
  EXPECT_TRUE(refuses(llama + R"("num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
                                 "vocab_size": 100})",
                      {kWhere, "missing required field 'hidden_size'"}));
  EXPECT_TRUE(refuses(llama + R"("hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                                 "intermediate_size": 128})",
                      {"missing required field 'vocab_size'"}));
  EXPECT_TRUE(refuses("{" + ok + "}", {"missing required field 'architectures'"}));
  EXPECT_TRUE(refuses(R"({"architectures": ["GPT2LMHeadModel"], )" + ok + "}",
                      {"architecture 'GPT2LMHeadModel' is not supported", "Qwen3ForCausalLM"}));
  EXPECT_TRUE(refuses(R"({"model_type": "gemma", )" + ok + "}", {"model_type 'gemma' is not supported"}));
  EXPECT_TRUE(refuses(llama + ok + R"(, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})",
                      {"rope_scaling type 'yarn' is not supported (supported: default, linear, llama3)"}));
  EXPECT_TRUE(refuses(llama + ok + R"(, "rope_scaling": {"type": "dynamic", "factor": 2.0}})",
                      {"rope_scaling type 'dynamic' is not supported"}));
  EXPECT_TRUE(refuses(llama + ok + R"(, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6}})",
                      {"rope_parameters type 'yarn' is not supported"}));
  EXPECT_TRUE(refuses(llama + ok + R"(, "rope_parameters": {"rope_type": "longrope"}})", {"'longrope'"}));
  EXPECT_TRUE(refuses(llama + ok + R"(, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}})",
                      {"rope_scaling.low_freq_factor"}));
  EXPECT_TRUE(refuses(llama + ok + R"(, "rope_scaling": {"type": "linear"}})", {"rope_scaling.factor"}));
  EXPECT_TRUE(refuses(llama + ok + R"(, "rope_scaling": {"type": "linear", "factor": 0}})", {"factor", "positive"}));
  EXPECT_TRUE(refuses(llama + ok + R"(, "num_key_value_heads": 3})", {"not a multiple of num_key_value_heads 3"}));
  EXPECT_TRUE(refuses(llama + ok + R"(, "head_dim": 15})", {"head_dim 15 must be even"}));
  EXPECT_TRUE(refuses(llama + R"("hidden_size": 66, "num_hidden_layers": 2, "num_attention_heads": 4,
                                 "intermediate_size": 128, "vocab_size": 100})",
                      {"not divisible"}));
  EXPECT_TRUE(refuses(llama + R"("hidden_size": 64, "num_hidden_layers": 0, "num_attention_heads": 4,
                                 "intermediate_size": 128, "vocab_size": 100})",
                      {"positive"}));
  EXPECT_TRUE(refuses(llama + R"("hidden_size": "64", "num_hidden_layers": 2, "num_attention_heads": 4,
                                 "intermediate_size": 128, "vocab_size": 100})",
                      {"'hidden_size' must be an integer"}));
  EXPECT_TRUE(refuses(llama + ok + R"(, "tie_word_embeddings": "yes"})", {"'tie_word_embeddings'"}));
  EXPECT_TRUE(refuses(llama + ok + R"(, "torch_dtype": "int8"})", {"'torch_dtype'", "int8"}));
  EXPECT_TRUE(refuses("[1]", {"not a JSON object"}));
}

TEST(ModelConfig, FileErrorsNameTheFile) {
  const fs::path dir = test::temp_dir_for_test();
  try {
    ModelConfig::from_dir(dir);
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.where(), (dir / "config.json").string());
  }
  std::ofstream(dir / "config.json") << R"({"architectures": ["LlamaForCausalLM"], "hidden_size": )";
  try {
    ModelConfig::from_dir(dir);
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.where(), (dir / "config.json").string());
    EXPECT_NE(e.detail().find("not valid JSON"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace oscar::fmt
