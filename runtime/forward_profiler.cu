#include <cuda_runtime.h>

#include "runtime/device_buffer.h"
#include "runtime/forward_profiler.h"

namespace oscar::rt {

ForwardProfiler::~ForwardProfiler() {
  for (void* e : events_) cudaEventDestroy(static_cast<cudaEvent_t>(e));
}

void* ForwardProfiler::event(size_t i) {
  while (events_.size() <= i) {
    cudaEvent_t e = nullptr;
    check_cuda(cudaEventCreate(&e), "ForwardProfiler: cudaEventCreate");
    events_.push_back(e);
  }
  return events_[i];
}

void ForwardProfiler::mark(kern::Stream stream, const char* op) {
  check_cuda(cudaEventRecord(static_cast<cudaEvent_t>(event(used_)), reinterpret_cast<cudaStream_t>(stream)),
             "ForwardProfiler: cudaEventRecord");
  ops_.resize(used_ + 1);
  ops_[used_++] = op;
}

void ForwardProfiler::finish(kern::Stream stream) { mark(stream, nullptr); }

void ForwardProfiler::collect() {
  if (used_ == 0) return;
  check_cuda(cudaEventSynchronize(static_cast<cudaEvent_t>(events_[used_ - 1])), "ForwardProfiler: synchronize");
  for (size_t i = 0; i + 1 < used_; ++i) {
    if (!ops_[i]) continue;
    float ms = 0.f;
    check_cuda(cudaEventElapsedTime(&ms, static_cast<cudaEvent_t>(events_[i]), static_cast<cudaEvent_t>(events_[i + 1])),
               "ForwardProfiler: cudaEventElapsedTime");
    totals_ms_[ops_[i]] += ms;
    ++calls_[ops_[i]];
  }
  used_ = 0;
  ops_.clear();
}

}  // namespace oscar::rt
