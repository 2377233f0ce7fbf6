// oscar generate: text continuation streamed to stdout as tokens are produced, on the CPU reference model or
// (--device cuda) on the GPU engine with a bf16, INT2, INT4, FP8, Hadamard INT2 or OSCAR (--bundle) paged KV cache.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <functional>
#include <memory>
#include <vector>

#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include "apps/oscar/command.h"
#include "apps/oscar/common.h"
#include "formats/bundle.h"
#include "formats/error.h"
#include "formats/model_config.h"
#include "lib/model/generate.h"
#ifdef OSCAR_HAVE_CUDA
#include "runtime/device_model.h"
#include "runtime/engine.h"
#include "runtime/kv_cache.h"
#endif

namespace oscar::app {
namespace {

struct GenerateCliOptions {
  std::string model_dir;
  std::string prompt;
  std::string device = "cpu";
  int64_t max_new_tokens = 64;
  float temperature = 0.0f;
  int64_t top_k = 0;
  float top_p = 1.0f;
  uint64_t seed = 0;
  bool ignore_eos = false;
  bool no_echo = false;
  bool json = false;
  // --device cuda only: the engine's cache.
  std::string bundle;
  std::string ef_context = "auto";  // auto | bundle | N: the positions the oscar cache's key tables are made for
  std::string cache;  // bf16 | int2 | int4 | fp8 | hadamard2 | oscar; empty: oscar with --bundle, else bf16
  int64_t sink = -1;  // -1: the bundle's (oscar) or the published default (int2)
  int64_t recent = -1;
  double cache_budget_mib = 1024;
  bool fold_v = false;
  uint64_t hadamard_seed = 0;
};

// Prints the decoded text incrementally. Decoding the whole sequence each step (not token by token) keeps
// SentencePiece's leading-space rule and multi-byte characters right; a trailing U+FFFD means a character is still
// incomplete (byte-fallback tokens), so it is held back until the next token completes it.
class TextStreamer {
 public:
  TextStreamer(const fmt::Tokenizer& tok, std::vector<int32_t> prompt, bool echo)
      : tok_(tok), ids_(std::move(prompt)) {
    printed_ = echo ? 0 : tok_.decode(ids_).size();
  }
  void push(int32_t id) {
    ids_.push_back(id);
    emit(false);
  }
  void finish() { emit(true); }

 private:
  void emit(bool final) {
    const std::string text = tok_.decode(ids_);
    if (!final && text.ends_with("\xEF\xBF\xBD")) return;
    if (text.size() > printed_) {
      std::fwrite(text.data() + printed_, 1, text.size() - printed_, stdout);
      std::fflush(stdout);
      printed_ = text.size();
    }
  }
  const fmt::Tokenizer& tok_;
  std::vector<int32_t> ids_;
  size_t printed_ = 0;
};

struct GenerationOutcome {
  std::vector<int32_t> tokens;
  bool stopped_at_eos = false;
};

#ifdef OSCAR_HAVE_CUDA
// One sequence through rt::Engine: prefill picks the first token, each step() the next one.
GenerationOutcome generate_on_engine(const GenerateCliOptions& o, const std::vector<int32_t>& prompt,
                                     const std::vector<int32_t>& stop_ids,
                                     const std::function<void(int32_t)>& on_token) {
  rt::EngineOptions eo;
  eo.cache = o.cache.empty() ? (o.bundle.empty() ? rt::CacheMode::Bf16 : rt::CacheMode::Oscar)
                             : rt::parse_cache_mode(o.cache, "--cache");
  eo.bundle = o.bundle;
  if (!o.bundle.empty() && eo.cache != rt::CacheMode::Oscar)
    throw Error("--bundle", "a bundle is only used by --cache oscar");
  if (o.sink >= 0) eo.sink_tokens = o.sink;
  if (o.recent >= 0) eo.recent_tokens = o.recent;
  if (!(o.cache_budget_mib > 0)) throw Error("--cache-budget-mib", "must be positive");
  eo.cache_budget_bytes = static_cast<size_t>(o.cache_budget_mib * 1024.0 * 1024.0);
  eo.max_sequences = 1;
  eo.sampling = {o.temperature, o.top_k, o.top_p, o.seed};
  eo.fold_v = o.fold_v;
  eo.hadamard_seed = o.hadamard_seed;
  // The cache holds the prompt and the new tokens: auto makes the key tables for that many positions when the
  // bundle stores their metric (format 1.3), and keeps a 1.2 bundle's tables as they are.
  if (eo.cache == rt::CacheMode::Oscar) {
    const int64_t fixed = parse_ef_context(o.ef_context);
    if (fixed > 0) eo.key_table_context = fixed;
    else if (o.ef_context == "auto" && fmt::has_key_metric(fmt::read_bundle(o.bundle)))
      eo.key_table_context = static_cast<int64_t>(prompt.size()) + std::max<int64_t>(o.max_new_tokens, 1);
  }
  auto engine = rt::Engine::load(o.model_dir, eo);
  if (engine->cache_format().key_table_context > 0)
    spdlog::info("error-feedback key tables for positions 0..{}", engine->cache_format().key_table_context - 1);
  if (o.fold_v)
    spdlog::info(engine->cache_format().v_rotation_folded ? "R_v folded into W_v / W_o"
                                                          : "--fold-v: this cache format has no V rotation to fold");
  const rt::CacheFormat& f = engine->cache_format();
  if (f.quantized)
    spdlog::info("cache {}: INT2 pages {}, bf16 pages {}, sink {}, recent {}", rt::cache_mode_name(f.mode),
                 engine->cache().tables().int2_pages().capacity(), engine->cache().tables().bf16_pages().capacity(),
                 f.sink_tokens, f.recent_tokens);
  else
    spdlog::info("cache bf16: {} pages", engine->cache().tables().bf16_pages().capacity());

  GenerationOutcome out;
  if (o.max_new_tokens == 0) return out;
  const int64_t seq = engine->add_sequence(prompt);
  int32_t next = engine->next_token(seq);
  while (true) {
    out.tokens.push_back(next);
    if (on_token) on_token(next);
    if (!o.ignore_eos && std::find(stop_ids.begin(), stop_ids.end(), next) != stop_ids.end()) {
      out.stopped_at_eos = true;
      break;
    }
    if (static_cast<int64_t>(out.tokens.size()) >= o.max_new_tokens) break;
    next = engine->step().at(0).token;
  }
  return out;
}
#endif

int run_generate(const GenerateCliOptions& o) {
  if (o.max_new_tokens < 0) throw Error("--max-new-tokens", "must be >= 0");
  if (o.device != "cuda" && (!o.bundle.empty() || !o.cache.empty()))
    throw Error(o.bundle.empty() ? "--cache" : "--bundle", "the quantized KV cache runs on the GPU engine: add --device cuda");
  if (o.device != "cuda" && o.fold_v) throw Error("--fold-v", "folds R_v into the GPU engine's weights: add --device cuda");
  if (parse_ef_context(o.ef_context) > 0 && (o.device != "cuda" || o.bundle.empty()))
    throw Error("--ef-context", "sets the key tables of the oscar cache: needs --bundle and --device cuda");
  if (o.device == "cuda") {
#ifndef OSCAR_HAVE_CUDA
    throw Error("--device cuda", "this build has no CUDA runtime (CPU only build); use --device cpu");
#else
    check_model_dir(o.model_dir);
    auto tok = load_tokenizer(o.model_dir);
    const std::vector<int32_t> prompt = encode_prompt(*tok, o.prompt, "--prompt");
    const fmt::ModelConfig cfg = fmt::ModelConfig::from_dir(o.model_dir);
    rt::require_cuda_device("--device cuda");
    std::vector<int32_t> stop_ids;
    if (cfg.eos_token_id) stop_ids.push_back(static_cast<int32_t>(*cfg.eos_token_id));
    else if (auto eos = tok->eos_id()) stop_ids.push_back(*eos);
    const auto start = std::chrono::steady_clock::now();
    GenerationOutcome result;
    if (o.json) {
      result = generate_on_engine(o, prompt, stop_ids, {});
    } else {
      TextStreamer streamer(*tok, prompt, !o.no_echo);
      result = generate_on_engine(o, prompt, stop_ids, [&](int32_t id) { streamer.push(id); });
      streamer.finish();
      std::fputc('\n', stdout);
      std::fflush(stdout);
    }
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    spdlog::info("{} prompt + {} new tokens in {:.2f} s (load included){}", prompt.size(), result.tokens.size(),
                 seconds, result.stopped_at_eos ? ", stopped at EOS" : "");
    if (o.json) {
      nlohmann::json j = {{"prompt_ids", prompt},
                          {"new_ids", result.tokens},
                          {"text", tok->decode(result.tokens)},
                          {"stopped_at_eos", result.stopped_at_eos},
                          {"seconds", seconds}};
      std::puts(j.dump(2, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
    }
    return 0;
#endif
  }
  require_cpu_device(o.device);
  auto model = load_model(o.model_dir);
  auto tok = load_tokenizer(o.model_dir);
  const std::vector<int32_t> prompt = encode_prompt(*tok, o.prompt, "--prompt");
  const fmt::ModelConfig& cfg = model->config();
  if (cfg.max_position_embeddings > 0 &&
      static_cast<int64_t>(prompt.size()) + o.max_new_tokens > cfg.max_position_embeddings)
    spdlog::warn("prompt ({}) + new tokens ({}) exceed max_position_embeddings {}", prompt.size(), o.max_new_tokens,
                 cfg.max_position_embeddings);

  model::GenerateOptions g;
  g.max_new_tokens = o.max_new_tokens;
  g.sampling = {o.temperature, o.top_k, o.top_p, o.seed};
  g.stop_at_eos = !o.ignore_eos;
  if (auto eos = tok->eos_id(); eos && !cfg.eos_token_id) g.stop_ids.push_back(*eos);

  const auto start = std::chrono::steady_clock::now();
  model::GenerateResult result;
  if (o.json) {
    result = model::generate(*model, prompt, g);
  } else {
    TextStreamer streamer(*tok, prompt, !o.no_echo);
    result = model::generate(*model, prompt, g, [&](int32_t id) { streamer.push(id); });
    streamer.finish();
    std::fputc('\n', stdout);
    std::fflush(stdout);  // the closing newline before the stderr log line, even when stdout is a pipe
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  spdlog::info("{} prompt + {} new tokens in {:.2f} s ({:.1f} tokens/s){}", prompt.size(), result.tokens.size(),
               seconds, seconds > 0 ? result.tokens.size() / seconds : 0.0, result.stopped_at_eos ? ", stopped at EOS" : "");
  if (o.json) {
    nlohmann::json j = {{"prompt_ids", prompt},
                        {"new_ids", result.tokens},
                        {"text", tok->decode(result.tokens)},
                        {"stopped_at_eos", result.stopped_at_eos},
                        {"seconds", seconds}};
    std::puts(j.dump(2, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
  }
  return 0;
}

}  // namespace

OSCAR_REGISTER_COMMAND(
    "generate", "Continue a prompt (CPU reference model, or the GPU engine with a bf16/INT2/OSCAR KV cache), streaming text", 40,
    [](CLI::App& sub) -> RunCommand {
      auto o = std::make_shared<GenerateCliOptions>();
      add_model_option(sub, o->model_dir);
      sub.add_option("--prompt", o->prompt, "text to continue (BOS added as the tokenizer does)")->required();
      sub.add_option("--max-new-tokens", o->max_new_tokens, "tokens to generate")->capture_default_str();
      sub.add_option("--temperature", o->temperature, "0: greedy (argmax); > 0: sampling")->capture_default_str();
      sub.add_option("--top-k", o->top_k, "keep the k most likely tokens (0: off)")->capture_default_str();
      sub.add_option("--top-p", o->top_p, "nucleus: smallest set with this probability mass (1: off)")
          ->capture_default_str();
      sub.add_option("--seed", o->seed, "sampling seed (std::mt19937_64)")->capture_default_str();
      sub.add_flag("--ignore-eos", o->ignore_eos, "always generate --max-new-tokens tokens");
      sub.add_flag("--no-echo", o->no_echo, "print only the continuation, not the prompt");
      add_device_option(sub, o->device);
      sub.add_option("--bundle", o->bundle, "OSCAR calibration bundle (.oscar) for the INT2 cache (--device cuda)");
      sub.add_option("--ef-context", o->ef_context,
                     "--cache oscar: the positions its error-feedback key tables are made for. auto = prompt + "
                     "--max-new-tokens (rebuilt from the bundle's key metric, format 1.3); bundle = as stored; N")
          ->capture_default_str();
      sub.add_option("--cache", o->cache, "KV cache format on --device cuda: bf16, int2, int4, fp8, hadamard2 or oscar "
                                          "(default: oscar with --bundle, else bf16)")
          ->check(CLI::IsMember({"bf16", "int2", "int4", "fp8", "hadamard2", "oscar"}));
      sub.add_option("--hadamard-seed", o->hadamard_seed, "--cache hadamard2: seed of the random signs (as eval's --seed)")
          ->capture_default_str();
      sub.add_flag("--fold-v", o->fold_v, "--device cuda: fold R_v into W_v / W_o at load (no V rotation in the kernels)");
      sub.add_option("--sink", o->sink, "first tokens kept bf16 (INT2 caches; default: the bundle's, or 64)");
      sub.add_option("--recent", o->recent, "most recent tokens kept bf16 (INT2 caches; default: the bundle's, or 256)");
      sub.add_option("--cache-budget-mib", o->cache_budget_mib, "GPU memory for the KV cache pages, MiB")
          ->capture_default_str();
      add_json_flag(sub, o->json)->description("print {prompt_ids, new_ids, text, stopped_at_eos} at the end instead of streaming");
      return [o] { return run_generate(*o); };
    });

}  // namespace oscar::app
