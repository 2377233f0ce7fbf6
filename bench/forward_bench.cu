// Prefill throughput of DeviceModel on random weights of a published shape:
//   forward_bench --config bench/configs/qwen3-8b.json --batch 1 --seq 8192
// Prints tokens/s and achieved TFLOP/s (dense GEMM FLOPs + causal attention FLOPs, the usual 2·M·N·K count).
#include <cuda_runtime.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cstdio>
#include <random>
#include <vector>

#include "formats/error.h"
#include "formats/model_config.h"
#include "runtime/device_buffer.h"
#include "runtime/device_model.h"

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

int run(int argc, char** argv) {
  CLI::App app{"OSCAR GPU prefill benchmark (random weights)"};
  std::string config_path;
  int64_t batch = 1, seq = 4096, seed = 0;
  int warmup = 2, iters = 5;
  std::string logits = "last";
  app.add_option("--config", config_path, "HF config.json of the shape to benchmark")->required()->check(CLI::ExistingFile);
  app.add_option("--batch", batch, "sequences per forward")->check(CLI::PositiveNumber);
  app.add_option("--seq", seq, "tokens per sequence")->check(CLI::PositiveNumber);
  app.add_option("--warmup", warmup, "untimed forwards first")->check(CLI::NonNegativeNumber);
  app.add_option("--iters", iters, "timed forwards")->check(CLI::PositiveNumber);
  app.add_option("--seed", seed, "seed of the random weights and ids");
  app.add_option("--logits", logits, "logits rows: last (one per sequence), all, none")
      ->check(CLI::IsMember({"last", "all", "none"}));
  CLI11_PARSE(app, argc, argv);

  const fmt::ModelConfig cfg = fmt::ModelConfig::from_file(config_path);
  cudaDeviceProp prop{};
  rt::check_cuda(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
  std::printf("device: %s (%d SMs)\nconfig: %s  layers %lld  hidden %lld  heads %lld/%lld  head_dim %lld  inter %lld  vocab %lld\n",
              prop.name, prop.multiProcessorCount, config_path.c_str(), (long long)cfg.num_layers,
              (long long)cfg.hidden_size, (long long)cfg.num_heads, (long long)cfg.num_kv_heads,
              (long long)cfg.head_dim, (long long)cfg.intermediate_size, (long long)cfg.vocab_size);

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
  for (int i = 0; i < warmup; ++i) model->forward(packed, opt);
  rt::check_cuda(cudaStreamSynchronize(stream), "warmup");

  std::vector<float> ms(static_cast<size_t>(iters));
  cudaEvent_t start, stop;
  rt::check_cuda(cudaEventCreate(&start), "cudaEventCreate");
  rt::check_cuda(cudaEventCreate(&stop), "cudaEventCreate");
  for (int i = 0; i < iters; ++i) {
    rt::check_cuda(cudaEventRecord(start, stream), "cudaEventRecord");
    model->forward(packed, opt);
    rt::check_cuda(cudaEventRecord(stop, stream), "cudaEventRecord");
    rt::check_cuda(cudaEventSynchronize(stop), "cudaEventSynchronize");
    rt::check_cuda(cudaEventElapsedTime(&ms[i], start, stop), "cudaEventElapsedTime");
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  std::sort(ms.begin(), ms.end());
  const double median_s = ms[ms.size() / 2] * 1e-3;
  const double tokens = static_cast<double>(batch * seq);
  const double flops = prefill_flops(cfg, batch, seq, logits_rows);
  std::printf("batch %lld x seq %lld (%lld tokens), logits %s: median %.2f ms (min %.2f, max %.2f) over %d iters\n",
              (long long)batch, (long long)seq, (long long)(batch * seq), logits.c_str(), median_s * 1e3, ms.front(),
              ms.back(), iters);
  std::printf("prefill: %.0f tokens/s, %.1f TFLOP/s (%.2f TFLOP per forward)\n", tokens / median_s,
              flops / median_s * 1e-12, flops * 1e-12);
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
