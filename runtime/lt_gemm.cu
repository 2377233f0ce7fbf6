#include <cublasLt.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "formats/error.h"
#include "runtime/lt_gemm.h"

namespace oscar::rt {

namespace {
void check_lt(cublasStatus_t s, const std::string& where, const char* call) {
  if (s != CUBLAS_STATUS_SUCCESS)
    throw Error(where, std::string("cuBLASLt ") + call + " failed: " + cublasGetStatusString(s));
}
}  // namespace

// Descriptors and the heuristic's algorithm for one shape, built once and reused by every forward of that size.
struct LtGemm::Plan {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulAlgo_t algo{};
  cublasLtMatmulAlgo_t candidates[kTimedCandidates]{};  // Timed selection: the heuristic's results, best first
  int num_candidates = 0;
  bool timed = false;                             // the algorithm was chosen by timing
  ~Plan() {
    if (c) cublasLtMatrixLayoutDestroy(c);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

LtGemm::LtGemm(size_t workspace_bytes) : workspace_(workspace_bytes, "cuBLASLt workspace") {
  cublasLtHandle_t h = nullptr;
  check_lt(cublasLtCreate(&h), "LtGemm", "cublasLtCreate");
  handle_ = h;
}

LtGemm::~LtGemm() {
  plans_.clear();
  if (handle_) cublasLtDestroy(static_cast<cublasLtHandle_t>(handle_));
}

LtGemm::Plan& LtGemm::plan(const Key& key, const std::string& where) {
  if (auto it = plans_.find(key); it != plans_.end()) return *it->second;
  // Token counts vary call to call (eval, calibration over documents); bound the cache rather than let it grow.
  if (plans_.size() >= 4096) plans_.clear();
  const auto [m, n, k, out_type, accumulate] = key;
  auto p = std::make_unique<Plan>();
  // cuBLASLt is column-major. Row-major Y[m, n] is column-major Yᵀ[n, m] = W · Xᵀ, where row-major W[n, k] read
  // column-major is Wᵀ[k, n] (so op(A) = transpose) and row-major X[m, k] is column-major Xᵀ[k, m] (op(B) = none).
  // This "TN" form is the layout cuBLASLt's fastest bf16 kernels are built for.
  check_lt(cublasLtMatmulDescCreate(&p->op, CUBLAS_COMPUTE_32F, CUDA_R_32F), where, "MatmulDescCreate");
  const cublasOperation_t trans = CUBLAS_OP_T, no_trans = CUBLAS_OP_N;
  check_lt(cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_TRANSA, &trans, sizeof(trans)), where,
           "MatmulDescSetAttribute(TRANSA)");
  check_lt(cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_TRANSB, &no_trans, sizeof(no_trans)), where,
           "MatmulDescSetAttribute(TRANSB)");
  const cudaDataType_t y_type = out_type == static_cast<int>(GemmOut::F32) ? CUDA_R_32F : CUDA_R_16BF;
  check_lt(cublasLtMatrixLayoutCreate(&p->a, CUDA_R_16BF, k, n, k), where, "MatrixLayoutCreate(W)");
  check_lt(cublasLtMatrixLayoutCreate(&p->b, CUDA_R_16BF, k, m, k), where, "MatrixLayoutCreate(X)");
  check_lt(cublasLtMatrixLayoutCreate(&p->c, y_type, n, m, n), where, "MatrixLayoutCreate(Y)");

  cublasLtMatmulPreference_t pref = nullptr;
  check_lt(cublasLtMatmulPreferenceCreate(&pref), where, "MatmulPreferenceCreate");
  const uint64_t ws = workspace_.bytes();
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws));
  const int wanted = selection_ == GemmSelection::Timed ? kTimedCandidates : 1;
  cublasLtMatmulHeuristicResult_t results[kTimedCandidates]{};
  int found = 0;
  const cublasStatus_t hs = cublasLtMatmulAlgoGetHeuristic(static_cast<cublasLtHandle_t>(handle_), p->op, p->a,
                                                           p->b, p->c, p->c, pref, wanted, results, &found);
  cublasLtMatmulPreferenceDestroy(pref);
  check_lt(hs, where, "MatmulAlgoGetHeuristic");
  if (found == 0)
    throw Error(where, "cuBLASLt has no algorithm for [" + std::to_string(m) + " x " + std::to_string(k) + "] x [" +
                           std::to_string(n) + " x " + std::to_string(k) + "]ᵀ" + (accumulate ? " (beta=1)" : ""));
  p->algo = results[0].algo;
  for (int i = 0; i < found; ++i)
    if (results[i].state == CUBLAS_STATUS_SUCCESS) p->candidates[p->num_candidates++] = results[i].algo;
  return *plans_.emplace(key, std::move(p)).first->second;
}

void LtGemm::set_selection(GemmSelection selection) {
  if (selection == selection_) return;
  plans_.clear();
  selection_ = selection;
}

int LtGemm::time_candidates(const Plan& p, const uint16_t* x, const uint16_t* w, void* y, int64_t m, int64_t n,
                            GemmOut y_type, float beta, kern::Stream stream, const std::string& where) {
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  // With beta != 0 the call accumulates into y: time on a scratch copy so y is added to exactly once (by the call).
  DeviceBuffer scratch;
  void* out = y;
  if (beta != 0.f) {
    const size_t bytes = static_cast<size_t>(m * n) * (y_type == GemmOut::F32 ? 4 : 2);
    scratch = DeviceBuffer(bytes, where + ": GEMM timing scratch");
    check_cuda(cudaMemcpyAsync(scratch.data(), y, bytes, cudaMemcpyDeviceToDevice, s), where + ": GEMM timing copy");
    out = scratch.data();
  }
  cudaEvent_t e0 = nullptr, e1 = nullptr;
  check_cuda(cudaEventCreate(&e0), where + ": cudaEventCreate");
  check_cuda(cudaEventCreate(&e1), where + ": cudaEventCreate");
  int best = -1;
  float best_ms = 0.f;
  for (int i = 0; i < p.num_candidates; ++i) {
    // A candidate the library cannot run here is skipped.
    if (matmul(p, i, x, w, out, beta, stream) != CUBLAS_STATUS_SUCCESS) continue;
    // Median of 3, after the warm-up above.
    float ms[3];
    for (float& t : ms) {
      check_cuda(cudaEventRecord(e0, s), where + ": cudaEventRecord");
      matmul(p, i, x, w, out, beta, stream);
      check_cuda(cudaEventRecord(e1, s), where + ": cudaEventRecord");
      check_cuda(cudaEventSynchronize(e1), where + ": cudaEventSynchronize");
      check_cuda(cudaEventElapsedTime(&t, e0, e1), where + ": cudaEventElapsedTime");
    }
    std::sort(ms, ms + 3);
    if (best < 0 || ms[1] < best_ms) best = i, best_ms = ms[1];
  }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  return best;
}

int LtGemm::matmul(const Plan& p, int candidate, const uint16_t* x, const uint16_t* w, void* y, float beta,
                   kern::Stream stream) {
  const float alpha = 1.f;
  const cublasLtMatmulAlgo_t* algo = candidate < 0 ? &p.algo : &p.candidates[candidate];
  return cublasLtMatmul(static_cast<cublasLtHandle_t>(handle_), p.op, &alpha, w, p.a, x, p.b, &beta, y, p.c, y, p.c,
                        algo, workspace_.data(), workspace_.bytes(), reinterpret_cast<cudaStream_t>(stream));
}

void LtGemm::xwt(const uint16_t* x, int64_t m, int64_t k, const uint16_t* w, int64_t n, void* y, GemmOut y_type,
                 float beta, kern::Stream stream, const std::string& where) {
  if (m == 0 || n == 0) return;
  if (m < 0 || n < 0 || k <= 0) throw Error(where, "GEMM with a negative or empty dimension");
  Plan& p = plan(Key{m, n, k, static_cast<int>(y_type), beta != 0.f}, where);
  if (selection_ == GemmSelection::Timed && !p.timed) {
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    check_cuda(cudaStreamIsCapturing(reinterpret_cast<cudaStream_t>(stream), &capture), where + ": capture status");
    if (capture == cudaStreamCaptureStatusNone) {
      // One candidate leaves nothing to choose: the shape counts as tuned without running it.
      const int best = p.num_candidates > 1 ? time_candidates(p, x, w, y, m, n, y_type, beta, stream, where) : 0;
      if (best > 0) {
        p.algo = p.candidates[best];
        ++timed_changed_;
      }
      p.timed = true;
      ++timed_shapes_;
    }
  }
  check_lt(static_cast<cublasStatus_t>(matmul(p, -1, x, w, y, beta, stream)), where, "Matmul");
}

}  // namespace oscar::rt
