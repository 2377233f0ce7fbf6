#pragma once
// Greedy sampling on the device: the index of the largest logit of every row, with std::max_element's exact
// semantics (first index of the maximum; a NaN at index 0 gives 0, later NaNs never win; -0.0 == +0.0), so the
// GPU's token equals the CPU reference's token bit for bit. The reduction rule is kernels/sampling/argmax_rows_rule.h.
#include <cstdint>

#include "kernels/common/status.h"

namespace oscar::kern {

// logits [rows, row_stride] fp32 (only the first cols entries of each row are read; rows need no alignment: a
// misaligned row start or cols % 4 != 0 only costs a scalar head/tail), out [rows] int32. Device pointers.
// Preconditions: rows >= 0 (0 returns Ok without touching anything), 1 <= cols <= INT32_MAX, row_stride >= cols,
// non-null pointers when rows > 0 (else InvalidArgument); rows > INT32_MAX is Unsupported (one block per row).
Status argmax_rows(const float* logits, int64_t rows, int64_t cols, int64_t row_stride, int32_t* out,
                   Stream stream);

// CPU reference (host pointers, same shapes and preconditions): std::max_element on each row.
void argmax_rows_ref(const float* logits, int64_t rows, int64_t cols, int64_t row_stride, int32_t* out);

}  // namespace oscar::kern
