#include "lib/model/generate.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <string>
#include <utility>

#include <tbb/parallel_for.h>

#include "formats/error.h"

namespace oscar::model {

namespace {

int32_t argmax(std::span<const float> logits) {
  // std::max_element returns the first maximum, matching torch.argmax's tie rule.
  return static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
}

// A uniform double in [0, 1) from the top 53 bits: unlike std::uniform_real_distribution, identical on every
// standard library, so a seed reproduces the same text everywhere.
double uniform01(std::mt19937_64& rng) { return static_cast<double>(rng() >> 11) * 0x1.0p-53; }

// One 64-bit key per token whose ascending order is the candidate order: the high 32 bits rise as the logit falls
// (the IEEE bits mapped to an order-preserving unsigned, complemented; -0 as +0 since the order compares values),
// the low 32 bits are the id. NaN has no place in that order: refused.
void candidate_keys(std::span<const float> logits, std::vector<uint64_t>& keys) {
  keys.resize(logits.size());
  for (size_t i = 0; i < logits.size(); ++i) {
    const float v = logits[i];
    if (std::isnan(v)) throw Error("sampling", "the logit of token " + std::to_string(i) + " is NaN");
    const uint32_t bits = std::bit_cast<uint32_t>(v == 0.0f ? 0.0f : v);
    const uint32_t ascending = (bits & 0x80000000u) != 0 ? ~bits : bits | 0x80000000u;
    keys[i] = static_cast<uint64_t>(~ascending) << 32 | static_cast<uint32_t>(i);
  }
}

// Least-significant-digit radix sort of the keys, 11 bits a pass, skipping digits that no key varies in. LSD radix
// is stable, so keys still in id order (the whole vocabulary, as candidate_keys made them) only need the 32 logit
// bits sorted: 3 passes. Several times faster than std::stable_sort of the ids with a comparator
// (bench/sampling_bench.cpp).
void sort_keys(std::vector<uint64_t>& keys, std::vector<uint64_t>& other, bool in_id_order) {
  if (keys.size() < 2048) {
    std::sort(keys.begin(), keys.end());
    return;
  }
  uint64_t varying = 0;
  for (const uint64_t k : keys) varying |= k ^ keys[0];
  constexpr int kDigitBits = 11;
  constexpr size_t kBuckets = size_t{1} << kDigitBits;
  other.resize(keys.size());
  std::vector<size_t> count(kBuckets);
  for (int shift = in_id_order ? 32 : 0; shift < 64 && (varying >> shift) != 0; shift += kDigitBits) {
    if (((varying >> shift) & (kBuckets - 1)) == 0) continue;  // every key has the same digit here
    std::fill(count.begin(), count.end(), 0);
    for (const uint64_t k : keys) ++count[(k >> shift) & (kBuckets - 1)];
    size_t sum = 0;
    for (size_t& c : count) sum += std::exchange(c, sum);
    for (const uint64_t k : keys) other[count[(k >> shift) & (kBuckets - 1)]++] = k;
    keys.swap(other);
  }
}

void check_sampling_options(const SamplingOptions& opt) {
  if (opt.top_p <= 0.0f || opt.top_p > 1.0f)
    throw Error("--top-p", "must be in (0, 1], got " + std::to_string(opt.top_p));
  if (opt.top_k < 0) throw Error("--top-k", "must be >= 0, got " + std::to_string(opt.top_k));
}

// The draw over the candidates order[0, keep) (descending logit, ties by ascending id, top-k applied): softmax at
// the temperature in double, the top-p nucleus, one uniform from rng. Every sum runs in candidate order.
int32_t draw_from_candidates(std::span<const float> logits, std::span<const int32_t> order, int64_t keep,
                             const SamplingOptions& opt, std::mt19937_64& rng) {
  thread_local std::vector<double> prob;
  prob.resize(static_cast<size_t>(keep));
  const double max_scaled = static_cast<double>(logits[order[0]]) / opt.temperature;
  double total = 0;
  for (int64_t i = 0; i < keep; ++i) {
    prob[i] = std::exp(static_cast<double>(logits[order[i]]) / opt.temperature - max_scaled);
    total += prob[i];
  }
  if (opt.top_p < 1.0f) {
    // Smallest prefix of the sorted candidates whose probability mass reaches top_p (at least one token).
    double cumulative = 0;
    int64_t nucleus = 0;
    while (nucleus < keep) {
      cumulative += prob[nucleus] / total;
      ++nucleus;
      if (cumulative >= opt.top_p) break;
    }
    keep = nucleus;
    total = std::accumulate(prob.begin(), prob.begin() + keep, 0.0);
  }
  const double target = uniform01(rng) * total;
  double running = 0;
  for (int64_t i = 0; i < keep; ++i) {
    running += prob[i];
    if (target < running) return order[i];
  }
  return order[keep - 1];
}

}  // namespace

int32_t pick_next_token(std::span<const float> logits, const SamplingOptions& opt, std::mt19937_64& rng) {
  if (logits.empty()) throw Error("generate", "empty logits");
  if (opt.temperature <= 0.0f) return argmax(logits);
  check_sampling_options(opt);

  // transformers' processor order: temperature, then top-k, then top-p, then softmax over the survivors.
  // Candidates in descending logit order, ties by ascending id (pick_next_token_reference's stable sort), as
  // integer keys: a radix sort, or for top-k a selection and a sort of the survivors only.
  const int64_t vocab = static_cast<int64_t>(logits.size());
  // Per-thread buffers: fresh megabyte-sized vectors per token cost more in page faults than the sort itself.
  thread_local std::vector<uint64_t> keys, scratch;
  thread_local std::vector<int32_t> order;
  candidate_keys(logits, keys);
  const bool top_k_cuts = opt.top_k > 0 && opt.top_k < vocab;
  if (top_k_cuts) {
    // The k best and whatever ties the k-th (transformers' TopKLogitsWarper keeps every token tied with the k-th
    // logit): the keys whose logit part is at most the k-th key's.
    std::nth_element(keys.begin(), keys.begin() + (opt.top_k - 1), keys.end());
    const uint64_t kth_logit = keys[static_cast<size_t>(opt.top_k - 1)] >> 32;
    keys.erase(std::partition(keys.begin(), keys.end(), [&](uint64_t k) { return (k >> 32) <= kth_logit; }),
               keys.end());
  }
  sort_keys(keys, scratch, !top_k_cuts);
  order.resize(keys.size());
  for (size_t i = 0; i < keys.size(); ++i) order[i] = static_cast<int32_t>(keys[i] & 0xffffffffu);
  return draw_from_candidates(logits, order, static_cast<int64_t>(order.size()), opt, rng);
}

std::vector<int32_t> pick_next_tokens(std::span<const float> logits, int64_t vocab, const SamplingOptions& opt,
                                      std::span<std::mt19937_64* const> rngs) {
  const auto rows = static_cast<int64_t>(rngs.size());
  if (vocab < 1 || static_cast<int64_t>(logits.size()) != rows * vocab)
    throw Error("generate", "pick_next_tokens: " + std::to_string(logits.size()) + " logits for " +
                                std::to_string(rows) + " rows of " + std::to_string(vocab));
  std::vector<int32_t> picks(static_cast<size_t>(rows));
  auto pick_row = [&](int64_t r) {
    picks[static_cast<size_t>(r)] =
        pick_next_token(logits.subspan(static_cast<size_t>(r * vocab), static_cast<size_t>(vocab)), opt, *rngs[r]);
  };
  // Greedy rows are one scan each; sampled rows sort the vocabulary, worth a thread each.
  if (opt.temperature > 0.0f && rows > 1)
    tbb::parallel_for(int64_t{0}, rows, pick_row);
  else
    for (int64_t r = 0; r < rows; ++r) pick_row(r);
  return picks;
}

int32_t pick_next_token_reference(std::span<const float> logits, const SamplingOptions& opt, std::mt19937_64& rng) {
  if (logits.empty()) throw Error("generate", "empty logits");
  if (opt.temperature <= 0.0f) return argmax(logits);
  check_sampling_options(opt);
  const int64_t vocab = static_cast<int64_t>(logits.size());
  std::vector<int32_t> order(static_cast<size_t>(vocab));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });
  int64_t keep = vocab;
  if (opt.top_k > 0) {
    keep = std::min<int64_t>(keep, opt.top_k);
    while (keep < vocab && logits[order[keep]] == logits[order[keep - 1]]) ++keep;
  }
  return draw_from_candidates(logits, order, keep, opt, rng);
}

GenerateResult generate(CpuModel& model, std::span<const int32_t> prompt, const GenerateOptions& opt,
                        const std::function<void(int32_t)>& on_token) {
  if (prompt.empty()) throw Error("generate", "empty prompt (at least a BOS token is needed)");
  if (opt.max_new_tokens < 0) throw Error("--max-new-tokens", "must be >= 0");
  std::vector<int32_t> stop_ids = opt.stop_ids;
  if (stop_ids.empty() && model.config().eos_token_id)
    stop_ids.push_back(static_cast<int32_t>(*model.config().eos_token_id));

  GenerateResult result;
  if (opt.max_new_tokens == 0) return result;
  KvCache cache(model.config(), static_cast<int64_t>(prompt.size()) + opt.max_new_tokens);
  std::mt19937_64 rng(opt.sampling.seed);
  ForwardOptions fwd = opt.forward;
  fwd.last_logits_only = true;

  std::vector<float> logits = model.forward(prompt, cache, fwd);
  while (true) {
    const int32_t next = pick_next_token(logits, opt.sampling, rng);
    result.tokens.push_back(next);
    if (on_token) on_token(next);
    if (opt.stop_at_eos && std::find(stop_ids.begin(), stop_ids.end(), next) != stop_ids.end()) {
      result.stopped_at_eos = true;
      break;
    }
    if (static_cast<int64_t>(result.tokens.size()) >= opt.max_new_tokens) break;
    logits = model.forward(std::span<const int32_t>(&next, 1), cache, fwd);
  }
  return result;
}

}  // namespace oscar::model
