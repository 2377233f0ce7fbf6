// CPU reference forward throughput: prefill tokens/s at several prompt lengths and single-token decode tokens/s
// on a real checkpoint. Prints a table; not part of ctest.
//   cpu_forward_bench [--model DIR] [--prefill 256,512] [--decode-context 256] [--decode-tokens 64] [--reps 3]
#include <CLI/CLI.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>

#include "formats/error.h"
#include "lib/model/cpu_model.h"

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

std::vector<int32_t> bench_ids(int64_t n, int64_t vocab) {
  std::mt19937_64 rng(2024);  // fixed: every run measures the same token sequence
  std::vector<int32_t> ids(static_cast<size_t>(n));
  for (auto& id : ids) id = static_cast<int32_t>(rng() % static_cast<uint64_t>(vocab));
  return ids;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"CPU reference forward throughput (prefill and decode tokens/s)"};
  std::string model_dir = "../shared/fixtures/models/qwen3-tiny-trained";
  std::vector<int64_t> prefill_lengths = {256, 512};
  int64_t decode_context = 256, decode_tokens = 64;
  int reps = 3;
  app.add_option("--model", model_dir, "Hugging Face model directory")->capture_default_str();
  app.add_option("--prefill", prefill_lengths, "prompt lengths to time")->delimiter(',')->capture_default_str();
  app.add_option("--decode-context", decode_context, "tokens prefilled before timing decode")->capture_default_str();
  app.add_option("--decode-tokens", decode_tokens, "decode steps timed")->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--reps", reps, "repetitions per measurement (median reported)")->capture_default_str()->check(CLI::PositiveNumber);
  CLI11_PARSE(app, argc, argv);

  try {
    const auto t_load = Clock::now();
    auto model = oscar::model::CpuModel::load(model_dir);
    const double load_s = seconds_since(t_load);
    const auto& cfg = model->config();
    std::printf("model %s: %s, %lld layers, hidden %lld, heads %lld/%lld x %lld, vocab %lld (load %.2f s)\n",
                model_dir.c_str(), std::string(oscar::fmt::arch_name(cfg.arch)).c_str(),
                static_cast<long long>(cfg.num_layers), static_cast<long long>(cfg.hidden_size),
                static_cast<long long>(cfg.num_heads), static_cast<long long>(cfg.num_kv_heads),
                static_cast<long long>(cfg.head_dim), static_cast<long long>(cfg.vocab_size), load_s);
    std::printf("%-10s %8s %8s %12s %12s\n", "phase", "context", "tokens", "median_ms", "tokens/s");

    for (int64_t T : prefill_lengths) {
      const auto ids = bench_ids(T, cfg.vocab_size);
      std::vector<double> times;
      for (int r = 0; r <= reps; ++r) {  // r == 0 warms caches and thread pools, not reported
        oscar::model::KvCache cache(cfg, T);
        const auto t0 = Clock::now();
        model->forward(ids, cache);
        if (r > 0) times.push_back(seconds_since(t0));
      }
      const double s = median(times);
      std::printf("%-10s %8lld %8lld %12.2f %12.1f\n", "prefill", 0LL, static_cast<long long>(T), s * 1e3, T / s);
    }

    const auto ids = bench_ids(decode_context + decode_tokens, cfg.vocab_size);
    std::vector<double> times;
    oscar::model::ForwardOptions opt;
    opt.last_logits_only = true;
    for (int r = 0; r <= reps; ++r) {
      oscar::model::KvCache cache(cfg, decode_context + decode_tokens);
      model->forward(std::span(ids).first(static_cast<size_t>(decode_context)), cache, opt);
      const auto t0 = Clock::now();
      for (int64_t t = 0; t < decode_tokens; ++t)
        model->forward(std::span(ids).subspan(static_cast<size_t>(decode_context + t), 1), cache, opt);
      if (r > 0) times.push_back(seconds_since(t0));
    }
    const double s = median(times);
    std::printf("%-10s %8lld %8lld %12.2f %12.1f\n", "decode", static_cast<long long>(decode_context),
                static_cast<long long>(decode_tokens), s * 1e3, decode_tokens / s);
  } catch (const oscar::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
