#include "runtime/layer_stream.h"

#include <cuda_runtime.h>
#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <chrono>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <string>
#include <thread>

#ifdef OSCAR_HAVE_NCCL
#include <nccl.h>
#endif

#include "formats/error.h"
#include "formats/safetensors.h"
#include "kernels/embedding/embedding.h"
#include "kernels/norm/rmsnorm.h"
#include "lib/model/cpu_model.h"
#include "runtime/decoder_layer.h"
#include "runtime/device_buffer.h"
#include "runtime/lt_gemm.h"
#include "runtime/shard_plan.h"

namespace oscar::rt {

namespace {

using Clock = std::chrono::steady_clock;
std::string S(int64_t v) { return std::to_string(v); }

void check(kern::Status s, const std::string& where) {
  if (s != kern::Status::Ok) throw Error(where, "kernel launch refused: " + std::string(kern::status_name(s)));
}

struct Event {
  cudaEvent_t e = nullptr;
  explicit Event(bool timing = false) {
    check_cuda(cudaEventCreateWithFlags(&e, timing ? cudaEventDefault : cudaEventDisableTiming), "cudaEventCreate");
  }
  ~Event() {
    if (e) cudaEventDestroy(e);
  }
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
};

struct StreamHandle {
  cudaStream_t s = nullptr;
  StreamHandle() { check_cuda(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate"); }
  ~StreamHandle() {
    if (s) cudaStreamDestroy(s);
  }
};

struct PinnedChunk {
  void* p = nullptr;
  size_t bytes = 0;
  explicit PinnedChunk(size_t n) : bytes(n) {
    check_cuda(cudaHostAlloc(&p, n, cudaHostAllocPortable), "pinned host residual stream (" + S(static_cast<int64_t>(n)) + " bytes)");
  }
  ~PinnedChunk() {
    if (p) cudaFreeHost(p);
  }
  PinnedChunk(const PinnedChunk&) = delete;
  PinnedChunk& operator=(const PinnedChunk&) = delete;
};

// Timed intervals of one layer, summed once the layer has synchronized.
struct IntervalLog {
  std::vector<std::unique_ptr<Event>> pool;
  std::vector<std::pair<cudaEvent_t, cudaEvent_t>> open;
  size_t used = 0;
  cudaEvent_t next() {
    if (used == pool.size()) pool.push_back(std::make_unique<Event>(true));
    return pool[used++]->e;
  }
  std::pair<cudaEvent_t, cudaEvent_t> begin(cudaStream_t st) {
    cudaEvent_t a = next(), b = next();
    check_cuda(cudaEventRecord(a, st), "cudaEventRecord");
    open.push_back({a, b});
    return open.back();
  }
  static void end(std::pair<cudaEvent_t, cudaEvent_t> iv, cudaStream_t st) {
    check_cuda(cudaEventRecord(iv.second, st), "cudaEventRecord");
  }
  double drain() {  // seconds; the events must have completed
    double total = 0;
    for (const auto& [a, b] : open) {
      float ms = 0;
      check_cuda(cudaEventElapsedTime(&ms, a, b), "cudaEventElapsedTime");
      total += ms / 1e3;
    }
    open.clear();
    used = 0;
    return total;
  }
};

double device_used_bytes() {
  size_t free = 0, total = 0;
  check_cuda(cudaMemGetInfo(&free, &total), "cudaMemGetInfo");
  return static_cast<double>(total - free);
}

// ---- the streamer: one rank's device state

// What the streamer does around each layer (statistics hooks, or the held-out relay).
class PassHooks {
 public:
  virtual ~PassHooks() = default;
  virtual int passes(int64_t layer) const = 0;
  // The pass that runs the whole layer (and carries the residual stream on): always the last one.
  virtual DeviceObserver* observer() = 0;
  virtual void before_batch(int64_t layer, int pass, int64_t local, cudaStream_t st) {}
  virtual void after_batch(int64_t layer, int pass, int64_t local, cudaStream_t st) {}
  virtual void after_pass(int64_t layer, int pass, cudaStream_t st) {}
  virtual void after_layer(int64_t layer) {}
};

struct BatchOnDevice {
  DeviceBuffer ints;  // ids [T], positions [T], cu_seqlens [S + 1]
  int64_t T = 0, S = 0;
  int32_t max_seqlen = 0;
  std::unique_ptr<PinnedChunk> host_x;  // fp32 [T, H] between layers
  std::unique_ptr<Event> host_ready;    // the last download into host_x
  bool host_written = false;
};

}  // namespace

struct StreamedForwardRunner::State {
  LayerSource src;
  int device;
  fmt::ModelConfig cfg;
  std::unique_ptr<fmt::TensorStore> store;
  StreamHandle compute, upload, download, weights;
  LtGemm gemm;
  DeviceBuffer inv_freq, embed;
  DeviceLayerBuffers slot_w[2];
  Event w_ready[2], w_free[2];
  std::vector<BatchOnDevice> batches;
  // Scratch for the largest batch; the residual stream has three slots (upload / compute / download).
  DeviceBuffer x[3], normed, qkv, q, k, v, attn, proj, gate_up, act, obs_q, obs_k_pre, obs_k, obs_v;
  Event slot_uploaded[3], slot_free[3];
  int64_t slot_counter = 0;
  IntervalLog compute_log, h2d_log, d2h_log, weight_log;
  double compute_s = 0, h2d_s = 0, d2h_s = 0, weight_s = 0, h2d_bytes = 0, d2h_bytes = 0, pinned_bytes = 0;
  double used_before = 0, peak_used = 0;

  State(const LayerSource& source, int dev) : src(source), device(dev), cfg(source.config) {
    validate_device_config(cfg, source.checkpoint.empty() ? std::string("layer streaming config")
                                                          : (source.checkpoint / "config.json").string());
    used_before = device_used_bytes();
    const std::vector<float> f = model::rope_inv_freq(cfg);
    inv_freq = to_device(std::span<const float>(f), "rope inv_freq");
    if (src.checkpoint.empty()) {
      embed = generate_random_embedding(cfg, src.seed, reinterpret_cast<Stream>(weights.s));
    } else {
      store = std::make_unique<fmt::TensorStore>(fmt::TensorStore::open(src.checkpoint));
      const std::vector<uint16_t> e = read_checkpoint_embedding(*store, cfg);
      embed = to_device(std::span<const uint16_t>(e), "model.embed_tokens.weight");
    }
    // Uploads above went through the legacy stream, which the non-blocking streams below do not wait for.
    check_cuda(cudaDeviceSynchronize(), "layer streaming: embedding");
  }

  void set_batches(const std::vector<PackedBatch>& packed) {
    batches.clear();
    const int64_t H = cfg.hidden_size, I = cfg.intermediate_size, qd = cfg.q_dim(), kvd = cfg.kv_dim();
    int64_t maxT = 0;
    for (const PackedBatch& b : packed) {
      BatchOnDevice d;
      d.T = b.num_tokens();
      d.S = b.num_sequences();
      d.max_seqlen = b.max_seqlen();
      for (int64_t t = 0; t < d.T; ++t)
        if (b.ids[t] < 0 || b.ids[t] >= cfg.vocab_size)
          throw Error("layer streaming: input id at " + S(t), S(b.ids[t]) + " is outside the vocabulary [0, " +
                                                                  S(cfg.vocab_size) + ")");
      std::vector<int32_t> ints(b.ids.begin(), b.ids.end());
      for (int64_t s = 0; s < d.S; ++s)
        for (int32_t t = b.cu_seqlens[s]; t < b.cu_seqlens[s + 1]; ++t) ints.push_back(t - b.cu_seqlens[s]);
      ints.insert(ints.end(), b.cu_seqlens.begin(), b.cu_seqlens.end());
      d.ints = to_device(std::span<const int32_t>(ints), "batch token ids");
      if (cfg.num_layers > 1 && d.T > 0) {
        d.host_x = std::make_unique<PinnedChunk>(static_cast<size_t>(d.T * H) * 4);
        pinned_bytes += static_cast<double>(d.host_x->bytes);
      }
      d.host_ready = std::make_unique<Event>();
      maxT = std::max(maxT, d.T);
      batches.push_back(std::move(d));
    }
    const auto sz = [](int64_t n, int64_t e) { return static_cast<size_t>(std::max<int64_t>(n, 1) * e); };
    for (DeviceBuffer& b : x) b.ensure(sz(maxT * H, 4), "streamed residual stream");
    normed.ensure(sz(maxT * H, 2), "normed activations");
    qkv.ensure(sz(maxT * (qd + 2 * kvd), 4), "qkv projection");
    q.ensure(sz(maxT * qd, 2), "q");
    k.ensure(sz(maxT * kvd, 2), "k");
    v.ensure(sz(maxT * kvd, 2), "v");
    attn.ensure(sz(maxT * qd, 2), "attention output");
    proj.ensure(sz(maxT * H, 4), "projection output");
    gate_up.ensure(sz(maxT * 2 * I, 2), "gate_up");
    act.ensure(sz(maxT * I, 2), "swiglu output");
    obs_q.ensure(sz(maxT * qd, 4), "observer q");
    obs_k_pre.ensure(sz(maxT * kvd, 4), "observer k_pre_rope");
    obs_k.ensure(sz(maxT * kvd, 4), "observer k");
    obs_v.ensure(sz(maxT * kvd, 4), "observer v");
    check_cuda(cudaDeviceSynchronize(), "layer streaming: batch upload");  // legacy-stream copies, see above
  }

  // Enqueues layer l's weights into slot l % 2 on the weight stream, after the slot's previous layer is done.
  void fetch_weights(int64_t l) {
    const int slot = static_cast<int>(l % 2);
    check_cuda(cudaStreamWaitEvent(weights.s, w_free[slot].e, 0), "layer streaming: weight slot");
    const auto iv = weight_log.begin(weights.s);
    if (src.checkpoint.empty()) {
      generate_random_layer(cfg, src.seed, l, slot_w[slot], reinterpret_cast<Stream>(weights.s));
    } else {
      const HostLayerWeights host = read_checkpoint_layer(*store, cfg, l);
      upload_layer(host, slot_w[slot], reinterpret_cast<Stream>(weights.s));
    }
    IntervalLog::end(iv, weights.s);
    check_cuda(cudaEventRecord(w_ready[slot].e, weights.s), "layer streaming: weights ready");
  }

  void run_batch(int64_t l, int pass, int64_t j, LayerPart part, bool carry, const DeviceLayerWeights& w,
                 PassHooks& hooks) {
    BatchOnDevice& b = batches[j];
    if (b.T == 0) return;
    const int64_t H = cfg.hidden_size;
    const int slot = static_cast<int>(slot_counter++ % 3);
    float* xs = x[slot].as<float>();
    const size_t xbytes = static_cast<size_t>(b.T * H) * 4;
    const int32_t* ids = b.ints.as<int32_t>();
    const std::string where = "layer streaming: layer " + S(l);
    if (l == 0) {
      check_cuda(cudaStreamWaitEvent(compute.s, slot_free[slot].e, 0), where);
      check(kern::embedding_gather(ids, b.T, embed.as<uint16_t>(), cfg.vocab_size, H, xs,
                                   reinterpret_cast<Stream>(compute.s)),
            where + " embedding");
    } else {
      check_cuda(cudaStreamWaitEvent(upload.s, slot_free[slot].e, 0), where);
      check_cuda(cudaStreamWaitEvent(upload.s, b.host_ready->e, 0), where);
      const auto iv = h2d_log.begin(upload.s);
      check_cuda(cudaMemcpyAsync(xs, b.host_x->p, xbytes, cudaMemcpyHostToDevice, upload.s), where + " upload");
      IntervalLog::end(iv, upload.s);
      h2d_bytes += static_cast<double>(xbytes);
      check_cuda(cudaEventRecord(slot_uploaded[slot].e, upload.s), where);
      check_cuda(cudaStreamWaitEvent(compute.s, slot_uploaded[slot].e, 0), where);
    }
    const auto iv = compute_log.begin(compute.s);
    const Stream cst = reinterpret_cast<Stream>(compute.s);
    check(kern::rmsnorm(xs, b.T, H, w.input_norm, static_cast<float>(cfg.rms_norm_eps), normed.as<uint16_t>(), cst),
          where + " input_layernorm");
    DecoderLayerIo io;
    io.num_tokens = b.T;
    io.num_sequences = b.S;
    io.max_seqlen = b.max_seqlen;
    io.positions = ids + b.T;
    io.cu_seqlens = ids + 2 * b.T;
    io.x = xs;
    io.normed = normed.as<uint16_t>();
    io.qkv = qkv.as<float>();
    io.q = q.as<uint16_t>();
    io.k = k.as<uint16_t>();
    io.v = v.as<uint16_t>();
    io.attn = attn.as<uint16_t>();
    io.proj = proj.as<float>();
    io.gate_up = gate_up.as<uint16_t>();
    io.act = act.as<uint16_t>();
    DeviceObserver* obs = hooks.observer();
    if (obs) {
      io.obs_q = obs_q.as<float>();
      io.obs_k_pre = obs_k_pre.as<float>();
      io.obs_k = obs_k.as<float>();
      io.obs_v = obs_v.as<float>();
    }
    hooks.before_batch(l, pass, j, compute.s);
    // The fused residual add normalizes with the layer's own input norm: its `normed` output is never read (the
    // next layer recomputes it from x with the identical kernel body), only x moves on.
    run_decoder_layer(cfg, gemm, inv_freq.as<float>(), w, w.input_norm, l, io, obs, part, cst);
    hooks.after_batch(l, pass, j, compute.s);
    IntervalLog::end(iv, compute.s);
    if (carry) {
      check_cuda(cudaEventRecord(slot_uploaded[slot].e, compute.s), where);  // reused as "computed"
      check_cuda(cudaStreamWaitEvent(download.s, slot_uploaded[slot].e, 0), where);
      const auto div = d2h_log.begin(download.s);
      check_cuda(cudaMemcpyAsync(b.host_x->p, xs, xbytes, cudaMemcpyDeviceToHost, download.s), where + " download");
      IntervalLog::end(div, download.s);
      d2h_bytes += static_cast<double>(xbytes);
      check_cuda(cudaEventRecord(b.host_ready->e, download.s), where);
      check_cuda(cudaEventRecord(slot_free[slot].e, download.s), where);
    } else {
      check_cuda(cudaEventRecord(slot_free[slot].e, compute.s), where);
    }
  }

  void sync_all(const std::string& where) {
    for (cudaStream_t s : {compute.s, upload.s, download.s, weights.s}) check_cuda(cudaStreamSynchronize(s), where);
  }

  // Every layer over every batch, `hooks` deciding the passes.
  void run(PassHooks& hooks, const StreamProgress& progress) {
    const int64_t L = cfg.num_layers;
    fetch_weights(0);
    for (int64_t l = 0; l < L; ++l) {
      const int slot = static_cast<int>(l % 2);
      const DeviceLayerWeights w = slot_w[slot].view();
      check_cuda(cudaStreamWaitEvent(compute.s, w_ready[slot].e, 0), "layer streaming: weights");
      const bool last = l + 1 == L;
      const int passes = hooks.passes(l);
      for (int pass = 0; pass < passes; ++pass) {
        const bool full = pass == passes - 1 && !last;
        for (int64_t j = 0; j < static_cast<int64_t>(batches.size()); ++j)
          run_batch(l, pass, j, full ? LayerPart::Full : LayerPart::AttentionInputsOnly, full, w, hooks);
        // The next layer's weights are fetched while this pass computes (a checkpoint is read on this thread now).
        if (pass == 0 && !last) fetch_weights(l + 1);
        hooks.after_pass(l, pass, compute.s);
      }
      check_cuda(cudaEventRecord(w_free[slot].e, compute.s), "layer streaming: weights free");
      sync_all("layer streaming: layer " + S(l));
      compute_s += compute_log.drain();
      h2d_s += h2d_log.drain();
      d2h_s += d2h_log.drain();
      weight_s += weight_log.drain();
      peak_used = std::max(peak_used, device_used_bytes() - used_before);
      hooks.after_layer(l);
      if (progress) progress("layers", l + 1, L);
    }
  }
};

namespace {

using State = StreamedForwardRunner::State;

// ---- exchange of per-batch partials between ranks

class Exchange {
 public:
  explicit Exchange(int ranks) : barrier_(ranks) {}
  virtual ~Exchange() = default;
  // Every rank's `count` doubles at `send`, concatenated in rank order into each rank's `recv`; returns when done.
  void all_gather(int rank, const double* send, double* recv, size_t count, cudaStream_t st) {
    check_cuda(cudaStreamSynchronize(st), "all-gather: partials");
    sync_point();
    gather(rank, send, recv, count, st);
    check_cuda(cudaStreamSynchronize(st), "all-gather");
    sync_point();
  }
  // A failing rank leaves the barrier for good; the others notice at their next exchange instead of waiting forever.
  void fail() {
    failed_ = true;
    barrier_.arrive_and_drop();
  }
  virtual bool nccl() const { return false; }

 protected:
  virtual void gather(int rank, const double* send, double* recv, size_t count, cudaStream_t st) = 0;
  void sync_point() {
    barrier_.arrive_and_wait();
    if (failed_) throw Error("--gpus", "another rank failed");
  }

 private:
  std::barrier<> barrier_;
  std::atomic<bool> failed_{false};
};

// Copies between device pointers (unified addressing: peer copies across devices, plain copies for virtual shards).
class PeerExchange : public Exchange {
 public:
  explicit PeerExchange(int ranks) : Exchange(ranks), sends_(static_cast<size_t>(ranks)) {}

 protected:
  void gather(int rank, const double* send, double* recv, size_t count, cudaStream_t st) override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      sends_[rank] = send;
    }
    sync_point();  // every rank has published its pointer
    for (size_t r = 0; r < sends_.size(); ++r)
      check_cuda(cudaMemcpyAsync(recv + r * count, sends_[r], count * sizeof(double), cudaMemcpyDefault, st),
                 "all-gather: peer copy");
  }

 private:
  std::mutex mu_;
  std::vector<const double*> sends_;
};

#ifdef OSCAR_HAVE_NCCL
struct NcclApi {
  decltype(&ncclCommInitAll) init_all = nullptr;
  decltype(&ncclAllGather) all_gather = nullptr;
  decltype(&ncclCommDestroy) destroy = nullptr;
  decltype(&ncclGetErrorString) error_string = nullptr;
};

// Loaded on first use so that binaries start (and single-device runs work) where libnccl.so.2 is absent.
const NcclApi& nccl_api() {
  static const NcclApi api = [] {
    void* lib = dlopen("libnccl.so.2", RTLD_NOW | RTLD_GLOBAL);
    if (!lib) lib = dlopen("libnccl.so", RTLD_NOW | RTLD_GLOBAL);
    if (!lib)
      throw Error("--gpus", std::string("NCCL library not found (libnccl.so.2; add its directory to "
                                        "LD_LIBRARY_PATH): ") + dlerror());
    NcclApi a;
    a.init_all = reinterpret_cast<decltype(a.init_all)>(dlsym(lib, "ncclCommInitAll"));
    a.all_gather = reinterpret_cast<decltype(a.all_gather)>(dlsym(lib, "ncclAllGather"));
    a.destroy = reinterpret_cast<decltype(a.destroy)>(dlsym(lib, "ncclCommDestroy"));
    a.error_string = reinterpret_cast<decltype(a.error_string)>(dlsym(lib, "ncclGetErrorString"));
    if (!a.init_all || !a.all_gather || !a.destroy || !a.error_string)
      throw Error("--gpus", "libnccl.so.2 lacks ncclCommInitAll / ncclAllGather");
    return a;
  }();
  return api;
}

class NcclExchange : public Exchange {
 public:
  explicit NcclExchange(const std::vector<int>& devices) : Exchange(static_cast<int>(devices.size())) {
    const NcclApi& api = nccl_api();
    // NVLink SHARP (multicast) stays off on these machines; NCCL reads the variable at communicator creation.
    ::setenv("NCCL_NVLS_ENABLE", "0", 1);
    comms_.resize(devices.size());
    const ncclResult_t r = api.init_all(comms_.data(), static_cast<int>(devices.size()), devices.data());
    if (r != ncclSuccess) throw Error("--gpus", std::string("ncclCommInitAll: ") + api.error_string(r));
  }
  ~NcclExchange() override {
    for (ncclComm_t c : comms_)
      if (c) nccl_api().destroy(c);
  }
  bool nccl() const override { return true; }

 protected:
  void gather(int rank, const double* send, double* recv, size_t count, cudaStream_t st) override {
    const NcclApi& api = nccl_api();
    const ncclResult_t r = api.all_gather(send, recv, count, ncclDouble, comms_[rank], st);
    if (r != ncclSuccess) throw Error("--gpus", std::string("ncclAllGather: ") + api.error_string(r));
  }

 private:
  std::vector<ncclComm_t> comms_;
};
#endif

// sums[i] = ((0 + p_0[i]) + p_1[i]) + ... in global batch order (shard_plan.h's ordered_reduce_ref, on the device).
// Destination: i < n → qq, i < 2n → vv, else w.
__global__ void ordered_reduce_kernel(const double* __restrict__ gathered, const int64_t* __restrict__ first,
                                      int64_t ranks, int64_t slots, int64_t stride, int64_t n,
                                      double* __restrict__ qq, double* __restrict__ vv, double* __restrict__ w) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= stride) return;
  double acc = 0;
  for (int64_t r = 0; r < ranks; ++r) {
    const int64_t count = first[r + 1] - first[r];
    for (int64_t j = 0; j < count; ++j) acc += gathered[(r * slots + j) * stride + i];
  }
  if (i < n)
    qq[i] = acc;
  else if (i < 2 * n)
    vv[i - n] = acc;
  else
    w[i - 2 * n] = acc;
}

class StatisticsHooks : public PassHooks {
 public:
  StatisticsHooks(GpuStatisticsCollector& c, calib::ValueWeighting weighting, const fmt::ModelConfig& cfg,
                  const std::vector<int64_t>& batch_tokens, const ShardPlan& plan, int rank, Exchange* exchange,
                  double* exchange_seconds)
      : c_(c), weighting_(weighting), plan_(plan), rank_(rank), exchange_(exchange), exchange_s_(exchange_seconds) {
    const int64_t group = cfg.num_heads / cfg.num_kv_heads;
    for (int64_t t : batch_tokens) {  // the resident path's per-call increments, in batch order
      total_q_ += static_cast<double>(group * t);
      total_v_ += static_cast<double>(t);
    }
    if (exchange_) {
      const GpuStatisticsCollector::LayerSums s = c_.layer_sums(0);
      n_ = s.matrix_elems;
      stride_ = 2 * n_ + s.heads;
      const int64_t slots = std::max<int64_t>(plan_.max_local(), 1);
      partials_.ensure(static_cast<size_t>(slots * stride_) * 8, "per-batch statistics partials");
      gathered_.ensure(static_cast<size_t>(plan_.ranks * slots * stride_) * 8, "gathered statistics partials");
      first_ = to_device(std::span<const int64_t>(plan_.first), "shard plan");
      check_cuda(cudaMemset(partials_.data(), 0, partials_.bytes()), "partials");
    }
  }
  int passes(int64_t) const override { return weighting_ == calib::ValueWeighting::QueryEnergy ? 2 : 1; }
  DeviceObserver* observer() override { return &c_; }
  void before_batch(int64_t l, int, int64_t, cudaStream_t st) override {
    if (!exchange_) return;
    const GpuStatisticsCollector::LayerSums s = c_.layer_sums(l);
    check_cuda(cudaMemsetAsync(s.qq, 0, static_cast<size_t>(n_) * 8, st), "partials: reset");
    check_cuda(cudaMemsetAsync(s.vv, 0, static_cast<size_t>(n_) * 8, st), "partials: reset");
    check_cuda(cudaMemsetAsync(s.w, 0, static_cast<size_t>(s.heads) * 8, st), "partials: reset");
  }
  void after_batch(int64_t l, int, int64_t j, cudaStream_t st) override {
    if (!exchange_) return;
    const GpuStatisticsCollector::LayerSums s = c_.layer_sums(l);
    double* dst = partials_.as<double>() + j * stride_;
    check_cuda(cudaMemcpyAsync(dst, s.qq, static_cast<size_t>(n_) * 8, cudaMemcpyDeviceToDevice, st), "partials");
    check_cuda(cudaMemcpyAsync(dst + n_, s.vv, static_cast<size_t>(n_) * 8, cudaMemcpyDeviceToDevice, st), "partials");
    check_cuda(cudaMemcpyAsync(dst + 2 * n_, s.w, static_cast<size_t>(s.heads) * 8, cudaMemcpyDeviceToDevice, st),
               "partials");
  }
  void after_pass(int64_t l, int pass, cudaStream_t st) override {
    const bool query_pass = weighting_ == calib::ValueWeighting::QueryEnergy && pass == 0;
    if (exchange_) {
      const auto t0 = Clock::now();
      const int64_t slots = std::max<int64_t>(plan_.max_local(), 1);
      exchange_->all_gather(rank_, partials_.as<double>(), gathered_.as<double>(), static_cast<size_t>(slots * stride_),
                            st);
      const GpuStatisticsCollector::LayerSums s = c_.layer_sums(l);
      ordered_reduce_kernel<<<static_cast<unsigned>((stride_ + 255) / 256), 256, 0, st>>>(
          gathered_.as<double>(), first_.as<int64_t>(), plan_.ranks, slots, stride_, n_, s.qq, s.vv, s.w);
      check_cuda(cudaGetLastError(), "ordered reduction");
      check_cuda(cudaStreamSynchronize(st), "ordered reduction");
      c_.set_layer_counts(l, total_q_, query_pass ? 0.0 : total_v_);
      *exchange_s_ += std::chrono::duration<double>(Clock::now() - t0).count();
    }
    if (query_pass) c_.freeze_layer_queries(l);
  }
  void after_layer(int64_t) override { c_.check_finite(); }

 private:
  GpuStatisticsCollector& c_;
  calib::ValueWeighting weighting_;
  ShardPlan plan_;
  int rank_;
  Exchange* exchange_;
  double* exchange_s_;
  double total_q_ = 0, total_v_ = 0;
  int64_t n_ = 0, stride_ = 0;
  DeviceBuffer partials_, gathered_, first_;
};

}  // namespace

// ---- LayerSource

LayerSource LayerSource::from_checkpoint(const std::filesystem::path& model_dir) {
  LayerSource s;
  s.config = fmt::ModelConfig::from_dir(model_dir);
  s.checkpoint = model_dir;
  return s;
}

LayerSource LayerSource::random(const fmt::ModelConfig& cfg, uint64_t seed) {
  LayerSource s;
  s.config = cfg;
  s.seed = seed;
  return s;
}

// ---- statistics

std::unique_ptr<GpuStatisticsCollector> streamed_statistics(const LayerSource& source,
                                                            const std::vector<std::vector<int32_t>>& sequences,
                                                            calib::ValueWeighting weighting,
                                                            const LayerStreamOptions& opt, LayerStreamReport* report,
                                                            const StreamProgress& progress) {
  if (opt.batch_tokens < 1) throw Error("--batch-tokens", "must be >= 1");
  if (opt.devices.empty()) throw Error("--gpus", "no devices");
  int device_count = 0;
  check_cuda(cudaGetDeviceCount(&device_count), "cudaGetDeviceCount");
  for (int d : opt.devices)
    if (d < 0 || d >= device_count)
      throw Error("--gpus", "device " + S(d) + " does not exist (" + S(device_count) + " visible)");
  const calib::StatisticsShape shape = calib::StatisticsShape::from_config(source.config);
  const std::vector<BatchRange> batches = plan_batches(sequences, opt.batch_tokens);
  const int ranks = static_cast<int>(opt.devices.size());
  const ShardPlan plan = plan_shards(static_cast<int64_t>(batches.size()), ranks);
  std::vector<int64_t> batch_tokens;
  for (const BatchRange& b : batches) {
    int64_t t = 0;
    for (int64_t i = b.first; i < b.last; ++i) t += static_cast<int64_t>(sequences[i].size());
    batch_tokens.push_back(t);
  }

  std::unique_ptr<Exchange> exchange;
  if (ranks > 1 || opt.sharded_reduction) {
    std::vector<int> sorted = opt.devices;
    std::sort(sorted.begin(), sorted.end());
    const bool distinct = std::adjacent_find(sorted.begin(), sorted.end()) == sorted.end();
#ifdef OSCAR_HAVE_NCCL
    if (ranks > 1 && distinct && opt.use_nccl) exchange = std::make_unique<NcclExchange>(opt.devices);
#else
    (void)distinct;
#endif
    if (!exchange) exchange = std::make_unique<PeerExchange>(ranks);
  }

  std::vector<std::unique_ptr<GpuStatisticsCollector>> collectors(static_cast<size_t>(ranks));
  std::vector<std::unique_ptr<State>> states(static_cast<size_t>(ranks));
  std::vector<std::exception_ptr> errors(static_cast<size_t>(ranks));
  std::vector<double> exchange_s(static_cast<size_t>(ranks), 0.0);
  const auto t0 = Clock::now();
  const auto run_rank = [&](int r) {
    try {
      check_cuda(cudaSetDevice(opt.devices[r]), "cudaSetDevice");
      states[r] = std::make_unique<State>(source, opt.devices[r]);
      std::vector<PackedBatch> local;
      for (int64_t b = plan.first[r]; b < plan.first[r + 1]; ++b) {
        PackedBatch p;
        for (int64_t i = batches[b].first; i < batches[b].last; ++i) p.add_sequence(sequences[i]);
        local.push_back(std::move(p));
      }
      states[r]->set_batches(local);
      collectors[r] = std::make_unique<GpuStatisticsCollector>(shape, weighting);
      StatisticsHooks hooks(*collectors[r], weighting, source.config, batch_tokens, plan, r, exchange.get(),
                            &exchange_s[r]);
      // The collector's and hooks' memsets ran on the legacy stream; the streamer's streams are non-blocking.
      check_cuda(cudaDeviceSynchronize(), "layer streaming: statistics buffers");
      states[r]->run(hooks, r == 0 ? progress : StreamProgress{});
    } catch (...) {
      errors[r] = std::current_exception();
      if (exchange) exchange->fail();
    }
  };
  std::vector<std::thread> threads;
  for (int r = 1; r < ranks; ++r) threads.emplace_back(run_rank, r);
  run_rank(0);
  for (std::thread& t : threads) t.join();
  const double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  // The first rank's own error, not "another rank failed".
  std::exception_ptr first_error;
  for (int r = 0; r < ranks && !first_error; ++r) {
    if (!errors[r]) continue;
    try {
      std::rethrow_exception(errors[r]);
    } catch (const Error& e) {
      if (std::string(e.what()).find("another rank failed") == std::string::npos) first_error = errors[r];
    } catch (...) {
      first_error = errors[r];
    }
  }
  for (int r = 0; r < ranks && !first_error; ++r)
    if (errors[r]) first_error = errors[r];

  if (report && !first_error) {
    LayerStreamReport& rep = *report;
    rep = LayerStreamReport{};
    rep.ranks = ranks;
    rep.nccl = exchange && exchange->nccl();
    rep.layers = source.config.num_layers;
    rep.batches = static_cast<int64_t>(batches.size());
    for (int64_t t : batch_tokens) rep.tokens += t;
    rep.seconds = seconds;
    const State& s0 = *states[0];
    rep.compute_busy_seconds = s0.compute_s;
    rep.h2d_seconds = s0.h2d_s;
    rep.d2h_seconds = s0.d2h_s;
    rep.weight_seconds = s0.weight_s;
    rep.exchange_seconds = exchange_s[0];
    rep.layer_weight_bytes = static_cast<double>(s0.slot_w[0].bytes());
    for (const auto& s : states) {
      rep.h2d_bytes += s->h2d_bytes;
      rep.d2h_bytes += s->d2h_bytes;
      rep.pinned_host_bytes += s->pinned_bytes;
      rep.peak_device_bytes = std::max(rep.peak_device_bytes, s->peak_used);
    }
  }
  // Each rank's device state is released on its own device.
  for (int r = ranks - 1; r >= 0; --r) {
    cudaSetDevice(opt.devices[r]);
    states[r].reset();
    if (r > 0) collectors[r].reset();
  }
  check_cuda(cudaSetDevice(opt.devices[0]), "cudaSetDevice");
  if (first_error) std::rethrow_exception(first_error);
  return std::move(collectors[0]);
}

// ---- held-out runner

namespace {
class RelayHooks : public PassHooks {
 public:
  explicit RelayHooks(DeviceObserver& o) : o_(o) {}
  int passes(int64_t) const override { return 1; }
  DeviceObserver* observer() override { return &o_; }

 private:
  DeviceObserver& o_;
};
}  // namespace

StreamedForwardRunner::StreamedForwardRunner(const LayerSource& source, int device)
    : source_(source), device_(device) {}
StreamedForwardRunner::~StreamedForwardRunner() = default;

void StreamedForwardRunner::run_sequence(std::span<const int32_t> ids, model::Observer& observer) {
  check_cuda(cudaSetDevice(device_), "cudaSetDevice");
  if (!state_) state_ = std::make_unique<State>(source_, device_);
  PackedBatch batch;
  batch.add_sequence(ids);
  state_->set_batches({batch});
  const std::unique_ptr<DeviceObserver> relay = make_host_relay(observer);
  RelayHooks hooks(*relay);
  state_->run(hooks, {});
}

calib::CalibrationResult calibrate_streamed(const LayerSource& source, const fmt::ModelFingerprint& fingerprint,
                                            const calib::CalibrationData& data,
                                            const calib::CalibrationOptions& opt, const LayerStreamOptions& stream,
                                            LayerStreamReport* report) {
  calib::validate_inputs(source.config, data, opt);
  if (!opt.checkpoint.empty() || opt.resume)
    throw Error("--checkpoint", "statistics checkpoints are not supported with --device cuda yet");
  const std::unique_ptr<GpuStatisticsCollector> stats =
      streamed_statistics(source, data.sequences, opt.value_weighting, stream, report, opt.progress);
  calib::CalibrationSpectra spectra = cusolver_spectra(stats->moments(opt.per_head));
  if (opt.error_feedback.mode != calib::ErrorFeedbackMode::Off) spectra.head_sigma_q = stats->head_sigma_q();
  StreamedForwardRunner runner(source, stream.devices.front());
  return calib::assemble_bundle(spectra, runner, fingerprint, data, opt);
}

}  // namespace oscar::rt
