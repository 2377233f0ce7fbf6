// GPU calibration cost on random weights of a published shape (default: Qwen3-8B, 512 × 2048 tokens):
//   calibrate_bench --config bench/configs/qwen3-8b.json --num-seqs 512 --seq-len 2048
//   calibrate_bench --config bench/configs/qwen3-8b.json --num-seqs 16 --seq-len 1024      (a quick first look)
// Prints, excluding weight initialization:
//   forward alone          the statistics passes' forwards without an observer (logits off)
//   statistics passes      the same forwards with GpuStatisticsCollector (two passes for "query" weighting), and the
//                          overhead over forward alone
//   eigendecomposition     cuSOLVER dsyevd of every layer's Σ_Q and Σ_V (2 × layers matrices, per-layer sharing)
//   end to end             rt::calibrate_on_device (statistics + eigen + rotations + held-out report + clip tuning)
// Token ids are random (uniform over the vocabulary, fixed seed): the cost does not depend on the text.
//
// --stream-layers (runtime/layer_stream.h; implied by --gpus N > 1): no resident model. Each layer's weights are
// generated on the device when it is due, hidden states stay in pinned host memory, and the statistics are streamed
// layer by layer. Prints time, tok/s, TFLOP/s (executed: full layers + the Σ_Q pass's QKV projections + causal
// attention; and the 2·params·tokens-per-pass convention), peak device memory, host memory and how much of the
// residual-stream traffic hid behind compute. A 70B shape on one H100:
//   calibrate_bench --config bench/configs/llama3-70b.json --stream-layers --num-seqs 32 --seq-len 2048
#include <cuda_runtime.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <string>
#include <random>
#include <vector>

#include "formats/error.h"
#include "formats/model_config.h"
#include "lib/calib/calibrator.h"
#include "runtime/device_buffer.h"
#include "runtime/device_model.h"
#include "runtime/gpu_calibration.h"
#include "runtime/layer_stream.h"

namespace {

using namespace oscar;
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// Peak resident set of this process (VmHWM), bytes.
double host_peak_bytes() {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::stod(line.substr(6)) * 1024.0;
  return 0;
}

int run_streamed(const fmt::ModelConfig& cfg, const calib::CalibrationData& data, calib::ValueWeighting w,
                 int64_t batch_tokens, int gpus, uint64_t seed) {
  rt::LayerStreamOptions o;
  o.batch_tokens = batch_tokens;
  o.devices.clear();
  for (int g = 0; g < gpus; ++g) o.devices.push_back(g);
  rt::LayerStreamReport rep;
  const auto t0 = Clock::now();
  auto stats = rt::streamed_statistics(rt::LayerSource::random(cfg, seed), data.sequences, w, o, &rep);
  const double total_s = seconds_since(t0);
  const int64_t H = cfg.hidden_size, I = cfg.intermediate_size, qd = cfg.q_dim(), kvd = cfg.kv_dim(),
                L = cfg.num_layers;
  const double qkv = static_cast<double>(H * (qd + 2 * kvd)), layer = qkv + static_cast<double>(H * qd + 3 * H * I);
  const double T = static_cast<double>(rep.tokens), seq = static_cast<double>(data.seq_len);
  const bool two = w == calib::ValueWeighting::QueryEnergy;
  // Executed: L - 1 full layers (the last stops at its attention inputs), every layer's QKV once more for Σ_Q, and
  // causal attention (QKᵀ and PV over half the sequence on average) in the full layers.
  const double executed = 2 * T * ((L - 1) * layer + (two ? L : 1) * qkv) + 2 * T * seq * qd * (L - 1);
  const double convention = 2 * T * (L * layer) * (two ? 2 : 1);
  std::printf("streamed statistics (%d rank%s%s): %.2f s (%.2f s incl. setup)  %.0f tok/s\n", rep.ranks,
              rep.ranks > 1 ? "s" : "", rep.nccl ? ", NCCL" : "", rep.seconds, total_s, T / rep.seconds);
  std::printf("  TFLOP/s: %.1f executed (%.3g FLOP), %.1f by the 2*params*tokens*passes convention\n",
              executed / rep.seconds / 1e12, executed, convention / rep.seconds / 1e12);
  std::printf("  layers %lld, batches %lld, tokens %.0f, one layer's weights %.2f GB\n",
              static_cast<long long>(rep.layers), static_cast<long long>(rep.batches), T, rep.layer_weight_bytes / 1e9);
  std::printf("  peak device memory %.2f GB (per rank, above the pre-run baseline)\n", rep.peak_device_bytes / 1e9);
  std::printf("  host: pinned hidden states %.2f GB, process peak RSS %.2f GB\n", rep.pinned_host_bytes / 1e9,
              host_peak_bytes() / 1e9);
  std::printf("  rank 0: compute busy %.2f s (%.1f%% of wall); H2D %.2f GB in %.2f s, D2H %.2f GB in %.2f s "
              "(%.1f GB/s); weights %.2f s; exchange %.2f s\n",
              rep.compute_busy_seconds, 100 * rep.compute_busy_seconds / rep.seconds, rep.h2d_bytes / 1e9 / rep.ranks,
              rep.h2d_seconds, rep.d2h_bytes / 1e9 / rep.ranks, rep.d2h_seconds,
              (rep.h2d_bytes + rep.d2h_bytes) / rep.ranks / 1e9 / std::max(rep.h2d_seconds + rep.d2h_seconds, 1e-9),
              rep.weight_seconds, rep.exchange_seconds);
  const double transfer = rep.h2d_seconds + rep.d2h_seconds;
  const double exposed = std::max(0.0, rep.seconds - rep.compute_busy_seconds);
  std::printf("  transfer overlap: %.2f s of copies, wall - compute = %.2f s not covered by compute (upper bound on "
              "exposed copies + sync bubbles) -> at least %.1f%% of copy time hidden\n",
              transfer, exposed, transfer > 0 ? 100 * std::max(0.0, 1 - exposed / transfer) : 100.0);
  const calib::CalibrationMoments moments = stats->moments(false);
  const auto te = Clock::now();
  const calib::CalibrationSpectra spectra = rt::cusolver_spectra(moments);
  std::printf("eigendecomposition:  %8.3f s  (%zu matrices)\n", seconds_since(te), 2 * moments.moments.size());
  (void)spectra;
  return 0;
}

int run(int argc, char** argv) {
  CLI::App app{"OSCAR GPU calibration benchmark (random weights)"};
  std::string config_path;
  int64_t num_seqs = 512, seq_len = 2048, heldout = 8, batch_tokens = 16384;
  uint64_t seed = 0;
  std::string weighting = "query";
  bool skip_end_to_end = false, stream_layers = false;
  int gpus = 1;
  app.add_option("--config", config_path, "HF config.json of the shape to benchmark")->required()->check(CLI::ExistingFile);
  app.add_option("--num-seqs", num_seqs, "calibration sequences")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--seq-len", seq_len, "tokens per sequence")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--heldout-seqs", heldout, "held-out sequences of the end-to-end run")
      ->check(CLI::NonNegativeNumber)->capture_default_str();
  app.add_option("--batch-tokens", batch_tokens, "tokens per packed forward")->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--value-weighting", weighting, "query (two passes) or uniform (one)")
      ->check(CLI::IsMember({"query", "uniform"}))->capture_default_str();
  app.add_option("--seed", seed, "seed of the random weights and ids")->capture_default_str();
  app.add_flag("--skip-end-to-end", skip_end_to_end, "only the forward / statistics / eigen timings");
  app.add_flag("--stream-layers", stream_layers, "layer-streaming statistics (no resident model; random weights "
                                                  "generated per layer)");
  app.add_option("--gpus", gpus, "data-parallel ranks (devices 0..N-1); implies --stream-layers")
      ->check(CLI::PositiveNumber)->capture_default_str();
  CLI11_PARSE(app, argc, argv);

  fmt::ModelConfig cfg = fmt::ModelConfig::from_file(config_path);
  if (cfg.max_position_embeddings > 0 && seq_len > cfg.max_position_embeddings) cfg.max_position_embeddings = seq_len;
  cudaDeviceProp prop{};
  rt::check_cuda(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
  std::printf("device: %s (%d SMs)\nconfig: %s  layers %lld  heads %lld/%lld  head_dim %lld\n", prop.name,
              prop.multiProcessorCount, config_path.c_str(), static_cast<long long>(cfg.num_layers),
              static_cast<long long>(cfg.num_heads), static_cast<long long>(cfg.num_kv_heads),
              static_cast<long long>(cfg.head_dim));
  std::printf("data: %lld x %lld tokens (+%lld held-out), batch %lld tokens, weighting %s\n",
              static_cast<long long>(num_seqs), static_cast<long long>(seq_len), static_cast<long long>(heldout),
              static_cast<long long>(batch_tokens), weighting.c_str());

  if (stream_layers || gpus > 1) {
    calib::CalibrationData data;
    data.seq_len = seq_len;
    std::mt19937_64 rng(seed);
    std::uniform_int_distribution<int32_t> id(0, static_cast<int32_t>(cfg.vocab_size - 1));
    for (int64_t s = 0; s < num_seqs; ++s) {
      std::vector<int32_t> seq(static_cast<size_t>(seq_len));
      for (int32_t& t : seq) t = id(rng);
      data.sequences.push_back(std::move(seq));
    }
    std::printf("mode: layer streaming, %d GPU%s (held-out / clip tuning not timed here)\n", gpus, gpus > 1 ? "s" : "");
    return run_streamed(cfg, data, calib::parse_value_weighting(weighting, "--value-weighting"), batch_tokens, gpus,
                        seed);
  }

  const auto t_init = Clock::now();
  auto model = rt::DeviceModel::random(cfg, seed);
  rt::check_cuda(cudaDeviceSynchronize(), "weight init");
  std::printf("weight init (excluded): %.2f s, %.2f GB\n", seconds_since(t_init), model->weight_bytes() / 1e9);

  calib::CalibrationData data;
  data.seq_len = seq_len;
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int32_t> id(0, static_cast<int32_t>(cfg.vocab_size - 1));
  const auto make = [&](int64_t n, std::vector<std::vector<int32_t>>& out) {
    for (int64_t s = 0; s < n; ++s) {
      std::vector<int32_t> seq(static_cast<size_t>(seq_len));
      for (int32_t& t : seq) t = id(rng);
      out.push_back(std::move(seq));
    }
  };
  make(num_seqs, data.sequences);
  make(heldout, data.heldout);
  const auto batches = rt::plan_batches(data.sequences, batch_tokens);
  const calib::ValueWeighting w = calib::parse_value_weighting(weighting, "--value-weighting");
  const int passes = w == calib::ValueWeighting::QueryEnergy ? 2 : 1;
  const double tokens = static_cast<double>(num_seqs * seq_len) * passes;

  const auto run_forwards = [&](rt::GpuStatisticsCollector* stats, int pass) {
    for (const auto& [first, last] : batches) {
      rt::PackedBatch batch;
      for (int64_t i = first; i < last; ++i) batch.add_sequence(data.sequences[i]);
      rt::DeviceForwardOptions fo;
      fo.observer = stats;
      fo.rows = rt::LogitsRows::None;
      model->forward(batch, fo);
      if (stats) stats->check_finite();
    }
    (void)pass;
    rt::check_cuda(cudaDeviceSynchronize(), "forward");
  };

  // Warm-up: one batch each way (cuBLAS heuristics, scratch allocation).
  {
    rt::PackedBatch batch;
    for (int64_t i = batches[0].first; i < batches[0].last; ++i) batch.add_sequence(data.sequences[i]);
    rt::DeviceForwardOptions fo;
    fo.rows = rt::LogitsRows::None;
    model->forward(batch, fo);
    rt::GpuStatisticsCollector warm(calib::StatisticsShape::from_config(cfg), w);
    fo.observer = &warm;
    model->forward(batch, fo);
    warm.check_finite();
  }

  auto t0 = Clock::now();
  for (int p = 0; p < passes; ++p) run_forwards(nullptr, p);
  const double forward_s = seconds_since(t0);

  rt::GpuStatisticsCollector stats(calib::StatisticsShape::from_config(cfg), w);
  t0 = Clock::now();
  run_forwards(&stats, 0);
  if (stats.needs_value_pass()) {
    stats.start_value_pass();
    run_forwards(&stats, 1);
  }
  const double stats_s = seconds_since(t0);
  std::printf("forward alone:       %8.2f s  %10.0f tok/s  (%d pass%s)\n", forward_s, tokens / forward_s, passes,
              passes > 1 ? "es" : "");
  std::printf("statistics passes:   %8.2f s  %10.0f tok/s  overhead %+.1f%% over forward alone\n", stats_s,
              tokens / stats_s, 100.0 * (stats_s - forward_s) / forward_s);

  const calib::CalibrationMoments moments = stats.moments(false);
  t0 = Clock::now();
  const calib::CalibrationSpectra spectra = rt::cusolver_spectra(moments);
  std::printf("eigendecomposition:  %8.3f s  (%zu matrices of %lld x %lld, cuSOLVER dsyevd fp64)\n", seconds_since(t0),
              2 * moments.moments.size(), static_cast<long long>(cfg.head_dim), static_cast<long long>(cfg.head_dim));
  (void)spectra;

  if (!skip_end_to_end) {
    calib::CalibrationOptions opt;
    opt.value_weighting = w;
    opt.quant = fmt::KvQuantSpec::int2_default(cfg.head_dim);
    fmt::ModelFingerprint fp;
    fp.architecture = std::string(fmt::arch_name(cfg.arch));
    fp.num_layers = cfg.num_layers;
    fp.num_heads = cfg.num_heads;
    fp.num_kv_heads = cfg.num_kv_heads;
    fp.head_dim = cfg.head_dim;
    fp.hidden_size = cfg.hidden_size;
    fp.vocab_size = cfg.vocab_size;
    fp.config_sha256 = std::string(64, '0');
    fp.attention_sha256 = std::string(64, '0');
    rt::GpuCalibrationOptions gpu;
    gpu.batch_tokens = batch_tokens;
    t0 = Clock::now();
    const calib::CalibrationResult r = rt::calibrate_on_device(*model, fp, data, opt, gpu);
    std::printf("end to end:          %8.2f s  (statistics, eigen, rotations, held-out report, clip tuning)\n",
                seconds_since(t0));
    std::fputs(r.report.c_str(), stdout);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "calibrate_bench: %s\n", e.what());
    return 1;
  }
}
