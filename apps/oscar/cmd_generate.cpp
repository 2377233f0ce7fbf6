// oscar generate: text continuation streamed to stdout as tokens are produced, on the CPU reference model or
// (--device cuda) on the GPU engine with a bf16, INT2, INT4, FP8, Hadamard INT2 or OSCAR (--bundle) paged KV cache.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <functional>
#include <map>
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
  std::vector<std::string> prompts;  // --prompt, repeatable: several prompts decode as one batch
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

bool is_stop(const std::vector<int32_t>& stop_ids, int32_t id) {
  return std::find(stop_ids.begin(), stop_ids.end(), id) != stop_ids.end();
}

#ifdef OSCAR_HAVE_CUDA
// The prompts through one rt::Engine as a batch: one packed prefill picks each sequence's first token, each step()
// the next token of every sequence still running; a sequence leaves the batch (its pages freed) at EOS or
// --max-new-tokens. on_token sees the tokens of a single prompt as they come (streaming).
std::vector<GenerationOutcome> generate_on_engine(const GenerateCliOptions& o,
                                                  const std::vector<std::vector<int32_t>>& prompts,
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
  eo.max_sequences = static_cast<int64_t>(prompts.size());
  eo.sampling = {o.temperature, o.top_k, o.top_p, o.seed};
  eo.fold_v = o.fold_v;
  eo.hadamard_seed = o.hadamard_seed;
  // The cache holds the prompt and the new tokens: auto makes the key tables for that many positions when the
  // bundle stores their metric (format 1.3), and keeps a 1.2 bundle's tables as they are.
  if (eo.cache == rt::CacheMode::Oscar) {
    const int64_t fixed = parse_ef_context(o.ef_context);
    if (fixed > 0) eo.key_table_context = fixed;
    else if (o.ef_context == "auto" && fmt::has_key_metric(fmt::read_bundle(o.bundle))) {
      size_t longest = 0;
      for (const auto& p : prompts) longest = std::max(longest, p.size());
      eo.key_table_context = static_cast<int64_t>(longest) + std::max<int64_t>(o.max_new_tokens, 1);
    }
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

  std::vector<GenerationOutcome> out(prompts.size());
  if (o.max_new_tokens == 0) return out;
  const std::vector<int64_t> ids = engine->add_sequences(prompts);
  std::map<int64_t, size_t> running;  // engine sequence id -> prompt index
  std::vector<int32_t> next(prompts.size());
  for (size_t i = 0; i < ids.size(); ++i) {
    running.emplace(ids[i], i);
    next[i] = engine->next_token(ids[i]);
  }
  while (true) {
    for (auto it = running.begin(); it != running.end();) {
      GenerationOutcome& g = out[it->second];
      const int32_t token = next[it->second];
      g.tokens.push_back(token);
      if (on_token) on_token(token);
      g.stopped_at_eos = !o.ignore_eos && is_stop(stop_ids, token);
      if (g.stopped_at_eos || static_cast<int64_t>(g.tokens.size()) >= o.max_new_tokens) {
        engine->free_sequence(it->first);
        it = running.erase(it);
      } else {
        ++it;
      }
    }
    if (running.empty()) break;
    for (const auto& st : engine->step()) next[running.at(st.sequence)] = st.token;
  }
  return out;
}
#endif

// Several prompts: each result printed once all are done (echoed prompt unless --no-echo, then the continuation),
// under a "=== sequence i ===" line; --json: {"sequences": [the single-prompt object per prompt], "seconds"}.
void print_results(const GenerateCliOptions& o, const fmt::Tokenizer& tok,
                   const std::vector<std::vector<int32_t>>& prompts, const std::vector<GenerationOutcome>& results,
                   double seconds) {
  const auto as_json = [&](size_t i) {
    return nlohmann::json{{"prompt_ids", prompts[i]},
                          {"new_ids", results[i].tokens},
                          {"text", tok.decode(results[i].tokens)},
                          {"stopped_at_eos", results[i].stopped_at_eos}};
  };
  const auto dump = [](const nlohmann::json& j) {
    std::puts(j.dump(2, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
  };
  if (o.json && prompts.size() == 1) {
    nlohmann::json j = as_json(0);
    j["seconds"] = seconds;
    dump(j);
  } else if (o.json) {
    nlohmann::json seqs = nlohmann::json::array();
    for (size_t i = 0; i < prompts.size(); ++i) seqs.push_back(as_json(i));
    dump(nlohmann::json{{"sequences", seqs}, {"seconds", seconds}});
  } else if (prompts.size() > 1) {
    for (size_t i = 0; i < prompts.size(); ++i) {
      std::vector<int32_t> ids = o.no_echo ? std::vector<int32_t>{} : prompts[i];
      ids.insert(ids.end(), results[i].tokens.begin(), results[i].tokens.end());
      // Decoded as a whole, as the streamer does, so a continuation's first token keeps SentencePiece's spacing.
      std::printf("=== sequence %zu ===\n%s\n", i, tok.decode(ids).c_str());
    }
    std::fflush(stdout);
  }
}

int run_generate(const GenerateCliOptions& o) {
  if (o.max_new_tokens < 0) throw Error("--max-new-tokens", "must be >= 0");
  if (o.prompts.empty()) throw Error("--prompt", "required");
  if (o.device != "cuda" && (!o.bundle.empty() || !o.cache.empty()))
    throw Error(o.bundle.empty() ? "--cache" : "--bundle", "the quantized KV cache runs on the GPU engine: add --device cuda");
  if (o.device != "cuda" && o.fold_v) throw Error("--fold-v", "folds R_v into the GPU engine's weights: add --device cuda");
  if (parse_ef_context(o.ef_context) > 0 && (o.device != "cuda" || o.bundle.empty()))
    throw Error("--ef-context", "sets the key tables of the oscar cache: needs --bundle and --device cuda");
  const bool stream = !o.json && o.prompts.size() == 1;
  const auto encode_all = [&](const fmt::Tokenizer& tok) {
    std::vector<std::vector<int32_t>> ids;
    for (size_t i = 0; i < o.prompts.size(); ++i)
      ids.push_back(encode_prompt(tok, o.prompts[i], o.prompts.size() == 1 ? "--prompt" : "--prompt " + std::to_string(i)));
    return ids;
  };
  size_t prompt_tokens = 0;
  const auto new_tokens = [](const std::vector<GenerationOutcome>& r) {
    size_t n = 0;
    for (const auto& g : r) n += g.tokens.size();
    return n;
  };
  if (o.device == "cuda") {
#ifndef OSCAR_HAVE_CUDA
    throw Error("--device cuda", "this build has no CUDA runtime (CPU only build); use --device cpu");
#else
    check_model_dir(o.model_dir);
    auto tok = load_tokenizer(o.model_dir);
    const std::vector<std::vector<int32_t>> prompts = encode_all(*tok);
    for (const auto& p : prompts) prompt_tokens += p.size();
    const fmt::ModelConfig cfg = fmt::ModelConfig::from_dir(o.model_dir);
    rt::require_cuda_device("--device cuda");
    std::vector<int32_t> stop_ids;
    if (cfg.eos_token_id) stop_ids.push_back(static_cast<int32_t>(*cfg.eos_token_id));
    else if (auto eos = tok->eos_id()) stop_ids.push_back(*eos);
    const auto start = std::chrono::steady_clock::now();
    std::vector<GenerationOutcome> results;
    if (stream) {
      TextStreamer streamer(*tok, prompts[0], !o.no_echo);
      results = generate_on_engine(o, prompts, stop_ids, [&](int32_t id) { streamer.push(id); });
      streamer.finish();
      std::fputc('\n', stdout);
      std::fflush(stdout);
    } else {
      results = generate_on_engine(o, prompts, stop_ids, {});
    }
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    spdlog::info("{} prompt(s): {} prompt + {} new tokens in {:.2f} s (load included){}", prompts.size(),
                 prompt_tokens, new_tokens(results), seconds,
                 prompts.size() == 1 && results[0].stopped_at_eos ? ", stopped at EOS" : "");
    print_results(o, *tok, prompts, results, seconds);
    return 0;
#endif
  }
  require_cpu_device(o.device);
  auto model = load_model(o.model_dir);
  auto tok = load_tokenizer(o.model_dir);
  const std::vector<std::vector<int32_t>> prompts = encode_all(*tok);
  const fmt::ModelConfig& cfg = model->config();
  for (const auto& prompt : prompts) {
    prompt_tokens += prompt.size();
    if (cfg.max_position_embeddings > 0 &&
        static_cast<int64_t>(prompt.size()) + o.max_new_tokens > cfg.max_position_embeddings)
      spdlog::warn("prompt ({}) + new tokens ({}) exceed max_position_embeddings {}", prompt.size(), o.max_new_tokens,
                   cfg.max_position_embeddings);
  }

  model::GenerateOptions g;
  g.max_new_tokens = o.max_new_tokens;
  g.sampling = {o.temperature, o.top_k, o.top_p, o.seed};
  g.stop_at_eos = !o.ignore_eos;
  if (auto eos = tok->eos_id(); eos && !cfg.eos_token_id) g.stop_ids.push_back(*eos);

  // The CPU reference runs the prompts one after another, each as if it were given alone.
  const auto start = std::chrono::steady_clock::now();
  std::vector<GenerationOutcome> results;
  for (const auto& prompt : prompts) {
    model::GenerateResult r;
    if (stream) {
      TextStreamer streamer(*tok, prompt, !o.no_echo);
      r = model::generate(*model, prompt, g, [&](int32_t id) { streamer.push(id); });
      streamer.finish();
      std::fputc('\n', stdout);
      std::fflush(stdout);  // the closing newline before the stderr log line, even when stdout is a pipe
    } else {
      r = model::generate(*model, prompt, g);
    }
    results.push_back({std::move(r.tokens), r.stopped_at_eos});
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const size_t generated = new_tokens(results);
  spdlog::info("{} prompt(s): {} prompt + {} new tokens in {:.2f} s ({:.1f} tokens/s){}", prompts.size(), prompt_tokens,
               generated, seconds, seconds > 0 ? generated / seconds : 0.0,
               prompts.size() == 1 && results[0].stopped_at_eos ? ", stopped at EOS" : "");
  print_results(o, *tok, prompts, results, seconds);
  return 0;
}

}  // namespace

OSCAR_REGISTER_COMMAND(
    "generate", "Continue a prompt (CPU reference model, or the GPU engine with a bf16/INT2/OSCAR KV cache), streaming text", 40,
    [](CLI::App& sub) -> RunCommand {
      auto o = std::make_shared<GenerateCliOptions>();
      add_model_option(sub, o->model_dir);
      sub.add_option("--prompt", o->prompts,
                     "text to continue (BOS added as the tokenizer does); several (--prompt A B or --prompt A --prompt "
                     "B): the GPU engine decodes them as one batch, printed when all are done")
          ->required();
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
      add_json_flag(sub, o->json)
          ->description("print {prompt_ids, new_ids, text, stopped_at_eos, seconds} at the end instead of streaming "
                        "(several prompts: {sequences: [...], seconds})");
      return [o] { return run_generate(*o); };
    });

}  // namespace oscar::app
