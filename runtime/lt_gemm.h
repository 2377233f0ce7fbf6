#pragma once
// The forward pass's one GEMM shape, through cuBLASLt: Y[M, N] = X[M, K] · W[N, K]ᵀ (+ beta · Y), all row-major,
// bf16 X and W, fp32 accumulation, Y in bf16 or fp32. W is a PyTorch Linear weight exactly as stored
// ([out_features, in_features]), so no weight is ever transposed or repacked.
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <tuple>

#include "kernels/common/status.h"
#include "runtime/device_buffer.h"

namespace oscar::rt {

enum class GemmOut { BF16, F32 };

// How a shape's algorithm is chosen, once per (m, n, k, output type, beta) and then reused:
//   Heuristic: cuBLASLt's first heuristic result. Deterministic: the same algorithm, so the same bits, every run
//              (calibration and eval rely on that; the default).
//   Timed:     up to kTimedCandidates heuristic results, each run on the call's own operands and the fastest kept
//              (the autotuning serving stacks do). The choice can differ between processes, and with it the
//              summation order, so outputs are not bit-reproducible across runs; for fixed-shape benchmarks and
//              serving. A call made while its stream is being captured into a CUDA graph cannot be timed and takes
//              the heuristic's choice.
enum class GemmSelection { Heuristic, Timed };
inline constexpr int kTimedCandidates = 8;

class LtGemm {
 public:
  // One cuBLASLt handle and one workspace per model (cuBLASLt is free to use the workspace for split-K).
  explicit LtGemm(size_t workspace_bytes = size_t{64} << 20);
  ~LtGemm();
  LtGemm(const LtGemm&) = delete;
  LtGemm& operator=(const LtGemm&) = delete;

  // x: bf16 [m, k] (row stride k), w: bf16 [n, k], y: [m, n] (row stride n). Throws oscar::Error(where, ...) when
  // cuBLASLt has no algorithm for the shape or the call fails.
  void xwt(const uint16_t* x, int64_t m, int64_t k, const uint16_t* w, int64_t n, void* y, GemmOut y_type,
           float beta, kern::Stream stream, const std::string& where);

  // Changing the selection drops every cached plan.
  void set_selection(GemmSelection selection);
  GemmSelection selection() const { return selection_; }
  // For reports: how many shapes were planned by timing, and how many of those kept an algorithm other than the
  // heuristic's first.
  int64_t timed_shapes() const { return timed_shapes_; }
  int64_t timed_changed() const { return timed_changed_; }

 private:
  struct Plan;
  using Key = std::tuple<int64_t, int64_t, int64_t, int, bool>;  // m, n, k, out type, beta != 0
  Plan& plan(const Key& key, const std::string& where);
  // One cublasLtMatmul of the plan with its chosen algorithm (candidate -1) or candidate `candidate`; returns the
  // cublasStatus_t.
  int matmul(const Plan& p, int candidate, const uint16_t* x, const uint16_t* w, void* y, float beta,
             kern::Stream stream);
  // Times the plan's candidates on the call's operands; returns the index of the fastest that ran (-1: none).
  int time_candidates(const Plan& p, const uint16_t* x, const uint16_t* w, void* y, int64_t m, int64_t n,
                      GemmOut y_type, float beta, kern::Stream stream, const std::string& where);

  void* handle_ = nullptr;  // cublasLtHandle_t
  DeviceBuffer workspace_;
  std::map<Key, std::unique_ptr<Plan>> plans_;
  GemmSelection selection_ = GemmSelection::Heuristic;
  int64_t timed_shapes_ = 0, timed_changed_ = 0;
};

}  // namespace oscar::rt
