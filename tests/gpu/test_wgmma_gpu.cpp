// The wgmma building blocks (kernels/common/wgmma.cuh) against a double-precision matmul of the same bf16 values,
// through kernels/probe/wgmma_probe: descriptors, the 128B swizzle a loader writes, the accumulator layout, the A
// register fragment, and the MN-major (transposed B) descriptor strides. A wrong stride or swizzle scrambles whole
// 8-row groups or 16-byte chunks, so the error is O(1) relative, far from the bound.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "formats/dtype.h"
#include "kernels/probe/wgmma_probe.h"
#include "tests/gpu/gpu_test_buffer.h"

namespace oscar {
namespace {

using test::gpu::DeviceBuffer;

std::vector<uint16_t> random_bf16(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.f, 1.f);
  std::vector<uint16_t> v(n);
  for (auto& x : v) x = fmt::f32_to_bf16(dist(rng));
  return v;
}

// C[m][n] = Σ_k A[m][k] · B(k, n), B(k, n) = b[n * ldb_n + k * ldb_k].
std::vector<double> matmul(const std::vector<uint16_t>& a, const std::vector<uint16_t>& b, int m, int n, int k,
                           int ldb_n, int ldb_k) {
  std::vector<double> c(static_cast<size_t>(m) * n, 0.0);
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < n; ++j) {
      double s = 0;
      for (int t = 0; t < k; ++t)
        s += static_cast<double>(fmt::bf16_to_f32(a[static_cast<size_t>(i) * k + t])) *
             fmt::bf16_to_f32(b[static_cast<size_t>(j) * ldb_n + static_cast<size_t>(t) * ldb_k]);
      c[static_cast<size_t>(i) * n + j] = s;
    }
  return c;
}

double nmse(const std::vector<float>& got, const std::vector<double>& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double d = (std::isfinite(got[i]) ? got[i] : 1e30) - want[i];
    num += d * d;
    den += want[i] * want[i];
  }
  return num / den;
}

// Runs one probe; GTEST_SKIPs where the device or the build cannot (not an sm_90 GPU, or no sm_90a code).
double run_probe(kern::WgmmaProbeMode mode, uint32_t lbo, uint32_t sbo, bool* skipped) {
  *skipped = false;
  const bool ss = mode == kern::WgmmaProbeMode::Ss;
  const int n = ss ? 64 : 128;
  const auto a = random_bf16(64 * 128, 1);
  const auto b = random_bf16(static_cast<size_t>(ss ? 64 : 128) * 128, 2);
  DeviceBuffer<uint16_t> da(a), db(b);
  DeviceBuffer<float> dc(static_cast<size_t>(64) * n);
  kern::WgmmaProbeArgs args;
  args.mode = mode;
  args.a = da.ptr;
  args.b = db.ptr;
  args.c = dc.ptr;
  args.mn_lbo_bytes = lbo;
  args.mn_sbo_bytes = sbo;
  const kern::Status st = kern::wgmma_probe(args, nullptr);
  if (st == kern::Status::Unsupported) {
    *skipped = true;
    return 0;
  }
  EXPECT_EQ(st, kern::Status::Ok);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  // Ss: B rows are n (K contiguous); RsT: B rows are k (N contiguous).
  const auto want = ss ? matmul(a, b, 64, n, 128, 128, 1) : matmul(a, b, 64, n, 128, 1, 128);
  return nmse(dc.download(), want);
}

TEST(WgmmaGpu, SharedOperandsKMajorMatchTheMatmul) {
  OSCAR_REQUIRE_DEVICE();
  bool skipped = false;
  const double err = run_probe(kern::WgmmaProbeMode::Ss, 16, 1024, &skipped);
  if (skipped) GTEST_SKIP() << "wgmma needs an sm_90 device and a build for sm_90a";
  std::printf("  ss (K-major A and B, SW128) nmse %.3g\n", err);
  EXPECT_LE(err, 1e-10);
}

TEST(WgmmaGpu, RegisterAWithTransposedBMatchesTheMatmul) {
  OSCAR_REQUIRE_DEVICE();
  bool skipped = false;
  const double err = run_probe(kern::WgmmaProbeMode::RsT, 16384, 1024, &skipped);
  if (skipped) GTEST_SKIP() << "wgmma needs an sm_90 device and a build for sm_90a";
  // The other stride convention, printed (not asserted) so that a failure above says which one the hardware uses.
  const double swapped = run_probe(kern::WgmmaProbeMode::RsT, 1024, 16384, &skipped);
  std::printf("  rs + transposed B nmse %.3g (LBO 16384 / SBO 1024), %.3g (swapped)\n", err, swapped);
  EXPECT_LE(err, 1e-10);
}

}  // namespace
}  // namespace oscar
