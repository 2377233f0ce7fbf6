#pragma once
// Layer-streaming and data-parallel GPU calibration (`oscar calibrate --device cuda --stream-layers`, `--gpus N`).
//
// Layer streaming turns the forward inside out: instead of every layer for one batch, one layer for every batch.
// Only that layer's weights are on the device (two slots: layer l computes while l + 1 is generated or uploaded
// on a weight stream); every calibration batch's fp32 residual stream lives in pinned host memory between layers
// (one chunk per batch) and moves through three device slots, so batch j + 1 uploads on a copy stream and batch
// j - 1 downloads on another while batch j computes. Peak device memory is two layers + the embedding + one
// batch's activations: independent of depth. Each layer runs the very function DeviceModel::forward runs per layer
// (runtime/decoder_layer.h) with the same batches (rt::plan_batches), so the observer sees bit-identical q/k/v and
// the statistics equal the resident path bit for bit.
//
// Two-pass "query" weighting keeps its semantics but not its cost: Σ_Q of layer l depends on layer l only, so per
// layer the streamer first runs every batch through the QKV projection + RoPE (Σ_Q), freezes layer l's Σ_Q exactly as
// GpuStatisticsCollector::start_value_pass would, then runs every batch through the whole layer (Σ_V, and the
// residual stream moves on). The resident path's second full forward shrinks to one QKV projection per layer. The
// last layer never runs past its attention inputs (nothing reads its output during calibration).
//
// Data parallel: one thread per rank (one rank per device), batches sharded contiguously (runtime/shard_plan.h).
// Threads, not processes: every rank reads the same host data (sequences, checkpoint mmap) without a launcher or
// IPC, one ncclCommInitAll creates all communicators, and an exception on any rank reaches the caller. After every
// sub-pass each rank has per-batch fp64 partials of that layer; they are all-gathered (NCCL when built with it and
// the devices are distinct; otherwise device-to-device/peer copies) and every rank adds them in global batch order,
// which reproduces the single-device chain of additions exactly: the bundle is byte-identical for any rank count.
// NCCL is loaded at run time (dlopen libnccl.so.2) so binaries without it still start; NVLink SHARP/multicast is
// switched off (NCCL_NVLS_ENABLE=0, set by the launcher before ncclCommInitAll) as the cluster requires.
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <string_view>
#include <vector>

#include "lib/calib/calibrator.h"
#include "runtime/gpu_calibration.h"

namespace oscar::rt {

// Where the streamed layers' weights come from: a checkpoint (converted on the host a layer at a time, exactly as
// DeviceModel::load converts it) or DeviceModel::random's deterministic weights (generated on the device per layer:
// a 70B shape needs no host copy).
struct LayerSource {
  fmt::ModelConfig config;
  std::filesystem::path checkpoint;  // empty: random weights
  uint64_t seed = 0;

  static LayerSource from_checkpoint(const std::filesystem::path& model_dir);
  static LayerSource random(const fmt::ModelConfig& cfg, uint64_t seed);
};

struct LayerStreamOptions {
  int64_t batch_tokens = 16384;  // as GpuCalibrationOptions::batch_tokens (fixes the fp32 sums' order)
  std::vector<int> devices{0};   // one rank per entry; a device listed twice gives virtual shards (tests)
  // Per-batch partials + ordered reduction even with one rank (more than one rank always uses them).
  bool sharded_reduction = false;
  bool use_nccl = true;  // multi-device all-gather via NCCL when the build has it and the devices are distinct
};

// What a streamed run measured (rank 0, except the byte counts, which sum all ranks).
struct LayerStreamReport {
  int ranks = 1;
  bool nccl = false;
  int64_t layers = 0, batches = 0, tokens = 0;
  double seconds = 0;               // statistics passes, wall
  double compute_busy_seconds = 0;  // rank 0: the compute stream's batch work (events), excluding waits
  double h2d_seconds = 0, d2h_seconds = 0;  // rank 0: residual-stream copies (events)
  double weight_seconds = 0;                // rank 0: weight generation / upload on the weight stream (events)
  double exchange_seconds = 0;              // rank 0: all-gather + ordered reduction (host clock)
  double h2d_bytes = 0, d2h_bytes = 0;
  double peak_device_bytes = 0;  // max over ranks of (used − used before the run), sampled at every layer end
  double pinned_host_bytes = 0;  // all ranks
  double layer_weight_bytes = 0;  // one layer's weights on the device
};

using StreamProgress = std::function<void(std::string_view stage, int64_t done, int64_t total)>;

// The statistics passes over `sequences` (packed with plan_batches(batch_tokens)), streamed layer by layer on every
// rank. Returns rank 0's collector (it holds the full statistics; with one rank and no sharded reduction the very
// sums the resident path accumulates). Call from a host thread whose current device may be changed to devices[0].
std::unique_ptr<GpuStatisticsCollector> streamed_statistics(const LayerSource& source,
                                                            const std::vector<std::vector<int32_t>>& sequences,
                                                            calib::ValueWeighting weighting,
                                                            const LayerStreamOptions& options,
                                                            LayerStreamReport* report = nullptr,
                                                            const StreamProgress& progress = {});

// A calib::ForwardRunner that streams one sequence through every layer on `device` (held-out data: the layers are
// re-streamed per sequence, so this costs one weight sweep per held-out sequence).
class StreamedForwardRunner : public calib::ForwardRunner {
 public:
  StreamedForwardRunner(const LayerSource& source, int device);
  ~StreamedForwardRunner() override;
  const fmt::ModelConfig& config() const override { return source_.config; }
  void run_sequence(std::span<const int32_t> ids, model::Observer& observer) override;

  struct State;

 private:
  LayerSource source_;
  int device_;
  std::unique_ptr<State> state_;
};

// calibrate_on_device with streamed statistics (and held-out data through StreamedForwardRunner on devices[0]).
calib::CalibrationResult calibrate_streamed(const LayerSource& source, const fmt::ModelFingerprint& fingerprint,
                                            const calib::CalibrationData& data,
                                            const calib::CalibrationOptions& options,
                                            const LayerStreamOptions& stream, LayerStreamReport* report = nullptr);

}  // namespace oscar::rt
