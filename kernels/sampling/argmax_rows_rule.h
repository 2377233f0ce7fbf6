#pragma once
// The combine rule behind argmax_rows: a candidate (value, index) and an order-independent combine, so a parallel
// reduction in any order and tree shape returns exactly what std::max_element (operator<) returns on the row.
//
// The sequential contract. std::max_element starts with best = x[0] and moves to x[i] only if best < x[i]
// strictly. Hence:
//  * if x[0] is NaN, nothing ever beats it (NaN < x is false): the answer is 0;
//  * otherwise best is never NaN, a later NaN never wins (best < NaN is false), and the answer is the smallest index
//    among the non-NaN values equal to the non-NaN maximum (x[0] included). "Equal" is float ==, so -0.0 and +0.0
//    tie and the first of them wins; ties keep the smaller index because the comparison is strict.
//
// The parallel form. Order the candidates of a row by a strict total order and take the greatest:
//   rank 2: the poison candidate, index 0 with a NaN value (at most one per row);
//   rank 1: non-NaN values, greater value first, then smaller index (values compare as floats, so ±0 are equal);
//   rank 0: NaN values at index > 0, smaller index first (and the identity below, which has the largest index).
// Indices are unique within a row, so no two distinct candidates of a row are equivalent: the order is total, and
// the maximum of a finite set under a total order does not depend on grouping or order. argmax_combine(a, b) returns
// that maximum of {a, b}, so it is associative and commutative, and any reduction tree gives the same candidate.
// That candidate is the sequential answer: x[0] is always in the set, so if it is NaN the poison (index 0) wins;
// otherwise x[0] is rank 1, rank 0 never wins, and the rank-1 maximum is the smallest index of the maximal value.
//
// Plain C++ with host+device qualifiers under nvcc, so the CPU tests check the very rule the kernel runs.
#include <bit>
#include <cstdint>
#include <limits>

// Same definition as formats/kv_layout.h (an identical redefinition is allowed); this header stays self-contained.
#ifndef OSCAR_HD
#if defined(__CUDACC__)
#define OSCAR_HD __host__ __device__
#else
#define OSCAR_HD
#endif
#endif

namespace oscar::kern {

struct ArgmaxCandidate {
  float value;
  int32_t index;
};

// A bit test rather than x != x: it stays right under -ffinite-math-only, where the compiler may fold x != x to false.
OSCAR_HD inline bool argmax_is_nan(float x) {
#if defined(__CUDA_ARCH__)
  const uint32_t bits = __float_as_uint(x);
#else
  const uint32_t bits = std::bit_cast<uint32_t>(x);
#endif
  return (bits & 0x7fffffffu) > 0x7f800000u;
}

// The identity for empty lanes: rank 0 with an index no real element has (cols <= INT32_MAX, so indices are at most
// INT32_MAX - 1), so every real candidate beats it and combining with it changes nothing.
OSCAR_HD inline ArgmaxCandidate argmax_identity() {
  return {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<int32_t>::max()};
}

// True when a comes strictly before b in the total order above.
OSCAR_HD inline bool argmax_beats(ArgmaxCandidate a, ArgmaxCandidate b) {
  const bool a_nan = argmax_is_nan(a.value), b_nan = argmax_is_nan(b.value);
  const bool a_poison = a_nan && a.index == 0, b_poison = b_nan && b.index == 0;
  if (a_poison != b_poison) return a_poison;
  if (a_nan != b_nan) return b_nan;  // neither is poison here: non-NaN outranks NaN
  if (!a_nan && a.value != b.value) return a.value > b.value;
  return a.index < b.index;  // equal values (±0 included), or two NaNs: the first index
}

OSCAR_HD inline ArgmaxCandidate argmax_combine(ArgmaxCandidate a, ArgmaxCandidate b) {
  return argmax_beats(b, a) ? b : a;
}

// The kernel's per-thread fast path. Running the full combine on every element of a 150K-entry row costs about as
// much ALU time as the row's memory time on one SM, so each thread instead scans its elements in increasing index
// order with one compare:
//   acc starts at argmax_scan_start() = (-inf, INT32_MAX); argmax_scan_step takes (v, i) only if v > acc.value.
// NaNs never pass (v > anything is false for NaN), -inf never passes, and ties keep the earlier index. So acc ends
// as either the start value or the thread's first maximal element among those > -inf. Combined with x[0]'s own
// candidate (which the kernel adds through argmax_combine, so a NaN at index 0 becomes the poison), this gives the
// sequential answer: if x[0] is NaN the poison wins; otherwise every start value (-inf, INT32_MAX) loses to x[0]
// (x[0] > -inf, or x[0] == -inf with index 0 < INT32_MAX); if the row maximum M is -inf, x[0] == -inf is the answer
// 0; if M > -inf, the thread holding the first M reports it and nothing beats it. The skipped elements (NaNs, -infs
// at index > 0) can never be the sequential answer, so dropping them is exact. Requires increasing i per acc.
OSCAR_HD inline ArgmaxCandidate argmax_scan_start() {
  return {-std::numeric_limits<float>::infinity(), std::numeric_limits<int32_t>::max()};
}

OSCAR_HD inline void argmax_scan_step(ArgmaxCandidate& acc, float v, int32_t i) {
  if (v > acc.value) acc = {v, i};
}

}  // namespace oscar::kern
