// oscar synth: a small, deterministic, randomly initialised checkpoint (config.json, model.safetensors, a
// byte-level BPE tokenizer.json), so the quickstart and tests run without downloading or staging a model.
#include <cstdio>
#include <memory>
#include <random>

#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include "apps/oscar/command.h"
#include "apps/oscar/common.h"
#include "formats/atomic_file.h"
#include "formats/dtype.h"
#include "formats/error.h"
#include "formats/safetensors.h"
#include "oscar_version.h"

namespace oscar::app {
namespace {
namespace fs = std::filesystem;

struct SynthOptions {
  std::string out;
  std::string arch = "qwen3";
  std::string dtype = "bf16";
  uint64_t seed = 0;
  int64_t layers = 2;
  std::string device = "cpu";
};

// Shape of the synthetic model: head_dim 32 with GQA 4/2 exercises the same code paths as real checkpoints while
// every forward stays in the milliseconds.
constexpr int64_t kHidden = 128;
constexpr int64_t kHeads = 4;
constexpr int64_t kKvHeads = 2;
constexpr int64_t kHeadDim = 32;
constexpr int64_t kIntermediate = 256;
constexpr int64_t kMaxPositions = 2048;
constexpr const char* kEndOfText = "<|endoftext|>";

// Merges over GPT-2 byte-level symbols ("Ġ" is the space byte); each builds on earlier ones, so the BPE path of the
// tokenizer (merge ranks, chained merges) is exercised, not just the byte alphabet.
const std::vector<std::pair<std::string, std::string>>& synth_merges() {
  static const std::vector<std::pair<std::string, std::string>> merges = {
      {"Ġ", "t"}, {"h", "e"}, {"Ġt", "he"}, {"i", "n"}, {"Ġ", "a"}, {"e", "r"}, {"o", "n"}, {"r", "e"},
      {"a", "n"}, {"e", "n"}, {"Ġ", "s"}, {"Ġ", "w"}, {"o", "u"}, {"in", "g"}, {"Ġ", "o"}, {"Ġ", "c"}};
  return merges;
}

// GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to U+0100.. in byte order.
std::string byte_symbol(int b) {
  static const std::vector<std::string> table = [] {
    std::vector<int> cps(256, -1);
    int next = 256;
    for (int c = 0; c < 256; ++c) {
      const bool printable = (c >= 33 && c <= 126) || (c >= 161 && c <= 172) || (c >= 174 && c <= 255);
      cps[c] = printable ? c : next++;
    }
    std::vector<std::string> t(256);
    for (int c = 0; c < 256; ++c) {
      const int cp = cps[c];
      if (cp < 0x80) {
        t[c] = std::string(1, static_cast<char>(cp));
      } else {
        t[c] = {static_cast<char>(0xC0 | (cp >> 6)), static_cast<char>(0x80 | (cp & 0x3F))};
      }
    }
    return t;
  }();
  return table[static_cast<size_t>(b)];
}

// ids: 0 = <|endoftext|> (BOS, EOS, document separator), 1 + b for byte b, then one id per merge in rank order.
nlohmann::ordered_json synth_tokenizer_json() {
  nlohmann::ordered_json vocab;
  vocab[kEndOfText] = 0;
  for (int b = 0; b < 256; ++b) vocab[byte_symbol(b)] = 1 + b;
  nlohmann::ordered_json merges = nlohmann::ordered_json::array();
  int next_id = 257;
  for (const auto& [a, b] : synth_merges()) {
    vocab[a + b] = next_id++;
    merges.push_back({a, b});
  }
  const nlohmann::ordered_json byte_level = {
      {"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", true}};
  nlohmann::ordered_json j;
  j["version"] = "1.0";
  j["truncation"] = nullptr;
  j["padding"] = nullptr;
  j["added_tokens"] = {{{"id", 0},
                        {"content", kEndOfText},
                        {"single_word", false},
                        {"lstrip", false},
                        {"rstrip", false},
                        {"normalized", false},
                        {"special", true}}};
  j["normalizer"] = nullptr;
  j["pre_tokenizer"] = byte_level;
  j["post_processor"] = byte_level;
  j["decoder"] = byte_level;
  j["model"] = {{"type", "BPE"},
                {"dropout", nullptr},
                {"unk_token", nullptr},
                {"continuing_subword_prefix", nullptr},
                {"end_of_word_suffix", nullptr},
                {"fuse_unk", false},
                {"byte_fallback", false},
                {"ignore_merges", false},
                {"vocab", vocab},
                {"merges", merges}};
  return j;
}

int64_t synth_vocab_size() { return 257 + static_cast<int64_t>(synth_merges().size()); }

nlohmann::ordered_json synth_config(const SynthOptions& o) {
  nlohmann::ordered_json c;
  const bool qwen3 = o.arch == "qwen3";
  c["architectures"] = {qwen3 ? "Qwen3ForCausalLM" : "LlamaForCausalLM"};
  c["model_type"] = qwen3 ? "qwen3" : "llama";
  c["hidden_size"] = kHidden;
  c["intermediate_size"] = kIntermediate;
  c["num_hidden_layers"] = o.layers;
  c["num_attention_heads"] = kHeads;
  c["num_key_value_heads"] = kKvHeads;
  c["head_dim"] = kHeadDim;
  c["vocab_size"] = synth_vocab_size();
  c["max_position_embeddings"] = kMaxPositions;
  c["hidden_act"] = "silu";
  c["rms_norm_eps"] = 1e-6;
  c["attention_bias"] = false;
  c["tie_word_embeddings"] = true;
  c["bos_token_id"] = 0;
  c["eos_token_id"] = 0;
  // One config of each layout the loader accepts: transformers-5 (rope_parameters, dtype) for qwen3, classic
  // (rope_theta, torch_dtype) for llama.
  const std::string dtype_name = o.dtype == "bf16" ? "bfloat16" : "float32";
  if (qwen3) {
    c["rope_parameters"] = {{"rope_theta", 1000000.0}, {"rope_type", "default"}};
    c["dtype"] = dtype_name;
    c["use_sliding_window"] = false;
    c["sliding_window"] = nullptr;
  } else {
    c["rope_theta"] = 10000.0;
    c["rope_scaling"] = nullptr;
    c["torch_dtype"] = dtype_name;
  }
  c["oscar_synthetic"] = {{"seed", o.seed}, {"generator", std::string("oscar synth ") + OSCAR_VERSION_STRING}};
  return c;
}

// Weights uniform in [-a, a] with a = std * sqrt(3) (variance std^2), from the top 53 bits of mt19937_64: only
// exact arithmetic, so a seed gives bit-identical checkpoints on every platform.
class WeightGen {
 public:
  explicit WeightGen(uint64_t seed) : rng_(seed) {}
  std::vector<float> uniform(int64_t n, double std_dev) {
    const double a = std_dev * 1.7320508075688772;
    std::vector<float> w(static_cast<size_t>(n));
    for (auto& x : w) x = static_cast<float>((static_cast<double>(rng_() >> 11) * 0x1.0p-53 * 2.0 - 1.0) * a);
    return w;
  }

 private:
  std::mt19937_64 rng_;
};

struct OwnedTensor {
  std::string name;
  std::vector<int64_t> shape;
  std::vector<float> values;
};

void write_synth_weights(const fs::path& file, const SynthOptions& o) {
  WeightGen gen(o.seed);
  const int64_t H = kHidden, V = synth_vocab_size(), Q = kHeads * kHeadDim, KV = kKvHeads * kHeadDim;
  const double linear_std = 1.0 / std::sqrt(static_cast<double>(H));  // unit-variance activations through layers
  std::vector<OwnedTensor> ts;
  auto add = [&](std::string name, std::vector<int64_t> shape, double std_dev) {
    int64_t n = 1;
    for (auto d : shape) n *= d;
    ts.push_back({std::move(name), shape, gen.uniform(n, std_dev)});
  };
  auto ones = [&](std::string name, int64_t n) { ts.push_back({std::move(name), {n}, std::vector<float>(n, 1.0f)}); };
  // Unit-scale embeddings make the tied classifier favour repeating the input: degenerate but printable output.
  add("model.embed_tokens.weight", {V, H}, 1.0);
  for (int64_t l = 0; l < o.layers; ++l) {
    const std::string p = ::fmt::format("model.layers.{}.", l);
    add(p + "self_attn.q_proj.weight", {Q, H}, linear_std);
    add(p + "self_attn.k_proj.weight", {KV, H}, linear_std);
    add(p + "self_attn.v_proj.weight", {KV, H}, linear_std);
    add(p + "self_attn.o_proj.weight", {H, Q}, 1.0 / std::sqrt(static_cast<double>(Q)));
    if (o.arch == "qwen3") {
      ones(p + "self_attn.q_norm.weight", kHeadDim);
      ones(p + "self_attn.k_norm.weight", kHeadDim);
    }
    add(p + "mlp.gate_proj.weight", {kIntermediate, H}, linear_std);
    add(p + "mlp.up_proj.weight", {kIntermediate, H}, linear_std);
    add(p + "mlp.down_proj.weight", {H, kIntermediate}, 1.0 / std::sqrt(static_cast<double>(kIntermediate)));
    ones(p + "input_layernorm.weight", H);
    ones(p + "post_attention_layernorm.weight", H);
  }
  ones("model.norm.weight", H);

  const bool bf16 = o.dtype == "bf16";
  std::vector<std::vector<uint16_t>> bf16_storage;
  bf16_storage.reserve(ts.size());
  std::vector<fmt::TensorToWrite> out;
  for (const auto& t : ts) {
    if (bf16) {
      auto& b = bf16_storage.emplace_back(t.values.size());
      for (size_t i = 0; i < b.size(); ++i) b[i] = fmt::f32_to_bf16(t.values[i]);
      out.push_back({t.name, fmt::DType::BF16, t.shape, std::as_bytes(std::span<const uint16_t>(b))});
    } else {
      out.push_back(fmt::f32_tensor(t.name, t.shape, t.values));
    }
  }
  fmt::write_safetensors(file, out, {{"format", "pt"}, {"oscar_synthetic_seed", std::to_string(o.seed)}});
}

int run_synth(const SynthOptions& o) {
  require_cpu_device(o.device);
  if (o.layers < 1) throw Error("--layers", "must be at least 1");
  const fs::path out(o.out);
  std::error_code ec;
  if (fs::exists(out, ec) && !fs::is_directory(out, ec)) throw Error(o.out, "exists and is not a directory");
  fs::create_directories(out, ec);
  if (ec) throw Error(o.out, "cannot create directory: " + ec.message());

  fmt::write_file_atomic(out / "config.json", synth_config(o).dump(2) + "\n");
  const nlohmann::ordered_json generation = {{"bos_token_id", 0}, {"eos_token_id", 0}, {"do_sample", false}};
  fmt::write_file_atomic(out / "generation_config.json", generation.dump(2) + "\n");
  fmt::write_file_atomic(out / "tokenizer.json", synth_tokenizer_json().dump(2) + "\n");
  const nlohmann::ordered_json tok_cfg = {{"tokenizer_class", "PreTrainedTokenizerFast"},
                                          {"bos_token", kEndOfText},
                                          {"eos_token", kEndOfText}};
  fmt::write_file_atomic(out / "tokenizer_config.json", tok_cfg.dump(2) + "\n");
  write_synth_weights(out / "model.safetensors", o);
  spdlog::info("wrote synthetic {} model ({} layers, {} weights, seed {}) to {}", o.arch, o.layers, o.dtype, o.seed,
               o.out);
  std::puts(o.out.c_str());
  return 0;
}

}  // namespace

OSCAR_REGISTER_COMMAND(
    "synth", "Write a small deterministic random checkpoint with a byte-level BPE tokenizer (no download needed)", 90,
    [](CLI::App& sub) -> RunCommand {
      auto o = std::make_shared<SynthOptions>();
      sub.add_option("--out", o->out, "output directory (created; files in it are replaced atomically)")
          ->required()
          ->type_name("DIR");
      sub.add_option("--arch", o->arch, "qwen3 (q/k-norm, transformers-5 config) or llama")
          ->check(CLI::IsMember({"qwen3", "llama"}))
          ->capture_default_str();
      sub.add_option("--dtype", o->dtype, "weight dtype: bf16 or f32")
          ->check(CLI::IsMember({"bf16", "f32"}))
          ->capture_default_str();
      sub.add_option("--layers", o->layers, "number of decoder layers")->capture_default_str();
      sub.add_option("--seed", o->seed, "weight seed (std::mt19937_64)")->capture_default_str();
      add_device_option(sub, o->device);
      return [o] { return run_synth(*o); };
    });

}  // namespace oscar::app
