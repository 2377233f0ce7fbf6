// Greedy sampling: argmax_rows_ref against hand-checked rows, and the combine rule of argmax_rows_rule.h (the one the
// kernel runs) against argmax_rows_ref under every reduction order and tree shape a GPU block might use. The device
// kernel itself is compared with the reference in tests/gpu/test_argmax_rows_gpu.cpp.
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "kernels/sampling/argmax_rows.h"
#include "kernels/sampling/argmax_rows_rule.h"

namespace oscar::kern {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

int32_t ref_of(const std::vector<float>& row) {
  int32_t out = -1;
  argmax_rows_ref(row.data(), 1, static_cast<int64_t>(row.size()), static_cast<int64_t>(row.size()), &out);
  return out;
}

// Bitwise, so a NaN candidate equals itself and -0.0 differs from +0.0: "the same candidate", not "equal values".
bool same(ArgmaxCandidate a, ArgmaxCandidate b) {
  return std::bit_cast<uint32_t>(a.value) == std::bit_cast<uint32_t>(b.value) && a.index == b.index;
}

TEST(ArgmaxRowsRef, HandCheckedRows) {
  struct Case {
    std::vector<float> row;
    int32_t expected;
  };
  const std::vector<Case> cases = {
      {{7.f}, 0},
      {{kNaN}, 0},
      {{1.f, 3.f, 3.f, 2.f}, 1},            // a tie keeps the first index
      {{2.f, 5.f, kNaN, 5.f, 7.f, kNaN}, 4},  // NaNs are skipped, the later strict maximum wins
      {{-0.f, 0.f}, 0},                      // ±0 compare equal: the first of them
      {{0.f, -0.f}, 0},
      {{-1.f, 0.f, -0.f}, 1},
      {{-1.f, -0.f, 0.f}, 1},
      {{-kInf, -kInf}, 0},
      {{-kInf, kNaN, -kInf}, 0},
      {{-kInf, -kInf, -3.f}, 2},
      {{1.f, kInf, kInf}, 1},
      {{kNaN, 5.f, kInf}, 0},  // NaN at index 0: nothing is greater than it under operator<
      {{kNaN, kNaN}, 0},
      {{-kNaN, 1.f}, 0},       // the sign of the NaN does not matter
      {{1.f, kNaN, 2.f}, 2},
      {{3.f, kNaN, 2.f}, 0},
      {{1.f, kNaN, 1.f}, 0},
      {{1.f, -kNaN, kInf}, 2},
      {{std::numeric_limits<float>::denorm_min(), 0.f}, 0},  // a denormal is greater than zero (no flush)
      {{0.f, std::numeric_limits<float>::denorm_min()}, 1},
  };
  for (const Case& c : cases) EXPECT_EQ(ref_of(c.row), c.expected) << ::testing::PrintToString(c.row);
}

TEST(ArgmaxRowsRef, StridedRowsIgnoreThePadding) {
  // Three rows of 3 in a stride of 5; the padding holds values that would win if the reference read them.
  const std::vector<float> logits = {1.f, 4.f, 2.f, kInf, kInf,  //
                                     kNaN, 9.f, 9.f, kInf, kInf,  //
                                     -1.f, -1.f, -0.5f, kInf, kInf};
  std::vector<int32_t> out(3, -1);
  argmax_rows_ref(logits.data(), 3, 3, 5, out.data());
  EXPECT_EQ(out, (std::vector<int32_t>{1, 0, 2}));
}

// The values random rows draw from: many ties, both zeros, both infinities, NaNs of both signs, a denormal.
const std::vector<float> kPool = {-2.f, -1.f, -0.f, 0.f, 1.f, 2.f, 2.f, kInf, -kInf, kNaN, -kNaN,
                                  std::numeric_limits<float>::denorm_min()};

std::vector<float> random_row(std::mt19937& rng) {
  std::uniform_int_distribution<int> len(1, 300);
  // Each row draws from a random subset of the pool, so all-NaN, all-(-inf) and all-tie rows come up often.
  const int w = std::uniform_int_distribution<int>(1, static_cast<int>(kPool.size()))(rng);
  std::vector<int> allowed(kPool.size());
  for (size_t i = 0; i < allowed.size(); ++i) allowed[i] = static_cast<int>(i);
  std::shuffle(allowed.begin(), allowed.end(), rng);
  std::uniform_int_distribution<int> from(0, w - 1);
  std::vector<float> row(static_cast<size_t>(len(rng)));
  for (float& x : row) x = kPool[static_cast<size_t>(allowed[static_cast<size_t>(from(rng))])];
  return row;
}

// A random binary tree over the candidates in their given order: split at a random point, reduce both halves.
ArgmaxCandidate tree_reduce(const std::vector<ArgmaxCandidate>& c, size_t lo, size_t hi, std::mt19937& rng) {
  if (hi - lo == 1) return c[lo];
  std::uniform_int_distribution<size_t> split(lo + 1, hi - 1);
  const size_t mid = split(rng);
  const ArgmaxCandidate a = tree_reduce(c, lo, mid, rng), b = tree_reduce(c, mid, hi, rng);
  return rng() % 2 ? argmax_combine(a, b) : argmax_combine(b, a);
}

// Rounds of adjacent pairs, as the warp butterflies and the per-warp shared-memory pass do.
ArgmaxCandidate pairwise_reduce(std::vector<ArgmaxCandidate> c) {
  while (c.size() > 1) {
    std::vector<ArgmaxCandidate> next;
    for (size_t i = 0; i + 1 < c.size(); i += 2) next.push_back(argmax_combine(c[i], c[i + 1]));
    if (c.size() % 2) next.push_back(c.back());
    c = std::move(next);
  }
  return c[0];
}

TEST(ArgmaxRowsRule, AnyReductionOrderMatchesTheReference) {
  std::mt19937 rng(20240611);
  for (int r = 0; r < 3000; ++r) {
    const std::vector<float> row = random_row(rng);
    const int32_t expected = ref_of(row);
    std::vector<ArgmaxCandidate> cands;
    for (size_t i = 0; i < row.size(); ++i) cands.push_back({row[i], static_cast<int32_t>(i)});
    // Empty lanes: a block wider than the row contributes identities anywhere in the tree.
    const size_t empties = rng() % 40;
    for (size_t e = 0; e < empties; ++e) cands.push_back(argmax_identity());
    for (int order = 0; order < 6; ++order) {
      std::shuffle(cands.begin(), cands.end(), rng);
      ASSERT_EQ(pairwise_reduce(cands).index, expected) << "row " << r << " order " << order << " (pairwise)";
      ASSERT_EQ(tree_reduce(cands, 0, cands.size(), rng).index, expected) << "row " << r << " order " << order;
    }
  }
}

// The kernel's own decomposition: a scalar head of 0..3 elements, float4 groups and a scalar tail, each thread
// scanning its elements with argmax_scan_step, thread 0 folding in x[0] with the full combine, then the candidates
// combined across threads in a random order.
TEST(ArgmaxRowsRule, KernelScanDecompositionMatchesTheReference) {
  std::mt19937 rng(7);
  for (int r = 0; r < 3000; ++r) {
    const std::vector<float> row = random_row(rng);
    const int64_t cols = static_cast<int64_t>(row.size());
    const int32_t expected = ref_of(row);
    for (int trial = 0; trial < 4; ++trial) {
      const int64_t threads = 32 * (1 + static_cast<int64_t>(rng() % 4));
      const bool misaligned = rng() % 8 == 0;  // not 4-byte aligned: everything scalar
      const int64_t head = misaligned ? cols : std::min<int64_t>(cols, static_cast<int64_t>(rng() % 4));
      const int64_t n4 = (cols - head) / 4;
      std::vector<ArgmaxCandidate> acc(static_cast<size_t>(threads), argmax_scan_start());
      for (int64_t t = 0; t < threads; ++t) {
        ArgmaxCandidate& a = acc[static_cast<size_t>(t)];
        for (int64_t i = t; i < head; i += threads) argmax_scan_step(a, row[i], static_cast<int32_t>(i));
        for (int64_t k = t; k < n4; k += threads)
          for (int64_t j = 0; j < 4; ++j) {
            const int64_t i = head + 4 * k + j;
            argmax_scan_step(a, row[static_cast<size_t>(i)], static_cast<int32_t>(i));
          }
        for (int64_t i = head + 4 * n4 + t; i < cols; i += threads)
          argmax_scan_step(a, row[static_cast<size_t>(i)], static_cast<int32_t>(i));
      }
      acc[0] = argmax_combine(acc[0], {row[0], 0});
      acc.resize(32 * ((acc.size() + 31) / 32 + rng() % 2), argmax_identity());  // idle warps of the final pass
      std::shuffle(acc.begin(), acc.end(), rng);
      ASSERT_EQ(tree_reduce(acc, 0, acc.size(), rng).index, expected) << "row " << r << " trial " << trial;
    }
  }
}

// The algebra the proof rests on, checked exhaustively over candidates with distinct indices (as in any one row).
TEST(ArgmaxRowsRule, CombineIsCommutativeAssociativeWithIdentity) {
  std::vector<ArgmaxCandidate> cands;
  for (int32_t i = 0; i < 4; ++i)
    for (const float v : kPool) cands.push_back({v, i});
  for (const ArgmaxCandidate& a : cands) {
    EXPECT_TRUE(same(argmax_combine(a, argmax_identity()), a));
    EXPECT_TRUE(same(argmax_combine(argmax_identity(), a), a));
    for (const ArgmaxCandidate& b : cands) {
      if (b.index == a.index) continue;
      ASSERT_TRUE(same(argmax_combine(a, b), argmax_combine(b, a))) << a.value << "@" << a.index << " " << b.value
                                                                     << "@" << b.index;
      for (const ArgmaxCandidate& c : cands) {
        if (c.index == a.index || c.index == b.index) continue;
        ASSERT_TRUE(same(argmax_combine(argmax_combine(a, b), c), argmax_combine(a, argmax_combine(b, c))));
      }
    }
  }
}

TEST(ArgmaxRowsRule, NanTestIgnoresSignAndPayload) {
  EXPECT_TRUE(argmax_is_nan(kNaN));
  EXPECT_TRUE(argmax_is_nan(-kNaN));
  EXPECT_TRUE(argmax_is_nan(std::bit_cast<float>(0x7f800001u)));  // signalling, smallest payload
  EXPECT_TRUE(argmax_is_nan(std::bit_cast<float>(0xffffffffu)));
  EXPECT_FALSE(argmax_is_nan(kInf));
  EXPECT_FALSE(argmax_is_nan(-kInf));
  EXPECT_FALSE(argmax_is_nan(std::numeric_limits<float>::max()));
  EXPECT_FALSE(argmax_is_nan(-0.f));
}

}  // namespace
}  // namespace oscar::kern
