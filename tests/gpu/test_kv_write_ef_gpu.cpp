// INT2 quantize-on-write with error-feedback rounding on the GPU (kernels/kv_quantize/kv_write_int2_ef.cuh, issue
// #10) against kv_write_ref with the same tables, bit-exact: head_dim 64/128/256, 1..8 KV heads, clip feedback on
// and off, no clip / pop-the-maximum / bitwise clip positions, identity and random rotations, stress vectors and
// Gaussian keys with channel outliers, tails (tokens not a multiple of the tile, strided x, skipped slots and a
// skipped tile). All-zero weights must give the RTN writer's pool. Skips without a CUDA device.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <random>
#include <vector>

#include "../kernels/kv_cache_test_util.h"
#include "../kernels/kv_write_ef_util.h"
#include "../kernels/kv_write_stress.h"
#include "formats/dtype.h"
#include "formats/kv_layout.h"
#include "kernels/kv_quantize/kv_quantize.h"
#include "kernels/kv_quantize/kv_quantize_ref.h"
#include "gpu_test_buffer.h"
#include "kv_write_gpu_case.h"

namespace oscar {
namespace {

using Case = test::KvWriteCase;
using Pools = test::KvWritePools;

// Stress vectors (stress = true) or Gaussian keys with outliers (test::kv_write_case's slots and padding).
Case make_case(int d, int heads, int tokens, int pad, bool stress, uint32_t seed) {
  const auto gauss = test::random_bf16(static_cast<size_t>(tokens) * heads * d, d, seed + 1);
  return test::kv_write_case(d, heads, tokens, pad, seed, [&](int t, int h, std::mt19937& rng, uint16_t* dst) {
    if (stress)
      test::fill_stress_vector((t * heads + h) % test::kStressPatterns, d, rng, true, dst);
    else
      std::copy_n(gauss.data() + (static_cast<size_t>(t) * heads + h) * d, d, dst);
  });
}

// tables == nullptr: the RTN writer on both sides.
Pools run(const Case& c, const std::vector<float>* rot, float ratio, const test::EfTables* tables, bool feedback) {
  return test::run_kv_write(c, rot, ratio, tables, feedback,
                            [](const kern::KvWriteParams& p) { return kern::kv_write(p, kern::KvWriteMode::Int2, nullptr); });
}

size_t first_difference(const std::vector<uint8_t>& a, const std::vector<uint8_t>& b) {
  const auto m = std::mismatch(a.begin(), a.end(), b.begin(), b.end());
  return static_cast<size_t>(m.first - a.begin());
}

class KvWriteEfGpu : public ::testing::TestWithParam<int> {};

TEST_P(KvWriteEfGpu, BitExactWithReference) {
  OSCAR_REQUIRE_DEVICE();
  const int d = GetParam();
  const auto orth = test::random_rotation(d, 90 + d);
  int compared = 0;
  for (int heads : {1, 3, 8}) {
    const auto tables = test::random_ef_tables(d, heads, 100 + d + heads);
    for (int kind = 0; kind < 2; ++kind) {  // 0: stress vectors, no rotation; 1: Gaussian keys, random rotation
      const std::vector<float>* rot = kind == 0 ? nullptr : &orth;
      const Case c = make_case(d, heads, kind == 0 ? 203 : 77, kind == 0 ? 0 : 8, kind == 0,
                               static_cast<uint32_t>(d * 10 + heads + kind));
      for (float ratio : {1.0f, 0.96f, 0.92f, 0.5f})
        for (bool feedback : {false, true}) {
          const Pools p = run(c, rot, ratio, &tables, feedback);
          ASSERT_EQ(p.gpu.size(), p.ref.size());
          EXPECT_EQ(first_difference(p.gpu, p.ref), p.gpu.size())
              << "d " << d << " heads " << heads << " kind " << kind << " ratio " << ratio << " feedback " << feedback
              << ": first differing pool byte";
          ++compared;
        }
    }
  }
  EXPECT_EQ(compared, 3 * 2 * 4 * 2);
}

// Zero weights: the EF writer's pool is the RTN writer's, byte for byte; real tables change it.
TEST_P(KvWriteEfGpu, ZeroWeightsEqualRtnAndRealTablesDiffer) {
  OSCAR_REQUIRE_DEVICE();
  const int d = GetParam(), heads = 4;
  const auto orth = test::random_rotation(d, 95 + d);
  const Case c = make_case(d, heads, 150, 0, false, static_cast<uint32_t>(d));
  const auto zero = test::zero_ef_tables(d, heads, 7);
  const auto real = test::random_ef_tables(d, heads, 8);
  const Pools rtn = run(c, &orth, 0.96f, nullptr, false);
  EXPECT_EQ(rtn.gpu, rtn.ref);
  const Pools ef0 = run(c, &orth, 0.96f, &zero, false);
  EXPECT_EQ(first_difference(ef0.gpu, rtn.gpu), rtn.gpu.size());
  const Pools ef = run(c, &orth, 0.96f, &real, false);
  EXPECT_EQ(ef.gpu, ef.ref);
  EXPECT_NE(ef.gpu, rtn.gpu);
}

// Quotients exactly on half-integers, where rounding ties to even and int2_ef_code must defer to the IEEE division:
// every vector spans [0, 3] (scale 1, zero 0 in fp16) and its other values are multiples of 0.25, so (w - zero) /
// scale hits 0.5, 1.5, 2.5 exactly; no rotation, no clip. With zero tables the codes are the RTN ones (ties to
// even), with real tables the running targets leave the grid; both must equal the reference byte for byte.
TEST_P(KvWriteEfGpu, HalfIntegerQuotientsRoundLikeTheReference) {
  OSCAR_REQUIRE_DEVICE();
  const int d = GetParam(), heads = 2;
  const Case c = test::kv_write_case(d, heads, 70, 0, 11u + static_cast<uint32_t>(d),
                                     [d](int, int, std::mt19937& rng, uint16_t* dst) {
                                       std::uniform_int_distribution<int> quarter(0, 12);
                                       for (int i = 0; i < d; ++i)
                                         dst[i] = fmt::f32_to_bf16(0.25f * static_cast<float>(quarter(rng)));
                                       dst[rng() % d] = fmt::f32_to_bf16(0.f);
                                       dst[rng() % d] = fmt::f32_to_bf16(3.f);
                                     });
  for (const bool feedback : {false, true})
    for (const test::EfTables& tables : {test::zero_ef_tables(d, heads, 3), test::random_ef_tables(d, heads, 4)}) {
      const Pools p = run(c, nullptr, 1.0f, &tables, feedback);
      EXPECT_EQ(first_difference(p.gpu, p.ref), p.gpu.size()) << "d " << d << " clip feedback " << feedback;
    }
}

INSTANTIATE_TEST_SUITE_P(HeadDims, KvWriteEfGpu, ::testing::Values(64, 128, 256));

}  // namespace
}  // namespace oscar
