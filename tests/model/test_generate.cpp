// Token selection: greedy tie rule, sampling frequencies against the analytic softmax, the top-k / top-p
// candidate sets as transformers defines them, seed reproducibility, and EOS stopping.
#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <random>
#include <span>
#include <string>

#include "formats/error.h"
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

// pick_next_token sorts integer keys (radix, or a selection for top-k) where the definition stable-sorts every id:
// the same token and the same generator state afterwards, over rows built to stress the order: many ties (values
// on a coarse grid), -0 beside +0, infinities, a row of one value, vocabularies on both sides of the radix cutoff,
// top-k inside, at and past the ties of the k-th logit.
TEST(PickNextToken, SameTokensAndGeneratorStateAsTheStableSortDefinition) {
  std::mt19937_64 gen(2024);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  auto row_of = [&](int64_t vocab, float step) {
    std::vector<float> row(static_cast<size_t>(vocab));
    for (float& x : row) x = step > 0 ? std::round(normal(gen) / step) * step : normal(gen);
    return row;
  };
  std::vector<std::vector<float>> rows;
  for (const int64_t vocab : {1, 2, 7, 300, 2047, 2048, 5000, 151936})
    for (const float step : {0.0f, 0.25f, 2.0f}) rows.push_back(row_of(vocab, step));
  std::vector<float> signed_zeros = {0.0f, -0.0f, 0.0f, -1.0f, -0.0f, 1.0f, -0.0f, 1.0f, 0.0f};
  rows.push_back(signed_zeros);
  std::vector<float> infinities = row_of(3000, 0.5f);
  infinities[17] = INFINITY;
  infinities[2999] = INFINITY;
  infinities[5] = -INFINITY;
  for (int i = 100; i < 200; ++i) infinities[static_cast<size_t>(i)] = -INFINITY;
  rows.push_back(infinities);
  std::vector<float> minus_inf_tail = row_of(4000, 0.0f);
  for (size_t i = 1000; i < minus_inf_tail.size(); ++i) minus_inf_tail[i] = -INFINITY;
  rows.push_back(minus_inf_tail);
  rows.push_back(std::vector<float>(4096, 1.5f));

  int checked = 0;
  for (const auto& row : rows) {
    for (const int64_t top_k : {int64_t{0}, int64_t{1}, int64_t{3}, int64_t{40}, int64_t{1000}, int64_t{1} << 20})
      for (const float top_p : {1.0f, 0.9f, 0.3f})
        for (const float temperature : {0.7f, 1.0f, 4.0f}) {
          const SamplingOptions opt{temperature, top_k, top_p, 0};
          std::mt19937_64 fast_rng(checked), ref_rng(checked);
          for (int draw = 0; draw < 4; ++draw) {
            const int32_t fast = pick_next_token(row, opt, fast_rng);
            const int32_t ref = pick_next_token_reference(row, opt, ref_rng);
            ASSERT_EQ(fast, ref) << "vocab " << row.size() << " top_k " << top_k << " top_p " << top_p << " T "
                                 << temperature << " draw " << draw;
          }
          ASSERT_TRUE(fast_rng == ref_rng);
          ++checked;
        }
  }
  EXPECT_EQ(checked, static_cast<int>(rows.size()) * 6 * 3 * 3);
}

TEST(PickNextToken, TopKKeepsEveryTokenTiedWithTheKthLogit) {
  // Sorted: 5 (id 2), then 4 at ids 0, 3, 5. top_k = 2 cuts inside the tie, so all three 4s stay: with a huge
  // temperature every survivor is about equally likely, and ids 1 and 4 (logit 1) never come.
  const std::vector<float> logits = {4.f, 1.f, 5.f, 4.f, 1.f, 4.f};
  SamplingOptions opt{1e6f, 2, 1.0f, 9};
  const auto f = frequencies(logits, opt, 20000);
  EXPECT_EQ(f[1], 0.0);
  EXPECT_EQ(f[4], 0.0);
  for (const int id : {0, 2, 3, 5}) EXPECT_NEAR(f[static_cast<size_t>(id)], 0.25, 0.0125) << id;
}

TEST(PickNextToken, NanLogitIsRefusedWhenSampling) {
  std::vector<float> logits = {0.5f, NAN, 1.0f};
  std::mt19937_64 rng(1);
  EXPECT_EQ(pick_next_token(logits, {}, rng), 2);  // greedy keeps std::max_element's rule: a later NaN never wins
  const SamplingOptions opt{1.0f, 0, 1.0f, 0};
  try {
    pick_next_token(logits, opt, rng);
    FAIL() << "expected a refusal";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("token 1 is NaN"), std::string::npos) << e.what();
  }
}

// The batched picker draws row r from its own generator only: the same tokens as picking the rows one by one in
// any order, whatever the threads do.
TEST(PickNextToken, RowsPickedTogetherEqualEachAlone) {
  std::mt19937_64 gen(31);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  constexpr int64_t kRows = 9, kVocab = 3000;
  std::vector<float> logits(static_cast<size_t>(kRows * kVocab));
  for (float& x : logits) x = normal(gen);
  for (const SamplingOptions opt : {SamplingOptions{0.0f, 0, 1.0f, 0}, SamplingOptions{0.9f, 50, 0.95f, 0},
                                    SamplingOptions{1.2f, 0, 1.0f, 0}}) {
    std::vector<std::mt19937_64> together, alone;
    for (int64_t r = 0; r < kRows; ++r) {
      together.emplace_back(100 + r);
      alone.emplace_back(100 + r);
    }
    std::vector<std::mt19937_64*> ptrs;
    for (auto& g : together) ptrs.push_back(&g);
    for (int round = 0; round < 3; ++round) {
      const std::vector<int32_t> picks = pick_next_tokens(logits, kVocab, opt, ptrs);
      ASSERT_EQ(picks.size(), static_cast<size_t>(kRows));
      for (int64_t r = kRows - 1; r >= 0; --r) {
        const std::span<const float> row(logits.data() + r * kVocab, static_cast<size_t>(kVocab));
        EXPECT_EQ(picks[static_cast<size_t>(r)], pick_next_token(row, opt, alone[static_cast<size_t>(r)]))
            << "row " << r << " round " << round << " T " << opt.temperature;
      }
    }
    for (int64_t r = 0; r < kRows; ++r) EXPECT_TRUE(together[r] == alone[r]) << r;
  }
  std::vector<std::mt19937_64*> two(2, nullptr);
  EXPECT_THROW(pick_next_tokens(logits, kVocab, SamplingOptions{}, two), Error);
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
