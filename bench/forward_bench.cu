// Prefill throughput of DeviceModel on random weights of a published shape:
//   forward_bench --config bench/configs/qwen3-8b.json --batch 1 --seq 8192 [--attn-kernel v1,v2] [--profile]
//                 [--gemm-peak]
// Prints tokens/s and achieved TFLOP/s (dense GEMM FLOPs + causal attention FLOPs, the usual 2·M·N·K count) for each
// attention kernel in the same process. --profile adds one more forward per kernel with cudaEvents between ops
// (runtime/forward_profiler.h) and prints where the time goes (GEMMs / attention / the rest, per op, with GEMM and
// attention TFLOP/s); --gemm-peak times a 8192³ bf16 cuBLASLt GEMM (same LtGemm, random data) as the reference peak.
// --gemm-selection, --residual-add and --qkv-output take comma lists of variants, each timed in the same process
// (--qkv-output bf16: the QKV projection handed to the norm/RoPE kernel in bf16, DeviceForwardOptions::qkv_bf16).
#include <cuda_runtime.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cstdio>
#include <map>
#include <string>
#include <random>
#include <vector>

#include "bench/bench_fill.cuh"
#include "formats/error.h"
#include "formats/model_config.h"
#include "runtime/device_buffer.h"
#include "runtime/device_model.h"
#include "runtime/forward_profiler.h"
#include "runtime/lt_gemm.h"

namespace {

using namespace oscar;

// FLOPs of one prefill: every linear layer is 2·tokens·in·out; causal attention is, per sequence, layer and query
// head, 2·d·(L(L+1)/2) for QKᵀ and the same for PV.
double prefill_flops(const fmt::ModelConfig& c, int64_t batch, int64_t seq, int64_t logits_rows) {
  const double H = c.hidden_size, I = c.intermediate_size, qd = c.q_dim(), kvd = c.kv_dim();
  const double tokens = static_cast<double>(batch * seq);
  const double linear_per_token = H * (qd + 2 * kvd) + qd * H + 2 * I * H + I * H;
  const double attn_per_seq = 2.0 * 2.0 * c.head_dim * c.num_heads * (static_cast<double>(seq) * (seq + 1) / 2.0);
  return c.num_layers * (2.0 * tokens * linear_per_token + batch * attn_per_seq) +
         2.0 * static_cast<double>(logits_rows) * H * c.vocab_size;
}

// Median time of an n³ bf16 GEMM through the forward's LtGemm (bf16 out, fp32 accumulate) on random data.
double measure_gemm_peak_tflops(int64_t n, int iters) {
  rt::DeviceBuffer a(static_cast<size_t>(n * n) * 2, "peak A"), b(static_cast<size_t>(n * n) * 2, "peak B"),
      c(static_cast<size_t>(n * n) * 2, "peak C");
  bench::fill_uniform_bf16<<<1024, 256>>>(a.as<uint16_t>(), n * n, 1u, -1.f, 1.f);
  bench::fill_uniform_bf16<<<1024, 256>>>(b.as<uint16_t>(), n * n, 2u, -1.f, 1.f);
  rt::check_cuda(cudaGetLastError(), "peak fill");
  rt::LtGemm gemm;
  cudaStream_t stream = nullptr;
  rt::check_cuda(cudaStreamCreate(&stream), "cudaStreamCreate");
  const auto st = reinterpret_cast<kern::Stream>(stream);
  for (int i = 0; i < 3; ++i)
    gemm.xwt(a.as<uint16_t>(), n, n, b.as<uint16_t>(), n, c.data(), rt::GemmOut::BF16, 0.f, st, "gemm peak");
  cudaEvent_t e0, e1;
  rt::check_cuda(cudaEventCreate(&e0), "cudaEventCreate");
  rt::check_cuda(cudaEventCreate(&e1), "cudaEventCreate");
  std::vector<float> ms(static_cast<size_t>(iters));
  for (float& t : ms) {
    rt::check_cuda(cudaEventRecord(e0, stream), "cudaEventRecord");
    gemm.xwt(a.as<uint16_t>(), n, n, b.as<uint16_t>(), n, c.data(), rt::GemmOut::BF16, 0.f, st, "gemm peak");
    rt::check_cuda(cudaEventRecord(e1, stream), "cudaEventRecord");
    rt::check_cuda(cudaEventSynchronize(e1), "cudaEventSynchronize");
    rt::check_cuda(cudaEventElapsedTime(&t, e0, e1), "cudaEventElapsedTime");
  }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  cudaStreamDestroy(stream);
  std::sort(ms.begin(), ms.end());
  return 2.0 * n * n * n / (ms[ms.size() / 2] * 1e-3) * 1e-12;
}

int run(int argc, char** argv) {
  CLI::App app{"OSCAR GPU prefill benchmark (random weights)"};
  std::string config_path;
  int64_t batch = 1, seq = 4096, seed = 0;
  int warmup = 2, iters = 5;
  std::string logits = "last";
  std::vector<std::string> kernels = {"auto"};
  bool profile = false, gemm_peak = false;
  app.add_option("--config", config_path, "HF config.json of the shape to benchmark")->required()->check(CLI::ExistingFile);
  app.add_option("--batch", batch, "sequences per forward")->check(CLI::PositiveNumber);
  app.add_option("--seq", seq, "tokens per sequence")->check(CLI::PositiveNumber);
  app.add_option("--warmup", warmup, "untimed forwards first")->check(CLI::NonNegativeNumber);
  app.add_option("--iters", iters, "timed forwards")->check(CLI::PositiveNumber);
  app.add_option("--seed", seed, "seed of the random weights and ids");
  app.add_option("--logits", logits, "logits rows: last (one per sequence), all, none")
      ->check(CLI::IsMember({"last", "all", "none"}));
  std::vector<std::string> kernel_names = {"auto"};
  for (const kern::PrefillKernelInfo& info : kern::kPrefillKernels) kernel_names.push_back(info.name);
  app.add_option("--attn-kernel", kernels, "prefill attention kernels to time, in this order (auto: what the forward runs by default; v1, v2, v2k32, v3; v4 and up: wgmma, head_dim 128, sm_90a builds)")
      ->delimiter(',')
      ->check(CLI::IsMember(kernel_names));
  std::vector<std::string> selections = {"heuristic"};
  app.add_option("--gemm-selection", selections,
                 "cuBLASLt algorithm choice per GEMM shape, each timed in this order: heuristic (the first heuristic "
                 "result, the default) and/or timed (the fastest of 8 candidates, tuned during the warm-up)")
      ->delimiter(',')
      ->check(CLI::IsMember({"heuristic", "timed"}));
  std::vector<std::string> residual_adds = {"gemm"};
  app.add_option("--residual-add", residual_adds,
                 "where the sublayer residual add runs, each timed in this order: gemm (o_proj / down_proj epilogue, "
                 "the default) and/or norm (a separate add + RMSNorm kernel)")
      ->delimiter(',')
      ->check(CLI::IsMember({"gemm", "norm"}));
  std::vector<std::string> qkv_outputs = {"f32"};
  app.add_option("--qkv-output", qkv_outputs,
                 "the QKV projection's output type, each timed in this order: f32 (the default) and/or bf16 "
                 "(DeviceForwardOptions::qkv_bf16: half the bytes the GEMM writes and the RoPE kernel reads)")
      ->delimiter(',')
      ->check(CLI::IsMember({"f32", "bf16"}));
  app.add_flag("--profile", profile, "one extra forward per kernel with per-op cudaEvents: time breakdown");
  app.add_flag("--gemm-peak", gemm_peak, "time a 8192^3 bf16 cuBLASLt GEMM as the measured peak");
  CLI11_PARSE(app, argc, argv);

  const fmt::ModelConfig cfg = fmt::ModelConfig::from_file(config_path);
  cudaDeviceProp prop{};
  rt::check_cuda(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
  std::printf("device: %s (%d SMs)\nconfig: %s  layers %lld  hidden %lld  heads %lld/%lld  head_dim %lld  inter %lld  vocab %lld\n",
              prop.name, prop.multiProcessorCount, config_path.c_str(), (long long)cfg.num_layers,
              (long long)cfg.hidden_size, (long long)cfg.num_heads, (long long)cfg.num_kv_heads,
              (long long)cfg.head_dim, (long long)cfg.intermediate_size, (long long)cfg.vocab_size);

  std::printf("attention kernel auto = %s here\n", kern::prefill_kernel_name(kern::attention_prefill_auto_kernel(
                                                        static_cast<int32_t>(cfg.head_dim))));
  auto model = rt::DeviceModel::random(cfg, static_cast<uint64_t>(seed));
  std::printf("weights: %.2f GiB bf16\n", static_cast<double>(model->weight_bytes()) / (1 << 30));

  std::mt19937 rng(static_cast<uint32_t>(seed));
  std::uniform_int_distribution<int32_t> id(0, static_cast<int32_t>(cfg.vocab_size - 1));
  rt::PackedBatch packed;
  std::vector<int32_t> ids(static_cast<size_t>(seq));
  for (int64_t b = 0; b < batch; ++b) {
    for (int32_t& x : ids) x = id(rng);
    packed.add_sequence(ids);
  }
  rt::DeviceForwardOptions opt;
  opt.rows = logits == "all" ? rt::LogitsRows::All : logits == "none" ? rt::LogitsRows::None : rt::LogitsRows::LastPerSequence;
  const int64_t logits_rows = opt.rows == rt::LogitsRows::All ? batch * seq : opt.rows == rt::LogitsRows::None ? 0 : batch;

  const cudaStream_t stream = reinterpret_cast<cudaStream_t>(model->stream());
  const double tokens = static_cast<double>(batch * seq);
  const double flops = prefill_flops(cfg, batch, seq, logits_rows);
  std::printf("batch %lld x seq %lld (%lld tokens), logits %s, %.2f TFLOP per forward\n", (long long)batch,
              (long long)seq, (long long)(batch * seq), logits.c_str(), flops * 1e-12);

  // FLOPs per forward of each profiled op: GEMMs 2·M·N·K, attention as prefill_flops counts it.
  const double L = static_cast<double>(cfg.num_layers), H = static_cast<double>(cfg.hidden_size),
               I = static_cast<double>(cfg.intermediate_size), qd = static_cast<double>(cfg.q_dim()),
               kvd = static_cast<double>(cfg.kv_dim());
  const std::map<std::string, double> op_flops = {
      {"qkv_proj", 2 * tokens * H * (qd + 2 * kvd) * L},
      {"o_proj", 2 * tokens * qd * H * L},
      {"gate_up_proj", 2 * tokens * H * 2 * I * L},
      {"down_proj", 2 * tokens * I * H * L},
      {"lm_head", 2.0 * logits_rows * H * cfg.vocab_size},
      {"attention", prefill_flops(cfg, batch, seq, 0) - 2 * tokens * L * (H * (qd + 2 * kvd) + qd * H + 3 * I * H)}};
  auto is_gemm = [](const std::string& op) { return op.size() > 5 && (op.ends_with("_proj") || op == "lm_head"); };

  double peak_tflops = 0;
  if (gemm_peak) {
    peak_tflops = measure_gemm_peak_tflops(8192, 20);
    std::printf("cuBLASLt bf16 GEMM 8192^3 (measured peak): %.1f TFLOP/s\n", peak_tflops);
  }

  cudaEvent_t start, stop;
  rt::check_cuda(cudaEventCreate(&start), "cudaEventCreate");
  rt::check_cuda(cudaEventCreate(&stop), "cudaEventCreate");
  for (const std::string& qkv_output : qkv_outputs)
  for (const std::string& residual_add : residual_adds)
  for (const std::string& selection : selections)
  for (const std::string& kname : kernels) {
    opt.gemm_selection = selection == "timed" ? rt::GemmSelection::Timed : rt::GemmSelection::Heuristic;
    opt.residual_in_gemm = residual_add == "gemm";
    opt.qkv_bf16 = qkv_output == "bf16";
    const std::string label = kname + (selection == "timed" ? " (timed GEMMs)" : "") +
                              (residual_adds.size() > 1 ? ", residual add in " + residual_add : "") +
                              (qkv_outputs.size() > 1 ? ", qkv " + qkv_output : "");
    // The CLI check admits only the table's names, so the lookup succeeds.
    kern::prefill_kernel_from_name(kname, &opt.attention_kernel);
    opt.profiler = nullptr;
    for (int i = 0; i < warmup; ++i) model->forward(packed, opt);
    rt::check_cuda(cudaStreamSynchronize(stream), "warmup");
    if (opt.gemm_selection == rt::GemmSelection::Timed)
      std::printf("timed GEMM selection: %lld shapes tuned, %lld kept another algorithm than the heuristic's first\n",
                  (long long)model->gemm_timed_shapes(), (long long)model->gemm_timed_changed());
    std::vector<float> ms(static_cast<size_t>(iters));
    for (int i = 0; i < iters; ++i) {
      rt::check_cuda(cudaEventRecord(start, stream), "cudaEventRecord");
      model->forward(packed, opt);
      rt::check_cuda(cudaEventRecord(stop, stream), "cudaEventRecord");
      rt::check_cuda(cudaEventSynchronize(stop), "cudaEventSynchronize");
      rt::check_cuda(cudaEventElapsedTime(&ms[i], start, stop), "cudaEventElapsedTime");
    }
    std::sort(ms.begin(), ms.end());
    const double median_s = ms[ms.size() / 2] * 1e-3;
    size_t free_b = 0, total_b = 0;
    rt::check_cuda(cudaMemGetInfo(&free_b, &total_b), "cudaMemGetInfo");
    std::printf("attn %s: median %.2f ms (min %.2f, max %.2f) over %d iters, %.0f tokens/s, %.1f TFLOP/s, "
                "device memory in use %.1f GiB\n",
                label.c_str(), median_s * 1e3, ms.front(), ms.back(), iters, tokens / median_s,
                flops / median_s * 1e-12, static_cast<double>(total_b - free_b) / (1 << 30));

    if (!profile) continue;
    rt::ForwardProfiler prof;
    opt.profiler = &prof;
    model->forward(packed, opt);
    prof.collect();
    opt.profiler = nullptr;
    double total = 0, gemm_ms = 0, gemm_flops = 0, attn_ms = 0;
    for (const auto& [op, t] : prof.totals_ms()) {
      total += t;
      if (is_gemm(op)) {
        gemm_ms += t;
        gemm_flops += op_flops.at(op);
      }
      if (op == "attention") attn_ms += t;
    }
    std::printf("  breakdown (attn %s, one profiled forward, %.2f ms in ops):\n", label.c_str(), total);
    std::printf("    %-14s %10s %7s %6s %9s\n", "op", "ms", "%", "calls", "TFLOP/s");
    for (const auto& [op, t] : prof.totals_ms()) {
      const auto f = op_flops.find(op);
      if (f != op_flops.end() && f->second > 0)
        std::printf("    %-14s %10.2f %6.1f%% %6ld %9.1f\n", op.c_str(), t, 100 * t / total, prof.calls().at(op),
                    f->second / (t * 1e-3) * 1e-12);
      else
        std::printf("    %-14s %10.2f %6.1f%% %6ld %9s\n", op.c_str(), t, 100 * t / total, prof.calls().at(op), "-");
    }
    const double gemm_tflops = gemm_flops / (gemm_ms * 1e-3) * 1e-12;
    std::printf("  GEMMs %.2f ms (%.1f%%) at %.1f TFLOP/s", gemm_ms, 100 * gemm_ms / total, gemm_tflops);
    if (peak_tflops > 0) std::printf(" = %.1f%% of the measured peak", 100 * gemm_tflops / peak_tflops);
    std::printf("; attention %.2f ms (%.1f%%) at %.1f TFLOP/s; the rest %.2f ms (%.1f%%)\n", attn_ms,
                100 * attn_ms / total, op_flops.at("attention") / (attn_ms * 1e-3) * 1e-12, total - gemm_ms - attn_ms,
                100 * (total - gemm_ms - attn_ms) / total);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const oscar::Error& e) {
    std::fprintf(stderr, "forward_bench: %s\n", e.what());
    return 1;
  }
}
