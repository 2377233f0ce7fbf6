#include <algorithm>
#include <cstdint>

#include "kernels/activation/swiglu.cuh"
#include "kernels/activation/swiglu.h"

namespace oscar::kern {

Status swiglu(const uint16_t* gate_up, int64_t rows, int64_t inter, uint16_t* out, Stream stream) {
  if (rows < 0 || inter <= 0) return Status::InvalidArgument;
  if (rows == 0) return Status::Ok;
  if (!gate_up || !out) return Status::InvalidArgument;
  const bool vec8 = inter % 8 == 0 && reinterpret_cast<uintptr_t>(gate_up) % 16 == 0 &&
                    reinterpret_cast<uintptr_t>(out) % 16 == 0;
  const int64_t work = vec8 ? rows * inter / 8 : rows * inter;
  constexpr int kThreads = 256;
  // Enough blocks to fill every SM several times over; the grid-stride loop covers the rest.
  const int64_t blocks = std::min<int64_t>((work + kThreads - 1) / kThreads, 132 * 32);
  auto s = detail::to_cuda(stream);
  if (vec8)
    detail::swiglu_kernel<true><<<static_cast<unsigned>(blocks), kThreads, 0, s>>>(gate_up, rows, inter, out);
  else
    detail::swiglu_kernel<false><<<static_cast<unsigned>(blocks), kThreads, 0, s>>>(gate_up, rows, inter, out);
  return detail::launch_status();
}

}  // namespace oscar::kern
