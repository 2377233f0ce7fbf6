#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <random>

#include "datasets/shuffle.h"
#include "datasets/utf8.h"

namespace oscar::data {
namespace {

TEST(Utf8, AcceptsWellFormedText) {
  EXPECT_TRUE(is_valid_utf8(""));
  EXPECT_TRUE(is_valid_utf8("plain ascii\t~"));
  EXPECT_TRUE(is_valid_utf8("caf\xC3\xA9"));           // é U+00E9
  EXPECT_TRUE(is_valid_utf8("\xE2\x82\xAC"));          // € U+20AC
  EXPECT_TRUE(is_valid_utf8("\xF0\x9D\x84\x9E"));      // 𝄞 U+1D11E
  EXPECT_TRUE(is_valid_utf8("\xF4\x8F\xBF\xBF"));      // U+10FFFF, the last code point
  EXPECT_TRUE(is_valid_utf8("\xED\x9F\xBF"));          // U+D7FF, just below the surrogates
}

TEST(Utf8, RejectsEveryIllFormedClass) {
  EXPECT_FALSE(is_valid_utf8("\x80"));                 // continuation without lead
  EXPECT_FALSE(is_valid_utf8("a\xFF" "b"));            // never valid in UTF-8
  EXPECT_FALSE(is_valid_utf8("\xC0\x80"));             // overlong NUL
  EXPECT_FALSE(is_valid_utf8("\xE0\x80\xAF"));         // overlong '/'
  EXPECT_FALSE(is_valid_utf8("\xED\xA0\x80"));         // surrogate U+D800
  EXPECT_FALSE(is_valid_utf8("\xF4\x90\x80\x80"));     // U+110000
  EXPECT_FALSE(is_valid_utf8("\xE2\x82"));             // truncated
  EXPECT_FALSE(is_valid_utf8("\xC3" "A"));             // lead followed by ASCII
  EXPECT_FALSE(is_valid_utf8("\xF8\x88\x80\x80\x80")); // 5-byte form
}

TEST(Shuffle, EngineIsTheStandardMt19937_64) {
  // [rand.predef]: the 10000th consecutive invocation of a default-constructed mt19937_64 yields this value.
  std::mt19937_64 e;
  e.discard(9999);
  EXPECT_EQ(e(), 9981545732273789042ull);
}

TEST(Shuffle, IsAPermutationAndDeterministic) {
  const auto a = shuffled_indices(1000, 42);
  const auto b = shuffled_indices(1000, 42);
  const auto c = shuffled_indices(1000, 43);
  EXPECT_EQ(a, b);
  EXPECT_NE(a, c);
  auto sorted = a;
  std::sort(sorted.begin(), sorted.end());
  for (int64_t i = 0; i < 1000; ++i) ASSERT_EQ(sorted[i], i);
  EXPECT_TRUE(shuffled_indices(0, 1).empty());
  EXPECT_EQ(shuffled_indices(1, 1), std::vector<int64_t>{0});
}

TEST(Shuffle, AllPermutationsOfFourAreEquallyLikely) {
  // Fisher-Yates with an unbiased draw makes all 24 orders equally likely; the classic bugs (j drawn from the
  // whole range, or modulo bias) skew this distribution. Chi-square with 23 degrees of freedom: the 0.1% critical
  // value is 49.73. The seeds are fixed, so the test is deterministic.
  const int kTrials = 48000;
  std::map<std::vector<int64_t>, int> counts;
  for (int s = 0; s < kTrials; ++s) counts[shuffled_indices(4, static_cast<uint64_t>(s))]++;
  ASSERT_EQ(counts.size(), 24u);
  const double expected = kTrials / 24.0;
  double chi2 = 0;
  for (const auto& [perm, n] : counts) chi2 += (n - expected) * (n - expected) / expected;
  EXPECT_LT(chi2, 49.73);
}

TEST(Shuffle, UniformBelowStaysInRangeAndCoversIt) {
  std::mt19937_64 e(7);
  EXPECT_EQ(uniform_below(e, 1), 0u);
  std::vector<int> seen(3, 0);
  for (int i = 0; i < 3000; ++i) {
    const uint64_t v = uniform_below(e, 3);
    ASSERT_LT(v, 3u);
    seen[v]++;
  }
  for (int n : seen) EXPECT_NEAR(n, 1000, 150);
  // A bound just above 2^63 rejects almost half of the raw values; the result must still be in range.
  const uint64_t big = (uint64_t{1} << 63) + 1;
  for (int i = 0; i < 100; ++i) ASSERT_LT(uniform_below(e, big), big);
}

}  // namespace
}  // namespace oscar::data
