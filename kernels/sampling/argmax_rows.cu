#include "kernels/sampling/argmax_rows.cuh"
#include "kernels/sampling/argmax_rows.h"

#include <algorithm>
#include <cstdint>

namespace oscar::kern {

Status argmax_rows(const float* logits, int64_t rows, int64_t cols, int64_t row_stride, int32_t* out,
                   Stream stream) {
  // cols <= INT32_MAX because the answer is an int32 index (and the rule's identity takes INT32_MAX itself).
  if (rows < 0 || cols < 1 || cols > INT32_MAX || row_stride < cols) return Status::InvalidArgument;
  if (rows > INT32_MAX) return Status::Unsupported;  // one block per row on grid.x
  if (rows == 0) return Status::Ok;
  if (!logits || !out) return Status::InvalidArgument;
  // One float4 per thread per trip, rounded up to whole warps: a short row gets a small block instead of idle warps.
  const int64_t threads = std::clamp<int64_t>((cols / 4 + 31) / 32 * 32, 32, detail::kArgmaxMaxThreads);
  detail::argmax_rows_kernel<<<static_cast<unsigned>(rows), static_cast<unsigned>(threads), 0,
                               detail::to_cuda(stream)>>>(logits, cols, row_stride, out);
  return detail::launch_status();
}

}  // namespace oscar::kern
