#include "kernels/norm/rmsnorm.cuh"
#include "kernels/norm/rmsnorm.h"

namespace oscar::kern {

namespace {
int threads_for(int64_t n) { return n >= 2048 ? 512 : n >= 512 ? 256 : n >= 128 ? 128 : 64; }

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
  detail::rmsnorm_kernel<false><<<static_cast<unsigned>(rows), threads_for(n), 0, detail::to_cuda(stream)>>>(
      const_cast<float*>(x), nullptr, n, weight, eps, out);
  return detail::launch_status();
}

Status add_rmsnorm(float* residual, const float* delta, int64_t rows, int64_t n, const uint16_t* weight, float eps,
                   uint16_t* out, Stream stream) {
  if (Status s = check_rows(rows, n); s != Status::Ok) return s;
  if (rows == 0) return Status::Ok;
  if (!residual || !delta || !weight || !out) return Status::InvalidArgument;
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
