#include "lib/eval/metrics.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>

#include "formats/error.h"

namespace oscar::eval {
namespace {

// log-softmax of one row in double: the KL of two close distributions is a difference of nearly equal terms.
void log_softmax(std::span<const float> logits, std::vector<double>& out) {
  out.resize(logits.size());
  double max_logit = -std::numeric_limits<double>::infinity();
  for (float v : logits) max_logit = std::max(max_logit, static_cast<double>(v));
  double sum = 0;
  for (float v : logits) sum += std::exp(static_cast<double>(v) - max_logit);
  const double log_z = max_logit + std::log(sum);
  for (size_t i = 0; i < logits.size(); ++i) out[i] = static_cast<double>(logits[i]) - log_z;
}

size_t argmax(std::span<const float> v) { return static_cast<size_t>(std::max_element(v.begin(), v.end()) - v.begin()); }

}  // namespace

std::vector<PositionMetrics> compare_positions(std::span<const float> reference_logits,
                                               std::span<const float> mode_logits, int64_t vocab,
                                               std::span<const int32_t> targets) {
  const auto rows = static_cast<int64_t>(targets.size());
  if (vocab <= 0 || static_cast<int64_t>(reference_logits.size()) < rows * vocab ||
      static_cast<int64_t>(mode_logits.size()) < rows * vocab)
    throw Error("compare_positions", ::fmt::format("logits hold fewer than {} rows of {}", rows, vocab));
  std::vector<PositionMetrics> out(static_cast<size_t>(rows));
  std::vector<double> lp_ref, lp_mode;
  for (int64_t t = 0; t < rows; ++t) {
    const auto off = static_cast<size_t>(t * vocab);
    auto ref = reference_logits.subspan(off, static_cast<size_t>(vocab));
    auto mode = mode_logits.subspan(off, static_cast<size_t>(vocab));
    if (targets[t] < 0 || targets[t] >= vocab)
      throw Error("compare_positions", ::fmt::format("target {} at position {} outside the vocabulary", targets[t], t));
    log_softmax(ref, lp_ref);
    log_softmax(mode, lp_mode);
    double kl = 0;
    for (int64_t i = 0; i < vocab; ++i) {
      const double p = std::exp(lp_ref[i]);
      if (p > 0) kl += p * (lp_ref[i] - lp_mode[i]);
    }
    // Rounding can make a KL of identical distributions a tiny negative number; KL is >= 0 by definition.
    out[t] = {-lp_mode[static_cast<size_t>(targets[t])], std::max(kl, 0.0), argmax(ref) == argmax(mode)};
  }
  return out;
}

double percentile_nearest_rank(std::vector<double> values, double q) {
  if (values.empty()) return std::numeric_limits<double>::quiet_NaN();
  std::sort(values.begin(), values.end());
  const auto n = static_cast<double>(values.size());
  auto rank = static_cast<int64_t>(std::ceil(q / 100.0 * n));
  rank = std::clamp<int64_t>(rank, 1, static_cast<int64_t>(values.size()));
  return values[static_cast<size_t>(rank - 1)];
}

MetricSummary summarize(std::span<const PositionMetrics> positions) {
  MetricSummary s;
  s.positions = static_cast<int64_t>(positions.size());
  if (positions.empty()) {
    const double nan = std::numeric_limits<double>::quiet_NaN();
    s.nll_mean = s.perplexity = s.kl_mean = s.kl_p99 = s.top1_agreement = nan;
    return s;
  }
  double nll = 0, kl = 0;
  int64_t agree = 0;
  std::vector<double> kls;
  kls.reserve(positions.size());
  for (const auto& p : positions) {
    nll += p.nll;
    kl += p.kl;
    agree += p.top1_agrees ? 1 : 0;
    kls.push_back(p.kl);
  }
  const auto n = static_cast<double>(positions.size());
  s.nll_mean = nll / n;
  s.perplexity = std::exp(s.nll_mean);
  s.kl_mean = kl / n;
  s.kl_p99 = percentile_nearest_rank(std::move(kls), 99.0);
  s.top1_agreement = static_cast<double>(agree) / n;
  return s;
}

int64_t tokens_until_divergence(std::span<const int32_t> a, std::span<const int32_t> b) {
  const size_t n = std::min(a.size(), b.size());
  size_t i = 0;
  while (i < n && a[i] == b[i]) ++i;
  return static_cast<int64_t>(i);
}

std::string_view retrieval_task_name(RetrievalTask task) {
  return task == RetrievalTask::Passkey ? "passkey" : "needle";
}

namespace {

// Prose filler for the needle task: varied sentences, so the needle is not the only non-repetitive text.
constexpr const char* kNeedleFiller[] = {
    " The river bends twice before it reaches the old mill.",
    " Most of the town's bakeries open before sunrise.",
    " A committee met on Tuesday to discuss the new library hours.",
    " The museum added a wing for maps drawn by early sailors.",
    " Rain is expected to continue through the weekend in the hills.",
    " Several students built a small telescope from spare parts.",
    " The orchard produces apples, pears and a few late plums.",
    " Trains to the coast leave every hour during the summer.",
    " The recipe calls for butter, flour, salt and cold water.",
    " An old clock in the square has not kept time for years.",
};
constexpr const char* kCities[] = {"Lisbon", "Oslo",  "Nairobi", "Kyoto",   "Quito",
                                   "Tallinn", "Perth", "Toronto", "Cordoba", "Hanoi"};

}  // namespace

RetrievalPrompt make_retrieval_prompt(const fmt::Tokenizer& tok, RetrievalTask task, int64_t length, double depth,
                                      uint64_t seed) {
  if (!(depth >= 0.0 && depth <= 1.0)) throw Error("retrieval prompt", ::fmt::format("depth {} is outside [0, 1]", depth));
  std::mt19937_64 rng(seed);
  RetrievalPrompt p;
  std::string intro, needle, question;
  std::vector<std::vector<int32_t>> filler_units;
  if (task == RetrievalTask::Passkey) {
    p.answer = std::to_string(10000 + rng() % 90000);
    intro = "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
            "I will quiz you about the important information there.";
    // The key sentence three times, worded exactly as the question ends: a small model retrieves by copying
    // (induction), and one mention loses against the filler's hundreds of "... is green." (qwen3-tiny-trained in
    // bf16 answers "green" to the single-mention "The pass key is 68142. Remember it. 68142 is the pass key.").
    needle = ::fmt::format(" The pass key is {0}. The pass key is {0}. The pass key is {0}.", p.answer);
    question = " What is the pass key? The pass key is";
    filler_units.push_back(
        tok.encode(" The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.", false));
  } else {
    p.answer = std::to_string(1000000 + rng() % 9000000);
    const std::string city = kCities[rng() % std::size(kCities)];
    intro = "Read the following text carefully; a question about one detail follows it.";
    needle = ::fmt::format(" The special magic number for {} is: {}.", city, p.answer);
    question = ::fmt::format(" What is the special magic number for {}? The special magic number for {} is:", city, city);
    const size_t first = static_cast<size_t>(rng() % std::size(kNeedleFiller));
    for (size_t i = 0; i < std::size(kNeedleFiller); ++i)
      filler_units.push_back(tok.encode(kNeedleFiller[(first + i) % std::size(kNeedleFiller)], false));
  }
  const std::vector<int32_t> intro_ids = tok.encode(intro, true);
  const std::vector<int32_t> needle_ids = tok.encode(needle, false);
  const std::vector<int32_t> question_ids = tok.encode(question, false);
  const int64_t fixed = static_cast<int64_t>(intro_ids.size() + needle_ids.size() + question_ids.size());
  const int64_t budget = length - fixed;
  if (budget < 0)
    throw Error("retrieval prompt", ::fmt::format("length {} is shorter than the {} tokens of intro, needle and "
                                                  "question",
                                                  length, fixed));
  // Filler: whole sentences cycled until the budget is filled; the last one may be cut. The needle goes on a
  // sentence boundary at `depth` of the whole sentences.
  std::vector<int32_t> filler;
  std::vector<int64_t> boundaries = {0};
  for (size_t u = 0; static_cast<int64_t>(filler.size()) < budget; u = (u + 1) % filler_units.size()) {
    filler.insert(filler.end(), filler_units[u].begin(), filler_units[u].end());
    if (static_cast<int64_t>(filler.size()) <= budget) boundaries.push_back(static_cast<int64_t>(filler.size()));
  }
  filler.resize(static_cast<size_t>(budget));
  const auto slot = static_cast<size_t>(std::llround(depth * static_cast<double>(boundaries.size() - 1)));
  const int64_t insert_at = boundaries[slot];
  p.ids = intro_ids;
  p.ids.insert(p.ids.end(), filler.begin(), filler.begin() + insert_at);
  p.needle_token = static_cast<int64_t>(p.ids.size());
  p.ids.insert(p.ids.end(), needle_ids.begin(), needle_ids.end());
  p.ids.insert(p.ids.end(), filler.begin() + insert_at, filler.end());
  p.ids.insert(p.ids.end(), question_ids.begin(), question_ids.end());
  return p;
}

bool retrieval_success(std::string_view continuation, std::string_view answer) {
  return !answer.empty() && continuation.find(answer) != std::string_view::npos;
}

KvFootprint kv_footprint(const CacheFormat& format, int64_t context) {
  KvFootprint f;
  f.context = context;
  if (context <= 0) return f;
  const CacheWindows w = format.windows();
  // Tokens a decode cache of `context` tokens holds quantized (the newest query's view; the same rule as
  // SimulatedCacheAttention's quantization).
  auto quantized_tokens = [&](int64_t group) {
    const int64_t span = context - w.recent - w.sink;
    return span <= 0 ? int64_t{0} : (span / group) * group;
  };
  const int64_t qk = quantized_tokens(format.key_group_tokens());
  const int64_t qv = quantized_tokens(format.value_group_tokens());
  const double d = static_cast<double>(format.head_dim());
  const double heads = static_cast<double>(format.num_layers() * format.num_kv_heads());
  const ElementCost cost = format.element_cost();
  auto tensor_bits = [&](int64_t quantized, double bits) {
    return heads * d * (static_cast<double>(context - quantized) * 16.0 + static_cast<double>(quantized) * bits);
  };
  const double total_bits = tensor_bits(qk, cost.key_bits) + tensor_bits(qv, cost.value_bits);
  const double elements = 2.0 * heads * d * static_cast<double>(context);
  f.bytes_per_token = total_bits / 8.0 / static_cast<double>(context);
  f.bits_per_element = total_bits / elements;
  f.quantized_fraction = static_cast<double>(qk + qv) / (2.0 * static_cast<double>(context));
  return f;
}

}  // namespace oscar::eval
