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
#include "tests/gpu/gpu_test_data.h"

namespace oscar {
namespace {

using test::gpu::DeviceBuffer;
using test::gpu::random_bf16;

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

// Runs one probe; GTEST_SKIPs where the device or the build cannot (not an sm_90 GPU, or no sm_90a code).
double run_probe(kern::WgmmaProbeMode mode, uint32_t lbo, uint32_t sbo, bool* skipped) {
  *skipped = false;
  const bool b_k_major = mode != kern::WgmmaProbeMode::RsT;  // B rows are n with K contiguous (Ss, Rs, Rs8)
  const int n = mode == kern::WgmmaProbeMode::Ss ? 64 : mode == kern::WgmmaProbeMode::Rs8 ? 8 : 128;
  const auto a = random_bf16(64 * 128, 1);
  const auto b = random_bf16(static_cast<size_t>(n) * 128, 2);
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
  // Ss, Rs, Rs8: B rows are n (K contiguous); RsT: B rows are k (N contiguous).
  const auto want = b_k_major ? matmul(a, b, 64, n, 128, 128, 1) : matmul(a, b, 64, n, 128, 1, 128);
  return test::gpu::nmse_vs_double(dc.download(), want);
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

// S = Q·Kᵀ with Q in registers over a 128-key tile (wgmma_m64n128k16_rs, K-major B; prefill v5-style).
TEST(WgmmaGpu, RegisterAWithKMajorBMatchesTheMatmul) {
  OSCAR_REQUIRE_DEVICE();
  bool skipped = false;
  const double err = run_probe(kern::WgmmaProbeMode::Rs, 16, 1024, &skipped);
  if (skipped) GTEST_SKIP() << "wgmma needs an sm_90 device and a build for sm_90a";
  std::printf("  rs + K-major B (m64n128k16) nmse %.3g\n", err);
  EXPECT_LE(err, 1e-10);
}

// Prefill v11's row sums: P · ones through wgmma m64n8k16 with a K-major B of 8 rows (random B here, so a wrong
// swizzle or row order shows, which all-ones would hide).
TEST(WgmmaGpu, RegisterAWithEightRowBMatchesTheMatmul) {
  OSCAR_REQUIRE_DEVICE();
  bool skipped = false;
  const double err = run_probe(kern::WgmmaProbeMode::Rs8, 16, 1024, &skipped);
  if (skipped) GTEST_SKIP() << "wgmma needs an sm_90 device and a build for sm_90a";
  std::printf("  rs + 8-row K-major B (m64n8k16) nmse %.3g\n", err);
  EXPECT_LE(err, 1e-10);
}

}  // namespace
}  // namespace oscar
