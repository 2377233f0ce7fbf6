#pragma once
// config.json of a Hugging Face causal LM -> ModelConfig. Everything downstream takes ModelConfig, never JSON.
// Supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, in both config layouts
// seen in the wild: classic (rope_theta, rope_scaling, torch_dtype) and transformers-5 (rope_parameters, dtype).
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>

#include <nlohmann/json_fwd.hpp>

#include "formats/dtype.h"

namespace oscar::fmt {

enum class Arch { Llama, Mistral, Qwen2, Qwen3 };
std::string_view arch_name(Arch a);  // "LlamaForCausalLM", ...

enum class RopeType { Default, Linear, Llama3 };
std::string_view rope_type_name(RopeType t);  // "default", "linear", "llama3"

struct RopeSpec {
  RopeType type = RopeType::Default;
  double theta = 10000.0;
  double factor = 1.0;  // linear and llama3
  // llama3 only:
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  int64_t original_max_position_embeddings = 8192;
};

struct ModelConfig {
  Arch arch = Arch::Llama;
  int64_t hidden_size = 0;
  int64_t num_layers = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;   // == num_heads for MHA, 1 for MQA
  int64_t head_dim = 0;       // explicit in Qwen3 (head_dim * heads may differ from hidden)
  int64_t intermediate_size = 0;
  int64_t vocab_size = 0;
  int64_t max_position_embeddings = 0;
  double rms_norm_eps = 1e-6;
  RopeSpec rope;
  bool tie_word_embeddings = false;
  bool attention_bias = false;  // q/k/v biases (always for Qwen2, config's attention_bias otherwise)
  bool qk_norm = false;         // Qwen3: RMSNorm over head_dim on q and k before RoPE
  DType dtype = DType::F32;     // the checkpoint's declared dtype (informational; tensors carry their own)
  std::optional<int64_t> bos_token_id;
  std::optional<int64_t> eos_token_id;
  std::optional<int64_t> sliding_window;  // Mistral/Qwen2 with use_sliding_window; refused by the forward if set

  int64_t group_size() const { return num_heads / num_kv_heads; }  // query heads per KV head
  int64_t q_dim() const { return num_heads * head_dim; }
  int64_t kv_dim() const { return num_kv_heads * head_dim; }

  // Parses and validates; every missing/invalid field or unsupported architecture/rope type is an
  // oscar::Error naming the file and the field.
  static ModelConfig from_json(const nlohmann::json& j, const std::string& where);
  static ModelConfig from_file(const std::filesystem::path& config_json);
  // The directory form: reads DIR/config.json.
  static ModelConfig from_dir(const std::filesystem::path& model_dir);
};

}  // namespace oscar::fmt
