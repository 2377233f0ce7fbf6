// Prefill attention alone, kernel by kernel, with the energy it takes:
//   prefill_attention_bench --config bench/configs/qwen3-8b.json --batch 1 --seq 32768 --kernels v7,v6 --seconds 3
// Why energy: at Qwen3-8B 1 x 32K an H100 runs the forward with v7 at its 700 W power cap, the SM clock near
// 1.45 GHz instead of up to 1.98 (docs/results.md "The 1 × 32K prefill is power-bound"). There a kernel that does
// more per cycle can still lose per second, and four variants that cut latency or SFU work did. So each kernel here
// is launched back to back for --seconds while a host thread samples the board's power draw and SM clock through
// NVML (libnvidia-ml.so.1, the driver's, loaded at run time: nothing to link; without it the power columns read
// n/a), and the table gives ms per call, causal TFLOP/s, mean W, mean MHz, and pJ per FLOP — the number an
// energy-bound kernel has to lower — plus TFLOP/s per GHz (the work per cycle, clock taken out).
// Inputs: random bf16 q/k/v of the config's heads (uniform in [-2, 2)), batch sequences of --seq tokens packed
// varlen-style as the forward packs them; the output is not checked here (FwdGpuAttention does that).
#include <cuda_runtime.h>
#include <dlfcn.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <mutex>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "bench/bench_fill.cuh"
#include "formats/error.h"
#include "formats/model_config.h"
#include "kernels/attention_prefill/attention_prefill.h"
#include "kernels/common/device_utils.cuh"
#include "runtime/device_buffer.h"

namespace {

using namespace oscar;

// The few NVML entry points the sampler needs, resolved from the driver's library at run time.
struct Nvml {
  using Device = void*;
  int (*init)() = nullptr;
  int (*handle_by_index)(unsigned, Device*) = nullptr;
  int (*power_usage)(Device, unsigned*) = nullptr;          // mW
  int (*clock_info)(Device, int, unsigned*) = nullptr;      // MHz; type 1 = NVML_CLOCK_SM
  Device device = nullptr;
  bool ok = false;

  explicit Nvml(int cuda_device) {
    void* lib = dlopen("libnvidia-ml.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!lib) return;
    init = reinterpret_cast<int (*)()>(dlsym(lib, "nvmlInit_v2"));
    handle_by_index = reinterpret_cast<int (*)(unsigned, Device*)>(dlsym(lib, "nvmlDeviceGetHandleByIndex_v2"));
    power_usage = reinterpret_cast<int (*)(Device, unsigned*)>(dlsym(lib, "nvmlDeviceGetPowerUsage"));
    clock_info = reinterpret_cast<int (*)(Device, int, unsigned*)>(dlsym(lib, "nvmlDeviceGetClockInfo"));
    if (!init || !handle_by_index || !power_usage || !clock_info || init() != 0) return;
    // NVML counts devices as the driver does; with CUDA_VISIBLE_DEVICES unset that is CUDA's order too.
    ok = handle_by_index(static_cast<unsigned>(cuda_device), &device) == 0;
  }
};

// Mean power and SM clock over the samples taken while `running` is set (every 10 ms).
struct PowerSampler {
  const Nvml& nvml;
  std::atomic<bool> running{false};
  std::vector<double> watts, mhz;
  std::mutex mu;
  std::thread thread;

  explicit PowerSampler(const Nvml& n) : nvml(n) {}
  void start() {
    watts.clear();
    mhz.clear();
    if (!nvml.ok) return;
    running = true;
    thread = std::thread([this] {
      while (running) {
        unsigned mw = 0, clk = 0;
        if (nvml.power_usage(nvml.device, &mw) == 0 && nvml.clock_info(nvml.device, 1, &clk) == 0) {
          std::lock_guard<std::mutex> lock(mu);
          watts.push_back(mw / 1000.0);
          mhz.push_back(clk);
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      }
    });
  }
  void stop() {
    running = false;
    if (thread.joinable()) thread.join();
  }
  static double mean(const std::vector<double>& v) {
    double s = 0;
    for (double x : v) s += x;
    return v.empty() ? NAN : s / static_cast<double>(v.size());
  }
};

kern::PrefillKernel parse_kernel(const std::string& name) {
  kern::PrefillKernel kernel{};
  if (kern::prefill_kernel_from_name(name, &kernel)) return kernel;
  throw Error("--kernels", "unknown prefill attention kernel '" + name + "'");
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Prefill attention per kernel: time, causal TFLOP/s, power, SM clock and pJ per FLOP"};
  std::string config_path;
  int64_t batch = 1, seq = 32768;
  std::vector<std::string> kernels = {"auto"};
  double seconds = 3.0;
  app.add_option("--config", config_path, "HF config.json whose attention shape (heads, KV heads, head_dim) to run")
      ->required()
      ->check(CLI::ExistingFile);
  app.add_option("--batch", batch, "sequences")->check(CLI::PositiveNumber);
  app.add_option("--seq", seq, "tokens per sequence")->check(CLI::PositiveNumber);
  app.add_option("--kernels", kernels, "kernels in this order (auto, v1, v2, v2k32, v3 .. v8, v10 ..: kPrefillKernels in attention_prefill.h); a name may repeat")
      ->delimiter(',');
  app.add_option("--seconds", seconds, "how long each kernel runs back to back (power is averaged over it)")
      ->check(CLI::Range(0.2, 120.0));
  CLI11_PARSE(app, argc, argv);

  try {
    const fmt::ModelConfig cfg = fmt::ModelConfig::from_file(config_path);
    int device = 0;
    rt::check_cuda(cudaGetDevice(&device), "cudaGetDevice");
    cudaDeviceProp prop{};
    rt::check_cuda(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");
    const Nvml nvml(device);
    const int64_t tokens = batch * seq;
    if (tokens > 0x7fffffff) throw Error("--batch/--seq", "more than 2^31 tokens");
    const int64_t q_cols = cfg.num_heads * cfg.head_dim, kv_cols = cfg.num_kv_heads * cfg.head_dim;
    // Causal attention FLOPs as forward_bench counts them: 4·d per (query, key ≤ query) pair and head.
    const double flops = 4.0 * static_cast<double>(cfg.head_dim) * static_cast<double>(cfg.num_heads) *
                         static_cast<double>(batch) * static_cast<double>(seq) * static_cast<double>(seq + 1) / 2.0;
    std::printf("device: %s (%d SMs), NVML power: %s\n", prop.name, prop.multiProcessorCount,
                nvml.ok ? "yes" : "n/a (no libnvidia-ml.so.1)");
    std::printf("config: %s  heads %lld/%lld  head_dim %lld  batch %lld x seq %lld: %.2f TFLOP per call (causal)\n",
                config_path.c_str(), static_cast<long long>(cfg.num_heads), static_cast<long long>(cfg.num_kv_heads),
                static_cast<long long>(cfg.head_dim), static_cast<long long>(batch), static_cast<long long>(seq),
                flops * 1e-12);

    rt::DeviceBuffer q(static_cast<size_t>(tokens * q_cols) * 2, "q"), k(static_cast<size_t>(tokens * kv_cols) * 2, "k"),
        v(static_cast<size_t>(tokens * kv_cols) * 2, "v"), out(static_cast<size_t>(tokens * q_cols) * 2, "out");
    bench::fill_uniform_bf16<<<1024, 256>>>(q.as<uint16_t>(), tokens * q_cols, 1u, -2.f, 2.f);
    bench::fill_uniform_bf16<<<1024, 256>>>(k.as<uint16_t>(), tokens * kv_cols, 2u, -2.f, 2.f);
    bench::fill_uniform_bf16<<<1024, 256>>>(v.as<uint16_t>(), tokens * kv_cols, 3u, -2.f, 2.f);
    std::vector<int32_t> cu(static_cast<size_t>(batch) + 1);
    for (int64_t b = 0; b <= batch; ++b) cu[static_cast<size_t>(b)] = static_cast<int32_t>(b * seq);
    rt::DeviceBuffer d_cu = rt::to_device(std::span<const int32_t>(cu), "cu_seqlens");
    rt::check_cuda(cudaDeviceSynchronize(), "fill");

    kern::PrefillAttentionArgs a;
    a.q = q.as<uint16_t>();
    a.k = k.as<uint16_t>();
    a.v = v.as<uint16_t>();
    a.out = out.as<uint16_t>();
    a.q_row_stride = a.out_row_stride = q_cols;
    a.k_row_stride = a.v_row_stride = kv_cols;
    a.cu_seqlens = d_cu.as<int32_t>();
    a.num_seqs = static_cast<int32_t>(batch);
    a.max_seqlen = static_cast<int32_t>(seq);
    a.total_tokens = tokens;
    a.num_heads = static_cast<int32_t>(cfg.num_heads);
    a.num_kv_heads = static_cast<int32_t>(cfg.num_kv_heads);
    a.head_dim = static_cast<int32_t>(cfg.head_dim);
    a.scale = 1.f / std::sqrt(static_cast<float>(cfg.head_dim));

    cudaEvent_t e0, e1;
    rt::check_cuda(cudaEventCreate(&e0), "cudaEventCreate");
    rt::check_cuda(cudaEventCreate(&e1), "cudaEventCreate");
    std::printf("%-6s %10s %10s %9s %9s %10s %12s %8s\n", "kernel", "ms/call", "TFLOP/s", "W", "SM MHz", "pJ/FLOP",
                "TFLOP/s/GHz", "calls");
    PowerSampler sampler(nvml);
    for (const std::string& name : kernels) {
      a.kernel = parse_kernel(name);
      const std::string label = a.kernel == kern::PrefillKernel::Auto
                                    ? "auto=" + std::string(kern::prefill_kernel_name(
                                                    kern::attention_prefill_auto_kernel(a.head_dim)))
                                    : name;
      if (kern::Status s = kern::attention_prefill_can_implement(a); s != kern::Status::Ok) {
        std::printf("%-6s refused: %s\n", label.c_str(), std::string(kern::status_name(s)).c_str());
        continue;
      }
      for (int i = 0; i < 3; ++i) {
        if (kern::Status s = kern::attention_prefill(a, nullptr); s != kern::Status::Ok)
          throw Error(label, "launch failed: " + std::string(kern::status_name(s)));
      }
      rt::check_cuda(cudaDeviceSynchronize(), "warmup");
      // Batches of launches between two events, until --seconds of GPU time: the median batch gives ms per call,
      // the samples over the whole run give power and clock.
      std::vector<double> per_call;
      int64_t calls = 0;
      double elapsed_ms = 0;
      sampler.start();
      while (elapsed_ms < seconds * 1e3) {
        constexpr int kBatch = 4;
        rt::check_cuda(cudaEventRecord(e0), "cudaEventRecord");
        for (int i = 0; i < kBatch; ++i) (void)kern::attention_prefill(a, nullptr);
        rt::check_cuda(cudaEventRecord(e1), "cudaEventRecord");
        rt::check_cuda(cudaEventSynchronize(e1), "cudaEventSynchronize");
        float ms = 0;
        rt::check_cuda(cudaEventElapsedTime(&ms, e0, e1), "cudaEventElapsedTime");
        per_call.push_back(ms / kBatch);
        elapsed_ms += ms;
        calls += kBatch;
      }
      sampler.stop();
      rt::check_cuda(cudaGetLastError(), label);
      std::sort(per_call.begin(), per_call.end());
      const double ms = per_call[per_call.size() / 2];
      const double tflops = flops / (ms * 1e-3) * 1e-12;
      const double watts = PowerSampler::mean(sampler.watts), mhz = PowerSampler::mean(sampler.mhz);
      // pJ per FLOP = W / (FLOP/s) · 1e12 = W / TFLOP/s.
      std::printf("%-6s %10.3f %10.1f %9.1f %9.0f %10.3f %12.1f %8lld\n", label.c_str(), ms, tflops, watts, mhz,
                  watts / tflops, tflops / (mhz * 1e-3), static_cast<long long>(calls));
    }
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "prefill_attention_bench: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
