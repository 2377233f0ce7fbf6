// oscar info: what a checkpoint is, how many parameters it holds, and what its KV cache costs in BF16 vs INT2.
#include <map>
#include <memory>
#include <optional>

#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include "apps/oscar/command.h"
#include "apps/oscar/common.h"
#include "formats/bundle.h"
#include "formats/error.h"
#include "formats/kv_quant_spec.h"
#include "formats/model_config.h"
#include "formats/safetensors.h"
#include "runtime/engine.h"

namespace oscar::app {
namespace {

struct InfoOptions {
  std::string model_dir;
  std::string device = "cpu";
  bool json = false;
  std::string bundle;      // --bundle: the oscar format's (per-layer) layouts and windows
  std::string cache_mode;  // --cache-mode: bf16 | int2 | int4 | fp8 | hadamard2 | oscar; empty: oscar with --bundle
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

// The summary line's INT2 numbers: rt::kv_footprint of the int2 format (records from fmt::RecordLayout).
KvCost kv_cost(const fmt::ModelConfig& cfg, fmt::KvQuantSpec& spec_out) {
  spec_out = fmt::KvQuantSpec::int2_default(cfg.head_dim);
  const rt::KvFootprint fp = rt::kv_footprint(cfg, rt::CacheMode::Int2, nullptr, {}, spec_out.sink_tokens,
                                              spec_out.recent_tokens, "oscar info");
  KvCost c;
  c.bf16_bytes_per_token = fp.bf16_bytes_per_token;
  c.k_bits = fp.k_bits_per_element;
  c.v_bits = fp.v_bits_per_element;
  c.int2_bytes_per_token = fp.quant_bytes_per_token;
  c.window_tokens = spec_out.sink_tokens + spec_out.recent_tokens;
  return c;
}

// Context lengths of the per-format table (--cache-mode / --bundle).
constexpr int64_t kFootprintContexts[] = {1024, 4096, 32768, 131072};

nlohmann::json footprint_json(const rt::KvFootprint& fp) {
  nlohmann::json rows = nlohmann::json::array();
  for (const rt::KvFootprintRow& r : fp.rows)
    rows.push_back({{"context", r.context},
                    {"bf16_bytes", r.bf16_bytes},
                    {"stored_bytes", r.stored_bytes},
                    {"stored_bytes_per_token", r.stored_bytes / static_cast<double>(r.context)},
                    {"engine_bytes", r.engine_bytes < 0 ? nlohmann::json(nullptr) : nlohmann::json(r.engine_bytes)}});
  nlohmann::json layers = nlohmann::json::array();
  for (size_t l = 0; l < fp.k_record_bytes.size(); ++l)
    layers.push_back({{"layer", l},
                      {"k_layout", fp.k_layout[l]},
                      {"k_record_bytes", fp.k_record_bytes[l]},
                      {"v_layout", fp.v_layout[l]},
                      {"v_record_bytes", fp.v_record_bytes[l]}});
  return {{"mode", fp.mode},
          {"sink_tokens", fp.sink_tokens},
          {"recent_tokens", fp.recent_tokens},
          {"bf16_bytes_per_token", fp.bf16_bytes_per_token},
          {"quantized_bytes_per_token", fp.quant_bytes_per_token},
          {"k_bits_per_element", fp.k_bits_per_element},
          {"v_bits_per_element", fp.v_bits_per_element},
          {"layers", layers},
          {"engine_format_bytes",
           fp.engine_format_bytes < 0 ? nlohmann::json(nullptr) : nlohmann::json(fp.engine_format_bytes)},
          {"contexts", rows}};
}

std::string human_bytes(double b);

std::string footprint_text(const rt::KvFootprint& fp) {
  std::string out = ::fmt::format(
      "\nKV cache format {}: {} per quantized token (K {:.3f} + V {:.3f} bits/element incl. fp16 scale+zero), "
      "BF16 {}; sink {}, recent {}\n",
      fp.mode, human_bytes(fp.quant_bytes_per_token), fp.k_bits_per_element, fp.v_bits_per_element,
      human_bytes(fp.bf16_bytes_per_token), fp.sink_tokens, fp.recent_tokens);
  out += ::fmt::format("{:>9}  {:>12}  {:>12}  {:>12}  {:>7}  {:>12}\n", "context", "BF16", fp.mode, "per token",
                       "ratio", "engine pages");
  for (const rt::KvFootprintRow& r : fp.rows)
    out += ::fmt::format("{:>9}  {:>12}  {:>12}  {:>12}  {:>6.2f}x  {:>12}\n", r.context, human_bytes(r.bf16_bytes),
                         human_bytes(r.stored_bytes), human_bytes(r.stored_bytes / static_cast<double>(r.context)),
                         r.bf16_bytes / r.stored_bytes, r.engine_bytes < 0 ? "n/a" : human_bytes(r.engine_bytes));
  out += "(windows and fp16 scale/zero included; engine pages: what the GPU engine's 64-token pages hold for one "
         "sequence, INT2 copies of the window tokens included)\n";
  if (fp.engine_format_bytes > 0)
    out += ::fmt::format("engine format data: {} on the device once per engine (fp32 rotations, storage transforms "
                         "A and A⁻ᵀ, error-feedback tables)\n",
                         human_bytes(static_cast<double>(fp.engine_format_bytes)));
  bool uniform = true;
  for (size_t l = 1; l < fp.k_layout.size(); ++l)
    uniform = uniform && fp.k_layout[l] == fp.k_layout[0] && fp.v_layout[l] == fp.v_layout[0];
  if (!uniform) {
    out += ::fmt::format("per-layer layouts (bytes per token and KV head):\n{:>5}  {:<28} {:>5}  {:<28} {:>5}\n",
                         "layer", "K", "B", "V", "B");
    for (size_t l = 0; l < fp.k_layout.size(); ++l)
      out += ::fmt::format("{:>5}  {:<28} {:>5}  {:<28} {:>5}\n", l, fp.k_layout[l], fp.k_record_bytes[l],
                           fp.v_layout[l], fp.v_record_bytes[l]);
  }
  return out;
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
  std::optional<rt::KvFootprint> footprint;
  if (!o.bundle.empty() || !o.cache_mode.empty()) {
    const rt::CacheMode mode = o.cache_mode.empty() ? rt::CacheMode::Oscar : rt::parse_cache_mode(o.cache_mode, "--cache-mode");
    if (!o.bundle.empty() && mode != rt::CacheMode::Oscar)
      throw Error("--bundle", "a bundle describes the oscar format; drop --bundle or use --cache-mode oscar");
    std::optional<fmt::Bundle> bundle;
    if (!o.bundle.empty()) bundle = fmt::read_bundle(o.bundle);
    if (mode == rt::CacheMode::Oscar && !bundle) throw Error("--cache-mode oscar", "needs --bundle FILE");
    footprint = rt::kv_footprint(cfg, mode, bundle ? &*bundle : nullptr, kFootprintContexts, std::nullopt,
                                 std::nullopt, o.bundle.empty() ? "--cache-mode" : o.bundle);
  }

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
    if (footprint) j["kv_footprint"] = footprint_json(*footprint);
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
  if (footprint) out += footprint_text(*footprint);
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
      sub.add_option("--bundle", o->bundle, ".oscar bundle: KV bytes of its format, per-layer layouts included");
      sub.add_option("--cache-mode", o->cache_mode,
                     "KV bytes per token and per context of one format: bf16, int2, int4, fp8, hadamard2, oscar (needs "
                     "--bundle; the default with --bundle)")
          ->check(CLI::IsMember({"bf16", "int2", "int4", "fp8", "hadamard2", "oscar"}));
      return [o] { return run_info(*o); };
    });

}  // namespace oscar::app
