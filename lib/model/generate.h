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

// Picks the next token from one row of logits [vocab]. Sampling draws one uniform double from `rng`.
int32_t pick_next_token(std::span<const float> logits, const SamplingOptions& opt, std::mt19937_64& rng);

// Prefills `prompt` in one forward call, then decodes one token per call. `on_token` (optional) sees each new
// token as it is produced (streaming output).
GenerateResult generate(CpuModel& model, std::span<const int32_t> prompt, const GenerateOptions& opt,
                        const std::function<void(int32_t)>& on_token = {});

}  // namespace oscar::model
