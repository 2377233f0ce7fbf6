// The attention clip objective (lib/calib/clip_tuner.h): its numbers against a direct, loop-by-loop evaluation of
// the definition, and its choice on a case where the Σ_Q-weighted logit MSE clips what attention needs.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "formats/error.h"
#include "lib/calib/clip_tuner.h"
#include "lib/calib/quantizer_ref.h"
#include "lib/calib/spectral_calibration.h"

namespace oscar::calib {
namespace {

std::vector<float> identity(int64_t d) {
  std::vector<float> r(static_cast<size_t>(d * d), 0.0f);
  for (int64_t i = 0; i < d; ++i) r[i * d + i] = 1.0f;
  return r;
}

// A sequence of `tokens` keys/values of one KV head (filled by the caller) read by `heads` query heads that all
// lean on coordinate 0 (plus noise), so the keys that carry a large coordinate 0 are the ones attention goes to.
AttentionSequence leaning_queries(int64_t heads, int64_t tokens, int64_t d, float query_lean, std::mt19937_64& rng) {
  std::normal_distribution<float> n01(0.0f, 1.0f);
  AttentionSequence s;
  s.tokens = tokens;
  s.q.resize(static_cast<size_t>(heads * tokens * d));
  s.k.resize(static_cast<size_t>(tokens * d));
  s.v.resize(s.k.size());
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t t = 0; t < tokens; ++t)
      for (int64_t c = 0; c < d; ++c) s.q[(h * tokens + t) * d + c] = (c == 0 ? query_lean : 0.0f) + 0.5f * n01(rng);
  return s;
}

// One KV head read by `heads` query heads. Every query leans on coordinate 0; every `period`-th key carries a large
// coordinate 0 (the tokens attention goes to), the others are isotropic noise. So clipping the largest |k| of a token
// cuts exactly the coordinate the attended keys are attended for, while it shrinks the INT2 range of every other key.
AttentionSequence outlier_sequence(int64_t heads, int64_t tokens, int64_t d, int64_t period, float outlier,
                                   float query_lean, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> n01(0.0f, 1.0f);
  AttentionSequence s = leaning_queries(heads, tokens, d, query_lean, rng);
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t c = 0; c < d; ++c) {
      s.k[t * d + c] = n01(rng) + (c == 0 && t % period == 0 ? outlier : 0.0f);
      s.v[t * d + c] = n01(rng);
    }
  return s;
}

// Σ ‖ô − o‖² / Σ ‖o‖² by the definition, one query at a time, with K (key = true) or V quantized at `ratio`.
double direct_error(const std::vector<AttentionSequence>& seqs, int64_t heads, int64_t d, int64_t sink,
                    int64_t recent, int64_t max_queries, bool key, float ratio) {
  const auto spec = fmt::KvQuantSpec::int2_default(d);
  const HeadQuantizer qz(key ? spec.k : spec.v, d);
  double err = 0, energy = 0;
  for (const auto& s : seqs) {
    const int64_t T = s.tokens;
    std::vector<float> xq(s.k.size());
    qz.fake_quantize(key ? s.k : s.v, T, {}, ratio, Basis::Original, xq);
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t sq : scored_query_positions(T, sink, recent, max_queries)) {
        std::vector<double> l(T), lq(T);
        double m = -INFINITY, mq = -INFINITY;
        for (int64_t t = 0; t <= sq; ++t) {
          const bool quantized = t >= sink && t <= sq - recent;
          double a = 0, b = 0;
          for (int64_t c = 0; c < d; ++c) {
            const double qc = s.q[(h * T + sq) * d + c];
            a += qc * s.k[t * d + c];
            b += qc * ((key && quantized) ? xq[t * d + c] : s.k[t * d + c]);
          }
          l[t] = a / std::sqrt(double(d));
          lq[t] = b / std::sqrt(double(d));
          m = std::max(m, l[t]);
          mq = std::max(mq, lq[t]);
        }
        double z = 0, zq = 0;
        for (int64_t t = 0; t <= sq; ++t) {
          z += std::exp(l[t] - m);
          zq += std::exp(lq[t] - mq);
        }
        for (int64_t c = 0; c < d; ++c) {
          double o = 0, oq = 0;
          for (int64_t t = 0; t <= sq; ++t) {
            const bool quantized = t >= sink && t <= sq - recent;
            o += std::exp(l[t] - m) / z * s.v[t * d + c];
            oq += std::exp(lq[t] - mq) / zq * ((!key && quantized) ? xq[t * d + c] : s.v[t * d + c]);
          }
          err += (oq - o) * (oq - o);
          energy += o * o;
        }
      }
  }
  return err / energy;
}

TEST(AttentionClipObjective, MatchesTheDefinitionQueryByQuery) {
  const int64_t d = 32, heads = 2, sink = 4, recent = 16, queries = 24;
  std::vector<AttentionSequence> seqs = {outlier_sequence(heads, 160, d, 9, 5.0f, 1.5f, 1),
                                         outlier_sequence(heads, 100, d, 7, 3.0f, 1.0f, 2)};
  const auto spec = fmt::KvQuantSpec::int2_default(d);
  const auto r = identity(d);
  const AttentionClipScorer scorer(seqs, heads, 1, d, r, r, 1, spec.k, spec.v, sink, recent, queries);
  ASSERT_TRUE(scorer.reads_quantized());
  for (float ratio : {1.0f, 0.96f, 0.9f, 0.8f}) {
    const double k = direct_error(seqs, heads, d, sink, recent, queries, true, ratio);
    const double v = direct_error(seqs, heads, d, sink, recent, queries, false, ratio);
    EXPECT_GT(k, 0.0);
    EXPECT_NEAR(scorer.key_error(ratio), k, 1e-9 * k) << ratio;
    EXPECT_NEAR(scorer.value_error(ratio), v, 1e-9 * v) << ratio;
  }

  // A collector that keeps only the scored q rows gives the same numbers as one that keeps them all.
  std::vector<AttentionSequence> sparse = seqs;
  for (auto& s : sparse) {
    s.query_positions = scored_query_positions(s.tokens, sink, recent, queries);
    std::vector<float> q;
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t p : s.query_positions)
        q.insert(q.end(), s.q.begin() + (h * s.tokens + p) * d, s.q.begin() + (h * s.tokens + p + 1) * d);
    s.q = std::move(q);
  }
  const AttentionClipScorer kept(sparse, heads, 1, d, r, r, 1, spec.k, spec.v, sink, recent, queries);
  EXPECT_EQ(kept.key_error(0.9f), scorer.key_error(0.9f));
  EXPECT_EQ(kept.value_error(0.9f), scorer.value_error(0.9f));
  // ... and refuses rows kept for another query count.
  EXPECT_THROW(AttentionClipScorer(sparse, heads, 1, d, r, r, 1, spec.k, spec.v, sink, recent, queries / 2), Error);
}

// head_dim 128 (where clipping pays for MSE): most keys are small noise plus one spike in a random coordinate (so
// clipping each token's largest |k| shrinks its INT2 range a lot), and every `period`-th key instead carries a large
// coordinate 0, which every query leans on: few tokens, much of the attention.
AttentionSequence spiky_sequence(int64_t heads, int64_t tokens, int64_t d, int64_t period, float attended,
                                 float spike, float query_lean, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> n01(0.0f, 1.0f);
  std::uniform_int_distribution<int64_t> coord(1, d - 1);
  AttentionSequence s = leaning_queries(heads, tokens, d, query_lean, rng);
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t c = 0; c < d; ++c) {
      s.k[t * d + c] = 0.3f * n01(rng);
      s.v[t * d + c] = n01(rng);
    }
    if (t % period == 0) {
      s.k[t * d] += attended;
    } else {
      s.k[t * d + coord(rng)] += (t % 2 ? spike : -spike);
    }
  }
  return s;
}

TEST(AttentionClipObjective, KeepsTheOutlierCoordinateOfAttendedKeysThatLogitMseClips) {
  const int64_t d = 128, heads = 2, sink = 4, recent = 16, queries = 64;
  std::vector<AttentionSequence> seqs;
  for (uint64_t seed = 10; seed < 12; ++seed) seqs.push_back(spiky_sequence(heads, 384, d, 64, 8.0f, 8.0f, 4.0f, seed));
  const auto spec = fmt::KvQuantSpec::int2_default(d);
  const auto r = identity(d);

  // The error report's metric on the same keys (beyond the sink): Σ_Q of all queries, every key weighted equally.
  HeldoutLayer l;
  l.num_kv_heads = 1;
  l.head_dim = d;
  l.sigma_q.assign(static_cast<size_t>(d * d), 0.0);
  double nq = 0;
  for (const auto& s : seqs) {
    for (int64_t t = sink; t < s.tokens; ++t) {
      l.k.insert(l.k.end(), s.k.begin() + t * d, s.k.begin() + (t + 1) * d);
      l.v.insert(l.v.end(), s.v.begin() + t * d, s.v.begin() + (t + 1) * d);
      l.value_weight.push_back(1.0);
      ++l.tokens;
    }
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t t = 0; t < s.tokens; ++t, ++nq)
        for (int64_t i = 0; i < d; ++i)
          for (int64_t j = 0; j < d; ++j)
            l.sigma_q[i * d + j] += double(s.q[(h * s.tokens + t) * d + i]) * s.q[(h * s.tokens + t) * d + j];
  }
  for (double& x : l.sigma_q) x /= nq;
  const RotatedHeldout rotated(l, r, r, 1, spec);
  const ClipChoice old_choice = tune_clip(rotated, ClipGrid{}, 0.96f, 0.92f);

  const AttentionClipScorer scorer(seqs, heads, 1, d, r, r, 1, spec.k, spec.v, sink, recent, queries);
  const ClipChoice new_choice = tune_clip(scorer, ClipGrid{}, 0.96f, 0.92f);
  std::cout << "logit_mse picks K " << old_choice.k_ratio << ", attention picks K " << new_choice.k_ratio << "\n";

  // logit_mse clips (the range of the many unattended keys shrinks) ...
  EXPECT_LT(old_choice.k_ratio, 1.0f);
  // ... the attention objective clips less, and by its own measure the logit_mse choice is clearly worse.
  EXPECT_GT(new_choice.k_ratio, old_choice.k_ratio);
  EXPECT_GT(scorer.key_error(old_choice.k_ratio), 1.2 * new_choice.k_error);
  // The choice is the grid minimum, ties to less clipping.
  for (float ratio : ClipGrid{}.ratios()) EXPECT_LE(new_choice.k_error, scorer.key_error(ratio)) << ratio;
  EXPECT_EQ(new_choice.k_error_reference, scorer.key_error(0.96f));
}

TEST(AttentionClipObjective, RejectsBadShapes) {
  const int64_t d = 16;
  std::vector<AttentionSequence> seqs = {outlier_sequence(2, 40, d, 5, 3.0f, 1.0f, 3)};
  const auto spec = fmt::KvQuantSpec::int2_default(d);
  const auto r = identity(d);
  EXPECT_THROW(AttentionClipScorer(seqs, 3, 1, d, r, r, 1, spec.k, spec.v, 0, 8, 8), Error);  // 3 heads, q of 2
  EXPECT_THROW(AttentionClipScorer(seqs, 2, 1, d, std::vector<float>(5), r, 1, spec.k, spec.v, 0, 8, 8), Error);
  EXPECT_THROW(parse_clip_objective("kl", "--clip-objective"), Error);
  EXPECT_EQ(parse_clip_objective("logit_mse", "x"), ClipObjective::LogitMse);
  EXPECT_EQ(clip_objective_name(ClipObjective::Attention), "attention");
  // No query reads the quantized cache: every ratio scores 0, and the search keeps the data unclipped.
  const AttentionClipScorer none(seqs, 2, 1, d, r, r, 1, spec.k, spec.v, 16, 64, 8);
  EXPECT_FALSE(none.reads_quantized());
  EXPECT_EQ(tune_clip(none, ClipGrid{}, 0.96f, 0.92f).k_ratio, 1.0f);
}

}  // namespace
}  // namespace oscar::calib
