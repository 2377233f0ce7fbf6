#pragma once
// The numbers `oscar eval` reports, as plain functions of logits, tokens and formats (docs/eval.md defines each):
//   * per position t (the prediction of token t+1): NLL of the true next token under the mode, KL(BF16 ‖ mode)
//     between the next-token distributions, and whether the two argmaxes agree;
//   * summaries: perplexity exp(mean NLL), mean and p99 (nearest rank) KL, top-1 agreement rate;
//   * greedy agreement: tokens until the first divergence of two greedy continuations;
//   * passkey / needle retrieval prompts (deterministic in their seed) and their success rule;
//   * the KV footprint of a format at a context length (bf16 windows and scale/zero metadata included).
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "formats/model_config.h"
#include "formats/tokenizer.h"
#include "lib/eval/cache_modes.h"

namespace oscar::eval {

struct PositionMetrics {
  double nll = 0;         // -log p_mode(target)
  double kl = 0;          // KL(p_ref ‖ p_mode) in nats
  bool top1_agrees = false;  // argmax p_ref == argmax p_mode (lowest id on ties, as torch.argmax)
};

// Row t of both logit matrices ([rows, vocab], rows = targets.size()) is the distribution of the token after
// position t; targets[t] is that token. Softmaxes are computed in double.
std::vector<PositionMetrics> compare_positions(std::span<const float> reference_logits,
                                               std::span<const float> mode_logits, int64_t vocab,
                                               std::span<const int32_t> targets);

struct MetricSummary {
  int64_t positions = 0;
  double nll_mean = 0;
  double perplexity = 0;  // exp(nll_mean)
  double kl_mean = 0;
  double kl_p99 = 0;
  double top1_agreement = 0;  // fraction in [0, 1]
};
// Empty input gives positions 0 and NaN statistics (reported as "n/a").
MetricSummary summarize(std::span<const PositionMetrics> positions);

// Nearest-rank percentile: the ceil(q/100 · n)-th smallest value (1-based; q = 0 gives the minimum).
double percentile_nearest_rank(std::vector<double> values, double q);

// Tokens of `a` and `b` equal from the start, up to the first difference (the shorter length if none).
int64_t tokens_until_divergence(std::span<const int32_t> a, std::span<const int32_t> b);

// Long-context retrieval. Passkey: "There is an important info hidden inside a lot of irrelevant text..." with a
// random 5-digit pass key (stated three times in a row) in repeated filler text, ending with a question whose answer
// is the key. Needle: a
// random 7-digit "special magic number" for a random city, in prose filler from a fixed list of sentences.
enum class RetrievalTask { Passkey, Needle };
std::string_view retrieval_task_name(RetrievalTask task);  // "passkey", "needle"

struct RetrievalPrompt {
  std::vector<int32_t> ids;  // exactly `length` tokens (special tokens per the tokenizer's add_special_tokens)
  std::string answer;        // the digits the continuation must contain
  int64_t needle_token = 0;  // token index where the needle sentence starts
};
// depth in [0, 1] places the needle between the first and the last filler sentence. Throws oscar::Error when
// `length` is too short to hold the intro, the needle and the question.
RetrievalPrompt make_retrieval_prompt(const fmt::Tokenizer& tokenizer, RetrievalTask task, int64_t length, double depth,
                                      uint64_t seed);
// Success: the decoded greedy continuation contains the answer.
bool retrieval_success(std::string_view continuation, std::string_view answer);

struct KvFootprint {
  int64_t context = 0;
  double bytes_per_token = 0;   // whole cache (all layers, K and V) at `context` tokens, divided by context
  double bits_per_element = 0;  // same, per cached element
  double quantized_fraction = 0;  // cached K/V elements held quantized
};
// The cache a decode loop holds after `context` tokens: sink and recent tokens in bf16 (KIVI: its residual and
// incomplete key groups too), every other token at the format's bits with its scale/zero metadata. Per-layer
// constants (rotations) are not per-token and are not counted.
KvFootprint kv_footprint(const CacheFormat& format, int64_t context);

}  // namespace oscar::eval
