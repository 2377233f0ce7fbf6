#pragma once
// Per-op GPU time of a forward pass, for benchmarks: the forward calls mark(op) on its stream before each op and
// finish() after the last; the time between a mark and the next event is charged to that op. cudaEvents between
// launches on one in-order stream add no synchronization, so the profiled forward runs the same kernels in the
// same order (each event adds ~1-2 µs of GPU time on a 400-launch forward: well under 1%).
// CUDA-free header.
#include <map>
#include <string>
#include <vector>

#include "kernels/common/status.h"

namespace oscar::rt {

class ForwardProfiler {
 public:
  ForwardProfiler() = default;
  ~ForwardProfiler();
  ForwardProfiler(const ForwardProfiler&) = delete;
  ForwardProfiler& operator=(const ForwardProfiler&) = delete;

  // `op` must outlive summarize() (string literals at the call sites).
  void mark(kern::Stream stream, const char* op);
  void finish(kern::Stream stream);  // closes the last op
  // Waits for the last event, adds every op's milliseconds to totals_ms and clears the marks (events are reused).
  void collect();
  void clear_totals() { totals_ms_.clear(); calls_.clear(); }
  const std::map<std::string, double>& totals_ms() const { return totals_ms_; }
  const std::map<std::string, long>& calls() const { return calls_; }

 private:
  void* event(size_t i);
  std::vector<void*> events_;  // cudaEvent_t, grown on demand
  std::vector<const char*> ops_;
  size_t used_ = 0;
  std::map<std::string, double> totals_ms_;
  std::map<std::string, long> calls_;
};

}  // namespace oscar::rt
