#pragma once
// Autoregressive decoding on the CPU reference model (used by `oscar generate` and the golden tests):
// greedy, or sampling with temperature / top-k / top-p in transformers' order, from a seeded std::mt19937_64.
#include <cstdint>
#include <functional>
#include <optional>
#include <random>
#include <span>
#include <vector>

#include "lib/model/cpu_model.h"

namespace oscar::model {

struct SamplingOptions {
  float temperature = 0.0f;  // <= 0: greedy (argmax, lowest id on ties, as torch.argmax)
  int64_t top_k = 0;         // 0: no top-k filter
  float top_p = 1.0f;        // 1: no nucleus filter
  uint64_t seed = 0;
};

struct GenerateOptions {
  int64_t max_new_tokens = 64;
  SamplingOptions sampling;
  // Decoding stops after emitting one of these ids (the emitted id is kept in the result). Empty: the
  // config's eos_token_id, if any.
  std::vector<int32_t> stop_ids;
  bool stop_at_eos = true;  // false: always produce max_new_tokens (as the golden greedy continuations do)
  ForwardOptions forward;   // observer / attention backend for every step
};

struct GenerateResult {
  std::vector<int32_t> tokens;  // the new tokens only
  bool stopped_at_eos = false;
};

// Picks the next token from one row of logits [vocab]. Sampling draws one uniform double from `rng`; it refuses a
// NaN logit (there is no order to sample it in). ~1.5 ms a token at 152K ids on one core (radix-sorted candidates).
int32_t pick_next_token(std::span<const float> logits, const SamplingOptions& opt, std::mt19937_64& rng);

// pick_next_token of each row of `logits` ([rngs.size(), vocab]), row r drawing from *rngs[r]; sampled rows run in
// parallel. Each row touches only its own generator, so the picks do not depend on the thread count. The GPU
// engine's host picks (sampling, keep_logits) at batch B: B sorts of the vocabulary per step.
std::vector<int32_t> pick_next_tokens(std::span<const float> logits, int64_t vocab, const SamplingOptions& opt,
                                      std::span<std::mt19937_64* const> rngs);

// The definition pick_next_token implements: std::stable_sort of every id by descending logit, top-k extended over
// ties of the k-th logit, then the same draw. Returns the same token and leaves `rng` in the same state for any
// logits without NaN (tests/model/test_generate.cpp checks it); ~10x slower. For tests and bench/sampling_bench.
int32_t pick_next_token_reference(std::span<const float> logits, const SamplingOptions& opt, std::mt19937_64& rng);

// Prefills `prompt` in one forward call, then decodes one token per call. `on_token` (optional) sees each new
// token as it is produced (streaming output).
GenerateResult generate(CpuModel& model, std::span<const int32_t> prompt, const GenerateOptions& opt,
                        const std::function<void(int32_t)>& on_token = {});

}  // namespace oscar::model
