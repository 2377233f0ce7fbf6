// oscar info: what a checkpoint is, how many parameters it holds, and what its KV cache costs in BF16 vs INT2.
#include <map>
#include <memory>

#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include "apps/oscar/command.h"
#include "apps/oscar/common.h"
#include "formats/error.h"
#include "formats/kv_quant_spec.h"
#include "formats/model_config.h"
#include "formats/safetensors.h"

namespace oscar::app {
namespace {

struct InfoOptions {
  std::string model_dir;
  std::string device = "cpu";
  bool json = false;
};

// Context lengths the KV table reports: the usual serving points.
constexpr int64_t kContexts[] = {4096, 32768, 131072};

struct KvCost {
  double bf16_bytes_per_token = 0;  // K and V, all layers and KV heads
  double int2_bytes_per_token = 0;  // same, quantized tokens only (codes + fp16 scale/zero)
  double k_bits = 0, v_bits = 0;    // per element, from the format spec
  int64_t window_tokens = 0;        // sink + recent tokens kept in BF16

  // Whole cache at `context` tokens: the windows stay BF16, everything between them is INT2.
  double int2_bytes(int64_t context) const {
    const int64_t bf16_tokens = std::min(context, window_tokens);
    return bf16_tokens * bf16_bytes_per_token + (context - bf16_tokens) * int2_bytes_per_token;
  }
};

KvCost kv_cost(const fmt::ModelConfig& cfg, fmt::KvQuantSpec& spec_out) {
  spec_out = fmt::KvQuantSpec::int2_default(cfg.head_dim);
  KvCost c;
  const double elements = static_cast<double>(cfg.num_layers * cfg.num_kv_heads * cfg.head_dim);  // per K or V
  c.bf16_bytes_per_token = 2 * elements * 2;
  c.k_bits = spec_out.k.bits_per_element(cfg.head_dim);
  c.v_bits = spec_out.v.bits_per_element(cfg.head_dim);
  c.int2_bytes_per_token = elements * (c.k_bits + c.v_bits) / 8;
  c.window_tokens = spec_out.sink_tokens + spec_out.recent_tokens;
  return c;
}

std::string human_bytes(double b) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (b >= 1024 && u < 4) b /= 1024, ++u;
  return ::fmt::format("{:.{}f} {}", b, u == 0 ? 0 : 2, units[u]);
}

std::string with_commas(int64_t n) {
  std::string s = std::to_string(n);
  for (int i = static_cast<int>(s.size()) - 3; i > 0; i -= 3) s.insert(static_cast<size_t>(i), ",");
  return s;
}

int run_info(const InfoOptions& o) {
  require_cpu_device(o.device);
  check_model_dir(o.model_dir);
  const fmt::ModelConfig cfg = fmt::ModelConfig::from_dir(o.model_dir);
  const fmt::TensorStore store = fmt::TensorStore::open(o.model_dir);

  int64_t parameters = 0;
  uint64_t weight_bytes = 0;
  std::map<std::string, int64_t> dtype_counts;
  const auto names = store.names();
  for (const auto& name : names) {
    const fmt::TensorView& t = store.get(name);
    parameters += t.numel();
    weight_bytes += t.nbytes;
    dtype_counts[std::string(fmt::dtype_name(t.dtype))]++;
  }

  nlohmann::json tokenizer_info = nullptr;
  try {
    auto tok = fmt::Tokenizer::load(o.model_dir);
    tokenizer_info = {{"kind", tok->kind()}, {"vocab_size", tok->vocab_size()}};
    if (auto b = tok->bos_id()) tokenizer_info["bos_id"] = *b;
    if (auto e = tok->eos_id()) tokenizer_info["eos_id"] = *e;
  } catch (const Error& e) {
    spdlog::warn("no usable tokenizer: {}", e.what());
  }

  fmt::KvQuantSpec spec;
  const KvCost kv = kv_cost(cfg, spec);

  if (o.json) {
    nlohmann::json j;
    j["model"] = o.model_dir;
    j["architecture"] = std::string(fmt::arch_name(cfg.arch));
    j["num_layers"] = cfg.num_layers;
    j["hidden_size"] = cfg.hidden_size;
    j["num_heads"] = cfg.num_heads;
    j["num_kv_heads"] = cfg.num_kv_heads;
    j["head_dim"] = cfg.head_dim;
    j["intermediate_size"] = cfg.intermediate_size;
    j["vocab_size"] = cfg.vocab_size;
    j["max_position_embeddings"] = cfg.max_position_embeddings;
    j["rope"] = {{"type", std::string(fmt::rope_type_name(cfg.rope.type))}, {"theta", cfg.rope.theta},
                 {"factor", cfg.rope.factor}};
    j["rms_norm_eps"] = cfg.rms_norm_eps;
    j["qk_norm"] = cfg.qk_norm;
    j["attention_bias"] = cfg.attention_bias;
    j["tie_word_embeddings"] = cfg.tie_word_embeddings;
    j["dtype"] = std::string(fmt::dtype_name(cfg.dtype));
    j["parameters"] = parameters;
    j["tensor_count"] = names.size();
    j["weight_bytes"] = weight_bytes;
    j["tensor_dtypes"] = dtype_counts;
    j["tokenizer"] = tokenizer_info;
    nlohmann::json contexts = nlohmann::json::array();
    for (int64_t c : kContexts)
      contexts.push_back({{"context", c},
                          {"bf16_bytes", kv.bf16_bytes_per_token * c},
                          {"int2_bytes", kv.int2_bytes(c)},
                          {"compression", kv.bf16_bytes_per_token * c / kv.int2_bytes(c)}});
    j["kv_cache"] = {{"bf16_bytes_per_token", kv.bf16_bytes_per_token},
                     {"int2_bytes_per_token", kv.int2_bytes_per_token},
                     {"int2_k_bits_per_element", kv.k_bits},
                     {"int2_v_bits_per_element", kv.v_bits},
                     {"sink_tokens", spec.sink_tokens},
                     {"recent_tokens", spec.recent_tokens},
                     {"contexts", contexts}};
    std::puts(j.dump(2).c_str());
    return 0;
  }

  std::string out;
  auto line = [&](std::string_view key, const std::string& value) { out += ::fmt::format("{:<14}{}\n", key, value); };
  line("model", o.model_dir);
  line("architecture", std::string(fmt::arch_name(cfg.arch)));
  line("layers", std::to_string(cfg.num_layers));
  line("hidden", std::to_string(cfg.hidden_size));
  line("heads", ::fmt::format("{} query, {} KV (group {}), head_dim {}", cfg.num_heads, cfg.num_kv_heads,
                              cfg.group_size(), cfg.head_dim));
  line("intermediate", std::to_string(cfg.intermediate_size));
  line("vocab", std::to_string(cfg.vocab_size));
  line("max positions", std::to_string(cfg.max_position_embeddings));
  line("rope", ::fmt::format("{}, theta {:g}", fmt::rope_type_name(cfg.rope.type), cfg.rope.theta));
  line("norm", ::fmt::format("RMSNorm eps {:g}{}", cfg.rms_norm_eps, cfg.qk_norm ? ", q/k norm" : ""));
  line("embeddings", cfg.tie_word_embeddings ? "tied" : "separate lm_head");
  std::string dtypes;
  for (const auto& [name, count] : dtype_counts) dtypes += ::fmt::format("{}{} x{}", dtypes.empty() ? "" : ", ", name, count);
  line("parameters", ::fmt::format("{} in {} tensors ({}; {})", with_commas(parameters), names.size(),
                                   human_bytes(static_cast<double>(weight_bytes)), dtypes));
  line("tokenizer", tokenizer_info.is_null()
                        ? std::string("unavailable")
                        : ::fmt::format("{}, {} tokens", tokenizer_info["kind"].get<std::string>(),
                                        tokenizer_info["vocab_size"].get<int64_t>()));
  out += ::fmt::format(
      "\nKV cache per token: BF16 {} | INT2 {} (K {:.3f} + V {:.3f} bits/element incl. fp16 scale+zero)\n"
      "first {} and last {} tokens stay BF16\n",
      human_bytes(kv.bf16_bytes_per_token), human_bytes(kv.int2_bytes_per_token), kv.k_bits, kv.v_bits,
      spec.sink_tokens, spec.recent_tokens);
  out += ::fmt::format("{:>9}  {:>12}  {:>12}  {:>7}\n", "context", "BF16", "INT2", "ratio");
  for (int64_t c : kContexts)
    out += ::fmt::format("{:>9}  {:>12}  {:>12}  {:>6.2f}x\n", c, human_bytes(kv.bf16_bytes_per_token * c),
                         human_bytes(kv.int2_bytes(c)), kv.bf16_bytes_per_token * c / kv.int2_bytes(c));
  std::fputs(out.c_str(), stdout);
  return 0;
}

}  // namespace

OSCAR_REGISTER_COMMAND(
    "info", "Describe a model: architecture, dimensions, parameter count, KV-cache size in BF16 vs INT2", 10,
    [](CLI::App& sub) -> RunCommand {
      auto o = std::make_shared<InfoOptions>();
      add_model_option(sub, o->model_dir);
      add_device_option(sub, o->device);
      add_json_flag(sub, o->json);
      return [o] { return run_info(*o); };
    });

}  // namespace oscar::app
