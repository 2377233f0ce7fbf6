#include "formats/model_config.h"

#include <cerrno>
#include <cstring>
#include <fstream>
#include <limits>
#include <sstream>

#include <nlohmann/json.hpp>

#include "formats/error.h"

namespace oscar::fmt {

namespace fs = std::filesystem;
using nlohmann::json;

std::string_view arch_name(Arch a) {
  switch (a) {
    case Arch::Llama: return "LlamaForCausalLM";
    case Arch::Mistral: return "MistralForCausalLM";
    case Arch::Qwen2: return "Qwen2ForCausalLM";
    case Arch::Qwen3: return "Qwen3ForCausalLM";
  }
  return "?";
}

std::string_view rope_type_name(RopeType t) {
  switch (t) {
    case RopeType::Default: return "default";
    case RopeType::Linear: return "linear";
    case RopeType::Llama3: return "llama3";
  }
  return "?";
}

namespace {

constexpr const char* kSupportedArchs = "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM";

// A key that is absent or explicitly null means "use the default", as in transformers' config classes.
const json* find_field(const json& j, const char* key) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return nullptr;
  return &*it;
}

int64_t as_int(const json& v, const std::string& where, const std::string& field) {
  if (!v.is_number_integer())
    throw Error(where, "field '" + field + "' must be an integer, got " + v.dump());
  if (v.is_number_unsigned() && v.get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
    throw Error(where, "field '" + field + "' is too large: " + v.dump());
  return v.get<int64_t>();
}

double as_double(const json& v, const std::string& where, const std::string& field) {
  if (!v.is_number()) throw Error(where, "field '" + field + "' must be a number, got " + v.dump());
  return v.get<double>();
}

int64_t required_int(const json& j, const char* key, const std::string& where) {
  const json* v = find_field(j, key);
  if (!v) throw Error(where, std::string("missing required field '") + key + "'");
  return as_int(*v, where, key);
}

int64_t int_or(const json& j, const char* key, int64_t fallback, const std::string& where) {
  const json* v = find_field(j, key);
  return v ? as_int(*v, where, key) : fallback;
}

double double_or(const json& j, const char* key, double fallback, const std::string& where,
                 const std::string& prefix = "") {
  const json* v = find_field(j, key);
  return v ? as_double(*v, where, prefix + key) : fallback;
}

bool bool_or(const json& j, const char* key, bool fallback, const std::string& where) {
  const json* v = find_field(j, key);
  if (!v) return fallback;
  if (!v->is_boolean()) throw Error(where, std::string("field '") + key + "' must be true or false, got " + v->dump());
  return v->get<bool>();
}

// bos/eos: an id, null, or (generation-style configs) a list whose first entry is the primary id.
std::optional<int64_t> token_id(const json& j, const char* key, const std::string& where) {
  const json* v = find_field(j, key);
  if (!v) return std::nullopt;
  if (v->is_array()) {
    if (v->empty()) return std::nullopt;
    return as_int((*v)[0], where, std::string(key) + "[0]");
  }
  return as_int(*v, where, key);
}

Arch parse_arch(const json& j, const std::string& where) {
  if (const json* archs = find_field(j, "architectures")) {
    if (!archs->is_array() || archs->empty() || !(*archs)[0].is_string())
      throw Error(where, "field 'architectures' must be a non-empty list of strings");
    const auto name = (*archs)[0].get<std::string>();
    for (Arch a : {Arch::Llama, Arch::Mistral, Arch::Qwen2, Arch::Qwen3})
      if (arch_name(a) == name) return a;
    throw Error(where, "architecture '" + name + "' is not supported (supported: " + kSupportedArchs + ")");
  }
  if (const json* type = find_field(j, "model_type")) {
    if (!type->is_string()) throw Error(where, "field 'model_type' must be a string");
    const auto name = type->get<std::string>();
    if (name == "llama") return Arch::Llama;
    if (name == "mistral") return Arch::Mistral;
    if (name == "qwen2") return Arch::Qwen2;
    if (name == "qwen3") return Arch::Qwen3;
    throw Error(where, "model_type '" + name + "' is not supported (supported: llama, mistral, qwen2, qwen3)");
  }
  throw Error(where, "missing required field 'architectures' (or 'model_type')");
}

DType parse_config_dtype(const json& j, const std::string& where) {
  const char* key = find_field(j, "dtype") ? "dtype" : "torch_dtype";
  const json* v = find_field(j, key);
  if (!v) return DType::F32;  // transformers' default when a config does not say
  if (!v->is_string()) throw Error(where, std::string("field '") + key + "' must be a string");
  const auto name = v->get<std::string>();
  if (name == "float32") return DType::F32;
  if (name == "bfloat16") return DType::BF16;
  if (name == "float16") return DType::F16;
  if (name == "float64") return DType::F64;
  throw Error(where, std::string("field '") + key + "' has unsupported value '" + name +
                         "' (supported: float32, bfloat16, float16, float64)");
}

// Both layouts describe the same thing: classic configs put rope_theta at the top level and the scaling in
// rope_scaling ("type" in older files, "rope_type" in newer); transformers 5 folds everything into
// rope_parameters. `block` is whichever object carries the scaling keys, `block_name` its field name.
RopeSpec parse_rope(const json& j, const std::string& where) {
  RopeSpec rope;
  const json* block = nullptr;
  std::string block_name;
  if (const json* params = find_field(j, "rope_parameters")) {
    block = params;
    block_name = "rope_parameters";
  } else if (const json* scaling = find_field(j, "rope_scaling")) {
    block = scaling;
    block_name = "rope_scaling";
  }
  if (block && !block->is_object()) throw Error(where, "field '" + block_name + "' must be an object or null");

  rope.theta = double_or(j, "rope_theta", rope.theta, where);
  if (block_name == "rope_parameters") rope.theta = double_or(*block, "rope_theta", rope.theta, where, "rope_parameters.");
  if (!(rope.theta > 0)) throw Error(where, "rope_theta must be positive");
  if (!block) return rope;

  std::string type = "default";
  const char* type_key = find_field(*block, "rope_type") ? "rope_type" : "type";
  if (const json* t = find_field(*block, type_key)) {
    if (!t->is_string()) throw Error(where, "field '" + block_name + "." + type_key + "' must be a string");
    type = t->get<std::string>();
  }
  const std::string prefix = block_name + ".";
  auto required_double = [&](const char* key) {
    const json* v = find_field(*block, key);
    if (!v) throw Error(where, "missing required field '" + prefix + key + "' for rope type '" + type + "'");
    return as_double(*v, where, prefix + key);
  };
  if (type == "default") {
    rope.type = RopeType::Default;
  } else if (type == "linear") {
    rope.type = RopeType::Linear;
    rope.factor = required_double("factor");
  } else if (type == "llama3") {
    rope.type = RopeType::Llama3;
    rope.factor = required_double("factor");
    rope.low_freq_factor = required_double("low_freq_factor");
    rope.high_freq_factor = required_double("high_freq_factor");
    const json* orig = find_field(*block, "original_max_position_embeddings");
    if (!orig)
      throw Error(where, "missing required field '" + prefix + "original_max_position_embeddings' for rope type 'llama3'");
    rope.original_max_position_embeddings = as_int(*orig, where, prefix + "original_max_position_embeddings");
    if (!(rope.low_freq_factor > 0) || !(rope.high_freq_factor > rope.low_freq_factor) ||
        rope.original_max_position_embeddings <= 0)
      throw Error(where, prefix + "llama3 needs 0 < low_freq_factor < high_freq_factor and a positive "
                                  "original_max_position_embeddings");
  } else {
    throw Error(where, block_name + " type '" + type + "' is not supported (supported: default, linear, llama3)");
  }
  if (!(rope.factor > 0)) throw Error(where, "field '" + prefix + "factor' must be positive");
  return rope;
}

}  // namespace

ModelConfig ModelConfig::from_json(const json& j, const std::string& where) {
  if (!j.is_object()) throw Error(where, "config is not a JSON object");
  ModelConfig c;
  c.arch = parse_arch(j, where);
  c.hidden_size = required_int(j, "hidden_size", where);
  c.num_layers = required_int(j, "num_hidden_layers", where);
  c.num_heads = required_int(j, "num_attention_heads", where);
  c.intermediate_size = required_int(j, "intermediate_size", where);
  c.vocab_size = required_int(j, "vocab_size", where);
  // transformers' per-architecture defaults for a missing max_position_embeddings.
  const int64_t default_max_positions = c.arch == Arch::Llama ? 2048 : c.arch == Arch::Mistral ? 4096 * 32 : 32768;
  c.max_position_embeddings = int_or(j, "max_position_embeddings", default_max_positions, where);
  c.num_kv_heads = int_or(j, "num_key_value_heads", c.num_heads, where);
  c.rms_norm_eps = double_or(j, "rms_norm_eps", 1e-6, where);

  if (c.hidden_size <= 0 || c.num_layers <= 0 || c.num_heads <= 0 || c.num_kv_heads <= 0 ||
      c.intermediate_size <= 0 || c.vocab_size <= 0 || c.max_position_embeddings <= 0)
    throw Error(where, "hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads, "
                       "intermediate_size, vocab_size and max_position_embeddings must all be positive");
  if (!(c.rms_norm_eps > 0)) throw Error(where, "field 'rms_norm_eps' must be positive");

  // Qwen3Config defaults head_dim to 128 (independent of hidden/heads); the others derive it.
  if (const json* hd = find_field(j, "head_dim")) {
    c.head_dim = as_int(*hd, where, "head_dim");
  } else if (c.arch == Arch::Qwen3) {
    c.head_dim = 128;
  } else {
    if (c.hidden_size % c.num_heads != 0)
      throw Error(where, "hidden_size " + std::to_string(c.hidden_size) + " is not divisible by num_attention_heads " +
                             std::to_string(c.num_heads) + " and no head_dim is given");
    c.head_dim = c.hidden_size / c.num_heads;
  }
  if (c.head_dim <= 0) throw Error(where, "field 'head_dim' must be positive");
  // RoPE rotates pairs (x[i], x[i + head_dim/2]).
  if (c.head_dim % 2 != 0) throw Error(where, "head_dim " + std::to_string(c.head_dim) + " must be even for RoPE");
  if (c.num_heads % c.num_kv_heads != 0)
    throw Error(where, "num_attention_heads " + std::to_string(c.num_heads) +
                           " is not a multiple of num_key_value_heads " + std::to_string(c.num_kv_heads));

  c.rope = parse_rope(j, where);
  c.tie_word_embeddings = bool_or(j, "tie_word_embeddings", false, where);
  switch (c.arch) {
    case Arch::Qwen2:  // Qwen2Attention builds q/k/v with bias=True whatever the config says
      c.attention_bias = true;
      break;
    case Arch::Mistral:  // MistralAttention builds every projection with bias=False
      c.attention_bias = false;
      break;
    default:
      c.attention_bias = bool_or(j, "attention_bias", false, where);
  }
  c.qk_norm = c.arch == Arch::Qwen3;
  c.dtype = parse_config_dtype(j, where);
  c.bos_token_id = token_id(j, "bos_token_id", where);
  c.eos_token_id = token_id(j, "eos_token_id", where);

  // Qwen2/3 carry a sliding_window value even when it is switched off; only use_sliding_window turns it on.
  const bool window_on = (c.arch == Arch::Mistral) ||
                         ((c.arch == Arch::Qwen2 || c.arch == Arch::Qwen3) &&
                          bool_or(j, "use_sliding_window", false, where));
  if (window_on) {
    if (const json* w = find_field(j, "sliding_window")) {
      c.sliding_window = as_int(*w, where, "sliding_window");
      if (*c.sliding_window <= 0) throw Error(where, "field 'sliding_window' must be positive");
    }
  }
  return c;
}

ModelConfig ModelConfig::from_file(const fs::path& config_json) {
  const std::string where = config_json.string();
  std::ifstream in(config_json, std::ios::binary);
  if (!in) throw Error(where, "cannot open: " + std::string(std::strerror(errno)));
  std::ostringstream text;
  text << in.rdbuf();
  json j;
  try {
    j = json::parse(text.str());
  } catch (const json::exception& e) {
    throw Error(where, std::string("not valid JSON: ") + e.what());
  }
  return from_json(j, where);
}

ModelConfig ModelConfig::from_dir(const fs::path& model_dir) { return from_file(model_dir / "config.json"); }

}  // namespace oscar::fmt
