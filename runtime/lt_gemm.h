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

 private:
  struct Plan;
  using Key = std::tuple<int64_t, int64_t, int64_t, int, bool>;  // m, n, k, out type, beta != 0
  const Plan& plan(const Key& key, const std::string& where);

  void* handle_ = nullptr;  // cublasLtHandle_t
  DeviceBuffer workspace_;
  std::map<Key, std::unique_ptr<Plan>> plans_;
};

}  // namespace oscar::rt
