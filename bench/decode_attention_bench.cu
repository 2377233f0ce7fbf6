// Decode attention over the OSCAR paged cache (INT2 + bf16 sink/recent windows) vs our bf16-cache kernel.
// Prints µs per call, bytes moved, achieved GB/s, % of the cudaMemcpy D2D bandwidth measured in this process,
// and the speedup over the bf16 kernel. Cache contents are synthetic (valid fp16 scales, bounded bf16 values):
// the kernels' cost does not depend on the values.
// Timing: by default `iters` calls are captured into one CUDA graph and the graph launch is timed with events,
// which is how a serving loop issues a decode step and measures GPU time only; --eager times plain back-to-back
// calls, which at small sizes measures the host's launch rate (4 kernels per call) instead of the GPU.
// --torch-results reads the table printed by bench/torch_sdpa_decode.py (same shapes, same device run) and adds
// the speedup of the INT2 path over torch's bf16 SDPA. The segA/seg3b/segcal/seggen columns time the segmented
// (spectral) kernel on four layouts of the same bytes as INT2 (A, 3b, cal: compiled layouts; gen: the generic kernel;
// see the seg block below), each with its ratio to int2_us (issue #10's goal is <= 1.10x).
// int2_us is the default launch (DecodeAttentionVariant::Fused: q rotation + one INT2 kernel that also takes the
// window tokens and merges in its last block); the final two columns time the Separate variant (rotate_q, window,
// INT2, merge kernels) in the same run: sep_us and sep/int2 (> 1 means the fused launch is faster); wide_us and
// wide/int2 time the fused launch with the heads-as-rows score layout (DecodeAttentionVariant::FusedWide), which
// groups <= 4 no longer use by default (> 1 means the transposed layout is faster).
// fp8_us / int4_us time the eval baselines on the same windows: FP8 e4m3 pages (quant_storage = Fp8E4M3, 8 bits +
// one fp16 scale per head vector, its own CUDA-core split kernel) and INT4 pages (the segmented kernel with one 4-bit
// segment over the head, a compiled layout); each with its ratio to int2_us. Bytes are accounted as for int2_us.
// --splits N1,N2,... also times the default (Fused) launch with those split counts instead of
// decode_attention_num_splits()'s, one line per shape after its row: how the per-call floor (query setup, the last
// block's merge of every split's partial) trades against the tile work per block, e.g. at batch 1.
//   decode_attention_bench [--iters N] [--max-context T] [--torch-results FILE] [--eager] [--trace FILE]
//                          [--batch B] [--context T] [--splits N1,N2,...]
// --batch / --context time one batch size / context of any value instead of the table's (1, 8, 32 x 4K..max).
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cmath>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "bench/bench_fill.cuh"
#include "formats/kv_layout.h"
#include "kernels/attention_decode/decode_attention.h"

namespace {

#define CHECK_CUDA(x)                                                                         \
  do {                                                                                        \
    cudaError_t e_ = (x);                                                                     \
    if (e_ != cudaSuccess) {                                                                  \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(1);                                                                           \
    }                                                                                         \
  } while (0)

__device__ uint32_t hash32(uint64_t i) {
  uint32_t x = static_cast<uint32_t>((i * 0x9E3779B97F4A7C15ull) >> 32);
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  return x;
}

__global__ void fill_bf16(uint16_t* p, size_t n) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    const float v = (static_cast<float>(hash32(i) & 0xffff) / 65536.0f - 0.5f) * 4.0f;
    p[i] = static_cast<uint16_t>(__float_as_uint(v) >> 16);
  }
}

// Random e4m3 codes without the NaN patterns (exponent field <= 14); every fp16 scale 0.01.
__global__ void fill_fp8(uint8_t* pool, size_t blocks, int page_bytes, int scales_offset) {
  const size_t n = blocks * page_bytes;
  const uint16_t scale = __half_as_ushort(__float2half(0.01f));
  const uint32_t scales = static_cast<uint32_t>(scale) | (static_cast<uint32_t>(scale) << 16);
  for (size_t i = (blockIdx.x * size_t(blockDim.x) + threadIdx.x) * 4; i < n; i += size_t(gridDim.x) * blockDim.x * 4) {
    const size_t in_page = i % page_bytes;
    *reinterpret_cast<uint32_t*>(pool + i) = in_page >= static_cast<size_t>(scales_offset) ? scales : hash32(i) & 0x77777777u;
  }
}

// Random codes; every (scale, zero) pair = (0.01, -0.02) in fp16.
__global__ void fill_int2(uint8_t* pool, size_t blocks, int page_bytes, int params_offset) {
  const size_t n = blocks * page_bytes;
  const uint32_t pair = static_cast<uint32_t>(__half_as_ushort(__float2half(0.01f))) |
                        (static_cast<uint32_t>(__half_as_ushort(__float2half(-0.02f))) << 16);
  for (size_t i = (blockIdx.x * size_t(blockDim.x) + threadIdx.x) * 4; i < n; i += size_t(gridDim.x) * blockDim.x * 4) {
    const size_t in_page = i % page_bytes;
    *reinterpret_cast<uint32_t*>(pool + i) = in_page >= static_cast<size_t>(params_offset) ? pair : hash32(i);
  }
}

struct Model {
  const char* name;
  int q_heads, kv_heads;
};

// "model batch context | torch_us ..." rows of torch_sdpa_decode.py, keyed by (model, batch, context).
std::map<std::tuple<std::string, int, long long>, double> read_torch_results(const std::string& path) {
  std::map<std::tuple<std::string, int, long long>, double> rows;
  std::ifstream in(path);
  if (!in) {
    std::fprintf(stderr, "cannot read --torch-results %s\n", path.c_str());
    std::exit(2);
  }
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream ls(line);
    std::string model, bar;
    int batch = 0;
    long long ctx = 0;
    double us = 0;
    if (ls >> model >> batch >> ctx >> bar >> us && bar == "|") rows[{model, batch, ctx}] = us;
  }
  return rows;
}

}  // namespace

int main(int argc, char** argv) {
  int iters = 20;
  int64_t max_context = 131072;
  std::map<std::tuple<std::string, int, long long>, double> torch_us;
  const char* trace_path = nullptr;  // --trace FILE: per-block phase timestamps of one fused call per shape
  bool eager = false;
  std::vector<int> split_sweep;  // --splits: extra split counts of the fused launch
  int only_batch = 0;         // 0: every batch
  long long only_context = 0; // 0: every context (a profiler run picks one shape)
  for (int i = 1; i < argc; i += 2) {
    if (!std::strcmp(argv[i], "--eager")) {
      eager = true;
      --i;
      continue;
    }
    if (i + 1 >= argc) {
      std::fprintf(stderr, "flag %s needs a value\n", argv[i]);
      return 2;
    }
    if (!std::strcmp(argv[i], "--iters")) iters = std::atoi(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--max-context")) max_context = std::atoll(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--batch")) only_batch = std::atoi(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--context")) only_context = std::atoll(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--torch-results")) torch_us = read_torch_results(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--trace")) trace_path = argv[i + 1];
    else if (!std::strcmp(argv[i], "--splits")) {
      std::stringstream list(argv[i + 1]);
      for (std::string item; std::getline(list, item, ',');) {
        const int n = std::atoi(item.c_str());
        if (n < 1 || n > 4096) {
          std::fprintf(stderr, "--splits: '%s' is not a split count in 1..4096\n", item.c_str());
          return 2;
        }
        split_sweep.push_back(n);
      }
    }
    else {
      std::fprintf(stderr, "unknown flag %s\n", argv[i]);
      return 2;
    }
  }
  if (iters < 1 || max_context < 1 || only_batch < 0 || only_context < 0) {
    std::fprintf(stderr, "--iters, --max-context, --batch and --context take positive values\n");
    return 2;
  }
  // --batch / --context pick one shape of any size (64 x 128K, 16 x 100000); without them the issue's table.
  std::vector<int> batches = {1, 8, 32};
  if (only_batch) batches = {only_batch};
  std::vector<int64_t> contexts;
  for (int64_t ctx = 4096; ctx <= max_context; ctx *= 2) contexts.push_back(ctx);
  if (only_context) contexts = {only_context};
  cudaDeviceProp prop;
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  const double d2d = oscar::bench::measure_d2d_gbps();
  std::printf("device %s, %d SMs, cudaMemcpy D2D %.0f GB/s, timing %s\n", prop.name, prop.multiProcessorCount, d2d,
              eager ? "eager launches" : "CUDA graph of the calls");
  std::printf("%-12s %5s %7s %6s | %9s %9s %8s %6s | %9s %8s %6s | %7s | %9s %8s | %8s %7s | %8s %7s | %8s %7s | "
              "%8s %7s | %8s %8s | %8s %7s | %8s %7s | %8s %9s\n",
              "model", "batch", "context", "splits", "int2_us", "int2_MB", "GB/s", "%d2d", "bf16_us", "GB/s", "%d2d", "speedup",
              "torch_us", "vs_torch", "segA_us", "/int2", "seg3b_us", "/int2", "segcal_us", "/int2", "seggen_us",
              "/int2", "sep_us", "sep/int2", "fp8_us", "/int2", "int4_us", "/int2", "wide_us", "wide/int2");

  const int d = 128, page = oscar::fmt::kKvPageTokens;
  const int64_t sink = 64, recent = 256;
  const Model models[] = {{"qwen3-8b", 32, 8}, {"llama3-70b", 64, 8}};
  for (const auto& m : models) {
    for (int batch : batches) {
      for (int64_t ctx : contexts) {
        const int pages_per_seq = static_cast<int>((ctx + page - 1) / page);
        const size_t total_pages = size_t(batch) * pages_per_seq;
        const oscar::fmt::Int2PageGeometry g2{d, page};
        const oscar::fmt::Bf16PageGeometry gb{d, page};
        const size_t int2_bytes = total_pages * m.kv_heads * g2.page_bytes();
        const size_t bf16_bytes = total_pages * m.kv_heads * gb.page_bytes();
        // One pair of pools for the wider baselines: FP8 pages, and INT4 pages (smaller) in the same allocation.
        const oscar::fmt::Fp8PageGeometry g8{d, page};
        static const oscar::fmt::QuantSegment kInt4Whole[] = {{0, d, 4}};
        const auto g4 = oscar::fmt::segmented_page_geometry(kInt4Whole, 1, d, page);
        const size_t wide_bytes = total_pages * m.kv_heads * std::max(g8.page_bytes(), g4.page_bytes());
        size_t free_b = 0, total_b = 0;
        cudaMemGetInfo(&free_b, &total_b);
        if (2 * (int2_bytes + bf16_bytes + wide_bytes) + (size_t(1) << 30) > free_b) {
          std::printf("%-12s %5d %7lld  (skipped: needs %.1f GiB)\n", m.name, batch, (long long)ctx,
                      2.0 * (int2_bytes + bf16_bytes + wide_bytes) / (1 << 30));
          continue;
        }
        uint8_t *k2, *v2, *kw, *vw;
        uint16_t *kb, *vb, *q;
        int32_t *table, *lens;
        float* out;
        CHECK_CUDA(cudaMalloc(&k2, int2_bytes));
        CHECK_CUDA(cudaMalloc(&v2, int2_bytes));
        CHECK_CUDA(cudaMalloc(&kw, wide_bytes));
        CHECK_CUDA(cudaMalloc(&vw, wide_bytes));
        CHECK_CUDA(cudaMalloc(&kb, bf16_bytes));
        CHECK_CUDA(cudaMalloc(&vb, bf16_bytes));
        CHECK_CUDA(cudaMalloc(&q, size_t(batch) * m.q_heads * d * 2));
        CHECK_CUDA(cudaMalloc(&out, size_t(batch) * m.q_heads * d * 4));
        CHECK_CUDA(cudaMalloc(&table, total_pages * 4));
        CHECK_CUDA(cudaMalloc(&lens, size_t(batch) * 4));
        fill_int2<<<1024, 256>>>(k2, total_pages * m.kv_heads, g2.page_bytes(), g2.params_offset());
        fill_int2<<<1024, 256>>>(v2, total_pages * m.kv_heads, g2.page_bytes(), g2.params_offset());
        fill_bf16<<<1024, 256>>>(kb, bf16_bytes / 2);
        fill_bf16<<<1024, 256>>>(vb, bf16_bytes / 2);
        fill_bf16<<<64, 256>>>(q, size_t(batch) * m.q_heads * d);
        std::vector<int32_t> host_table(total_pages), host_lens(size_t(batch), static_cast<int32_t>(ctx));
        for (size_t i = 0; i < total_pages; ++i) host_table[i] = static_cast<int32_t>(i);
        CHECK_CUDA(cudaMemcpy(table, host_table.data(), total_pages * 4, cudaMemcpyHostToDevice));
        CHECK_CUDA(cudaMemcpy(lens, host_lens.data(), size_t(batch) * 4, cudaMemcpyHostToDevice));
        std::vector<float> rot(size_t(d) * d, 0.f);
        for (int i = 0; i < d; ++i) rot[size_t(i) * d + i] = 1.f;  // cost is the same for any R
        float* drot;
        CHECK_CUDA(cudaMalloc(&drot, rot.size() * 4));
        CHECK_CUDA(cudaMemcpy(drot, rot.data(), rot.size() * 4, cudaMemcpyHostToDevice));

        oscar::kern::DecodeAttentionParams p;
        p.batch = batch;
        p.num_q_heads = m.q_heads;
        p.num_kv_heads = m.kv_heads;
        p.head_dim = d;
        p.page_tokens = page;
        p.q = q;
        p.rotation_k = drot;
        p.rotation_v = drot;
        p.softmax_scale = 1.0f / std::sqrt(float(d));
        p.seq_lens = lens;
        p.max_seq_len = static_cast<int32_t>(ctx);
        p.k_int2_pool = k2;
        p.v_int2_pool = v2;
        p.k_bf16_pool = kb;
        p.v_bf16_pool = vb;
        p.int2_page_table = table;
        p.bf16_page_table = table;
        p.max_pages = pages_per_seq;
        p.out = out;
        const int splits = oscar::kern::decode_attention_num_splits(batch, m.q_heads, m.kv_heads, static_cast<int32_t>(ctx), page,
                                                                    prop.multiProcessorCount);
        const int most_splits = std::max(splits, split_sweep.empty() ? 0 : *std::max_element(split_sweep.begin(), split_sweep.end()));
        const size_t ws = oscar::kern::decode_attention_workspace_bytes(batch, m.q_heads, d, most_splits);
        CHECK_CUDA(cudaMalloc(&p.workspace, ws));
        p.workspace_bytes = ws;

        cudaStream_t stream;
        CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
        auto time_us = [&](int64_t sink_tokens, int64_t recent_tokens,
                           oscar::kern::DecodeAttentionVariant variant = oscar::kern::DecodeAttentionVariant::Fused) {
          p.sink_tokens = sink_tokens;
          p.recent_tokens = recent_tokens;
          p.variant = variant;
          for (int w = 0; w < 3; ++w)
            if (oscar::kern::decode_attention(p, stream) != oscar::kern::Status::Ok) {
              std::fprintf(stderr, "decode_attention rejected the params\n");
              std::exit(1);
            }
          cudaGraphExec_t exec = nullptr;
          if (!eager) {
            cudaGraph_t graph;
            CHECK_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
            for (int it = 0; it < iters; ++it) oscar::kern::decode_attention(p, stream);
            CHECK_CUDA(cudaStreamEndCapture(stream, &graph));
            CHECK_CUDA(cudaGraphInstantiate(&exec, graph, 0));
            CHECK_CUDA(cudaGraphDestroy(graph));
            CHECK_CUDA(cudaGraphLaunch(exec, stream));  // warm-up of the graph itself
          }
          cudaEvent_t e0, e1;
          cudaEventCreate(&e0);
          cudaEventCreate(&e1);
          cudaEventRecord(e0, stream);
          if (eager)
            for (int it = 0; it < iters; ++it) oscar::kern::decode_attention(p, stream);
          else
            CHECK_CUDA(cudaGraphLaunch(exec, stream));
          cudaEventRecord(e1, stream);
          CHECK_CUDA(cudaEventSynchronize(e1));
          float ms = 0;
          cudaEventElapsedTime(&ms, e0, e1);
          cudaEventDestroy(e0);
          cudaEventDestroy(e1);
          if (exec) cudaGraphExecDestroy(exec);
          return 1e3 * ms / iters;
        };
        const double int2_us = time_us(sink, recent);
        std::vector<double> sweep_us;
        for (int n : split_sweep) {
          p.num_splits = n;
          sweep_us.push_back(time_us(sink, recent));
          p.num_splits = 0;
        }
        if (trace_path) {
          // One more fused call with per-block phase timestamps (DecodeAttentionParams::phase_trace), appended to
          // the file as "model batch context block words...".
          const size_t blocks = size_t(splits) * m.kv_heads * batch;
          unsigned long long* dtrace;
          CHECK_CUDA(cudaMalloc(&dtrace, blocks * oscar::kern::kDecodePhaseTraceWords * 8));
          p.sink_tokens = sink;
          p.recent_tokens = recent;
          p.variant = oscar::kern::DecodeAttentionVariant::Fused;
          p.phase_trace = dtrace;
          for (int w = 0; w < 2; ++w)
            if (oscar::kern::decode_attention(p, stream) != oscar::kern::Status::Ok) std::exit(1);
          CHECK_CUDA(cudaStreamSynchronize(stream));
          p.phase_trace = nullptr;
          std::vector<unsigned long long> host(blocks * oscar::kern::kDecodePhaseTraceWords);
          CHECK_CUDA(cudaMemcpy(host.data(), dtrace, host.size() * 8, cudaMemcpyDeviceToHost));
          CHECK_CUDA(cudaFree(dtrace));
          if (FILE* f = std::fopen(trace_path, "a")) {
            for (size_t blk = 0; blk < blocks; ++blk) {
              std::fprintf(f, "%s %d %lld %zu", m.name, batch, (long long)ctx, blk);
              for (int w = 0; w < oscar::kern::kDecodePhaseTraceWords; ++w)
                std::fprintf(f, " %llu", host[blk * oscar::kern::kDecodePhaseTraceWords + w]);
              std::fputc('\n', f);
            }
            std::fclose(f);
          }
        }
        const double sep_us = time_us(sink, recent, oscar::kern::DecodeAttentionVariant::Separate);
        // At groups <= 4 the default fused launch computes scores transposed; FusedWide is the heads-as-rows layout.
        const double wide_us = time_us(sink, recent, oscar::kern::DecodeAttentionVariant::FusedWide);
        const double bf16_us = time_us(int64_t(1) << 40, 0);
        // Segmented (spectral) pages at the same bytes as INT2 (36 per record), each layout K | V timed on the same
        // pools refilled with its params offset (random codes, every pair (0.01, -0.02)):
        //   A    K 32x4b + 48x2b + 48x0b | V 16x4b + 80x2b + 32x0b      (compiled kernel)
        //   3b   K 48x3b + 80x1b         | V 32x3b + 64x2b + 32x0b      (compiled; 18 + 10 and 12 + 16 code bytes)
        //   cal  K 48x3b + 80x1b         | V 128x2b                     (compiled; what `oscar calibrate --widths
        //        1,2,3,4` picks for qwen3-tiny-trained layer 1, the other layers being whole-head INT2)
        //   gen  K 32x4b + 48x2b + 48x0b | V 32x3b + 64x2b + 32x0b      (no compiled kernel: the generic one)
        using QS = oscar::fmt::QuantSegment;
        static const QS kA[] = {{0, 32, 4}, {32, 80, 2}, {80, 128, 0}};
        static const QS vA[] = {{0, 16, 4}, {16, 96, 2}, {96, 128, 0}};
        static const QS k3[] = {{0, 48, 3}, {48, 128, 1}};
        static const QS v3[] = {{0, 32, 3}, {32, 96, 2}, {96, 128, 0}};
        static const QS vI[] = {{0, 128, 2}};
        struct SegRow {
          const QS* k;
          int nk;
          const QS* v;
          int nv;
        };
        const SegRow seg_rows[] = {{kA, 3, vA, 3}, {k3, 2, v3, 3}, {k3, 2, vI, 1}, {kA, 3, v3, 3}};
        double seg_us[4];
        for (int r = 0; r < 4; ++r) {
          const auto kg = oscar::fmt::segmented_page_geometry(seg_rows[r].k, seg_rows[r].nk, d, page);
          const auto vg = oscar::fmt::segmented_page_geometry(seg_rows[r].v, seg_rows[r].nv, d, page);
          if (kg.page_bytes() != g2.page_bytes() || vg.page_bytes() != g2.page_bytes()) {
            std::fprintf(stderr, "segmented bench layout %d is not INT2-sized\n", r);
            return 1;
          }
          fill_int2<<<1024, 256>>>(k2, total_pages * m.kv_heads, kg.page_bytes(), kg.params_offset());
          fill_int2<<<1024, 256>>>(v2, total_pages * m.kv_heads, vg.page_bytes(), vg.params_offset());
          p.k_geometry = &kg;
          p.v_geometry = &vg;
          seg_us[r] = time_us(sink, recent);
          p.k_geometry = p.v_geometry = nullptr;
        }
        // FP8 and INT4 baselines: no rotation (the eval baselines have none), the quantized pools swapped for wide.
        p.k_int2_pool = kw;
        p.v_int2_pool = vw;
        p.rotation_k = p.rotation_v = nullptr;
        fill_fp8<<<1024, 256>>>(kw, total_pages * m.kv_heads, g8.page_bytes(), g8.scales_offset());
        fill_fp8<<<1024, 256>>>(vw, total_pages * m.kv_heads, g8.page_bytes(), g8.scales_offset());
        p.quant_storage = oscar::fmt::KvStorage::Fp8E4M3;
        const double fp8_us = time_us(sink, recent);
        p.quant_storage = oscar::fmt::KvStorage::Int;
        fill_int2<<<1024, 256>>>(kw, total_pages * m.kv_heads, g4.page_bytes(), g4.params_offset());
        fill_int2<<<1024, 256>>>(vw, total_pages * m.kv_heads, g4.page_bytes(), g4.params_offset());
        p.k_geometry = p.v_geometry = &g4;
        const double int4_us = time_us(sink, recent);
        p.k_geometry = p.v_geometry = nullptr;
        p.k_int2_pool = k2;
        p.v_int2_pool = v2;
        p.rotation_k = p.rotation_v = drot;

        const int64_t hp = std::min<int64_t>(ctx, sink + recent);
        const double per_head_int2 = double(ctx - hp) * 2 * (d / 4 + 4) + double(hp) * 2 * 2 * d;
        const double per_head_bf16 = double(ctx) * 2 * 2 * d;
        const double io = double(batch) * m.q_heads * d * (2 + 4);
        const double int2_bytes_moved = double(batch) * m.kv_heads * per_head_int2 + io;
        const double bf16_bytes_moved = double(batch) * m.kv_heads * per_head_bf16 + io;
        const double int2_gbps = int2_bytes_moved / (int2_us * 1e-6) / 1e9;
        const double bf16_gbps = bf16_bytes_moved / (bf16_us * 1e-6) / 1e9;
        std::printf("%-12s %5d %7lld %6d | %9.1f %9.2f %8.0f %5.0f%% | %9.1f %8.0f %5.0f%% | %6.2fx", m.name, batch,
                    (long long)ctx, splits, int2_us, int2_bytes_moved / 1e6, int2_gbps, 100 * int2_gbps / d2d, bf16_us,
                    bf16_gbps, 100 * bf16_gbps / d2d, bf16_us / int2_us);
        const auto torch_row = torch_us.find({m.name, batch, static_cast<long long>(ctx)});
        if (torch_row != torch_us.end())
          std::printf(" | %9.1f %7.2fx", torch_row->second, torch_row->second / int2_us);
        else
          std::printf(" | %9s %8s", "-", "-");
        for (int r = 0; r < 4; ++r) std::printf(" | %8.1f %6.2fx", seg_us[r], seg_us[r] / int2_us);
        std::printf(" | %8.1f %7.2fx", sep_us, sep_us / int2_us);
        // Bytes as int2_us counts them (quantized records + bf16 windows + q/out); printed in the summary below.
        const double per_head_fp8 = double(ctx - hp) * 2 * (d + 2) + double(hp) * 2 * 2 * d;
        const double per_head_int4 = double(ctx - hp) * 2 * (d / 2 + 4) + double(hp) * 2 * 2 * d;
        const double fp8_gbps = (double(batch) * m.kv_heads * per_head_fp8 + io) / (fp8_us * 1e-6) / 1e9;
        const double int4_gbps = (double(batch) * m.kv_heads * per_head_int4 + io) / (int4_us * 1e-6) / 1e9;
        std::printf(" | %8.1f %6.2fx | %8.1f %6.2fx | %8.1f %8.2fx   (fp8 %.0f GB/s %.0f%%, int4 %.0f GB/s %.0f%%)\n",
                    fp8_us, fp8_us / int2_us, int4_us, int4_us / int2_us, wide_us, wide_us / int2_us, fp8_gbps,
                    100 * fp8_gbps / d2d, int4_gbps, 100 * int4_gbps / d2d);
        for (size_t i = 0; i < split_sweep.size(); ++i)
          std::printf("  %s %d x %lld, fused with %d splits: %.1f us (%.0f%% d2d; %.3fx the default %d splits)\n", m.name,
                      batch, (long long)ctx, split_sweep[i], sweep_us[i],
                      100 * int2_bytes_moved / (sweep_us[i] * 1e-6) / 1e9 / d2d, sweep_us[i] / int2_us, splits);
        std::fflush(stdout);
        cudaFree(k2);
        cudaFree(v2);
        cudaFree(kw);
        cudaFree(vw);
        cudaFree(kb);
        cudaFree(vb);
        cudaFree(q);
        cudaFree(out);
        cudaFree(table);
        cudaFree(lens);
        cudaFree(drot);
        cudaFree(p.workspace);
        cudaStreamDestroy(stream);
      }
    }
  }
  return 0;
}
