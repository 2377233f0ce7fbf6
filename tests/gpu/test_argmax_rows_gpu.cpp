// kern::argmax_rows against argmax_rows_ref (std::max_element), exactly, on Qwen3's vocabulary (151936) and odd
// shapes: rows of 1 and 3, 1000, cols % 4 != 0, padded strides, and row starts off the 16-byte grid (so the scalar
// head, the float4 body and the scalar tail all carry the answer in some row). Each row plants what the combine rule
// must get right: ties, NaN at index 0 and later, ±inf, ±0, a denormal, the maximum at the first and last index.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "kernels/sampling/argmax_rows.h"
#include "tests/gpu/gpu_test_buffer.h"

namespace oscar::kern {
namespace {

using test::gpu::DeviceBuffer;

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr int kPlantedPatterns = 14;
constexpr int kPoolRows = 24;

// Row r of n values: a planted pattern for r < kPlantedPatterns, else values from a small pool (mostly ties).
void fill_row(float* x, int64_t n, int r, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.f, 3.f);
  std::uniform_int_distribution<int64_t> pos(0, n - 1);
  for (int64_t i = 0; i < n; ++i) x[i] = normal(rng);
  const int64_t j = pos(rng), k = std::max(j, pos(rng));
  switch (r) {
    case 0: break;                                  // plain random logits
    case 1: x[j] = x[k] = 100.f; break;             // a tie for the maximum
    case 2: x[0] = kNaN, x[j] = kInf; break;        // NaN at index 0 beats everything, inf included
    case 3:                                         // scattered NaNs and infinities
      for (int64_t i = 0; i < n; ++i)
        if (rng() % 10 == 0) x[i] = rng() % 2 ? kNaN : -kInf;
      x[j] = x[k] = kInf;
      break;
    case 4:                                         // all -inf and NaN (never at 0): the answer is 0
      for (int64_t i = 0; i < n; ++i) x[i] = i > 0 && rng() % 3 == 0 ? kNaN : -kInf;
      break;
    case 5:                                         // negatives with -0.0 and +0.0 tying for the maximum
      for (int64_t i = 0; i < n; ++i) x[i] = -1.f - std::abs(x[i]);
      x[j] = rng() % 2 ? -0.f : 0.f, x[k] = rng() % 2 ? -0.f : 0.f;
      break;
    case 6:                                         // zeros and one denormal: flushing it to zero would give 0
      std::fill(x, x + n, 0.f);
      x[k] = std::numeric_limits<float>::denorm_min();
      break;
    case 7: std::fill(x, x + n, 3.f); break;        // all equal
    case 8:                                         // the only finite value is the last one
      std::fill(x, x + n, -kInf);
      x[n - 1] = -1e30f;
      break;
    case 9: x[n - 1] = 100.f; break;                // the maximum in the scalar tail or the last float4
    case 10: x[std::min<int64_t>(n - 1, 1 + static_cast<int64_t>(rng() % 3))] = 100.f; break;  // in the head
    case 11: x[0] = x[k] = 100.f; break;            // index 0 ties with a later element
    case 12: x[j] = kNaN, x[k] = 100.f; break;      // a NaN before the maximum does not stop the scan
    case 13:                                        // NaN everywhere but a few finite values
      for (int64_t i = 0; i < n; ++i) x[i] = i == 0 || rng() % 50 == 0 ? normal(rng) : -kNaN;
      break;
    default: {
      static const float pool[] = {-1.f, -0.f, 0.f, 1.f, 1.f, kInf, -kInf, kNaN};
      const int width = 1 + static_cast<int>(rng() % 8);
      for (int64_t i = 0; i < n; ++i) x[i] = pool[rng() % static_cast<unsigned>(width)];
    }
  }
}

struct Layout {
  int64_t cols, row_stride, offset;  // offset: floats between the (256-byte aligned) allocation and row 0
};

void check_layout(const Layout& l) {
  const int64_t rows = kPlantedPatterns + kPoolRows;
  // Padding and the leading offset hold +inf: a kernel that reads past cols or before the row would pick them.
  std::vector<float> host(static_cast<size_t>(l.offset + rows * l.row_stride), kInf);
  std::mt19937 rng(static_cast<uint32_t>(l.cols * 31 + l.row_stride * 7 + l.offset));
  for (int r = 0; r < rows; ++r) fill_row(host.data() + l.offset + r * l.row_stride, l.cols, r, rng);
  std::vector<int32_t> want(static_cast<size_t>(rows), -1);
  argmax_rows_ref(host.data() + l.offset, rows, l.cols, l.row_stride, want.data());

  DeviceBuffer<float> logits(host);
  DeviceBuffer<int32_t> out(static_cast<size_t>(rows));
  ASSERT_EQ(cudaMemset(out.ptr, 0xff, out.count * sizeof(int32_t)), cudaSuccess);
  ASSERT_EQ(argmax_rows(logits.ptr + l.offset, rows, l.cols, l.row_stride, out.ptr, nullptr), Status::Ok);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const std::vector<int32_t> got = out.download();
  for (int64_t r = 0; r < rows; ++r)
    EXPECT_EQ(got[static_cast<size_t>(r)], want[static_cast<size_t>(r)])
        << "cols " << l.cols << " stride " << l.row_stride << " offset " << l.offset << " row " << r;
}

TEST(ArgmaxRowsGpu, SmallAndOddShapesMatchRef) {
  OSCAR_REQUIRE_DEVICE();
  for (const Layout& l : {Layout{1, 1, 0}, Layout{1, 1, 1}, Layout{3, 3, 0}, Layout{3, 5, 1}, Layout{4, 4, 0},
                          Layout{5, 7, 3}, Layout{8, 9, 0}, Layout{1000, 1000, 0}, Layout{1000, 1001, 2},
                          Layout{1001, 1001, 0}, Layout{4099, 4100, 3}})
    check_layout(l);
}

TEST(ArgmaxRowsGpu, Qwen3VocabularyMatchesRef) {
  OSCAR_REQUIRE_DEVICE();
  // 151936 aligned; a stride of 151937 (every row start on a different 16-byte phase); every row 2 floats off the
  // grid; 151937 with a padded stride; 151937 unpadded from a misaligned base.
  for (const Layout& l : {Layout{151936, 151936, 0}, Layout{151936, 151937, 1}, Layout{151936, 151940, 2},
                          Layout{151937, 151940, 0}, Layout{151937, 151937, 3}})
    check_layout(l);
}

TEST(ArgmaxRowsGpu, BatchOf64DistinctRows) {
  OSCAR_REQUIRE_DEVICE();
  // A decode batch: 64 rows of random logits whose maxima sit at 64 different places (no planted patterns).
  const int64_t rows = 64, cols = 151936;
  std::vector<float> host(static_cast<size_t>(rows * cols));
  std::mt19937 rng(64);
  std::normal_distribution<float> normal(0.f, 3.f);
  for (float& x : host) x = normal(rng);
  for (int64_t r = 0; r < rows; ++r) host[static_cast<size_t>(r * cols + (r * 2371) % cols)] = 50.f;
  std::vector<int32_t> want(static_cast<size_t>(rows));
  argmax_rows_ref(host.data(), rows, cols, cols, want.data());
  DeviceBuffer<float> logits(host);
  DeviceBuffer<int32_t> out(static_cast<size_t>(rows));
  ASSERT_EQ(argmax_rows(logits.ptr, rows, cols, cols, out.ptr, nullptr), Status::Ok);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  EXPECT_EQ(out.download(), want);
}

// The checks come before any launch, so they need no device: the pointers are never dereferenced.
TEST(ArgmaxRowsGpu, PreconditionsAreReported) {
  float logit = 0.f;
  int32_t index = 0;
  const float* x = &logit;
  int32_t* o = &index;
  EXPECT_EQ(argmax_rows(x, 1, 0, 1, o, nullptr), Status::InvalidArgument);   // cols 0
  EXPECT_EQ(argmax_rows(x, 1, -4, 1, o, nullptr), Status::InvalidArgument);  // cols < 0
  EXPECT_EQ(argmax_rows(x, 2, 8, 7, o, nullptr), Status::InvalidArgument);   // stride < cols
  EXPECT_EQ(argmax_rows(x, -1, 8, 8, o, nullptr), Status::InvalidArgument);  // rows < 0
  EXPECT_EQ(argmax_rows(x, 1, int64_t{1} << 31, int64_t{1} << 31, o, nullptr), Status::InvalidArgument);  // int32 out
  EXPECT_EQ(argmax_rows(x, 1, 8, 8, nullptr, nullptr), Status::InvalidArgument);       // null out
  EXPECT_EQ(argmax_rows(nullptr, 1, 8, 8, o, nullptr), Status::InvalidArgument);       // null logits
  EXPECT_EQ(argmax_rows(x, int64_t{1} << 31, 8, 8, o, nullptr), Status::Unsupported);  // more rows than grid.x
  EXPECT_EQ(argmax_rows(nullptr, 0, 8, 8, nullptr, nullptr), Status::Ok);              // nothing to do
}

}  // namespace
}  // namespace oscar::kern
