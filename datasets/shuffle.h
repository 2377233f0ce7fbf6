#pragma once
// Deterministic shuffling that gives the same order on every platform and standard library.
// std::mt19937_64's output sequence is fixed by the C++ standard, but std::uniform_int_distribution and
// std::shuffle are not (libstdc++ and libc++ differ, and libstdc++ changed between versions), so the bounded
// draw and the Fisher-Yates loop are ours.
#include <cstdint>
#include <random>
#include <vector>

namespace oscar::data {

// Uniform integer in [0, bound) without modulo bias (rejection of the 2^64 mod bound lowest raw values).
// bound must be > 0.
uint64_t uniform_below(std::mt19937_64& engine, uint64_t bound);

// A permutation of 0..n-1: Fisher-Yates from the last position down, j = uniform_below(i + 1), seeded by `seed`.
std::vector<int64_t> shuffled_indices(int64_t n, uint64_t seed);

}  // namespace oscar::data
