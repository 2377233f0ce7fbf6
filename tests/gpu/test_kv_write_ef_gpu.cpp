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
#include "formats/kv_layout.h"
#include "kernels/kv_quantize/kv_quantize.h"
#include "kernels/kv_quantize/kv_quantize_ref.h"
#include "gpu_test_buffer.h"

namespace oscar {
namespace {

template <typename T>
using Dev = test::gpu::DeviceBuffer<T>;

struct Case {
  int d = 128, heads = 3, tokens = 0;
  int64_t stride = 0;
  std::vector<uint16_t> x;
  std::vector<int32_t> slots;
  int pages = 0;
};

// Stress vectors (stress = true) or Gaussian keys with outliers; shuffled slots, every 7th and one 16-token tile
// skipped, x rows padded by `pad` elements.
Case make_case(int d, int heads, int tokens, int pad, bool stress, uint32_t seed) {
  Case c;
  c.d = d;
  c.heads = heads;
  c.tokens = tokens;
  c.stride = static_cast<int64_t>(heads) * d + pad;
  c.pages = (tokens + 63) / 64 + 1;
  c.x.assign(static_cast<size_t>(tokens) * c.stride, fmt::f32_to_bf16(123.f));
  std::mt19937 rng(seed);
  const auto gauss = test::random_bf16(static_cast<size_t>(tokens) * heads * d, d, seed + 1);
  for (int t = 0; t < tokens; ++t)
    for (int h = 0; h < heads; ++h) {
      uint16_t* dst = c.x.data() + static_cast<size_t>(t) * c.stride + static_cast<size_t>(h) * d;
      if (stress)
        test::fill_stress_vector((t * heads + h) % test::kStressPatterns, d, rng, true, dst);
      else
        std::copy_n(gauss.data() + (static_cast<size_t>(t) * heads + h) * d, d, dst);
    }
  std::vector<int32_t> all(static_cast<size_t>(c.pages) * 64);
  std::iota(all.begin(), all.end(), 0);
  std::shuffle(all.begin(), all.end(), rng);
  c.slots.assign(all.begin(), all.begin() + tokens);
  for (int t = 0; t < tokens; t += 7) c.slots[static_cast<size_t>(t)] = -1;
  for (int t = 32; t < std::min(tokens, 48); ++t) c.slots[static_cast<size_t>(t)] = -1;
  return c;
}

struct Pools {
  std::vector<uint8_t> gpu, ref;
};

// tables == nullptr: the RTN writer on both sides.
Pools run(const Case& c, const std::vector<float>* rot, float ratio, const test::EfTables* tables, bool feedback) {
  const fmt::Int2PageGeometry geo{c.d, 64};
  std::vector<uint8_t> pool(static_cast<size_t>(c.pages) * c.heads * geo.page_bytes(), 0xab);
  kern::KvWriteParams p;
  p.tokens = c.tokens;
  p.token_stride = c.stride;
  p.num_kv_heads = c.heads;
  p.head_dim = c.d;
  p.page_tokens = 64;
  p.clip_ratio = ratio;
  p.ef_clip_feedback = feedback;
  Dev<uint16_t> dx(c.x);
  Dev<float> drot(rot ? *rot : std::vector<float>{});
  Dev<int32_t> dslots(c.slots);
  Dev<uint8_t> dpool(pool);
  Dev<int32_t> dorder(tables ? tables->order : std::vector<int32_t>{});
  Dev<float> dweights(tables ? tables->weights : std::vector<float>{});
  p.x = dx.ptr;
  p.rotation = rot ? drot.ptr : nullptr;
  p.slots = dslots.ptr;
  p.int2_pool = dpool.ptr;
  p.ef_order = tables ? dorder.ptr : nullptr;
  p.ef_weights = tables ? dweights.ptr : nullptr;
  EXPECT_EQ(kern::kv_write(p, kern::KvWriteMode::Int2, nullptr), kern::Status::Ok);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  Pools out{dpool.download(), pool};
  p.x = c.x.data();
  p.rotation = rot ? rot->data() : nullptr;
  p.slots = c.slots.data();
  p.int2_pool = out.ref.data();
  p.ef_order = tables ? tables->order.data() : nullptr;
  p.ef_weights = tables ? tables->weights.data() : nullptr;
  kern::kv_write_ref(p, kern::KvWriteMode::Int2);
  return out;
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

INSTANTIATE_TEST_SUITE_P(HeadDims, KvWriteEfGpu, ::testing::Values(64, 128, 256));

}  // namespace
}  // namespace oscar
