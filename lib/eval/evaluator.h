#pragma once
// evaluate() — the whole of `oscar eval` below the CLI: for every context length and cache mode, teacher-forced
// forwards through SimulatedCacheAttention compared with the BF16 cache (metrics.h), greedy continuations, and
// optional passkey / needle retrieval; the result is an EvalReport (report.h) the caller renders and writes.
#include <cstdint>
#include <functional>
#include <string_view>
#include <vector>

#include "formats/tokenizer.h"
#include "lib/eval/cache_modes.h"
#include "lib/eval/report.h"
#include "lib/model/cpu_model.h"

namespace oscar::eval {

// Evaluation sequences of one context length (each exactly `context` tokens).
struct ContextSequences {
  int64_t context = 0;
  std::vector<std::vector<int32_t>> sequences;
};

struct EvalOptions {
  std::vector<CacheMode> modes;  // compared with bf16, which is always run as the reference
  ModeOptions mode_options;      // windows, seed, KIVI parameters, bundle
  int64_t greedy_prompts = 2;    // first N sequences of each context, cut to context - greedy_tokens tokens
  int64_t greedy_tokens = 32;
  bool retrieval = false;                  // passkey and needle
  std::vector<int64_t> retrieval_lengths;  // prompt lengths in tokens
  std::vector<double> retrieval_depths = {0.0, 0.25, 0.5, 0.75, 1.0};
  int64_t retrieval_trials = 1;       // prompts per (length, depth), each with its own key
  int64_t retrieval_new_tokens = 12;  // greedy tokens generated for the answer
  uint64_t seed = 0;                  // retrieval keys (mode seeds are in mode_options)
  // --ef-context auto: the oscar mode's error-feedback key tables are rebuilt for each context and each retrieval
  // length (mode_options.key_table_context = that length) when the bundle stores its key metric (format 1.3);
  // without a stored metric the tables are used as stored.
  bool key_tables_per_context = false;
  // Progress lines ("context 1024: int2 sequence 2/4").
  std::function<void(std::string_view)> progress;
};

// Runs everything on the CPU reference model. `tokenizer` is needed only for retrieval. Results are ordered by
// context, then by options.modes. Throws oscar::Error for a mode that cannot be built (e.g. oscar without a
// bundle) before any forward pass runs.
EvalReport evaluate(model::CpuModel& model, const fmt::Tokenizer* tokenizer, const std::vector<ContextSequences>& data,
                    const EvalOptions& options);

// The key-table context the oscar mode uses at `positions` under `options` (per context when
// key_tables_per_context and the bundle stores key metrics, else mode_options.key_table_context).
int64_t key_table_context_at(const EvalOptions& options, int64_t positions);

// Logits [ids.size(), vocab] of one teacher-forced forward with `format`'s simulated cache.
std::vector<float> simulated_logits(model::CpuModel& model, const CacheFormat& format, std::span<const int32_t> ids);

// The parts of evaluate() that other drivers of the same measurements share (rt::evaluate_on_gpu runs them on the
// GPU engine), so both devices report identically defined numbers.
//
// One mode at one context: `positions` holds every sequence's compare_positions() output back to back (context - 1
// per sequence); `beyond` keeps positions t >= windows.sink + windows.recent; `greedy_agreement` holds
// tokens_until_divergence() per greedy prompt; the footprint is kv_footprint(format, context).
ModeResult summarize_mode(const CacheFormat& format, int64_t context, int64_t sequences,
                          std::span<const PositionMetrics> positions, CacheWindows windows,
                          std::span<const int64_t> greedy_agreement, int64_t greedy_tokens);

// The key seed of one retrieval prompt: a function of --seed, the task, the length, the depth's index and the
// trial, so every mode (and every device) sees the same prompts.
uint64_t retrieval_prompt_seed(uint64_t seed, RetrievalTask task, int64_t length, size_t depth_index, int64_t trial);

// Greedy continuation of `prompt` (new_tokens tokens, EOS not special) with `format`'s simulated cache.
std::vector<int32_t> simulated_greedy(model::CpuModel& model, const CacheFormat& format,
                                      std::span<const int32_t> prompt, int64_t new_tokens);

}  // namespace oscar::eval
