// Cost of quantize-on-write (kern::kv_write) for a whole prompt, next to the prefill of the same prompt:
//   kv_write_bench --config bench/configs/qwen3-8b.json --seq 32768
// Random weights (DeviceModel::random), random-sign Hadamard rotations (eval::random_sign_hadamard) and the
// published clip ratios (K 0.96, V 0.92), so the rotation and the clip selection are both exercised.
// Three numbers, one process, one device:
//   1. prefill: DeviceModel::forward of the prompt, no observer (forward_bench's number);
//   2. kv_write alone: the INT2 writes of every token past the sink, K and V, all layers, plus the bf16 writes of
//      the sink and recent-window tokens — what rt::Engine's prefill launches — from bf16 inputs already in place;
//      µs, GB/s (bf16 read + INT2 pages written), % of (1);
//   3. the engine's whole prefill write path: forward with an observer that does what rt::Engine's prefill
//      observer does (rt::PrefillLayerWriter: the forward's bf16 K/V written in place, or copied to staging when
//      the write overlaps), minus (1). Rows: the tiled writer and the EF one with the writes on the forward's
//      stream and on the writer's side stream overlapping the forward (the engine's default), and the EF one
//      overlapped once more with the fp32 observer copies the engine asked for before 2026-12-07 (rope_qkv writes
//      them; the staging reads the bf16 K/V either way), to show what dropping them saves.
// (2) is printed for each INT2 implementation of kernels/kv_quantize/kv_write_variants.h (--impl), next to the
// cost of ONE INT2 call (one layer's K or V; issue #6's budget is <= 0.5 ms of the 1.86 s prefill / 72 calls).
// "ef" is the error-feedback writer (issue #10; kv_write_int2_ef.cuh) with one table per KV head made by
// calib::error_feedback_table from a random correlated metric, shared by all layers (the cost does not depend on
// the table's values), clip feedback on (the bundle default).
#include <cuda_runtime.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "bench/bench_fill.cuh"
#include "formats/error.h"
#include "formats/kv_layout.h"
#include "formats/model_config.h"
#include "kernels/common/device_utils.cuh"
#include "kernels/kv_quantize/kv_quantize.h"
#include "kernels/kv_quantize/kv_write_variants.h"
#include "lib/calib/error_feedback.h"
#include "lib/eval/cache_modes.h"
#include "runtime/device_buffer.h"
#include "runtime/device_model.h"
#include "runtime/prefill_layer_writer.h"

namespace {

using namespace oscar;

void check(kern::Status s, const std::string& where) {
  if (s != kern::Status::Ok) throw Error(where, "kernel refused: " + std::string(kern::status_name(s)));
}

// Pools and slots of one prompt in the engine's layout: page p of the prompt is page id p in every pool.
struct Cache {
  fmt::ModelConfig cfg;
  int64_t tokens = 0, sink = 64, recent = 256;
  size_t int2_layer_bytes = 0, bf16_layer_bytes = 0;
  rt::DeviceBuffer int2, bf16;   // [layer][K/V] pools
  rt::DeviceBuffer slots;        // bf16 slots [T], int2 slots [T]
  std::vector<rt::DeviceBuffer> rotations;  // per layer: K, V
  rt::DeviceBuffer stage_k, stage_v;  // bf16 [T, Hkv, d]
  rt::DeviceBuffer ef_order, ef_weights;  // [Hkv, d], [Hkv, d, d]: one table set for every layer and K/V

  Cache(const fmt::ModelConfig& c, int64_t T) : cfg(c), tokens(T) {
    const int64_t pages = (T + fmt::kKvPageTokens - 1) / fmt::kKvPageTokens;
    const int64_t d = c.head_dim, hkv = c.num_kv_heads;
    int2_layer_bytes = static_cast<size_t>(pages * hkv) * fmt::Int2PageGeometry{static_cast<int32_t>(d), 64}.page_bytes();
    bf16_layer_bytes = static_cast<size_t>(pages * hkv) * fmt::Bf16PageGeometry{static_cast<int32_t>(d), 64}.page_bytes();
    int2 = rt::DeviceBuffer(int2_layer_bytes * 2 * c.num_layers, "INT2 pools");
    // bf16 pages only hold the windows, but slot = token keeps the bench simple: allocate every page.
    bf16 = rt::DeviceBuffer(bf16_layer_bytes * 2 * c.num_layers, "bf16 pools");
    std::vector<int32_t> s(static_cast<size_t>(2 * T));
    for (int64_t t = 0; t < T; ++t) {
      const bool high = fmt::is_high_precision_token(t, T, sink, recent);
      s[static_cast<size_t>(t)] = high ? static_cast<int32_t>(t) : -1;
      s[static_cast<size_t>(T + t)] = t >= sink ? static_cast<int32_t>(t) : -1;
    }
    slots = rt::to_device(std::span<const int32_t>(s), "slots");
    for (int64_t l = 0; l < c.num_layers; ++l)
      for (int v = 0; v < 2; ++v) {
        const std::vector<float> r = eval::random_sign_hadamard(d, 1000003u + 2 * static_cast<uint64_t>(l) + v);
        rotations.push_back(rt::to_device(std::span<const float>(r), "rotation"));
      }
    std::vector<int32_t> order(static_cast<size_t>(hkv * d));
    std::vector<float> weights(static_cast<size_t>(hkv * d * d));
    std::mt19937 rng(7);
    std::normal_distribution<double> n01;
    for (int64_t h = 0; h < hkv; ++h) {
      // M = G Gᵀ / d: a dense, correlated metric, so every weight row is non-zero as with real statistics.
      std::vector<double> g(static_cast<size_t>(d * d)), m(static_cast<size_t>(d * d));
      for (double& v : g) v = n01(rng);
      for (int64_t i = 0; i < d; ++i)
        for (int64_t j = 0; j < d; ++j) {
          double acc = 0;
          for (int64_t k = 0; k < d; ++k) acc += g[static_cast<size_t>(i * d + k)] * g[static_cast<size_t>(j * d + k)];
          m[static_cast<size_t>(i * d + j)] = acc / static_cast<double>(d);
        }
      const calib::ErrorFeedbackTable t = calib::error_feedback_table(m, d, {}, "kv_write_bench");
      calib::stored_error_feedback(t, std::span<int32_t>(order.data() + h * d, static_cast<size_t>(d)),
                                   std::span<float>(weights.data() + h * d * d, static_cast<size_t>(d * d)));
    }
    ef_order = rt::to_device(std::span<const int32_t>(order), "EF order");
    ef_weights = rt::to_device(std::span<const float>(weights), "EF weights");
    stage_k = rt::DeviceBuffer(static_cast<size_t>(T * hkv * d) * 2, "K staging");
    stage_v = rt::DeviceBuffer(static_cast<size_t>(T * hkv * d) * 2, "V staging");
  }

  // What rt::Engine's write_layer launches for one layer: bf16 writes of the windows, INT2 writes of the rest.
  void write_layer(int64_t layer, const uint16_t* k, const uint16_t* v, cudaStream_t stream,
                   kern::KvWriteInt2Impl impl = kern::KvWriteInt2Impl::Tiled, bool int2_only = false,
                   bool ef = false) {
    kern::KvWriteParams common;
    common.tokens = tokens;
    common.token_stride = cfg.num_kv_heads * cfg.head_dim;
    common.num_kv_heads = static_cast<int32_t>(cfg.num_kv_heads);
    common.head_dim = static_cast<int32_t>(cfg.head_dim);
    common.page_tokens = fmt::kKvPageTokens;
    const auto st = reinterpret_cast<kern::Stream>(stream);
    for (int value = 0; value < 2; ++value) {
      kern::KvWriteParams p = common;  // as the engine: K's EF tables must not reach V's bf16 write
      p.x = value ? v : k;
      p.rotation = rotations[static_cast<size_t>(2 * layer + value)].as<float>();
      p.slots = slots.as<int32_t>();
      p.bf16_pool = reinterpret_cast<uint16_t*>(bf16.as<uint8_t>() + (2 * layer + value) * bf16_layer_bytes);
      p.int2_pool = nullptr;
      if (!int2_only) check(kern::kv_write(p, kern::KvWriteMode::Bf16, st), "bf16 write");
      p.slots = slots.as<int32_t>() + tokens;
      p.bf16_pool = nullptr;
      p.int2_pool = int2.as<uint8_t>() + (2 * layer + value) * int2_layer_bytes;
      p.clip_ratio = value ? 0.92f : 0.96f;
      p.ef_order = ef ? ef_order.as<int32_t>() : nullptr;
      p.ef_weights = ef ? ef_weights.as<float>() : nullptr;
      p.ef_clip_feedback = true;
      check(ef ? kern::kv_write(p, kern::KvWriteMode::Int2, st) : kern::kv_write_int2_impl(p, impl, st), "INT2 write");
    }
  }
};

// What rt::Engine's prefill observer does: the layer's K/V through rt::PrefillLayerWriter (bf16 staging, then the
// writes, on the forward's stream or overlapped on its side stream) with the tiled INT2 writer or the EF one.
class EngineLikeWriter : public rt::DeviceObserver {
 public:
  EngineLikeWriter(Cache& c, bool ef, bool overlap, bool fp32) : c_(c), ef_(ef), fp32_(fp32), writer_(overlap) {}
  bool wants_fp32() const override { return fp32_; }
  void on_attention_inputs(const rt::DeviceAttentionInputs& in) override {
    writer_.write_layer(
        in, in.head_dim,
        [&](int64_t layer, const uint16_t* k, const uint16_t* v, rt::Stream stream) {
          c_.write_layer(layer, k, v, stream, kern::KvWriteInt2Impl::Tiled, false, ef_);
        },
        "kv_write_bench layer " + std::to_string(in.layer));
  }
  void join(rt::Stream stream) { writer_.join(stream, "kv_write_bench"); }

 private:
  Cache& c_;
  bool ef_;
  bool fp32_;
  rt::PrefillLayerWriter writer_;
};

template <class F>
double median_ms(int warmup, int iters, cudaStream_t stream, F&& f) {
  for (int i = 0; i < warmup; ++i) f();
  rt::check_cuda(cudaStreamSynchronize(stream), "warmup");
  cudaEvent_t a, b;
  rt::check_cuda(cudaEventCreate(&a), "event");
  rt::check_cuda(cudaEventCreate(&b), "event");
  std::vector<float> ms(static_cast<size_t>(iters));
  for (int i = 0; i < iters; ++i) {
    rt::check_cuda(cudaEventRecord(a, stream), "event");
    f();
    rt::check_cuda(cudaEventRecord(b, stream), "event");
    rt::check_cuda(cudaEventSynchronize(b), "event");
    rt::check_cuda(cudaEventElapsedTime(&ms[static_cast<size_t>(i)], a, b), "event");
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

// Per-pass time of f() from one CUDA graph of `iters` captured passes (warmed up once): the GPU time without the
// host's launch path, which eager launches of small writes (a decode step's) mostly measure.
template <typename F>
double graph_ms(int iters, cudaStream_t stream, F&& f) {
  f();  // first-launch work (attributes, lazy loading) outside the capture
  rt::check_cuda(cudaStreamSynchronize(stream), "warmup");
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  rt::check_cuda(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), "capture");
  for (int i = 0; i < iters; ++i) f();
  rt::check_cuda(cudaStreamEndCapture(stream, &graph), "capture");
  rt::check_cuda(cudaGraphInstantiate(&exec, graph, 0), "graph");
  rt::check_cuda(cudaGraphDestroy(graph), "graph");
  rt::check_cuda(cudaGraphLaunch(exec, stream), "graph");
  const double ms = median_ms(0, 3, stream, [&] { rt::check_cuda(cudaGraphLaunch(exec, stream), "graph"); });
  rt::check_cuda(cudaGraphExecDestroy(exec), "graph");
  return ms / iters;
}

int run(int argc, char** argv) {
  CLI::App app{"OSCAR quantize-on-write cost vs prefill (random weights)"};
  std::string config_path = "bench/configs/qwen3-8b.json";
  int64_t seq = 32768;
  int warmup = 1, iters = 3, write_iters = 20;
  uint64_t seed = 0;
  bool skip_prefill = false;
  std::string impl_name = "all";
  app.add_option("--config", config_path, "HF config.json of the shape")->capture_default_str()->check(CLI::ExistingFile);
  app.add_option("--seq", seq, "prompt tokens")->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--warmup", warmup, "untimed forwards first")->capture_default_str()->check(CLI::NonNegativeNumber);
  app.add_option("--iters", iters, "timed forwards")->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--write-iters", write_iters, "timed kv_write passes")->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--seed", seed, "seed of the random weights and ids")->capture_default_str();
  app.add_flag("--skip-prefill", skip_prefill, "time kv_write alone (no model, no forward)");
  bool graph = false;
  app.add_flag("--graph", graph,
               "time the kv_write passes as one CUDA graph (GPU time; default: eager launches timed with events, "
               "which include the host's launch path)");
  app.add_option("--impl", impl_name,
                 "INT2 implementation(s) timed in (2): tiled (what kv_write runs), radix, legacy, ef (error-feedback "
                 "rounding), all")
      ->capture_default_str()
      ->check(CLI::IsMember({"tiled", "radix", "legacy", "ef", "all"}));
  CLI11_PARSE(app, argc, argv);

  const fmt::ModelConfig cfg = fmt::ModelConfig::from_file(config_path);
  cudaDeviceProp prop{};
  rt::check_cuda(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
  std::printf("device: %s (%d SMs)\nconfig: %s  layers %lld  KV heads %lld  head_dim %lld  prompt %lld tokens\n",
              prop.name, prop.multiProcessorCount, config_path.c_str(), (long long)cfg.num_layers,
              (long long)cfg.num_kv_heads, (long long)cfg.head_dim, (long long)seq);

  std::unique_ptr<rt::DeviceModel> model;
  if (!skip_prefill) model = rt::DeviceModel::random(cfg, seed);
  cudaStream_t stream = nullptr;
  if (model) stream = reinterpret_cast<cudaStream_t>(model->stream());
  else rt::check_cuda(cudaStreamCreate(&stream), "cudaStreamCreate");

  Cache cache(cfg, seq);
  // (2) kv_write alone, from bf16 K/V already in place (one [T, Hkv, d] tensor each, reused for every layer).
  const int64_t n = seq * cfg.num_kv_heads * cfg.head_dim;
  bench::fill_uniform_bf16<<<4096, 256, 0, stream>>>(cache.stage_k.as<uint16_t>(), n, 1u, -2.f, 2.f);
  bench::fill_uniform_bf16<<<4096, 256, 0, stream>>>(cache.stage_v.as<uint16_t>(), n, 2u, -2.f, 2.f);
  rt::check_cuda(cudaGetLastError(), "fill");
  const int64_t quantized = std::max<int64_t>(seq - cache.sink, 0);
  const int64_t windows = std::min<int64_t>(seq, cache.sink + cache.recent);
  const double record = fmt::Int2PageGeometry{static_cast<int32_t>(cfg.head_dim), 64}.page_bytes() / 64.0;
  const double per_head_tokens = static_cast<double>(cfg.num_layers * 2 * cfg.num_kv_heads);
  // Bytes the writes must move: every INT2-written token read as bf16 and written as a record, plus the bf16
  // window tokens read and written. (The bf16 pass reads only its slots' rows.)
  const double bytes = per_head_tokens * (quantized * (cfg.head_dim * 2.0 + record) +
                                          windows * (cfg.head_dim * 2.0 * 2.0));
  struct Impl {
    const char* name;
    kern::KvWriteInt2Impl impl;
    bool ef = false;
  };
  const Impl impls[] = {{"tiled", kern::KvWriteInt2Impl::Tiled},
                        {"radix", kern::KvWriteInt2Impl::TiledRadix},
                        {"legacy", kern::KvWriteInt2Impl::Legacy},
                        {"ef", kern::KvWriteInt2Impl::Tiled, true}};
  double write_ms = 0;  // the tiled one (kv_write's), for (3)
  double ef_ms = -1, tiled_ms = -1;
  for (const Impl& im : impls) {
    if (impl_name != "all" && impl_name != im.name) continue;
    auto timed = [&](auto&& pass) { return graph ? graph_ms(write_iters, stream, pass) : median_ms(2, write_iters, stream, pass); };
    const double ms = timed([&] {
      for (int64_t l = 0; l < cfg.num_layers; ++l)
        cache.write_layer(l, cache.stage_k.as<uint16_t>(), cache.stage_v.as<uint16_t>(), stream, im.impl, false,
                          im.ef);
    });
    // One layer's K and V INT2 calls alone (no bf16 pass), averaged: the per-call budget of issue #6.
    const double int2_ms = timed([&] {
      cache.write_layer(0, cache.stage_k.as<uint16_t>(), cache.stage_v.as<uint16_t>(), stream, im.impl, true, im.ef);
    });
    if ((im.impl == kern::KvWriteInt2Impl::Tiled && !im.ef) || impl_name == im.name) write_ms = ms;
    if (im.ef) ef_ms = ms;
    else if (im.impl == kern::KvWriteInt2Impl::Tiled) tiled_ms = ms;
    std::printf("kv_write alone [%s]%s (%lld layers x K,V: INT2 for %lld tokens + bf16 for %lld window tokens): "
                "%.1f us, %.1f GB/s | one INT2 call (K/V mean): %.1f us\n",
                im.name, graph ? " (CUDA graph)" : "", (long long)cfg.num_layers, (long long)quantized, (long long)windows, ms * 1e3,
                bytes / (ms * 1e-3) * 1e-9, int2_ms * 1e3 / 2.0);
  }
  if (ef_ms > 0 && tiled_ms > 0)
    std::printf("RESULT ef/tiled kv_write = %.2fx (%.1f us vs %.1f us)\n", ef_ms / tiled_ms, ef_ms * 1e3,
                tiled_ms * 1e3);
  if (skip_prefill) return 0;

  // (1) prefill, (3) prefill with the engine's write path.
  std::mt19937 rng(static_cast<uint32_t>(seed));
  std::uniform_int_distribution<int32_t> id(0, static_cast<int32_t>(cfg.vocab_size - 1));
  std::vector<int32_t> ids(static_cast<size_t>(seq));
  for (int32_t& x : ids) x = id(rng);
  rt::PackedBatch packed;
  packed.add_sequence(ids);
  rt::DeviceForwardOptions plain;
  plain.rows = rt::LogitsRows::LastPerSequence;
  const double prefill_ms = median_ms(warmup, iters, stream, [&] { model->forward(packed, plain); });
  std::printf("prefill (no cache writes): %.2f ms\n", prefill_ms);
  // (3) for the tiled writer and the EF one, with the writes on the forward's stream (serial) and overlapped on the
  // engine's side stream (what rt::Engine runs).
  struct Path {
    const char* name;
    bool ef, overlap, fp32;
  };
  const Path paths[] = {{"tiled, serial", false, false, false},
                        {"tiled, overlapped", false, true, false},
                        {"ef, serial", true, false, false},
                        {"ef, overlapped", true, true, false},
                        {"ef, overlapped, fp32 observer copies as before", true, true, true}};
  for (const Path& p : paths) {
    if (impl_name != "all" && (impl_name == "ef") != p.ef) continue;
    EngineLikeWriter writer(cache, p.ef, p.overlap, p.fp32);
    rt::DeviceForwardOptions observed = plain;
    observed.observer = &writer;
    const double ms = median_ms(warmup, iters, stream, [&] {
      model->forward(packed, observed);
      writer.join(stream);
    });
    std::printf("prefill + engine write path [%s]: %.2f ms\n", p.name, ms);
    std::printf("RESULT engine write path [%s] +%.1f us = %.2f%% of prefill (goal < 2%%)\n", p.name,
                (ms - prefill_ms) * 1e3, 100.0 * (ms - prefill_ms) / prefill_ms);
  }
  std::printf("RESULT kv_write %.1f us = %.2f%% of prefill (alone, not overlapped)\n", write_ms * 1e3,
              100.0 * write_ms / prefill_ms);
  if (ef_ms > 0)
    std::printf("RESULT kv_write ef %.1f us = %.2f%% of prefill (alone, not overlapped)\n", ef_ms * 1e3,
                100.0 * ef_ms / prefill_ms);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const oscar::Error& e) {
    std::fprintf(stderr, "kv_write_bench: %s\n", e.what());
    return 1;
  }
}
