// Token selection: greedy tie rule, sampling frequencies against the analytic softmax, the top-k / top-p
// candidate sets as transformers defines them, seed reproducibility, and EOS stopping.
#include <gtest/gtest.h>

#include <cmath>
#include <map>

#include "lib/model/generate.h"

namespace oscar::model {
namespace {

std::vector<float> log_probs(const std::vector<double>& p) {
  std::vector<float> l;
  for (double x : p) l.push_back(static_cast<float>(std::log(x)));
  return l;
}

std::vector<double> frequencies(const std::vector<float>& logits, const SamplingOptions& opt, int draws) {
  std::mt19937_64 rng(opt.seed);
  std::vector<double> f(logits.size(), 0.0);
  for (int i = 0; i < draws; ++i) f[pick_next_token(logits, opt, rng)] += 1.0 / draws;
  return f;
}

TEST(PickNextToken, GreedyTakesTheFirstMaximum) {
  std::mt19937_64 rng(0);
  const std::vector<float> logits = {0.f, 3.f, -1.f, 3.f};
  EXPECT_EQ(pick_next_token(logits, {}, rng), 1);
}

TEST(PickNextToken, TemperatureOneSamplesTheSoftmax) {
  const std::vector<double> p = {0.5, 0.25, 0.15, 0.1};
  SamplingOptions opt;
  opt.temperature = 1.0f;
  opt.seed = 11;
  const auto f = frequencies(log_probs(p), opt, 40000);
  // 40000 draws: binomial standard deviation <= 0.0025; 5 sigma.
  for (size_t i = 0; i < p.size(); ++i) EXPECT_NEAR(f[i], p[i], 0.0125) << i;
}

TEST(PickNextToken, TemperatureSharpensAsPowerOfProbabilities) {
  // softmax(log p / T) ∝ p^(1/T): with T = 0.5 the weights are p² normalised.
  const std::vector<double> p = {0.5, 0.3, 0.2};
  SamplingOptions opt;
  opt.temperature = 0.5f;
  opt.seed = 5;
  const auto f = frequencies(log_probs(p), opt, 40000);
  const double z = 0.25 + 0.09 + 0.04;
  EXPECT_NEAR(f[0], 0.25 / z, 0.0125);
  EXPECT_NEAR(f[1], 0.09 / z, 0.0125);
  EXPECT_NEAR(f[2], 0.04 / z, 0.0125);
}

TEST(PickNextToken, TopKRenormalisesOverTheKBest) {
  const std::vector<double> p = {0.1, 0.4, 0.2, 0.3};
  SamplingOptions opt;
  opt.temperature = 1.0f;
  opt.top_k = 2;
  opt.seed = 3;
  const auto f = frequencies(log_probs(p), opt, 40000);
  EXPECT_EQ(f[0], 0.0);
  EXPECT_EQ(f[2], 0.0);
  EXPECT_NEAR(f[1], 0.4 / 0.7, 0.0125);
  EXPECT_NEAR(f[3], 0.3 / 0.7, 0.0125);
}

TEST(PickNextToken, TopPKeepsTheSmallestNucleusReachingP) {
  // Sorted: 0.4, 0.3, 0.2, 0.1. transformers removes tokens whose ascending cumulative mass is <= 1 - top_p;
  // with top_p = 0.6 that removes 0.1 (0.1) and 0.2 (0.3) and keeps {0.4, 0.3}.
  const std::vector<double> p = {0.2, 0.4, 0.1, 0.3};
  SamplingOptions opt;
  opt.temperature = 1.0f;
  opt.top_p = 0.6f;
  opt.seed = 8;
  const auto f = frequencies(log_probs(p), opt, 40000);
  EXPECT_EQ(f[0], 0.0);
  EXPECT_EQ(f[2], 0.0);
  EXPECT_NEAR(f[1], 4.0 / 7.0, 0.0125);
  EXPECT_NEAR(f[3], 3.0 / 7.0, 0.0125);
  // A tiny top_p keeps only the best token.
  opt.top_p = 0.01f;
  const auto g = frequencies(log_probs(p), opt, 1000);
  EXPECT_NEAR(g[1], 1.0, 1e-9);  // a sum of 1000 increments of 0.001
}

TEST(PickNextToken, SameSeedSameSequenceAndBadOptionsThrow) {
  const std::vector<float> logits = {0.1f, 0.2f, 0.3f, 0.4f, 0.5f};
  SamplingOptions opt;
  opt.temperature = 1.5f;
  opt.seed = 77;
  std::mt19937_64 a(77), b(77), c(78);
  std::vector<int32_t> sa, sb, sc;
  for (int i = 0; i < 64; ++i) {
    sa.push_back(pick_next_token(logits, opt, a));
    sb.push_back(pick_next_token(logits, opt, b));
    sc.push_back(pick_next_token(logits, opt, c));
  }
  EXPECT_EQ(sa, sb);
  EXPECT_NE(sa, sc);
  opt.top_p = 1.5f;
  EXPECT_THROW(pick_next_token(logits, opt, a), std::exception);
}

fmt::ModelConfig tiny_config() {
  fmt::ModelConfig c;
  c.hidden_size = 32;
  c.num_layers = 2;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.head_dim = 8;
  c.intermediate_size = 48;
  c.vocab_size = 41;
  c.max_position_embeddings = 128;
  c.tie_word_embeddings = true;
  return c;
}

TEST(Generate, GreedyEqualsArgmaxOfFullForwardAndStopsAtEos) {
  auto cfg = tiny_config();
  auto model = CpuModel::random(cfg, 21);
  const std::vector<int32_t> prompt = {3, 17, 5};
  GenerateOptions opt;
  opt.max_new_tokens = 10;
  opt.stop_at_eos = false;
  const auto out = generate(*model, prompt, opt);
  ASSERT_EQ(out.tokens.size(), 10u);
  EXPECT_FALSE(out.stopped_at_eos);
  // Recompute each step with a full forward over the whole sequence so far.
  std::vector<int32_t> seq = prompt;
  for (int32_t tok : out.tokens) {
    KvCache cache(cfg, static_cast<int64_t>(seq.size()));
    const auto logits = model->forward(seq, cache);
    const float* last = logits.data() + (seq.size() - 1) * cfg.vocab_size;
    EXPECT_EQ(std::max_element(last, last + cfg.vocab_size) - last, tok);
    seq.push_back(tok);
  }
  // Declaring the 4th generated token a stop id ends decoding right there, keeping the stop token.
  opt.stop_at_eos = true;
  opt.stop_ids = {out.tokens[3]};
  const auto stopped = generate(*model, prompt, opt);
  EXPECT_TRUE(stopped.stopped_at_eos);
  const auto first = std::find(out.tokens.begin(), out.tokens.end(), out.tokens[3]);
  EXPECT_EQ(stopped.tokens, std::vector<int32_t>(out.tokens.begin(), first + 1));
}

TEST(Generate, SampledDecodingIsReproducibleBySeed) {
  auto model = CpuModel::random(tiny_config(), 4);
  const std::vector<int32_t> prompt = {1, 2};
  GenerateOptions opt;
  opt.max_new_tokens = 24;
  opt.stop_at_eos = false;
  opt.sampling.temperature = 50.0f;  // random weights give near-flat logits; a high temperature keeps them flat
  opt.sampling.seed = 9;
  const auto a = generate(*model, prompt, opt), b = generate(*model, prompt, opt);
  EXPECT_EQ(a.tokens, b.tokens);
  opt.sampling.seed = 10;
  EXPECT_NE(generate(*model, prompt, opt).tokens, a.tokens);
}

}  // namespace
}  // namespace oscar::model
