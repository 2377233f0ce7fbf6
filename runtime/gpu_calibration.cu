#include "runtime/gpu_calibration.h"

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cusolverDn.h>

#include <algorithm>
#include <cmath>

#include "formats/error.h"
#include "lib/calib/rotation.h"
#include "runtime/device_buffer.h"

namespace oscar::rt {

namespace {

// nvcc cannot compile {fmt} 9's constexpr paths, so messages here are assembled with std::to_string.
std::string S(int64_t v) { return std::to_string(v); }

void check_cublas(cublasStatus_t s, const std::string& where) {
  if (s != CUBLAS_STATUS_SUCCESS) throw Error(where, std::string("cuBLAS: ") + cublasGetStatusString(s));
}
void check_cusolver(cusolverStatus_t s, const std::string& where) {
  if (s != CUSOLVER_STATUS_SUCCESS) throw Error(where, "cuSOLVER status " + std::to_string(static_cast<int>(s)));
}
void check_launch(const std::string& where) { check_cuda(cudaGetLastError(), where); }

size_t bytes_of(int64_t n, size_t elem) { return static_cast<size_t>(n) * elem; }

// acc[h][e] += Σ_{g < group} gram[h * group + g][e], g ascending: the GQA group's query heads are folded in one
// fixed order (and in fp64), so no reduction depends on thread scheduling.
__global__ void fold_groups_kernel(const float* __restrict__ gram, int64_t kv_heads, int64_t group, int64_t dd,
                                   double* __restrict__ acc) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= kv_heads * dd) return;
  const int64_t h = i / dd, e = i % dd;
  double s = 0;
  for (int64_t g = 0; g < group; ++g) s += static_cast<double>(gram[(h * group + g) * dd + e]);
  acc[i] += s;
}

// One warp per (token, kv head) row: w = Σ_i ks[i] k[i] with a fixed butterfly, i.e. w_t = k_tᵀ Σ_Q k_t.
__global__ void row_dot_kernel(const float* __restrict__ ks, const float* __restrict__ k, int64_t rows, int64_t d,
                               float* __restrict__ w) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;
  float s = 0;
  for (int64_t i = lane; i < d; i += 32) s += ks[row * d + i] * k[row * d + i];
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) s += __shfl_xor_sync(0xffffffffu, s, offset);
  if (lane == 0) w[row] = s;
}

// vw[row][i] = w[row] * v[row][i]  (rows = tokens × kv heads, token-major like the observer's tensors).
__global__ void scale_rows_kernel(const float* __restrict__ v, const float* __restrict__ w, int64_t rows, int64_t d,
                                  float* __restrict__ vw) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * d) return;
  vw[i] = v[i] * w[i / d];
}

// sum_w[h] += Σ_t w[t * kv_heads + h]: one block per head, a fixed per-thread stride then a fixed tree (fp64).
__global__ void sum_weights_kernel(const float* __restrict__ w, int64_t tokens, int64_t kv_heads,
                                   double* __restrict__ sum_w) {
  __shared__ double part[256];
  const int64_t h = blockIdx.x;
  double s = 0;
  for (int64_t t = threadIdx.x; t < tokens; t += blockDim.x) s += static_cast<double>(w[t * kv_heads + h]);
  part[threadIdx.x] = s;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) part[threadIdx.x] += part[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) sum_w[h] += part[0];
}

__global__ void fill_kernel(float* __restrict__ x, int64_t n, float value) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) x[i] = value;
}

// Integer atomics are exact and order-independent, so the count is deterministic.
__global__ void count_non_finite_kernel(const float* __restrict__ x, int64_t n, unsigned long long* __restrict__ bad) {
  unsigned long long local = 0;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    local += !isfinite(x[i]);
  if (local) atomicAdd(bad, local);
}

unsigned grid_for(int64_t n, int block) { return static_cast<unsigned>((n + block - 1) / block); }

}  // namespace

struct GpuStatisticsCollector::Impl {
  calib::StatisticsShape shape;
  calib::ValueWeighting weighting;
  bool value_pass = false;
  cublasHandle_t blas = nullptr;
  // fp64 running sums: [L, Hkv, d, d] and [L, Hkv]; host counts (known from the shapes).
  DeviceBuffer sum_qq, sum_vv, sum_w;
  std::vector<double> n_q, n_v;         // per layer, per KV head (identical for every head)
  std::vector<double> frozen_q_sums;    // value pass: the query pass's Σ q qᵀ [L, Hkv, d, d] and its counts
  std::vector<double> frozen_n_q;
  std::vector<char> layer_frozen;       // freeze_layer_queries, per layer
  DeviceBuffer frozen_sigma_q;          // fp32 [L, Hkv, d, d] Σ_Q for w_t
  DeviceBuffer non_finite;              // u64 [L]
  DeviceBuffer gram, ks, vw, w;         // per-call scratch

  ~Impl() {
    if (blas) cublasDestroy(blas);
  }
  int64_t dd() const { return shape.head_dim * shape.head_dim; }
  int64_t sums_size() const { return shape.num_layers * shape.num_kv_heads * dd(); }

  // C_b = A_b · B_bᵀ over `batch` heads, where head b of a token-major [T, heads, d] tensor is, in cuBLAS's
  // column-major view, the d × T matrix at x + b·d with leading dimension heads·d: one strided-batched GEMM covers
  // every head of the call without a transpose.
  void head_grams(const float* a, const float* b, int64_t heads, int64_t tokens, float* out, cudaStream_t st,
                  const std::string& where) {
    const int d = static_cast<int>(shape.head_dim);
    const float one = 1.f, zero = 0.f;
    check_cublas(cublasSetStream(blas, st), where);
    check_cublas(cublasGemmStridedBatchedEx(blas, CUBLAS_OP_N, CUBLAS_OP_T, d, d, static_cast<int>(tokens), &one, a,
                                            CUDA_R_32F, static_cast<int>(heads * d), d, b, CUDA_R_32F,
                                            static_cast<int>(heads * d), d, &zero, out, CUDA_R_32F, d,
                                            static_cast<long long>(dd()), static_cast<int>(heads),
                                            CUBLAS_COMPUTE_32F_PEDANTIC, CUBLAS_GEMM_DEFAULT),
                 where);
  }
};

GpuStatisticsCollector::GpuStatisticsCollector(const calib::StatisticsShape& shape, calib::ValueWeighting weighting)
    : impl_(std::make_unique<Impl>()) {
  if (weighting == calib::ValueWeighting::AttentionMass)
    throw Error("--value-weighting", "attention_mass needs every sequence's full softmax and is computed on the CPU "
                                     "only; use query or uniform with --device cuda");
  if (shape.num_layers <= 0 || shape.num_heads <= 0 || shape.num_kv_heads <= 0 || shape.head_dim <= 0 ||
      shape.num_heads % shape.num_kv_heads != 0)
    throw Error("GpuStatisticsCollector", "invalid model shape");
  Impl& m = *impl_;
  m.shape = shape;
  m.weighting = weighting;
  check_cublas(cublasCreate(&m.blas), "GpuStatisticsCollector: cublasCreate");
  // Pedantic fp32 math and no atomics: the same GEMM always reduces in the same order.
  check_cublas(cublasSetMathMode(m.blas, CUBLAS_PEDANTIC_MATH), "GpuStatisticsCollector: cublasSetMathMode");
  check_cublas(cublasSetAtomicsMode(m.blas, CUBLAS_ATOMICS_NOT_ALLOWED), "GpuStatisticsCollector: atomics mode");
  const int64_t L = shape.num_layers, Hkv = shape.num_kv_heads;
  m.sum_qq.ensure(bytes_of(m.sums_size(), 8), "Σ_Q sums");
  m.sum_vv.ensure(bytes_of(m.sums_size(), 8), "Σ_V sums");
  m.sum_w.ensure(bytes_of(L * Hkv, 8), "value weight sums");
  m.non_finite.ensure(bytes_of(L, 8), "non-finite counters");
  check_cuda(cudaMemset(m.sum_qq.data(), 0, m.sum_qq.bytes()), "GpuStatisticsCollector: memset");
  check_cuda(cudaMemset(m.sum_vv.data(), 0, m.sum_vv.bytes()), "GpuStatisticsCollector: memset");
  check_cuda(cudaMemset(m.sum_w.data(), 0, m.sum_w.bytes()), "GpuStatisticsCollector: memset");
  check_cuda(cudaMemset(m.non_finite.data(), 0, m.non_finite.bytes()), "GpuStatisticsCollector: memset");
  m.n_q.assign(static_cast<size_t>(L), 0.0);
  m.n_v.assign(static_cast<size_t>(L), 0.0);
  m.layer_frozen.assign(static_cast<size_t>(L), 0);
}

GpuStatisticsCollector::~GpuStatisticsCollector() = default;

bool GpuStatisticsCollector::needs_value_pass() const {
  const Impl& m = *impl_;
  return m.weighting == calib::ValueWeighting::QueryEnergy && !m.value_pass &&
         !std::all_of(m.layer_frozen.begin(), m.layer_frozen.end(), [](char f) { return f != 0; });
}

void GpuStatisticsCollector::on_attention_inputs(const DeviceAttentionInputs& in) {
  Impl& m = *impl_;
  const calib::StatisticsShape& s = m.shape;
  const std::string where = "GpuStatisticsCollector (layer " + S(in.layer) + ")";
  if (in.layer < 0 || in.layer >= s.num_layers || in.num_heads != s.num_heads || in.num_kv_heads != s.num_kv_heads ||
      in.head_dim != s.head_dim)
    throw Error(where, "attention inputs do not match the collector's model shape");
  const int64_t T = in.num_tokens, d = s.head_dim, H = s.num_heads, Hkv = s.num_kv_heads, group = H / Hkv;
  if (T <= 0) return;
  if (T > (int64_t{1} << 30) / std::max<int64_t>(H * d, 1))
    throw Error(where, S(T) + " tokens in one forward overflow cuBLAS's 32-bit sizes; use a smaller batch");
  cudaStream_t st = in.stream;
  const int64_t dd = m.dd();
  const size_t layer_off = static_cast<size_t>(in.layer * Hkv * dd);

  unsigned long long* bad = m.non_finite.as<unsigned long long>() + in.layer;
  count_non_finite_kernel<<<grid_for(T * H * d, 256 * 8), 256, 0, st>>>(in.q, T * H * d, bad);
  count_non_finite_kernel<<<grid_for(T * Hkv * d, 256 * 8), 256, 0, st>>>(in.k, T * Hkv * d, bad);
  count_non_finite_kernel<<<grid_for(T * Hkv * d, 256 * 8), 256, 0, st>>>(in.v, T * Hkv * d, bad);
  check_launch(where + ": non-finite count");

  m.gram.ensure(bytes_of(H * dd, 4), "per-head Gram matrices");
  const bool frozen = m.value_pass || m.layer_frozen[in.layer];
  const bool collect_queries = !frozen;
  const bool collect_values = m.weighting == calib::ValueWeighting::Uniform || frozen;
  if (collect_queries) {
    m.head_grams(in.q, in.q, H, T, m.gram.as<float>(), st, where + ": Σ q qᵀ");
    fold_groups_kernel<<<grid_for(Hkv * dd, 256), 256, 0, st>>>(m.gram.as<float>(), Hkv, group, dd,
                                                                m.sum_qq.as<double>() + layer_off);
    check_launch(where + ": fold Σ q qᵀ");
    m.n_q[in.layer] += static_cast<double>(group * T);
  }
  if (!collect_values) return;
  m.w.ensure(bytes_of(T * Hkv, 4), "value weights");
  float* w = m.w.as<float>();
  const float* weighted_v = in.v;
  if (m.weighting == calib::ValueWeighting::QueryEnergy) {
    // ks[t, h, :] = Σ_Q[h] k[t, h, :] as one strided-batched GEMM (Σ_Q symmetric, so row- vs column-major is moot).
    m.ks.ensure(bytes_of(T * Hkv * d, 4), "K Σ_Q");
    const float one = 1.f, zero = 0.f;
    check_cublas(cublasSetStream(m.blas, st), where);
    check_cublas(cublasGemmStridedBatchedEx(m.blas, CUBLAS_OP_N, CUBLAS_OP_N, static_cast<int>(d), static_cast<int>(T),
                                            static_cast<int>(d), &one, m.frozen_sigma_q.as<float>() + layer_off,
                                            CUDA_R_32F, static_cast<int>(d), static_cast<long long>(dd), in.k,
                                            CUDA_R_32F, static_cast<int>(Hkv * d), d, &zero, m.ks.as<float>(),
                                            CUDA_R_32F, static_cast<int>(Hkv * d), d, static_cast<int>(Hkv),
                                            CUBLAS_COMPUTE_32F_PEDANTIC, CUBLAS_GEMM_DEFAULT),
                 where + ": K Σ_Q");
    row_dot_kernel<<<grid_for(T * Hkv, 8), 256, 0, st>>>(m.ks.as<float>(), in.k, T * Hkv, d, w);
    check_launch(where + ": value weights");
    m.vw.ensure(bytes_of(T * Hkv * d, 4), "weighted values");
    scale_rows_kernel<<<grid_for(T * Hkv * d, 256), 256, 0, st>>>(in.v, w, T * Hkv, d, m.vw.as<float>());
    check_launch(where + ": weighted values");
    weighted_v = m.vw.as<float>();
  } else {
    fill_kernel<<<grid_for(T * Hkv, 256), 256, 0, st>>>(w, T * Hkv, 1.f);
    check_launch(where + ": uniform weights");
  }
  m.head_grams(weighted_v, in.v, Hkv, T, m.gram.as<float>(), st, where + ": Σ w v vᵀ");
  fold_groups_kernel<<<grid_for(Hkv * dd, 256), 256, 0, st>>>(m.gram.as<float>(), Hkv, 1, dd,
                                                              m.sum_vv.as<double>() + layer_off);
  sum_weights_kernel<<<static_cast<unsigned>(Hkv), 256, 0, st>>>(w, T, Hkv, m.sum_w.as<double>() + in.layer * Hkv);
  check_launch(where + ": fold Σ w v vᵀ");
  m.n_v[in.layer] += static_cast<double>(T);
}

void GpuStatisticsCollector::check_finite() {
  Impl& m = *impl_;
  std::vector<unsigned long long> bad(static_cast<size_t>(m.shape.num_layers));
  check_cuda(cudaDeviceSynchronize(), "GpuStatisticsCollector: forward");
  m.non_finite.download(bad.data(), bad.size() * sizeof(unsigned long long));
  for (int64_t l = 0; l < m.shape.num_layers; ++l)
    if (bad[l] > 0)
      throw Error("GpuStatisticsCollector (layer " + S(l) + ")",
                  S(static_cast<int64_t>(bad[l])) + " non-finite (NaN/Inf) values in the attention inputs q/k/v");
}

void GpuStatisticsCollector::start_value_pass() {
  Impl& m = *impl_;
  if (!needs_value_pass() || std::any_of(m.layer_frozen.begin(), m.layer_frozen.end(), [](char f) { return f != 0; }))
    throw Error("GpuStatisticsCollector", "start_value_pass() is only for the query pass of \"query\" weighting");
  check_cuda(cudaDeviceSynchronize(), "GpuStatisticsCollector: start_value_pass");
  m.frozen_q_sums.resize(static_cast<size_t>(m.sums_size()));
  m.sum_qq.download(m.frozen_q_sums.data(), m.frozen_q_sums.size() * sizeof(double));
  m.frozen_n_q = m.n_q;
  const int64_t Hkv = m.shape.num_kv_heads, dd = m.dd();
  std::vector<float> sigma(m.frozen_q_sums.size());
  for (int64_t l = 0; l < m.shape.num_layers; ++l) {
    if (!(m.n_q[l] > 0)) throw Error("GpuStatisticsCollector", "layer " + S(l) + " saw no queries");
    for (int64_t i = 0; i < Hkv * dd; ++i)
      sigma[l * Hkv * dd + i] = static_cast<float>(m.frozen_q_sums[l * Hkv * dd + i] / m.n_q[l]);
  }
  m.frozen_sigma_q = to_device(std::span<const float>(sigma.data(), sigma.size()), "frozen Σ_Q");
  m.value_pass = true;
}

void GpuStatisticsCollector::freeze_layer_queries(int64_t layer) {
  Impl& m = *impl_;
  const std::string where = "GpuStatisticsCollector (layer " + S(layer) + ")";
  if (m.weighting != calib::ValueWeighting::QueryEnergy || m.value_pass)
    throw Error(where, "freeze_layer_queries() is only for the query pass of \"query\" weighting");
  if (layer < 0 || layer >= m.shape.num_layers) throw Error(where, "no such layer");
  if (m.layer_frozen[layer]) throw Error(where, "queries already frozen");
  if (!(m.n_q[layer] > 0)) throw Error("GpuStatisticsCollector", "layer " + S(layer) + " saw no queries");
  check_cuda(cudaDeviceSynchronize(), where + ": freeze_layer_queries");
  const int64_t Hkv = m.shape.num_kv_heads, dd = m.dd(), n = Hkv * dd;
  const size_t off = static_cast<size_t>(layer * n);
  if (m.frozen_q_sums.empty()) {
    m.frozen_q_sums.assign(static_cast<size_t>(m.sums_size()), 0.0);
    m.frozen_n_q.assign(static_cast<size_t>(m.shape.num_layers), 0.0);
    m.frozen_sigma_q.ensure(bytes_of(m.sums_size(), 4), "frozen Σ_Q");
  }
  m.sum_qq.download(m.frozen_q_sums.data() + off, bytes_of(n, 8), off * sizeof(double));
  m.frozen_n_q[layer] = m.n_q[layer];
  std::vector<float> sigma(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) sigma[i] = static_cast<float>(m.frozen_q_sums[off + i] / m.n_q[layer]);
  m.frozen_sigma_q.upload(sigma.data(), bytes_of(n, 4), off * sizeof(float));
  // The upload used the legacy stream; callers may continue on a non-blocking one.
  check_cuda(cudaDeviceSynchronize(), where + ": freeze_layer_queries");
  m.layer_frozen[layer] = 1;
}

GpuStatisticsCollector::LayerSums GpuStatisticsCollector::layer_sums(int64_t layer) {
  Impl& m = *impl_;
  if (layer < 0 || layer >= m.shape.num_layers) throw Error("GpuStatisticsCollector", "no layer " + S(layer));
  const int64_t Hkv = m.shape.num_kv_heads, n = Hkv * m.dd();
  LayerSums s;
  s.qq = m.sum_qq.as<double>() + layer * n;
  s.vv = m.sum_vv.as<double>() + layer * n;
  s.w = m.sum_w.as<double>() + layer * Hkv;
  s.matrix_elems = n;
  s.heads = Hkv;
  return s;
}

void GpuStatisticsCollector::set_layer_counts(int64_t layer, double query_vectors, double value_tokens) {
  Impl& m = *impl_;
  if (layer < 0 || layer >= m.shape.num_layers) throw Error("GpuStatisticsCollector", "no layer " + S(layer));
  m.n_q[layer] = query_vectors;
  m.n_v[layer] = value_tokens;
}

calib::HeadMoments GpuStatisticsCollector::head_moments(int64_t layer, int64_t kv_head) {
  Impl& m = *impl_;
  const calib::StatisticsShape& s = m.shape;
  if (layer < 0 || layer >= s.num_layers || kv_head < 0 || kv_head >= s.num_kv_heads)
    throw Error("GpuStatisticsCollector", "no layer " + S(layer) + " / kv head " + S(kv_head));
  if (needs_value_pass()) throw Error("GpuStatisticsCollector", "value statistics need the second pass");
  check_cuda(cudaDeviceSynchronize(), "GpuStatisticsCollector: head_moments");
  const int64_t dd = m.dd();
  const size_t off = static_cast<size_t>((layer * s.num_kv_heads + kv_head) * dd);
  std::vector<double> qq(static_cast<size_t>(dd)), vv(static_cast<size_t>(dd));
  double wsum = 0;
  const bool frozen = m.value_pass || m.layer_frozen[layer];
  if (frozen) {
    std::copy_n(m.frozen_q_sums.begin() + off, dd, qq.begin());
  } else {
    m.sum_qq.download(qq.data(), bytes_of(dd, 8), off * sizeof(double));
  }
  m.sum_vv.download(vv.data(), bytes_of(dd, 8), off * sizeof(double));
  m.sum_w.download(&wsum, sizeof(double), static_cast<size_t>(layer * s.num_kv_heads + kv_head) * sizeof(double));
  calib::HeadMoments out;
  out.query_vectors = frozen ? m.frozen_n_q[layer] : m.n_q[layer];
  out.value_tokens = m.n_v[layer];
  out.value_weight = wsum;
  const std::string where = "GpuStatisticsCollector (layer " + S(layer) + ", kv head " + S(kv_head) + ")";
  if (!(out.query_vectors > 0) || !(out.value_tokens > 0)) throw Error(where, "no tokens were collected");
  if (!(out.value_weight > 0)) throw Error(where, "the value weights sum to zero");
  out.sigma_q.resize(static_cast<size_t>(dd));
  out.sigma_v.resize(static_cast<size_t>(dd));
  for (int64_t i = 0; i < dd; ++i) {
    out.sigma_q[i] = qq[i] / out.query_vectors;
    out.sigma_v[i] = vv[i] / out.value_weight;
  }
  return out;
}

std::vector<std::vector<double>> GpuStatisticsCollector::head_sigma_q() {
  return calib::head_sigma_q(impl_->shape, [this](int64_t l, int64_t h) { return head_moments(l, h); });
}

calib::CalibrationMoments GpuStatisticsCollector::moments(bool per_head) {
  const calib::StatisticsShape& s = impl_->shape;
  calib::CalibrationMoments out;
  out.num_layers = s.num_layers;
  out.groups = per_head ? s.num_kv_heads : 1;
  out.head_dim = s.head_dim;
  for (int64_t l = 0; l < s.num_layers; ++l) {
    if (per_head) {
      for (int64_t h = 0; h < s.num_kv_heads; ++h) out.moments.push_back(head_moments(l, h));
      continue;
    }
    // The layer mean, in the CPU collector's order.
    out.moments.push_back(calib::mean_head_moments(s.num_kv_heads, [&](int64_t h) { return head_moments(l, h); }));
  }
  return out;
}

// ---- cuSOLVER eigen-decomposition

std::vector<calib::SymmetricEigen> cusolver_symmetric_eigen(std::span<const double> matrices, int64_t d,
                                                            const std::string& where) {
  if (d <= 0 || d > 65536) throw Error(where, "invalid matrix dimension " + S(d));
  if (matrices.size() % static_cast<size_t>(d * d) != 0)
    throw Error(where, S(static_cast<int64_t>(matrices.size())) + " values are not a whole number of [" + S(d) + ", " + S(d) + "] matrices");
  const size_t count = matrices.size() / static_cast<size_t>(d * d);
  std::vector<calib::SymmetricEigen> out;
  if (count == 0) return out;
  cusolverDnHandle_t handle = nullptr;
  check_cusolver(cusolverDnCreate(&handle), where + ": cusolverDnCreate");
  struct HandleGuard {
    cusolverDnHandle_t h;
    ~HandleGuard() { cusolverDnDestroy(h); }
  } guard{handle};
  check_cusolver(cusolverDnSetDeterministicMode(handle, CUSOLVER_DETERMINISTIC_RESULTS), where);
  const int n = static_cast<int>(d);
  DeviceBuffer a(bytes_of(d * d, 8), "eigensolver matrix"), w(bytes_of(d, 8), "eigenvalues"),
      info(sizeof(int), "eigensolver info");
  int lwork = 0;
  check_cusolver(cusolverDnDsyevd_bufferSize(handle, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_UPPER, n,
                                             a.as<double>(), n, w.as<double>(), &lwork),
                 where + ": syevd workspace");
  DeviceBuffer work(bytes_of(std::max(lwork, 1), 8), "eigensolver workspace");
  std::vector<double> sym(static_cast<size_t>(d * d)), vectors(sym.size()), values(static_cast<size_t>(d));
  for (size_t m = 0; m < count; ++m) {
    const std::string at = count > 1 ? where + " (matrix " + S(static_cast<int64_t>(m)) + ")" : where;
    const double* sigma = matrices.data() + m * static_cast<size_t>(d * d);
    // (Σ + Σᵀ)/2 as on the CPU; being symmetric it reads the same in cuSOLVER's column-major order.
    for (int64_t i = 0; i < d; ++i)
      for (int64_t j = 0; j < d; ++j) {
        const double v = 0.5 * (sigma[i * d + j] + sigma[j * d + i]);
        if (!std::isfinite(v)) throw Error(at, "non-finite covariance entry (" + S(i) + ", " + S(j) + ")");
        sym[i * d + j] = v;
      }
    a.upload(sym.data(), sym.size() * sizeof(double));
    check_cusolver(cusolverDnDsyevd(handle, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_UPPER, n, a.as<double>(), n,
                                    w.as<double>(), work.as<double>(), lwork, info.as<int>()),
                   at + ": cusolverDnDsyevd");
    int status = 0;
    info.download(&status, sizeof(int));
    if (status != 0) throw Error(at, "cuSOLVER dsyevd failed (info = " + S(status) + ")");
    a.download(vectors.data(), vectors.size() * sizeof(double));
    w.download(values.data(), values.size() * sizeof(double));
    out.push_back(calib::eigen_from_ascending(std::span<const double>(values.data(), values.size()),
                                               std::span<const double>(vectors.data(), vectors.size()), d));
  }
  return out;
}

calib::CalibrationSpectra cusolver_spectra(const calib::CalibrationMoments& moments) {
  std::vector<double> matrices;  // Σ_Q, Σ_V of every (layer, group), in that order
  for (const calib::HeadMoments& m : moments.moments) {
    matrices.insert(matrices.end(), m.sigma_q.begin(), m.sigma_q.end());
    matrices.insert(matrices.end(), m.sigma_v.begin(), m.sigma_v.end());
  }
  const std::vector<calib::SymmetricEigen> eig = cusolver_symmetric_eigen(
      std::span<const double>(matrices.data(), matrices.size()), moments.head_dim, "Σ_Q / Σ_V");
  calib::CalibrationSpectra s;
  s.num_layers = moments.num_layers;
  s.groups = moments.groups;
  s.head_dim = moments.head_dim;
  for (size_t i = 0; i < moments.moments.size(); ++i) s.spectra.push_back({eig[2 * i], eig[2 * i + 1]});
  return s;
}

// ---- host relay for held-out data

namespace {

class HostRelay : public DeviceObserver {
 public:
  explicit HostRelay(model::Observer& target) : target_(target) {}
  void on_attention_inputs(const DeviceAttentionInputs& in) override {
    const int64_t T = in.num_tokens, d = in.head_dim;
    check_cuda(cudaStreamSynchronize(in.stream), "DeviceForwardRunner: observer");
    const auto head_major = [&](const float* device, int64_t heads, std::vector<float>& out) {
      const std::vector<float> token_major = to_host(device, static_cast<size_t>(T * heads * d));
      out.resize(token_major.size());
      for (int64_t t = 0; t < T; ++t)
        for (int64_t h = 0; h < heads; ++h)
          std::copy_n(token_major.begin() + (t * heads + h) * d, d, out.begin() + (h * T + t) * d);
    };
    head_major(in.q, in.num_heads, q_);
    head_major(in.k_pre_rope, in.num_kv_heads, k_pre_);
    head_major(in.k, in.num_kv_heads, k_);
    head_major(in.v, in.num_kv_heads, v_);
    model::AttentionInputs host;
    host.layer = in.layer;
    host.num_tokens = T;
    host.pos0 = 0;
    host.num_heads = in.num_heads;
    host.num_kv_heads = in.num_kv_heads;
    host.head_dim = d;
    host.q = q_.data();
    host.k_pre_rope = k_pre_.data();
    host.k = k_.data();
    host.v = v_.data();
    target_.on_attention_inputs(host);
  }

 private:
  model::Observer& target_;
  std::vector<float> q_, k_pre_, k_, v_;
};

}  // namespace

std::unique_ptr<DeviceObserver> make_host_relay(model::Observer& target) {
  return std::make_unique<HostRelay>(target);
}

void DeviceForwardRunner::run_sequence(std::span<const int32_t> ids, model::Observer& observer) {
  PackedBatch batch;
  batch.add_sequence(ids);
  HostRelay relay(observer);
  DeviceForwardOptions opt;
  opt.observer = &relay;
  opt.rows = LogitsRows::None;
  model_.forward(batch, opt);
  check_cuda(cudaStreamSynchronize(model_.stream()), "DeviceForwardRunner: forward");
}

// ---- orchestration

std::vector<BatchRange> plan_batches(const std::vector<std::vector<int32_t>>& sequences, int64_t batch_tokens) {
  std::vector<BatchRange> batches;
  const int64_t n = static_cast<int64_t>(sequences.size());
  int64_t first = 0, tokens = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t len = static_cast<int64_t>(sequences[i].size());
    if (i > first && tokens + len > batch_tokens) {
      batches.push_back({first, i});
      first = i;
      tokens = 0;
    }
    tokens += len;
  }
  if (first < n) batches.push_back({first, n});
  return batches;
}

calib::CalibrationResult calibrate_on_device(DeviceModel& model, const fmt::ModelFingerprint& fingerprint,
                                             const calib::CalibrationData& data,
                                             const calib::CalibrationOptions& opt, const GpuCalibrationOptions& gpu) {
  const fmt::ModelConfig& cfg = model.config();
  calib::validate_inputs(cfg, data, opt);
  if (!opt.checkpoint.empty() || opt.resume)
    throw Error("--checkpoint", "statistics checkpoints are not supported with --device cuda yet");
  if (gpu.batch_tokens < 1) throw Error("--batch-tokens", "must be >= 1");
  GpuStatisticsCollector stats(calib::StatisticsShape::from_config(cfg), opt.value_weighting);
  const auto batches = plan_batches(data.sequences, gpu.batch_tokens);
  const int64_t n = static_cast<int64_t>(data.sequences.size());
  const auto run_pass = [&](std::string_view stage) {
    for (const auto& [first, last] : batches) {
      PackedBatch batch;
      for (int64_t i = first; i < last; ++i) batch.add_sequence(data.sequences[i]);
      DeviceForwardOptions fo;
      fo.observer = &stats;
      fo.rows = LogitsRows::None;
      model.forward(batch, fo);
      stats.check_finite();  // also waits for the batch, so progress reports finished work
      if (opt.progress) opt.progress(stage, last, n);
    }
  };
  run_pass("queries");
  if (stats.needs_value_pass()) {
    stats.start_value_pass();
    run_pass("values");
  }
  calib::CalibrationSpectra spectra = cusolver_spectra(stats.moments(opt.per_head));
  if (opt.error_feedback.mode != calib::ErrorFeedbackMode::Off) spectra.head_sigma_q = stats.head_sigma_q();
  DeviceForwardRunner runner(model);
  return calib::assemble_bundle(spectra, runner, fingerprint, data, opt);
}

}  // namespace oscar::rt
