#include "kernels/norm/rmsnorm.cuh"
#include "kernels/norm/rmsnorm.h"

#include <algorithm>
#include <cstdint>

namespace oscar::kern {

namespace {
int threads_for(int64_t n) { return n >= 2048 ? 512 : n >= 512 ? 256 : n >= 128 ? 128 : 64; }

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// The vector kernel: 256 threads, kVec float4s each, kVec the smallest of 1/2/4/8 that covers the row (n <= 8192,
// every hidden size up to 70B-class models); false when the row shape or alignment rules it out.
template <bool kAdd>
bool launch_vec(float* x, const float* delta, int64_t rows, int64_t n, const uint16_t* weight, float eps,
                uint16_t* out, cudaStream_t stream) {
  constexpr int kThreads = 256;
  if (n % 4 != 0 || n > 4 * 8 * kThreads) return false;
  if (!aligned16(x) || (kAdd && !aligned16(delta)) || !aligned16(weight) || reinterpret_cast<uintptr_t>(out) % 8)
    return false;
  const int64_t per_thread = (n / 4 + kThreads - 1) / kThreads;
  // Small rows get fewer threads instead of idle ones: the block shrinks to a warp multiple covering n / 4.
  const int threads = per_thread == 1 ? static_cast<int>(std::max<int64_t>(32, (n / 4 + 31) / 32 * 32)) : kThreads;
  const unsigned grid = static_cast<unsigned>(rows);
  if (per_thread <= 1)
    detail::rmsnorm_vec_kernel<kAdd, 1><<<grid, threads, 0, stream>>>(x, delta, n, weight, eps, out);
  else if (per_thread <= 2)
    detail::rmsnorm_vec_kernel<kAdd, 2><<<grid, threads, 0, stream>>>(x, delta, n, weight, eps, out);
  else if (per_thread <= 4)
    detail::rmsnorm_vec_kernel<kAdd, 4><<<grid, threads, 0, stream>>>(x, delta, n, weight, eps, out);
  else
    detail::rmsnorm_vec_kernel<kAdd, 8><<<grid, threads, 0, stream>>>(x, delta, n, weight, eps, out);
  return true;
}

Status check_rows(int64_t rows, int64_t n) {
  if (rows < 0 || n <= 0) return Status::InvalidArgument;
  if (rows > 0x7fffffff) return Status::Unsupported;  // one block per row
  return Status::Ok;
}
}  // namespace

Status rmsnorm(const float* x, int64_t rows, int64_t n, const uint16_t* weight, float eps, uint16_t* out,
               Stream stream) {
  if (Status s = check_rows(rows, n); s != Status::Ok) return s;
  if (rows == 0) return Status::Ok;
  if (!x || !weight || !out) return Status::InvalidArgument;
  // The non-residual variant never writes x; the const_cast only shares one kernel body with add_rmsnorm.
  if (launch_vec<false>(const_cast<float*>(x), nullptr, rows, n, weight, eps, out, detail::to_cuda(stream)))
    return detail::launch_status();
  detail::rmsnorm_kernel<false><<<static_cast<unsigned>(rows), threads_for(n), 0, detail::to_cuda(stream)>>>(
      const_cast<float*>(x), nullptr, n, weight, eps, out);
  return detail::launch_status();
}

Status add_rmsnorm(float* residual, const float* delta, int64_t rows, int64_t n, const uint16_t* weight, float eps,
                   uint16_t* out, Stream stream) {
  if (Status s = check_rows(rows, n); s != Status::Ok) return s;
  if (rows == 0) return Status::Ok;
  if (!residual || !delta || !weight || !out) return Status::InvalidArgument;
  if (launch_vec<true>(residual, delta, rows, n, weight, eps, out, detail::to_cuda(stream)))
    return detail::launch_status();
  detail::rmsnorm_kernel<true><<<static_cast<unsigned>(rows), threads_for(n), 0, detail::to_cuda(stream)>>>(
      residual, delta, n, weight, eps, out);
  return detail::launch_status();
}

Status head_rmsnorm(float* x, int64_t rows, int64_t row_stride, int64_t heads, int64_t head_dim,
                    const uint16_t* weight, float eps, Stream stream) {
  if (rows < 0 || heads <= 0 || head_dim <= 0 || row_stride < heads * head_dim) return Status::InvalidArgument;
  if (head_dim > 256) return Status::Unsupported;
  if (rows == 0) return Status::Ok;
  if (!x || !weight) return Status::InvalidArgument;
  const int64_t warps = rows * heads;
  constexpr int kThreads = 256;
  const int64_t blocks = (warps * 32 + kThreads - 1) / kThreads;
  if (blocks > 0x7fffffff) return Status::Unsupported;
  detail::head_rmsnorm_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, detail::to_cuda(stream)>>>(
      x, rows, row_stride, static_cast<int>(heads), static_cast<int>(head_dim), weight, eps);
  return detail::launch_status();
}

}  // namespace oscar::kern
