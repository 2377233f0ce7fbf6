// INT2 quantize-on-write on the GPU (kernels/kv_quantize/kv_write_int2.cuh) against kv_write_ref, bit-exact, on the
// vectors that stress the clip select and min/max (tests/kernels/kv_write_stress.h), every clip position class
// (no clip, the maximum itself, pop-the-maximum range, bitwise range), the tiled kernel's tails (tokens not a
// multiple of the tile, strided x, skipped slots, whole tiles skipped) and every implementation of
// kv_write_variants.h. NaN has no defined record (the reference's std::nth_element gives none); the NaN test checks
// that such a token disturbs nothing but its own record. Skips without a CUDA device.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <utility>
#include <vector>

#include "../kernels/kv_cache_test_util.h"
#include "../kernels/kv_write_stress.h"
#include "formats/kv_layout.h"
#include "kernels/kv_quantize/kv_quantize.h"
#include "kernels/kv_quantize/kv_quantize_ref.h"
#include "kernels/kv_quantize/kv_write_variants.h"
#include "gpu_test_buffer.h"
#include "kv_write_gpu_case.h"
#include "test_support.h"

namespace oscar {
namespace {

using test::gpu::have_gpu;

using Case = test::KvWriteCase;
using Pools = test::KvWritePools;

// Runs one implementation and the reference on the same pool.
Pools run(const Case& c, const std::vector<float>* rot, float ratio, kern::KvWriteInt2Impl impl) {
  return test::run_kv_write(c, rot, ratio, nullptr, false,
                            [impl](const kern::KvWriteParams& p) { return kern::kv_write_int2_impl(p, impl, nullptr); });
}

// `tokens` stress vectors per head (test::kv_write_case's slots and padding).
Case stress_case(int d, int heads, int tokens, int pad, bool finite_only, uint32_t seed) {
  return test::kv_write_case(d, heads, tokens, pad, seed, [&](int t, int h, std::mt19937& rng, uint16_t* dst) {
    test::fill_stress_vector((t * heads + h) % test::kStressPatterns, d, rng, finite_only, dst);
  });
}

// Unpadded rows, slots 0 .. tokens-1 in order over `pages` pages.
Case contiguous_case(int d, int heads, int tokens, int pages, std::vector<uint16_t> x) {
  Case c;
  c.d = d;
  c.heads = heads;
  c.tokens = tokens;
  c.stride = static_cast<int64_t>(heads) * d;
  c.pages = pages;
  c.x = std::move(x);
  c.slots.resize(static_cast<size_t>(tokens));
  std::iota(c.slots.begin(), c.slots.end(), 0);
  return c;
}

const float kRatios[] = {1.0f, 0.999f, 0.96f, 0.92f, 0.8f, 0.5f, 0.01f};

class KvWriteInt2Gpu : public ::testing::TestWithParam<int> {};

TEST_P(KvWriteInt2Gpu, StressVectorsBitExactForEveryImplAndClipPosition) {
  OSCAR_REQUIRE_DEVICE();
  const int d = GetParam();
  const auto perm = test::signed_permutation(d, 70 + d);
  const auto orth = test::random_rotation(d, 80 + d);
  int compared = 0;
  for (int rot_kind = 0; rot_kind < 3; ++rot_kind) {
    const std::vector<float>* rot = rot_kind == 0 ? nullptr : rot_kind == 1 ? &perm : &orth;
    for (float ratio : kRatios) {
      const bool finite_only = rot_kind != 0 || !test::inf_is_clipped(ratio, d);
      const Case c = stress_case(d, 3, 203, rot_kind == 2 ? 8 : 0, finite_only, static_cast<uint32_t>(d + rot_kind));
      for (auto impl : {kern::KvWriteInt2Impl::Tiled, kern::KvWriteInt2Impl::TiledRadix}) {
        const Pools p = run(c, rot, ratio, impl);
        ASSERT_EQ(p.gpu.size(), p.ref.size());
        size_t first = p.gpu.size();
        for (size_t i = 0; i < p.gpu.size(); ++i)
          if (p.gpu[i] != p.ref[i]) {
            first = i;
            break;
          }
        EXPECT_EQ(first, p.gpu.size()) << "d " << d << " rot " << rot_kind << " ratio " << ratio << " impl "
                                       << static_cast<int>(impl) << ": first differing pool byte";
        ++compared;
      }
    }
  }
  EXPECT_EQ(compared, 3 * 7 * 2);
}

// The three implementations on ordinary data (Gaussian with channel outliers, random orthogonal R): the legacy
// kernel is the bench's baseline, so it must still produce the same cache.
TEST_P(KvWriteInt2Gpu, AllImplementationsAgreeOnGaussianKeys) {
  OSCAR_REQUIRE_DEVICE();
  const int d = GetParam(), heads = 8, tokens = 517;
  const auto rot = test::random_rotation(d, 90 + d);
  const Case c = contiguous_case(d, heads, tokens, (tokens + 63) / 64,
                                 test::random_bf16(static_cast<size_t>(tokens) * heads * d, d, 91, 30.0f));
  for (float ratio : {0.96f, 0.92f, 0.5f}) {
    for (auto impl : {kern::KvWriteInt2Impl::Tiled, kern::KvWriteInt2Impl::TiledRadix, kern::KvWriteInt2Impl::Legacy}) {
      const Pools p = run(c, &rot, ratio, impl);
      EXPECT_TRUE(p.gpu == p.ref) << "d " << d << " ratio " << ratio << " impl " << static_cast<int>(impl);
    }
  }
}

// A NaN in one head vector: the record of that (token, head) is unspecified, everything else is bit-exact and the
// launch succeeds. The reference gets the same x with that vector zeroed (its select is undefined on NaN).
TEST_P(KvWriteInt2Gpu, NanTouchesOnlyItsOwnRecord) {
  OSCAR_REQUIRE_DEVICE();
  const int d = GetParam(), heads = 2, tokens = 40;
  const auto rot = test::random_rotation(d, 95 + d);
  Case c = contiguous_case(d, heads, tokens, 1, test::random_bf16(static_cast<size_t>(tokens) * heads * d, d, 96));
  const int bad_t = 17, bad_h = 1;
  Case zeroed = c;
  uint16_t* v = c.x.data() + (static_cast<size_t>(bad_t) * heads + bad_h) * d;
  v[3] = fmt::f32_to_bf16(std::numeric_limits<float>::quiet_NaN());
  std::fill_n(zeroed.x.data() + (static_cast<size_t>(bad_t) * heads + bad_h) * d, d, uint16_t{0});
  const fmt::Int2PageGeometry geo{d, 64};
  for (const std::vector<float>* r : {static_cast<const std::vector<float>*>(nullptr), &rot}) {
    for (float ratio : {1.0f, 0.96f, 0.5f}) {
      const Pools got = run(c, r, ratio, kern::KvWriteInt2Impl::Tiled);
      const Pools want = run(zeroed, r, ratio, kern::KvWriteInt2Impl::Tiled);
      auto mask = [&](std::vector<uint8_t> pool) {  // blank the bad token's codes and params
        uint8_t* block = pool.data() + fmt::page_block_offset(0, bad_h, heads, geo.page_bytes());
        std::fill_n(block + bad_t * geo.code_row_bytes(), geo.code_row_bytes(), uint8_t{0});
        std::fill_n(block + geo.params_offset() + bad_t * 4, 4, uint8_t{0});
        return pool;
      };
      EXPECT_TRUE(mask(got.gpu) == mask(want.ref)) << "d " << d << " rot " << (r != nullptr) << " ratio " << ratio;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(HeadDims, KvWriteInt2Gpu, ::testing::Values(64, 128, 256));

}  // namespace
}  // namespace oscar
