// Host sampling cost per token: model::pick_next_token (radix-sorted candidates, a selection for top-k) against
// pick_next_token_reference (std::stable_sort of every id), on the same logits rows, in the same run. Rows are
// normal with a spread like a trained model's (sd --spread) plus ties (values rounded to --step), at --vocab ids
// (Qwen3's 151936 by default). Both must pick the same tokens from the same seed: the bench exits 1 if not.
// Usage: sampling_bench [--vocab N] [--rows N] [--temperature T]
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <chrono>
#include <cmath>
#include <random>
#include <thread>
#include <vector>

#include "lib/model/generate.h"

namespace {

using Clock = std::chrono::steady_clock;
using oscar::model::SamplingOptions;

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Host sampling: pick_next_token against the stable-sort reference"};
  int64_t vocab = 151936;
  int rows = 16;
  float temperature = 0.8f;
  float spread = 3.0f;
  float step = 1.0f / 64;
  app.add_option("--vocab", vocab, "ids per row")->check(CLI::Range(int64_t{1}, int64_t{1} << 30));
  app.add_option("--rows", rows, "rows timed per setting")->check(CLI::Range(1, 100000));
  app.add_option("--temperature", temperature, "sampling temperature")->check(CLI::PositiveNumber);
  app.add_option("--spread", spread, "standard deviation of the logits")->check(CLI::PositiveNumber);
  app.add_option("--step", step, "logits rounded to multiples of this (ties), 0: no rounding");
  CLI11_PARSE(app, argc, argv);

  std::mt19937_64 gen(1234);
  std::normal_distribution<float> normal(0.0f, spread);
  std::vector<std::vector<float>> logits(static_cast<size_t>(rows), std::vector<float>(static_cast<size_t>(vocab)));
  for (auto& row : logits)
    for (float& x : row) x = step > 0 ? std::round(normal(gen) / step) * step : normal(gen);

  struct Setting {
    int64_t top_k;
    float top_p;
  };
  fmt::print("vocab {}, {} rows, temperature {}\n", vocab, rows, temperature);
  fmt::print("{:>6} {:>6} | {:>12} {:>12} | {:>8}\n", "top_k", "top_p", "ref ms/tok", "fast ms/tok", "speedup");
  bool same = true;
  for (const Setting s : {Setting{0, 1.0f}, Setting{0, 0.9f}, Setting{50, 1.0f}, Setting{50, 0.9f}, Setting{1000, 0.95f}}) {
    const SamplingOptions opt{temperature, s.top_k, s.top_p, 7};
    std::vector<int32_t> ref_picks, fast_picks;
    std::mt19937_64 ref_rng(opt.seed), fast_rng(opt.seed);
    const auto t0 = Clock::now();
    for (const auto& row : logits) ref_picks.push_back(oscar::model::pick_next_token_reference(row, opt, ref_rng));
    const auto t1 = Clock::now();
    for (const auto& row : logits) fast_picks.push_back(oscar::model::pick_next_token(row, opt, fast_rng));
    const auto t2 = Clock::now();
    const double ref_ms = std::chrono::duration<double, std::milli>(t1 - t0).count() / rows;
    const double fast_ms = std::chrono::duration<double, std::milli>(t2 - t1).count() / rows;
    const bool ok = ref_picks == fast_picks && ref_rng == fast_rng;
    same = same && ok;
    fmt::print("{:>6} {:>6.2f} | {:>12.3f} {:>12.3f} | {:>7.1f}x{}\n", s.top_k, s.top_p, ref_ms, fast_ms,
               ref_ms / fast_ms, ok ? "" : "  DIFFERENT PICKS");
  }
  // The engine's host picks at batch = rows: the rows one after another against pick_next_tokens (rows in parallel).
  {
    const SamplingOptions opt{temperature, 50, 0.9f, 7};
    std::vector<float> flat;
    for (const auto& row : logits) flat.insert(flat.end(), row.begin(), row.end());
    std::vector<std::mt19937_64> serial_rngs, batch_rngs;
    std::vector<std::mt19937_64*> batch_ptrs;
    for (int r = 0; r < rows; ++r) {
      serial_rngs.emplace_back(100 + r);
      batch_rngs.emplace_back(100 + r);
    }
    for (auto& g : batch_rngs) batch_ptrs.push_back(&g);
    std::vector<int32_t> serial;
    const auto t0 = Clock::now();
    for (int r = 0; r < rows; ++r) serial.push_back(oscar::model::pick_next_token(logits[r], opt, serial_rngs[r]));
    const auto t1 = Clock::now();
    const std::vector<int32_t> batch = oscar::model::pick_next_tokens(flat, vocab, opt, batch_ptrs);
    const auto t2 = Clock::now();
    const double serial_ms = std::chrono::duration<double, std::milli>(t1 - t0).count();
    const double batch_ms = std::chrono::duration<double, std::milli>(t2 - t1).count();
    const bool ok = serial == batch;
    same = same && ok;
    fmt::print("a step of {} rows (top_k 50, top_p 0.9): {:.2f} ms one by one, {:.2f} ms pick_next_tokens ({:.1f}x, "
               "{} hardware threads){}\n",
               rows, serial_ms, batch_ms, serial_ms / batch_ms, std::thread::hardware_concurrency(),
               ok ? "" : "  DIFFERENT PICKS");
  }
  return same ? 0 : 1;
}
