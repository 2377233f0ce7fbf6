// The forward's GEMM (runtime/lt_gemm.h) against a double-precision matmul of the same bf16 values, with the
// heuristic's algorithm and with timed selection. Timed selection runs every candidate on the call's own operands
// before the real call; with beta = 1 that must not leave the candidates' sums in the output (it times on a
// scratch copy), so the accumulate case checks that y_in + X·Wᵀ comes out, added exactly once.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "formats/dtype.h"
#include "runtime/lt_gemm.h"
#include "tests/gpu/gpu_test_buffer.h"
#include "tests/gpu/gpu_test_data.h"

namespace oscar {
namespace {

using test::gpu::DeviceBuffer;
using test::gpu::random_bf16;

struct Case {
  int64_t m, n, k;
};

void check_case(rt::GemmSelection selection, const Case& c, bool accumulate) {
  SCOPED_TRACE("m " + std::to_string(c.m) + " n " + std::to_string(c.n) + " k " + std::to_string(c.k) +
               (accumulate ? " beta 1" : " beta 0") +
               (selection == rt::GemmSelection::Timed ? " timed" : " heuristic"));
  const auto x = random_bf16(static_cast<size_t>(c.m * c.k), 1);
  const auto w = random_bf16(static_cast<size_t>(c.n * c.k), 2);
  std::vector<float> y0(static_cast<size_t>(c.m * c.n), 0.f);
  if (accumulate) {
    std::mt19937 rng(3);
    std::normal_distribution<float> dist(0.f, 8.f);
    for (float& v : y0) v = dist(rng);
  }
  std::vector<double> want(y0.begin(), y0.end());
  for (int64_t i = 0; i < c.m; ++i)
    for (int64_t j = 0; j < c.n; ++j) {
      double s = 0;
      for (int64_t t = 0; t < c.k; ++t)
        s += static_cast<double>(fmt::bf16_to_f32(x[i * c.k + t])) * fmt::bf16_to_f32(w[j * c.k + t]);
      want[i * c.n + j] += s;
    }
  DeviceBuffer<uint16_t> dx(x), dw(w);
  DeviceBuffer<float> dy(y0);
  rt::LtGemm gemm;
  gemm.set_selection(selection);
  gemm.xwt(dx.ptr, c.m, c.k, dw.ptr, c.n, dy.ptr, rt::GemmOut::F32, accumulate ? 1.f : 0.f, nullptr, "test");
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const double err = test::gpu::nmse_vs_double(dy.download(), want);
  std::printf("  %s m %lld n %lld k %lld beta %d: nmse %.3g, timed shapes %lld (changed %lld)\n",
              selection == rt::GemmSelection::Timed ? "timed" : "heuristic", (long long)c.m, (long long)c.n,
              (long long)c.k, accumulate ? 1 : 0, err, (long long)gemm.timed_shapes(), (long long)gemm.timed_changed());
  // fp32 accumulation of bf16 products: ~1e-7 relative per element; a wrong or doubled sum is O(1).
  EXPECT_LE(err, 1e-9);
  if (selection == rt::GemmSelection::Timed) {
    EXPECT_EQ(gemm.timed_shapes(), 1);
  } else {
    EXPECT_EQ(gemm.timed_shapes(), 0);
  }
  // A second call reuses the plan: no more tuning, the same answer.
  if (!accumulate) {
    gemm.xwt(dx.ptr, c.m, c.k, dw.ptr, c.n, dy.ptr, rt::GemmOut::F32, 0.f, nullptr, "test");
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_LE(test::gpu::nmse_vs_double(dy.download(), want), 1e-9);
    EXPECT_LE(gemm.timed_shapes(), 1);
  }
}

TEST(LtGemmGpu, HeuristicAndTimedSelectionMatchTheMatmul) {
  OSCAR_REQUIRE_DEVICE();
  for (const Case& c : {Case{64, 96, 128}, Case{257, 384, 512}, Case{1024, 1024, 1024}})
    for (const auto selection : {rt::GemmSelection::Heuristic, rt::GemmSelection::Timed})
      for (bool accumulate : {false, true}) check_case(selection, c, accumulate);
}

TEST(LtGemmGpu, ChangingTheSelectionDropsThePlans) {
  OSCAR_REQUIRE_DEVICE();
  rt::LtGemm gemm;
  EXPECT_EQ(gemm.selection(), rt::GemmSelection::Heuristic);
  gemm.set_selection(rt::GemmSelection::Timed);
  const Case c{128, 256, 256};
  const auto x = random_bf16(static_cast<size_t>(c.m * c.k), 4);
  const auto w = random_bf16(static_cast<size_t>(c.n * c.k), 5);
  DeviceBuffer<uint16_t> dx(x), dw(w);
  DeviceBuffer<uint16_t> dy(static_cast<size_t>(c.m * c.n));
  gemm.xwt(dx.ptr, c.m, c.k, dw.ptr, c.n, dy.ptr, rt::GemmOut::BF16, 0.f, nullptr, "test");
  gemm.xwt(dx.ptr, c.m, c.k, dw.ptr, c.n, dy.ptr, rt::GemmOut::BF16, 0.f, nullptr, "test");
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  EXPECT_EQ(gemm.timed_shapes(), 1);  // planned once
  gemm.set_selection(rt::GemmSelection::Heuristic);
  gemm.set_selection(rt::GemmSelection::Timed);
  gemm.xwt(dx.ptr, c.m, c.k, dw.ptr, c.n, dy.ptr, rt::GemmOut::BF16, 0.f, nullptr, "test");
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  EXPECT_EQ(gemm.timed_shapes(), 2);  // the plan was dropped and tuned again
}

}  // namespace
}  // namespace oscar
