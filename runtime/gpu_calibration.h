#pragma once
// GPU calibration (`oscar calibrate --device cuda`): stages 1 and 2 of lib/calib/calibrator.h on the device, then
// the same rotation / held-out report / clip tuning / bundle code as the CPU path (calib::assemble_bundle).
//
//   statistics  GpuStatisticsCollector observes DeviceModel::forward over packed batches of whole sequences and
//               accumulates, per layer and KV head, Σ q qᵀ over the group's query heads and Σ w v vᵀ, Σ w on the
//               device. Every per-call product is one fp32 cuBLAS strided-batched GEMM over all the call's tokens
//               (pedantic fp32: no TF32, default algorithm, atomics off), then folded into fp64 running sums by a
//               kernel that adds the group's heads in head order: no atomics in any reduction, so a run repeats bit
//               for bit on the same GPU model and batch size. fp64 across calls keeps 512 × 2048 tokens of
//               O(1)-magnitude sums from losing the small eigenvalues' digits.
//               Value weights: QueryEnergy w_t = k_tᵀ Σ_Q k_t (Σ_Q frozen after a first pass, as on the CPU) via one
//               GEMM K·Σ_Q and a warp-per-row dot; Uniform w_t = 1. AttentionMass needs each sequence's full
//               softmax and is CPU only.
//   spectra     cuSOLVER dsyevd on every Σ (fp64 on the device; the fp32-accumulated covariances are promoted), then
//               calib::eigen_from_ascending, so signs and order follow the CPU path's convention exactly.
//   held-out    DeviceForwardRunner: one sequence per forward, q/k/v copied to the host (small) and handed to the
//               same calib::HeldoutCollector the CPU path uses.
// Only built with nvcc; this header is CUDA-free.
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "lib/calib/calibrator.h"
#include "runtime/device_model.h"

namespace oscar::rt {

class GpuStatisticsCollector : public DeviceObserver {
 public:
  // weighting: QueryEnergy or Uniform (AttentionMass is an oscar::Error naming --value-weighting).
  GpuStatisticsCollector(const calib::StatisticsShape& shape, calib::ValueWeighting weighting);
  ~GpuStatisticsCollector() override;
  GpuStatisticsCollector(const GpuStatisticsCollector&) = delete;
  GpuStatisticsCollector& operator=(const GpuStatisticsCollector&) = delete;

  void on_attention_inputs(const DeviceAttentionInputs& in) override;

  // After each forward: waits for it and throws oscar::Error naming the first layer with NaN/Inf inputs and how many
  // values were non-finite (the statistics are then unusable).
  void check_finite();

  // True while QueryEnergy still needs its second pass (neither start_value_pass() nor every layer frozen).
  bool needs_value_pass() const;
  // QueryEnergy: freezes Σ_Q from everything seen so far as the value weighting; feed the same sequences again.
  void start_value_pass();

  // ---- layer streaming / data parallel (runtime/layer_stream.h)
  // QueryEnergy, one layer at a time: freezes this layer's Σ_Q exactly as start_value_pass() does for all (same
  // division, same fp32 rounding); from then on this layer's calls collect Σ_V only.
  void freeze_layer_queries(int64_t layer);
  // The device fp64 running sums of one layer (Σ q qᵀ [Hkv, d, d], Σ w v vᵀ [Hkv, d, d], Σ w [Hkv]), for the
  // sharded reduction: zeroed before a batch they hold that batch's partial, and the ordered total is written back.
  struct LayerSums {
    double* qq = nullptr;
    double* vv = nullptr;
    double* w = nullptr;
    int64_t matrix_elems = 0;  // Hkv · d · d
    int64_t heads = 0;         // Hkv
  };
  LayerSums layer_sums(int64_t layer);
  // Overwrites a layer's token counts (a shard saw only its own batches; the totals are known from the plan).
  void set_layer_counts(int64_t layer, double query_vectors, double value_tokens);

  // Normalized moments, downloaded (waits for the device). Same definitions as calib::StatisticsCollector.
  calib::HeadMoments head_moments(int64_t layer, int64_t kv_head);
  calib::CalibrationMoments moments(bool per_head);
  // Σ_Q of every KV head, [layer][num_kv_heads · d · d] (calib::head_sigma_q's layout): the key metric of the
  // error-feedback tables from the calibration statistics, as on the CPU path, instead of the held-out fallback.
  std::vector<std::vector<double>> head_sigma_q();

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

// Eigen-decomposition of symmetric row-major matrices, `matrices` = [count, d, d] back to back, with cuSOLVER dsyevd
// (one call per matrix, fp64), symmetrized first as calib::symmetric_eigen does; results follow
// calib::eigen_from_ascending's convention. Throws oscar::Error(where, ...) for a non-finite entry or a solver
// failure.
std::vector<calib::SymmetricEigen> cusolver_symmetric_eigen(std::span<const double> matrices, int64_t d,
                                                            const std::string& where);
calib::CalibrationSpectra cusolver_spectra(const calib::CalibrationMoments& moments);

// A calib::ForwardRunner over a DeviceModel: one sequence per forward, every layer's q / k_pre_rope / k / v copied to
// the host and transposed to model::AttentionInputs' [heads, T, d]. For held-out data and tests, not for throughput.
class DeviceForwardRunner : public calib::ForwardRunner {
 public:
  explicit DeviceForwardRunner(DeviceModel& model) : model_(model) {}
  const fmt::ModelConfig& config() const override { return model_.config(); }
  void run_sequence(std::span<const int32_t> ids, model::Observer& observer) override;

 private:
  DeviceModel& model_;
};

// A DeviceObserver that copies each layer's q / k_pre_rope / k / v to the host, transposes them to
// model::AttentionInputs' [heads, T, d] and hands them to `target` (what DeviceForwardRunner uses).
std::unique_ptr<DeviceObserver> make_host_relay(model::Observer& target);

struct GpuCalibrationOptions {
  // Whole sequences are packed into one forward until the next would exceed this many tokens (at least one per
  // forward). Recorded in the bundle, since it fixes the order of the fp32 sums.
  int64_t batch_tokens = 16384;
};

// Sequences [first, last) of a calibration set, run as one packed forward.
struct BatchRange {
  int64_t first = 0;
  int64_t last = 0;
  bool operator==(const BatchRange&) const = default;
};
// Consecutive runs of sequences of at most batch_tokens tokens each (a longer sequence is alone in its batch).
std::vector<BatchRange> plan_batches(const std::vector<std::vector<int32_t>>& sequences, int64_t batch_tokens);

// The GPU counterpart of calib::calibrate. Checkpoints are not supported on the device yet: options.checkpoint
// must be empty (oscar::Error naming --checkpoint otherwise).
calib::CalibrationResult calibrate_on_device(DeviceModel& model, const fmt::ModelFingerprint& fingerprint,
                                             const calib::CalibrationData& data,
                                             const calib::CalibrationOptions& options,
                                             const GpuCalibrationOptions& gpu = {});

}  // namespace oscar::rt
