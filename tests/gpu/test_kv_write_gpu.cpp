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
#include <vector>

#include "../kernels/kv_cache_test_util.h"
#include "../kernels/kv_write_stress.h"
#include "formats/kv_layout.h"
#include "kernels/kv_quantize/kv_quantize.h"
#include "kernels/kv_quantize/kv_quantize_ref.h"
#include "kernels/kv_quantize/kv_write_variants.h"
#include "gpu_test_buffer.h"
#include "test_support.h"

namespace oscar {
namespace {

using test::gpu::have_gpu;

template <typename T>
using Dev = test::gpu::DeviceBuffer<T>;

struct Case {
  int d = 128, heads = 3, tokens = 0;
  int64_t stride = 0;  // elements between tokens (>= heads * d)
  std::vector<uint16_t> x;
  std::vector<int32_t> slots;
  int pages = 0;
};

// Runs one implementation and the reference on the same pool (pre-filled with 0xab so stray writes show).
struct Pools {
  std::vector<uint8_t> gpu, ref;
};
Pools run(const Case& c, const std::vector<float>* rot, float ratio, kern::KvWriteInt2Impl impl) {
  const fmt::Int2PageGeometry geo{c.d, 64};
  std::vector<uint8_t> pool(static_cast<size_t>(c.pages) * c.heads * geo.page_bytes(), 0xab);
  kern::KvWriteParams p;
  p.tokens = c.tokens;
  p.token_stride = c.stride;
  p.num_kv_heads = c.heads;
  p.head_dim = c.d;
  p.page_tokens = 64;
  p.clip_ratio = ratio;
  Dev<uint16_t> dx(c.x);
  Dev<float> drot(rot ? *rot : std::vector<float>{});
  Dev<int32_t> dslots(c.slots);
  Dev<uint8_t> dpool(pool);
  p.x = dx.ptr;
  p.rotation = rot ? drot.ptr : nullptr;
  p.slots = dslots.ptr;
  p.int2_pool = dpool.ptr;
  EXPECT_EQ(kern::kv_write_int2_impl(p, impl, nullptr), kern::Status::Ok);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  Pools out{dpool.download(), pool};
  p.x = c.x.data();
  p.rotation = rot ? rot->data() : nullptr;
  p.slots = c.slots.data();
  p.int2_pool = out.ref.data();
  kern::kv_write_ref(p, kern::KvWriteMode::Int2);
  return out;
}

// `tokens` stress vectors per head with shuffled slots over `pages` pages, every 7th slot skipped and one whole
// 16-token tile skipped; x rows strided by `pad` extra elements (x a slice of a wider tensor).
Case stress_case(int d, int heads, int tokens, int pad, bool finite_only, uint32_t seed) {
  Case c;
  c.d = d;
  c.heads = heads;
  c.tokens = tokens;
  c.stride = static_cast<int64_t>(heads) * d + pad;
  c.pages = (tokens + 63) / 64 + 1;
  c.x.assign(static_cast<size_t>(tokens) * c.stride, fmt::f32_to_bf16(123.f));  // the padding must not be read
  std::mt19937 rng(seed);
  for (int t = 0; t < tokens; ++t)
    for (int h = 0; h < heads; ++h)
      test::fill_stress_vector((t * heads + h) % test::kStressPatterns, d, rng, finite_only,
                               c.x.data() + static_cast<size_t>(t) * c.stride + static_cast<size_t>(h) * d);
  std::vector<int32_t> all(static_cast<size_t>(c.pages) * 64);
  std::iota(all.begin(), all.end(), 0);
  std::shuffle(all.begin(), all.end(), rng);
  c.slots.assign(all.begin(), all.begin() + tokens);
  for (int t = 0; t < tokens; t += 7) c.slots[static_cast<size_t>(t)] = -1;
  for (int t = 32; t < std::min(tokens, 48); ++t) c.slots[static_cast<size_t>(t)] = -1;
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
  Case c;
  c.d = d;
  c.heads = heads;
  c.tokens = tokens;
  c.stride = static_cast<int64_t>(heads) * d;
  c.pages = (tokens + 63) / 64;
  c.x = test::random_bf16(static_cast<size_t>(tokens) * heads * d, d, 91, 30.0f);
  c.slots.resize(static_cast<size_t>(tokens));
  std::iota(c.slots.begin(), c.slots.end(), 0);
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
  Case c;
  c.d = d;
  c.heads = heads;
  c.tokens = tokens;
  c.stride = static_cast<int64_t>(heads) * d;
  c.pages = 1;
  c.x = test::random_bf16(static_cast<size_t>(tokens) * heads * d, d, 96);
  c.slots.resize(static_cast<size_t>(tokens));
  std::iota(c.slots.begin(), c.slots.end(), 0);
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
