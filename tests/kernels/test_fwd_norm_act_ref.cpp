// CPU references of the forward-pass elementwise families (embedding, rmsnorm, swiglu) against closed forms.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "formats/dtype.h"
#include "kernels/activation/swiglu.h"
#include "kernels/embedding/embedding.h"
#include "kernels/norm/rmsnorm.h"

namespace oscar::kern {
namespace {

std::vector<float> randn(size_t n, uint32_t seed, float sd = 1.f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.f, sd);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

TEST(FwdEmbeddingRef, GathersWidenedRowsAndZeroesInvalidIds) {
  const int64_t vocab = 5, hidden = 3;
  std::vector<uint16_t> table(vocab * hidden);
  for (int64_t i = 0; i < vocab * hidden; ++i) table[i] = fmt::f32_to_bf16(0.5f * static_cast<float>(i) - 3.f);
  const std::vector<int32_t> ids = {4, 0, 7, 2, -1};
  std::vector<float> out(ids.size() * hidden, 123.f);
  embedding_gather_ref(ids, table.data(), vocab, hidden, out.data());
  for (size_t t = 0; t < ids.size(); ++t)
    for (int64_t i = 0; i < hidden; ++i) {
      // 0.5*k - 3 is exact in bf16 for these small k, so the expected value is the formula itself.
      const float expected = ids[t] >= 0 && ids[t] < vocab ? 0.5f * static_cast<float>(ids[t] * hidden + i) - 3.f : 0.f;
      EXPECT_EQ(out[t * hidden + i], expected) << "token " << t << " dim " << i;
    }
}

TEST(FwdRmsNormRef, ConstantRowNormalizesToWeight) {
  // A row of constant c has rms |c|, so y = w * c / sqrt(c² + eps).
  const int64_t n = 64;
  const float c = -2.5f, eps = 1e-5f;
  std::vector<float> x(n, c), w(n), y(n);
  for (int64_t i = 0; i < n; ++i) w[i] = 0.1f * static_cast<float>(i + 1);
  rmsnorm_ref(x.data(), 1, n, w.data(), eps, y.data());
  const double scale = c / std::sqrt(static_cast<double>(c) * c + eps);
  for (int64_t i = 0; i < n; ++i) EXPECT_NEAR(y[i], w[i] * scale, 1e-6) << i;
}

TEST(FwdRmsNormRef, OutputHasUnitRmsWithUnitWeight) {
  const int64_t rows = 7, n = 300;
  const std::vector<float> x = randn(rows * n, 1, 3.f);
  std::vector<float> w(n, 1.f), y(rows * n);
  rmsnorm_ref(x.data(), rows, n, w.data(), 0.f, y.data());
  for (int64_t r = 0; r < rows; ++r) {
    double ss = 0;
    for (int64_t i = 0; i < n; ++i) ss += static_cast<double>(y[r * n + i]) * y[r * n + i];
    EXPECT_NEAR(std::sqrt(ss / n), 1.0, 1e-5) << "row " << r;
  }
}

TEST(FwdRmsNormRef, AddVariantEqualsAddThenNorm) {
  const int64_t rows = 5, n = 96;
  std::vector<float> residual = randn(rows * n, 2), delta = randn(rows * n, 3), w = randn(n, 4);
  std::vector<float> sum(rows * n), expected(rows * n), got(rows * n);
  for (int64_t i = 0; i < rows * n; ++i) sum[i] = residual[i] + delta[i];
  rmsnorm_ref(sum.data(), rows, n, w.data(), 1e-6f, expected.data());
  add_rmsnorm_ref(residual.data(), delta.data(), rows, n, w.data(), 1e-6f, got.data());
  EXPECT_EQ(residual, sum);  // the residual stream is updated in place
  EXPECT_EQ(got, expected);
}

TEST(FwdRmsNormRef, HeadNormTouchesOnlyItsSliceOfAStridedRow) {
  // Qwen3's q/k norm runs on the q part of a fused [q | k | v] row: columns past heads*d must stay untouched.
  const int64_t rows = 3, heads = 2, d = 8, stride = heads * d + 5;
  std::vector<float> x = randn(rows * stride, 5), w(d);
  for (int64_t i = 0; i < d; ++i) w[i] = 1.f + 0.25f * static_cast<float>(i);
  const std::vector<float> before = x;
  head_rmsnorm_ref(x.data(), rows, stride, heads, d, w.data(), 1e-6f);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t h = 0; h < heads; ++h) {
      const float* src = before.data() + r * stride + h * d;
      double ss = 0;
      for (int64_t i = 0; i < d; ++i) ss += static_cast<double>(src[i]) * src[i];
      const double inv = 1.0 / std::sqrt(ss / d + 1e-6);
      for (int64_t i = 0; i < d; ++i) EXPECT_NEAR(x[r * stride + h * d + i], w[i] * src[i] * inv, 1e-5);
    }
    for (int64_t i = heads * d; i < stride; ++i) EXPECT_EQ(x[r * stride + i], before[r * stride + i]);
  }
}

TEST(FwdSwigluRef, MatchesSiluTimesUpOnTheFusedLayout) {
  const int64_t rows = 3, inter = 4;
  // gate | up per row; silu(g) = g * sigmoid(g): silu(0) = 0, silu(ln 3) = ln3 * 3/4.
  const double ln3 = std::log(3.0);
  std::vector<float> gu = {0.f, static_cast<float>(ln3), -20.f, 20.f,  /* up */ 5.f, 2.f, 1.f, 0.5f,
                           1.f, -1.f, 2.f, -2.f, /* up */ 1.f, 1.f, 1.f, 1.f,
                           0.3f, 0.3f, 0.3f, 0.3f, /* up */ 0.f, -1.f, 2.f, 4.f};
  std::vector<float> out(rows * inter);
  swiglu_ref(gu.data(), rows, inter, out.data());
  EXPECT_EQ(out[0], 0.f);
  EXPECT_NEAR(out[1], ln3 * 0.75 * 2.0, 1e-6);
  EXPECT_NEAR(out[2], -20.0 / (1.0 + std::exp(20.0)), 1e-12);
  EXPECT_NEAR(out[3], 20.0 * 0.5, 1e-5);
  for (int64_t r = 1; r < rows; ++r)
    for (int64_t i = 0; i < inter; ++i) {
      const double g = gu[r * 2 * inter + i], u = gu[r * 2 * inter + inter + i];
      EXPECT_NEAR(out[r * inter + i], g / (1.0 + std::exp(-g)) * u, 1e-6);
    }
}

}  // namespace
}  // namespace oscar::kern
