// StatisticsCollector against a naive re-computation, bit-exact merges and checkpoint round trips.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "formats/error.h"
#include "lib/calib/statistics.h"
#include "test_support.h"

namespace oscar::calib {
namespace {

// One synthetic sequence: q [H, T, d], k/v [Hkv, T, d] for every layer.
struct Sequence {
  int64_t tokens = 0;
  std::vector<std::vector<float>> q, k, v;  // per layer
};

const StatisticsShape kShape{2, 4, 2, 8};  // 2 layers, GQA 4 query heads on 2 KV heads, head_dim 8

Sequence make_sequence(uint64_t seed, int64_t tokens, const StatisticsShape& s = kShape) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal;
  Sequence seq;
  seq.tokens = tokens;
  for (int64_t l = 0; l < s.num_layers; ++l) {
    std::vector<float> q(s.num_heads * tokens * s.head_dim), k(s.num_kv_heads * tokens * s.head_dim), v(k.size());
    // Channel scales make the moments anisotropic, so a transposed index would not go unnoticed.
    for (size_t i = 0; i < q.size(); ++i) q[i] = normal(rng) * (1.0f + float(i % s.head_dim));
    for (size_t i = 0; i < k.size(); ++i) k[i] = normal(rng) * (0.5f + 0.25f * float(i % s.head_dim));
    for (size_t i = 0; i < v.size(); ++i) v[i] = normal(rng) + 0.1f * float(i % 3);
    seq.q.push_back(std::move(q));
    seq.k.push_back(std::move(k));
    seq.v.push_back(std::move(v));
  }
  return seq;
}

void feed(model::Observer& obs, const Sequence& seq, const StatisticsShape& s = kShape) {
  for (int64_t l = 0; l < s.num_layers; ++l) {
    model::AttentionInputs in;
    in.layer = l;
    in.num_tokens = seq.tokens;
    in.pos0 = 0;
    in.num_heads = s.num_heads;
    in.num_kv_heads = s.num_kv_heads;
    in.head_dim = s.head_dim;
    in.q = seq.q[l].data();
    in.k = seq.k[l].data();
    in.k_pre_rope = seq.k[l].data();
    in.v = seq.v[l].data();
    obs.on_attention_inputs(in);
  }
}

std::vector<Sequence> make_sequences(int n) {
  std::vector<Sequence> out;
  for (int i = 0; i < n; ++i) out.push_back(make_sequence(100 + i, 5 + 3 * i));
  return out;
}

// ---- the naive reference: straight from the definitions in statistics.h / compute_kv_rotation.py

struct Naive {
  std::vector<double> sigma_q, sigma_v;
};

std::vector<double> naive_mass(const Sequence& seq, int64_t layer, int64_t h, const StatisticsShape& s) {
  const int64_t T = seq.tokens, d = s.head_dim, group = s.num_heads / s.num_kv_heads;
  std::vector<double> mass(T, 0.0);
  for (int64_t g = 0; g < group; ++g) {
    const float* q = seq.q[layer].data() + (h * group + g) * T * d;
    const float* k = seq.k[layer].data() + h * T * d;
    for (int64_t i = 0; i < T; ++i) {
      std::vector<double> logit(i + 1);
      double z = 0;
      for (int64_t j = 0; j <= i; ++j) {
        double dot = 0;
        for (int64_t c = 0; c < d; ++c) dot += double(q[i * d + c]) * k[j * d + c];
        logit[j] = std::exp(dot / std::sqrt(double(d)));
        z += logit[j];
      }
      for (int64_t j = 0; j <= i; ++j) mass[j] += logit[j] / z;
    }
  }
  return mass;
}

Naive naive(const std::vector<Sequence>& seqs, int64_t layer, int64_t h, ValueWeighting weighting,
            const StatisticsShape& s = kShape) {
  const int64_t d = s.head_dim, group = s.num_heads / s.num_kv_heads;
  Naive out;
  out.sigma_q.assign(d * d, 0.0);
  out.sigma_v.assign(d * d, 0.0);
  double nq = 0;
  for (const auto& seq : seqs)
    for (int64_t g = 0; g < group; ++g)
      for (int64_t t = 0; t < seq.tokens; ++t) {
        const float* q = seq.q[layer].data() + ((h * group + g) * seq.tokens + t) * d;
        for (int64_t i = 0; i < d; ++i)
          for (int64_t j = 0; j < d; ++j) out.sigma_q[i * d + j] += double(q[i]) * q[j];
        nq += 1;
      }
  for (auto& x : out.sigma_q) x /= nq;
  double wsum = 0;
  for (const auto& seq : seqs) {
    const std::vector<double> mass =
        weighting == ValueWeighting::AttentionMass ? naive_mass(seq, layer, h, s) : std::vector<double>();
    for (int64_t t = 0; t < seq.tokens; ++t) {
      const float* k = seq.k[layer].data() + (h * seq.tokens + t) * d;
      const float* v = seq.v[layer].data() + (h * seq.tokens + t) * d;
      double w = 1.0;
      if (weighting == ValueWeighting::QueryEnergy) {
        w = 0;
        for (int64_t i = 0; i < d; ++i)
          for (int64_t j = 0; j < d; ++j) w += double(k[i]) * out.sigma_q[i * d + j] * k[j];
      } else if (weighting == ValueWeighting::AttentionMass) {
        w = mass[t];
      }
      for (int64_t i = 0; i < d; ++i)
        for (int64_t j = 0; j < d; ++j) out.sigma_v[i * d + j] += w * double(v[i]) * v[j];
      wsum += w;
    }
  }
  for (auto& x : out.sigma_v) x /= wsum;
  return out;
}

void expect_close(const std::vector<double>& got, const std::vector<double>& want, double rel, const char* what) {
  ASSERT_EQ(got.size(), want.size());
  double scale = 0;
  for (double x : want) scale = std::max(scale, std::abs(x));
  for (size_t i = 0; i < got.size(); ++i) EXPECT_NEAR(got[i], want[i], rel * scale) << what << " [" << i << "]";
}

StatisticsCollector collect(const std::vector<Sequence>& seqs, ValueWeighting w, std::vector<int> order = {}) {
  if (order.empty())
    for (size_t i = 0; i < seqs.size(); ++i) order.push_back(int(i));
  StatisticsCollector c(kShape, w);
  for (int i : order) {
    c.begin_sequence(i);
    feed(c, seqs[i]);
  }
  if (c.needs_value_pass()) {
    c.start_value_pass();
    for (int i : order) {
      c.begin_sequence(i);
      feed(c, seqs[i]);
    }
  }
  c.finish_sequence();
  return c;
}

class StatisticsWeighting : public ::testing::TestWithParam<ValueWeighting> {};

TEST_P(StatisticsWeighting, MatchesNaiveComputation) {
  const auto seqs = make_sequences(5);
  StatisticsCollector c = collect(seqs, GetParam());
  for (int64_t l = 0; l < kShape.num_layers; ++l)
    for (int64_t h = 0; h < kShape.num_kv_heads; ++h) {
      const Naive ref = naive(seqs, l, h, GetParam());
      const HeadMoments m = c.head_moments(l, h);
      expect_close(m.sigma_q, ref.sigma_q, 1e-12, "sigma_q");
      expect_close(m.sigma_v, ref.sigma_v, 1e-12, "sigma_v");
      double tokens = 0;
      for (const auto& s : seqs) tokens += double(s.tokens);
      EXPECT_EQ(m.query_vectors, tokens * 2);  // group of 2 query heads
      EXPECT_EQ(m.value_tokens, tokens);
    }
  // The layer moment is the mean of the KV heads' moments (compute_qqt / compute_sst divide by kv_heads).
  const HeadMoments mean = c.layer_moments(1);
  const HeadMoments h0 = c.head_moments(1, 0), h1 = c.head_moments(1, 1);
  for (size_t i = 0; i < mean.sigma_q.size(); ++i) {
    EXPECT_DOUBLE_EQ(mean.sigma_q[i], 0.5 * h0.sigma_q[i] + 0.5 * h1.sigma_q[i]);
    EXPECT_DOUBLE_EQ(mean.sigma_v[i], 0.5 * h0.sigma_v[i] + 0.5 * h1.sigma_v[i]);
  }
}

INSTANTIATE_TEST_SUITE_P(AllWeightings, StatisticsWeighting,
                         ::testing::Values(ValueWeighting::QueryEnergy, ValueWeighting::AttentionMass,
                                           ValueWeighting::Uniform));

TEST(AttentionMass, SumsToTheNumberOfQueries) {
  const Sequence seq = make_sequence(5, 9);
  model::AttentionInputs in{0, 9, 0, 4, 2, 8, seq.q[0].data(), seq.k[0].data(), seq.k[0].data(), seq.v[0].data()};
  std::vector<double> mass(9);
  attention_mass(in, 1, mass);
  double total = 0;
  for (double m : mass) total += m;
  EXPECT_NEAR(total, 2.0 * 9, 1e-12);  // every softmax row sums to 1; 2 query heads × 9 positions
  // The last key is seen by the last query only.
  const auto ref = naive_mass(seq, 0, 1, kShape);
  for (int t = 0; t < 9; ++t) EXPECT_NEAR(mass[t], ref[t], 1e-12);
  in.pos0 = 3;
  EXPECT_THROW(attention_mass(in, 1, mass), Error);
}

TEST(StatisticsMerge, TwoHalvesEqualOnePassBitExactly) {
  const auto seqs = make_sequences(7);
  for (ValueWeighting w : {ValueWeighting::Uniform, ValueWeighting::QueryEnergy}) {
    StatisticsCollector one = collect(seqs, w);
    // Halves [0, 3) and [3, 7), fed in scrambled order; for the query weighting the merged Σ_Q is frozen and
    // both workers run their value pass with it, as two GPUs would.
    StatisticsCollector a(kShape, w), b(kShape, w);
    for (int i : {2, 0, 1}) {
      a.begin_sequence(i);
      feed(a, seqs[i]);
    }
    for (int i : {6, 3, 5, 4}) {
      b.begin_sequence(i);
      feed(b, seqs[i]);
    }
    a.finish_sequence();
    b.finish_sequence();
    a.merge(b);
    if (w == ValueWeighting::QueryEnergy) {
      a.start_value_pass();
      // The second worker starts its value pass from the same frozen Σ_Q (shipped as a checkpoint image).
      StatisticsCollector b2 = StatisticsCollector::deserialize(a.serialize(), "frozen");
      for (int i : {0, 2, 1}) {
        a.begin_sequence(i);
        feed(a, seqs[i]);
      }
      for (int i : {4, 6, 5, 3}) {
        b2.begin_sequence(i);
        feed(b2, seqs[i]);
      }
      b2.finish_sequence();
      a.merge(b2);
    }
    EXPECT_EQ(a.num_sequences(), 7);
    EXPECT_EQ(a.serialize(), one.serialize()) << value_weighting_name(w);
    for (int64_t l = 0; l < kShape.num_layers; ++l) {
      const HeadMoments x = a.layer_moments(l), y = one.layer_moments(l);
      EXPECT_EQ(x.sigma_q, y.sigma_q);
      EXPECT_EQ(x.sigma_v, y.sigma_v);
    }
  }
}

TEST(StatisticsMerge, RejectsOverlapsAndMismatches) {
  const auto seqs = make_sequences(3);
  StatisticsCollector a(kShape, ValueWeighting::Uniform), b(kShape, ValueWeighting::Uniform);
  a.begin_sequence(0);
  feed(a, seqs[0]);
  b.begin_sequence(0);
  feed(b, seqs[0]);
  b.finish_sequence();
  EXPECT_THROW(a.merge(b), Error);
  EXPECT_THROW(a.begin_sequence(0), Error);  // already collected
  StatisticsCollector other(kShape, ValueWeighting::AttentionMass);
  EXPECT_THROW(a.merge(other), Error);
  StatisticsCollector no_sequence(kShape, ValueWeighting::Uniform);
  EXPECT_THROW(feed(no_sequence, seqs[0]), Error);
  StatisticsCollector query(kShape, ValueWeighting::QueryEnergy);
  query.begin_sequence(0);
  feed(query, seqs[0]);
  EXPECT_THROW(query.head_moments(0, 0), Error);  // Σ_V needs the value pass
}

TEST(StatisticsCheckpoint, RoundTripsAndRejectsDamage) {
  const auto seqs = make_sequences(4);
  StatisticsCollector c = collect(seqs, ValueWeighting::QueryEnergy);
  const std::string bytes = c.serialize();
  StatisticsCollector back = StatisticsCollector::deserialize(bytes, "ckpt");
  EXPECT_EQ(back.serialize(), bytes);
  EXPECT_EQ(back.head_moments(1, 1).sigma_v, c.head_moments(1, 1).sigma_v);
  EXPECT_TRUE(back.contains_sequence(3));
  EXPECT_FALSE(back.contains_sequence(4));
  try {
    StatisticsCollector::deserialize(std::string_view(bytes).substr(0, bytes.size() - 9), "ckpt.bin");
    FAIL() << "truncated checkpoint accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.where(), "ckpt.bin");
  }
  EXPECT_THROW(StatisticsCollector::deserialize("not a checkpoint", "x"), Error);
  // Resuming mid-pass: a checkpoint after 2 sequences plus the remaining 2 equals the full pass.
  StatisticsCollector part(kShape, ValueWeighting::Uniform);
  for (int i : {0, 1}) {
    part.begin_sequence(i);
    feed(part, seqs[i]);
  }
  StatisticsCollector resumed = StatisticsCollector::deserialize(part.serialize(), "ckpt");
  for (int i : {2, 3}) {
    resumed.begin_sequence(i);
    feed(resumed, seqs[i]);
  }
  EXPECT_EQ(resumed.serialize(), collect(seqs, ValueWeighting::Uniform).serialize());
}

}  // namespace
}  // namespace oscar::calib
