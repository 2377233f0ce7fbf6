#pragma once
// The status every kernel launcher returns. Launchers never throw and never exit: they check preconditions
// (can_implement) and report; host code above turns a non-Ok status into an oscar::Error naming the call site.
// Plain C++ (no CUDA headers), so host code and CPU-only builds can include launcher headers.
#include <string_view>

// The CUDA runtime spells a stream `struct CUstream_st*`; naming the struct here lets launcher headers take a
// stream without including cuda_runtime.h.
struct CUstream_st;

namespace oscar::kern {

using Stream = CUstream_st*;

enum class Status {
  Ok = 0,
  InvalidArgument,  // a size, count or pointer that cannot be right (negative, null with work to do)
  Unsupported,      // a valid request this kernel does not implement (head_dim, bits, dtype)
  Misaligned,       // a pointer or stride that breaks the vector-load alignment the kernel relies on
  CudaError,        // the launch itself failed (cudaGetLastError after the launch)
};

constexpr std::string_view status_name(Status s) {
  switch (s) {
    case Status::Ok: return "ok";
    case Status::InvalidArgument: return "invalid argument";
    case Status::Unsupported: return "unsupported";
    case Status::Misaligned: return "misaligned";
    case Status::CudaError: return "CUDA error";
  }
  return "unknown status";
}

}  // namespace oscar::kern
