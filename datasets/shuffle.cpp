#include "datasets/shuffle.h"

#include <numeric>
#include <utility>

namespace oscar::data {

uint64_t uniform_below(std::mt19937_64& engine, uint64_t bound) {
  // 2^64 mod bound, computed in 64-bit arithmetic: (2^64 - bound) mod bound. Raw values below it are the
  // surplus that would make small residues more likely.
  const uint64_t threshold = (0 - bound) % bound;
  for (;;) {
    const uint64_t r = engine();
    if (r >= threshold) return r % bound;
  }
}

std::vector<int64_t> shuffled_indices(int64_t n, uint64_t seed) {
  std::vector<int64_t> idx(static_cast<size_t>(n));
  std::iota(idx.begin(), idx.end(), int64_t{0});
  std::mt19937_64 engine(seed);
  for (int64_t i = n - 1; i > 0; --i) {
    const auto j = static_cast<int64_t>(uniform_below(engine, static_cast<uint64_t>(i) + 1));
    std::swap(idx[i], idx[j]);
  }
  return idx;
}

}  // namespace oscar::data
