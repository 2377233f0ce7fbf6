// SimulatedCacheAttention against independent references: a brute-force per-query attention in double, the same
// backend fed in chunks, and true token-by-token decoding through a cache that is rewritten in place as tokens leave
// the window (what a decode-time quantized cache does).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <random>
#include <sstream>

#include "formats/error.h"
#include "formats/tokenizer.h"
#include "lib/eval/cache_modes.h"
#include "lib/eval/evaluator.h"
#include "lib/eval/metrics.h"
#include "lib/eval/simulated_attention.h"
#include "lib/model/cpu_model.h"
#include "test_support.h"

namespace oscar::eval {
namespace {

constexpr int64_t kHeads = 4, kKvHeads = 2, kDim = 16, kStride = 120;

fmt::ModelConfig synthetic_config() {
  fmt::ModelConfig cfg;
  cfg.hidden_size = 64;
  cfg.num_layers = 1;
  cfg.num_heads = kHeads;
  cfg.num_kv_heads = kKvHeads;
  cfg.head_dim = kDim;
  cfg.vocab_size = 16;
  cfg.max_position_embeddings = 1024;
  return cfg;
}

struct SyntheticLayer {
  int64_t tokens;
  std::vector<float> q, k, v;  // q [heads, T, d]; k/v [kv_heads, stride, d]
  explicit SyntheticLayer(int64_t t, uint64_t seed) : tokens(t) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> n(0.f, 1.f);
    q.resize(kHeads * t * kDim);
    k.assign(kKvHeads * kStride * kDim, 0.f);
    v.assign(kKvHeads * kStride * kDim, 0.f);
    for (float& x : q) x = 2.0f * n(rng);
    for (int64_t h = 0; h < kKvHeads; ++h)
      for (int64_t j = 0; j < t; ++j)
        for (int64_t i = 0; i < kDim; ++i) {
          // A few outlier channels, as real keys have, so that the formats differ.
          k[(h * kStride + j) * kDim + i] = n(rng) * (i % 5 == 0 ? 6.f : 1.f);
          v[(h * kStride + j) * kDim + i] = n(rng);
        }
  }
  // Runs queries [t0, t1) (their K/V must already be in k/v).
  std::vector<float> run(model::AttentionBackend& backend, int64_t t0, int64_t t1) const {
    const int64_t T = t1 - t0;
    std::vector<float> qs(kHeads * T * kDim), out(T * kHeads * kDim);
    for (int64_t h = 0; h < kHeads; ++h)
      std::copy_n(q.begin() + (h * tokens + t0) * kDim, T * kDim, qs.begin() + h * T * kDim);
    model::AttentionCall c;
    c.layer = 0;
    c.num_tokens = T;
    c.pos0 = t0;
    c.num_heads = kHeads;
    c.num_kv_heads = kKvHeads;
    c.head_dim = kDim;
    c.cache_stride = kStride;
    c.scale = 1.0f / std::sqrt(static_cast<float>(kDim));
    c.q = qs.data();
    c.k = k.data();
    c.v = v.data();
    c.out = out.data();
    backend.attend(c);
    return out;
  }
};

// Output row of query t, head h, in double, with every key's K and V chosen by the mask: the definition in
// simulated_attention.h written out per query (groups quantized from their bf16 values, as a decode cache does).
std::vector<double> brute_force(const SyntheticLayer& L, const CacheFormat& f, int64_t h, int64_t t) {
  const CacheWindows w = f.windows();
  const int64_t kvh = h / (kHeads / kKvHeads), gk = f.key_group_tokens();
  auto bf16_row = [&](const std::vector<float>& src, int64_t j) {
    std::vector<float> r(kDim);
    round_to_bf16({src.data() + (kvh * kStride + j) * kDim, static_cast<size_t>(kDim)}, r);
    return r;
  };
  std::vector<double> scores(t + 1);
  std::vector<std::vector<float>> values(t + 1);
  for (int64_t j = 0; j <= t; ++j) {
    std::vector<float> key = bf16_row(L.k, j);
    if (reads_quantized(t, j, w, gk)) {
      const int64_t g0 = w.sink + (j - w.sink) / gk * gk;
      std::vector<float> group, out(gk * kDim);
      for (int64_t i = g0; i < g0 + gk; ++i) {
        auto r = bf16_row(L.k, i);
        group.insert(group.end(), r.begin(), r.end());
      }
      f.fake_quantize_keys(0, kvh, group, gk, out);
      std::copy_n(out.begin() + (j - g0) * kDim, kDim, key.begin());
    }
    values[j] = bf16_row(L.v, j);
    if (reads_quantized(t, j, w, 1)) f.fake_quantize_values(0, kvh, std::vector<float>(values[j]), 1, values[j]);
    double dot = 0;
    for (int64_t i = 0; i < kDim; ++i) dot += static_cast<double>(L.q[(h * L.tokens + t) * kDim + i]) * key[i];
    scores[j] = dot / std::sqrt(static_cast<double>(kDim));
  }
  const double mx = *std::max_element(scores.begin(), scores.end());
  double sum = 0;
  for (double& s : scores) sum += (s = std::exp(s - mx));
  std::vector<double> out(kDim, 0.0);
  for (int64_t j = 0; j <= t; ++j)
    for (int64_t i = 0; i < kDim; ++i) out[i] += scores[j] / sum * values[j][i];
  return out;
}

class SyntheticModes : public ::testing::TestWithParam<CacheMode> {};

TEST_P(SyntheticModes, MatchesBruteForcePerQuery) {
  ModeOptions opt;
  opt.windows = {3, 10};
  opt.kivi_key_group_tokens = 4;
  opt.kivi_value_group_channels = 8;
  opt.kivi_residual = 0;
  const auto f = CacheFormat::create(GetParam(), synthetic_config(), opt);
  const SyntheticLayer L(100, 11);
  SimulatedCacheAttention backend(*f);
  const auto out = L.run(backend, 0, 100);
  double max_err = 0;
  for (int64_t t = 0; t < 100; ++t)
    for (int64_t h = 0; h < kHeads; ++h) {
      const auto ref = brute_force(L, *f, h, t);
      for (int64_t i = 0; i < kDim; ++i)
        max_err = std::max(max_err, std::fabs(ref[i] - out[(t * kHeads + h) * kDim + i]));
    }
  EXPECT_LT(max_err, 2e-5) << cache_mode_name(GetParam());
  // Only tokens some query read were quantized: the last query (99) reads keys up to 89 (groups: up to 87).
  EXPECT_EQ(backend.quantized_values(0), 90 - 3);
  EXPECT_EQ(backend.quantized_keys(0), GetParam() == CacheMode::Kivi2 ? 84 : 87);
}

TEST_P(SyntheticModes, SplittingTheSequenceIntoCallsChangesNothing) {
  ModeOptions opt;
  opt.windows = {3, 10};
  opt.kivi_key_group_tokens = 4;
  opt.kivi_value_group_channels = 8;
  opt.kivi_residual = 0;
  const auto f = CacheFormat::create(GetParam(), synthetic_config(), opt);
  const SyntheticLayer L(100, 12);
  SimulatedCacheAttention whole(*f), pieces(*f);
  const auto one_call = L.run(whole, 0, 100);
  std::vector<float> split;
  for (auto [a, b] : std::vector<std::pair<int64_t, int64_t>>{{0, 37}, {37, 38}, {38, 39}, {39, 80}, {80, 100}}) {
    const auto part = L.run(pieces, a, b);
    split.insert(split.end(), part.begin(), part.end());
  }
  ASSERT_EQ(split.size(), one_call.size());
  double max_err = 0;
  for (size_t i = 0; i < split.size(); ++i) max_err = std::max(max_err, static_cast<double>(std::fabs(split[i] - one_call[i])));
  EXPECT_LT(max_err, 1e-5);
  // A call that skips positions is refused rather than silently misread.
  EXPECT_THROW(L.run(pieces, 50, 60), Error);
}

INSTANTIATE_TEST_SUITE_P(Modes, SyntheticModes,
                         ::testing::Values(CacheMode::Int2, CacheMode::Kivi2, CacheMode::Hadamard2, CacheMode::Fp8),
                         [](const auto& info) { return std::string(cache_mode_name(info.param)); });

// ---- on a real checkpoint ----

// What a decode-time cache holds: each new token is written in bf16; when a token (KIVI keys: its whole group)
// leaves the recent window it is overwritten in place by its quantized value. Attention is plain exact_attention
// over that cache. Only single-token calls (true decoding).
class MaterializedDecodeCache : public model::AttentionBackend {
 public:
  explicit MaterializedDecodeCache(const CacheFormat& f) : f_(f), layers_(f.num_layers()) {}
  void attend(const model::AttentionCall& c) override {
    if (c.num_tokens != 1) throw Error("MaterializedDecodeCache", "one token per call");
    Layer& L = layers_[c.layer];
    const int64_t d = c.head_dim, t = c.pos0, stride = c.cache_stride;
    if (t == 0) L = Layer{std::vector<float>(c.num_kv_heads * stride * d), std::vector<float>(c.num_kv_heads * stride * d),
                          std::vector<float>(c.num_kv_heads * stride * d), std::vector<float>(c.num_kv_heads * stride * d),
                          std::vector<char>(stride, 0), std::vector<char>(stride, 0)};
    for (int64_t h = 0; h < c.num_kv_heads; ++h) {
      const size_t off = (h * stride + t) * d;
      round_to_bf16({c.k + off, size_t(d)}, {L.k_bf16.data() + off, size_t(d)});
      round_to_bf16({c.v + off, size_t(d)}, {L.v_bf16.data() + off, size_t(d)});
      std::copy_n(L.k_bf16.begin() + off, d, L.k.begin() + off);
      std::copy_n(L.v_bf16.begin() + off, d, L.v.begin() + off);
    }
    const CacheWindows w = f_.windows();
    const int64_t gk = f_.key_group_tokens();
    for (int64_t j = 0; j <= t; ++j) {
      if (!L.k_done[j] && reads_quantized(t, j, w, gk)) {
        const int64_t g0 = w.sink + (j - w.sink) / gk * gk;
        for (int64_t h = 0; h < c.num_kv_heads; ++h) {
          const size_t off = (h * stride + g0) * d, n = gk * d;
          f_.fake_quantize_keys(c.layer, h, {L.k_bf16.data() + off, n}, gk, {L.k.data() + off, n});
        }
        for (int64_t i = g0; i < g0 + gk; ++i) L.k_done[i] = 1;
      }
      if (!L.v_done[j] && reads_quantized(t, j, w, 1)) {
        for (int64_t h = 0; h < c.num_kv_heads; ++h) {
          const size_t off = (h * stride + j) * d;
          f_.fake_quantize_values(c.layer, h, {L.v_bf16.data() + off, size_t(d)}, 1, {L.v.data() + off, size_t(d)});
        }
        L.v_done[j] = 1;
      }
    }
    model::AttentionCall m = c;
    m.k = L.k.data();
    m.v = L.v.data();
    model::exact_attention(m);
  }

 private:
  struct Layer {
    std::vector<float> k_bf16, v_bf16, k, v;
    std::vector<char> k_done, v_done;
  };
  const CacheFormat& f_;
  std::vector<Layer> layers_;
};

// exact_attention over a cache rounded to bf16: an independent statement of the bf16 reference.
class Bf16ExactAttention : public model::AttentionBackend {
 public:
  void attend(const model::AttentionCall& c) override {
    const size_t n = c.num_kv_heads * c.cache_stride * c.head_dim;
    k_.resize(n);
    v_.resize(n);
    round_to_bf16({c.k, n}, k_);
    round_to_bf16({c.v, n}, v_);
    model::AttentionCall m = c;
    m.k = k_.data();
    m.v = v_.data();
    model::exact_attention(m);
  }

 private:
  std::vector<float> k_, v_;
};

const char* kQwen = "models/qwen3-tiny-trained";

std::vector<int32_t> heldout_tokens(int64_t n) {
  const auto dir = test::fixtures_dir() / kQwen;
  auto tok = fmt::Tokenizer::load(dir);
  std::ifstream in(test::fixtures_dir() / "text/python-docs-heldout.txt");
  std::stringstream ss;
  ss << in.rdbuf();
  auto ids = tok->encode(ss.str().substr(0, 20 * n), false);
  if (static_cast<int64_t>(ids.size()) < n) throw Error("test", "not enough held-out text");
  ids.resize(n);
  ids[0] = 0;  // <|endoftext|>: the document separator the model was trained with
  return ids;
}

class RealModel : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!std::filesystem::exists(test::fixtures_dir() / kQwen / "config.json") ||
        !std::filesystem::exists(test::fixtures_dir() / "text/python-docs-heldout.txt"))
      GTEST_SKIP() << "fixture not found: " << (test::fixtures_dir() / kQwen);
    if (!model_) model_ = model::CpuModel::load(test::fixtures_dir() / kQwen);
  }
  static std::unique_ptr<model::CpuModel> model_;
};
std::unique_ptr<model::CpuModel> RealModel::model_;

// Records every layer's attention call of a teacher-forced forward (inputs and the simulated outputs).
class RecordingBackend : public model::AttentionBackend {
 public:
  explicit RecordingBackend(model::AttentionBackend& inner) : inner_(inner) {}
  struct Call {
    model::AttentionCall call;
    std::vector<float> q, k, v, out;
  };
  void attend(const model::AttentionCall& c) override {
    inner_.attend(c);
    Call r{c, {c.q, c.q + c.num_heads * c.num_tokens * c.head_dim},
           {c.k, c.k + c.num_kv_heads * c.cache_stride * c.head_dim},
           {c.v, c.v + c.num_kv_heads * c.cache_stride * c.head_dim},
           {c.out, c.out + c.num_tokens * c.num_heads * c.head_dim}};
    calls.push_back(std::move(r));
  }
  std::vector<Call> calls;

 private:
  model::AttentionBackend& inner_;
};

// The brief's check, on the real Q/K/V of a 300-token held-out sequence: every layer's teacher-forced simulated
// attention equals true token-by-token decoding through a cache rewritten in place (MaterializedDecodeCache) fed
// the same tensors. Replaying the recorded tensors keeps the model's own prefill-vs-decode rounding noise (about
// 1e-5 in fp32 logits here) out of the comparison: through whole forwards that noise flips bf16 and INT2 roundings
// of individual K/V elements, which the next test bounds separately.
TEST_F(RealModel, TeacherForcedEqualsTokenByTokenDecoding) {
  const int64_t n = 300;
  const auto ids = heldout_tokens(n);
  ModeOptions opt;
  opt.windows = {4, 48};  // small windows: most of the 300 tokens are read quantized
  opt.kivi_residual = 0;
  for (CacheMode mode : {CacheMode::Int2, CacheMode::Kivi2, CacheMode::Hadamard2, CacheMode::Int4}) {
    const auto f = CacheFormat::create(mode, model_->config(), opt);
    SimulatedCacheAttention sim(*f);
    RecordingBackend rec(sim);
    model::KvCache cache(model_->config(), n);
    model::ForwardOptions fo;
    fo.attention = &rec;
    model_->forward(ids, cache, fo);
    ASSERT_EQ(rec.calls.size(), static_cast<size_t>(model_->config().num_layers));
    MaterializedDecodeCache decode_cache(*f);
    double max_diff = 0, max_out = 0;
    for (const auto& r : rec.calls) {
      const int64_t H = r.call.num_heads, d = r.call.head_dim;
      for (int64_t t = 0; t < n; ++t) {
        std::vector<float> q(H * d), out(H * d);
        for (int64_t h = 0; h < H; ++h) std::copy_n(r.q.begin() + (h * n + t) * d, d, q.begin() + h * d);
        model::AttentionCall c = r.call;
        c.num_tokens = 1;
        c.pos0 = t;
        c.q = q.data();
        c.k = r.k.data();  // the replayed cache holds all n tokens; decoding reads 0 .. t only
        c.v = r.v.data();
        c.out = out.data();
        decode_cache.attend(c);
        for (int64_t i = 0; i < H * d; ++i) {
          max_diff = std::max(max_diff, static_cast<double>(std::fabs(out[i] - r.out[t * H * d + i])));
          max_out = std::max(max_out, static_cast<double>(std::fabs(out[i])));
        }
      }
    }
    EXPECT_LE(max_diff, 1e-4) << cache_mode_name(mode) << " (largest output " << max_out << ")";
    std::printf("  %s: max |teacher-forced - token-by-token| attention output %.3g (largest output %.3g)\n",
                std::string(cache_mode_name(mode)).c_str(), max_diff, max_out);
  }
}

// Whole forwards, one token per call, through MaterializedDecodeCache vs the teacher-forced simulation. Rounding
// flips (see above) make bit-equality impossible, but they must be rare and small: the two runs must agree far
// better than either agrees with bf16.
TEST_F(RealModel, TokenByTokenForwardAgreesWithTeacherForcing) {
  const int64_t n = 300;
  const auto ids = heldout_tokens(n);
  ModeOptions opt;
  opt.windows = {4, 48};
  opt.kivi_residual = 0;
  const int64_t vocab = model_->config().vocab_size;
  const std::span<const int32_t> targets(ids.data() + 1, n - 1);
  const auto ref = simulated_logits(*model_, *CacheFormat::create(CacheMode::BF16, model_->config(), opt), ids);
  for (CacheMode mode : {CacheMode::Int2, CacheMode::Kivi2}) {
    const auto f = CacheFormat::create(mode, model_->config(), opt);
    const std::vector<float> teacher = simulated_logits(*model_, *f, ids);
    MaterializedDecodeCache decode_cache(*f);
    model::KvCache cache(model_->config(), n);
    model::ForwardOptions fo;
    fo.attention = &decode_cache;
    std::vector<float> incremental;
    for (int64_t t = 0; t < n; ++t) {
      const auto row = model_->forward(std::span<const int32_t>(ids).subspan(t, 1), cache, fo);
      incremental.insert(incremental.end(), row.begin(), row.end());
    }
    const auto between = summarize(compare_positions(teacher, incremental, vocab, targets.first(n - 1)));
    const auto quant = summarize(compare_positions(ref, teacher, vocab, targets.first(n - 1)));
    EXPECT_LT(between.kl_mean, 0.05 * quant.kl_mean) << cache_mode_name(mode);
    EXPECT_GE(between.top1_agreement, 0.98) << cache_mode_name(mode);
    EXPECT_GT(quant.kl_mean, 1e-3) << cache_mode_name(mode);  // the quantized cache really matters here
    std::printf("  %s: KL(teacher || token-by-token) mean %.3g, top-1 %.4f; KL(bf16 || mode) mean %.3g\n",
                std::string(cache_mode_name(mode)).c_str(), between.kl_mean, between.top1_agreement, quant.kl_mean);
  }
}

TEST_F(RealModel, Bf16ModeMatchesExactAttentionOnABf16Cache) {
  const int64_t n = 256;
  const auto ids = heldout_tokens(n);
  const auto bf16 = CacheFormat::create(CacheMode::BF16, model_->config(), ModeOptions{{4, 16}});
  const auto sim = simulated_logits(*model_, *bf16, ids);
  Bf16ExactAttention exact;
  model::KvCache cache(model_->config(), n);
  model::ForwardOptions fo;
  fo.attention = &exact;
  const auto ref = model_->forward(ids, cache, fo);
  const std::span<const int32_t> targets(ids.data() + 1, n - 1);
  const auto s = summarize(compare_positions(ref, sim, model_->config().vocab_size, targets));
  EXPECT_LE(s.kl_mean, 1e-6);
  EXPECT_LE(s.kl_p99, 1e-6);
  EXPECT_EQ(s.top1_agreement, 1.0);
}

TEST_F(RealModel, Int4IsCloserToBf16ThanInt2) {
  const int64_t n = 256;
  const auto ids = heldout_tokens(n);
  ModeOptions opt{{4, 16}};
  const auto ref = simulated_logits(*model_, *CacheFormat::create(CacheMode::BF16, model_->config(), opt), ids);
  const std::span<const int32_t> targets(ids.data() + 1, n - 1);
  auto kl = [&](CacheMode m) {
    const auto logits = simulated_logits(*model_, *CacheFormat::create(m, model_->config(), opt), ids);
    return summarize(compare_positions(ref, logits, model_->config().vocab_size, targets));
  };
  const MetricSummary int2 = kl(CacheMode::Int2), int4 = kl(CacheMode::Int4);
  EXPECT_GT(int2.kl_mean, 0.0);
  EXPECT_LT(int4.kl_mean, int2.kl_mean);
  EXPECT_LT(int4.kl_p99, int2.kl_p99);
  EXPECT_GE(int4.top1_agreement, int2.top1_agreement);
}

}  // namespace
}  // namespace oscar::eval
