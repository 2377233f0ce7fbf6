#include "lib/model/generate.h"

#include <algorithm>
#include <cmath>
#include <numeric>

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

}  // namespace

int32_t pick_next_token(std::span<const float> logits, const SamplingOptions& opt, std::mt19937_64& rng) {
  if (logits.empty()) throw Error("generate", "empty logits");
  if (opt.temperature <= 0.0f) return argmax(logits);
  if (opt.top_p <= 0.0f || opt.top_p > 1.0f)
    throw Error("--top-p", "must be in (0, 1], got " + std::to_string(opt.top_p));
  if (opt.top_k < 0) throw Error("--top-k", "must be >= 0, got " + std::to_string(opt.top_k));

  // transformers' processor order: temperature, then top-k, then top-p, then softmax over the survivors.
  const int64_t vocab = static_cast<int64_t>(logits.size());
  std::vector<int32_t> order(static_cast<size_t>(vocab));
  std::iota(order.begin(), order.end(), 0);
  // Stable sort by descending logit, ties by ascending id: the candidate order is fully determined.
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });
  int64_t keep = vocab;
  if (opt.top_k > 0) {
    keep = std::min<int64_t>(keep, opt.top_k);
    // transformers' TopKLogitsWarper keeps every token tied with the k-th logit.
    while (keep < vocab && logits[order[keep]] == logits[order[keep - 1]]) ++keep;
  }

  std::vector<double> prob(static_cast<size_t>(keep));
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
