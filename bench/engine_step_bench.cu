// rt::Engine decode steps end to end on random weights of a published shape: B sequences prefilled to T tokens,
// then `--steps` calls of Engine::step() (one token for every sequence: all layers' GEMMs, the cache append, the
// decode attention, lm_head and the token choice), timed on the host clock around each call, since step() returns
// only once the tokens are on the host (what a serving loop waits for).
//   engine_step_bench --config bench/configs/qwen3-8b.json --batch 8 --context 32768 [--cache int2,bf16]
//                     [--steps 32] [--picks device,host] [--prefill-tokens 32768] [--budget-gib 30] [--seed 0]
// Per cache format and pick mode: median and min ms per step, tokens/s, the bytes a step must read at least (the
// bf16 weights once + every sequence's cache at its length, from rt::kv_footprint) as GB/s and % of the D2D copy
// bandwidth measured in the same process, and the prefill's tokens/s. "--picks host" keeps the logits
// (EngineOptions::keep_logits), so each step downloads B x vocab fp32 and picks on the host, as the engine did before
// greedy picks moved to the device; "device" is the default greedy path (kern::argmax_rows, B int32 downloaded).
#include <cuda_runtime.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <unistd.h>

#include "bench/bench_fill.cuh"
#include "formats/error.h"
#include "formats/model_config.h"
#include "runtime/device_model.h"
#include "runtime/engine.h"

namespace {

using namespace oscar;
namespace fs = std::filesystem;

// bf16 bytes of the weights one decode step reads: every layer's projections and norms, the final norm, lm_head (the
// embedding contributes one row per sequence, negligible).
double weight_bytes_per_step(const fmt::ModelConfig& c) {
  const double H = c.hidden_size, I = c.intermediate_size, qd = c.q_dim(), kvd = c.kv_dim();
  const double per_layer = H * (qd + 2 * kvd) + qd * H + 3 * I * H + 2 * H;
  return 2.0 * (c.num_layers * per_layer + H + static_cast<double>(c.vocab_size) * H);
}

std::vector<std::string> split_list(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, ',');)
    if (!item.empty()) out.push_back(item);
  return out;
}

rt::CacheMode parse_cache(const std::string& name) {
  const rt::CacheMode m = rt::parse_cache_mode(name, "--cache");
  if (m == rt::CacheMode::Oscar) throw Error("--cache", "oscar needs a checkpoint's bundle; random weights have none");
  return m;
}

struct Result {
  double median_ms = 0, min_ms = 0, prefill_tokens_per_s = 0;
};

Result run(const fs::path& config_dir, const std::shared_ptr<rt::DeviceModel>& model, rt::CacheMode mode, bool keep,
           int64_t batch, int64_t context, int64_t steps, int64_t prefill_tokens, double budget_gib, uint64_t seed) {
  rt::EngineOptions opt;
  opt.cache = mode;
  opt.keep_logits = keep;
  opt.max_sequences = batch;
  opt.cache_budget_bytes = static_cast<size_t>(budget_gib * (1ull << 30));
  auto engine = rt::Engine::load(config_dir, opt, nullptr, model);
  // The same prompts for every format and pick mode.
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int32_t> id(0, static_cast<int32_t>(model->config().vocab_size) - 1);
  std::vector<std::vector<int32_t>> prompts(static_cast<size_t>(batch), std::vector<int32_t>(static_cast<size_t>(context)));
  for (auto& p : prompts)
    for (auto& t : p) t = id(rng);
  const auto t0 = std::chrono::steady_clock::now();
  // Packed prefills of at most prefill_tokens tokens (one prompt at least), so the forward's scratch stays bounded.
  for (size_t first = 0; first < prompts.size();) {
    size_t last = first + 1;
    int64_t tokens = context;
    while (last < prompts.size() && tokens + context <= prefill_tokens) {
      tokens += context;
      ++last;
    }
    engine->add_sequences(std::vector<std::vector<int32_t>>(prompts.begin() + static_cast<std::ptrdiff_t>(first),
                                                            prompts.begin() + static_cast<std::ptrdiff_t>(last)));
    first = last;
  }
  const double prefill_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  for (int i = 0; i < 3; ++i) engine->step();  // warm-up: workspaces grown, GEMM plans made
  std::vector<double> ms;
  for (int64_t i = 0; i < steps; ++i) {
    const auto s0 = std::chrono::steady_clock::now();
    const auto out = engine->step();
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - s0).count());
    if (static_cast<int64_t>(out.size()) != batch) throw Error("engine_step_bench", "a step lost a sequence");
  }
  std::sort(ms.begin(), ms.end());
  Result r;
  r.median_ms = ms[ms.size() / 2];
  r.min_ms = ms.front();
  r.prefill_tokens_per_s = static_cast<double>(batch * context) / prefill_s;
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"rt::Engine decode steps on random weights"};
  std::string config_path, caches = "int2,bf16", picks = "device,host";
  int64_t batch = 8, context = 32768, steps = 32, prefill_tokens = 32768;
  double budget_gib = 30;
  uint64_t seed = 0;
  app.add_option("--config", config_path, "HF config.json of the shape to benchmark")->required()->check(CLI::ExistingFile);
  app.add_option("--batch", batch, "sequences decoded together")->check(CLI::PositiveNumber);
  app.add_option("--context", context, "prompt tokens per sequence")->check(CLI::PositiveNumber);
  app.add_option("--steps", steps, "timed steps")->check(CLI::PositiveNumber);
  app.add_option("--cache", caches, "comma list of bf16, int2, int4, fp8, hadamard2");
  app.add_option("--picks", picks, "comma list of device (greedy on the GPU) and host (keep_logits)");
  app.add_option("--prefill-tokens", prefill_tokens, "most tokens per packed prefill")->check(CLI::PositiveNumber);
  app.add_option("--budget-gib", budget_gib, "KV-cache budget")->check(CLI::PositiveNumber);
  app.add_option("--seed", seed, "random weights and prompts");
  CLI11_PARSE(app, argc, argv);
  try {
    const fmt::ModelConfig cfg = fmt::ModelConfig::from_file(config_path);
    std::vector<rt::CacheMode> modes;
    for (const auto& c : split_list(caches)) modes.push_back(parse_cache(c));
    std::vector<bool> keeps;
    for (const auto& p : split_list(picks)) {
      if (p != "device" && p != "host") throw Error("--picks", "'" + p + "': device or host");
      keeps.push_back(p == "host");
    }
    if (modes.empty() || keeps.empty()) throw Error("--cache/--picks", "empty list");
    int device_count = 0;
    if (cudaGetDeviceCount(&device_count) != cudaSuccess || device_count == 0)
      throw Error("CUDA", "no device");
    // Engine::load reads the shape from a model folder; a private one holding only the config serves the random
    // model shared with every engine below.
    const fs::path dir = fs::temp_directory_path() / ("oscar_engine_step_bench_" + std::to_string(::getpid()));
    fs::create_directories(dir);
    fs::copy_file(config_path, dir / "config.json", fs::copy_options::overwrite_existing);
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, 0) != cudaSuccess) throw Error("CUDA", "cudaGetDeviceProperties failed");
    const double d2d = bench::measure_d2d_gbps();
    std::shared_ptr<rt::DeviceModel> model = rt::DeviceModel::random(cfg, seed);
    const double weights = weight_bytes_per_step(cfg);
    std::printf("device %s, %d SMs, cudaMemcpy D2D %.0f GB/s; %s: %lld layers, %lld/%lld heads, vocab %lld, "
                "bf16 weights %.2f GB\n",
                prop.name, prop.multiProcessorCount, d2d, config_path.c_str(), static_cast<long long>(cfg.num_layers),
                static_cast<long long>(cfg.num_heads), static_cast<long long>(cfg.num_kv_heads),
                static_cast<long long>(cfg.vocab_size), weights / 1e9);
    std::printf("%-10s %-6s %5s %7s | %9s %9s %9s | %8s %8s %6s | %12s\n", "cache", "picks", "batch", "context",
                "step_ms", "min_ms", "tok/s", "read_GB", "GB/s", "%d2d", "prefill_t/s");
    for (const rt::CacheMode mode : modes) {
      const int64_t ctxs[1] = {context};
      const rt::KvFootprint fp =
          rt::kv_footprint(cfg, mode, nullptr, ctxs, std::nullopt, std::nullopt, "engine_step_bench");
      const double kv = static_cast<double>(batch) * fp.rows.at(0).stored_bytes;
      for (const bool keep : keeps) {
        const Result r = run(dir, model, mode, keep, batch, context, steps, prefill_tokens, budget_gib, seed);
        const double read = weights + kv;
        const double gbps = read / (r.median_ms * 1e-3) / 1e9;
        std::printf("%-10s %-6s %5lld %7lld | %9.3f %9.3f %9.0f | %8.2f %8.0f %5.0f%% | %12.0f\n",
                    std::string(rt::cache_mode_name(mode)).c_str(), keep ? "host" : "device",
                    static_cast<long long>(batch), static_cast<long long>(context), r.median_ms, r.min_ms,
                    static_cast<double>(batch) / (r.median_ms * 1e-3), read / 1e9, gbps, 100.0 * gbps / d2d,
                    r.prefill_tokens_per_s);
        std::fflush(stdout);
      }
    }
    fs::remove_all(dir);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "engine_step_bench: %s\n", e.what());
    return 1;
  }
  return 0;
}
