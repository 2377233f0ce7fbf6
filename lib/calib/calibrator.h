#pragma once
// calib::calibrate — the whole of `oscar calibrate` below the CLI, as four separable stages:
//   1. statistics   sequences ─► forward passes with a StatisticsCollector (two passes for the default "query"
//                   value weighting), checkpointed for --resume                        collect_statistics()
//                   ─► per (layer, rotation group) normalized moments Σ_Q / Σ_V          group_moments()
//   2. spectra      eigen-decomposition of every Σ_Q / Σ_V (LAPACK here; cuSOLVER in runtime/gpu_calibration.h)
//                                                                                       solve_spectra()
//   3. rotations    OSCAR rotations (lib/calib/rotation.h) and the comparison candidates
//   4. report       held-out forward with a HeldoutCollector ─► error report (none / hadamard / eigen / oscar, ± clip)
//                   ─► per-layer clip tuning ─► fmt::Bundle (write it with fmt::write_bundle)  assemble_bundle()
// The GPU path (runtime/gpu_calibration.h) replaces stages 1 and 2 and reuses 3 and 4 unchanged, so both devices
// produce bundles through the same rotation, report and clip code.
// The forward pass is behind ForwardRunner, so the GPU runtime plugs in by implementing run_sequence().
//
// Typical use (what apps/oscar's `calibrate` command does):
//   auto model = model::CpuModel::load(dir);
//   calib::CpuForwardRunner runner(*model);
//   calib::CalibrationData data;            // token ids: data.sequences (calibration), data.heldout (evaluation)
//   data.data_files = {{path, fmt::sha256_file(path)}}; data.seq_len = 2048;
//   calib::CalibrationOptions opt;          // every field maps to one CLI flag
//   opt.quant = fmt::KvQuantSpec::int2_default(model->config().head_dim);
//   auto result = calib::calibrate(runner, calib::model_fingerprint(dir), data, opt);
//   fmt::write_bundle(out_path, result.bundle);  std::cout << result.report;
#include <cstdint>
#include <filesystem>
#include <functional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "formats/bundle.h"
#include "formats/model_config.h"
#include "lib/calib/clip_tuner.h"
#include "lib/calib/ef_calibration.h"
#include "lib/calib/kv_transform.h"
#include "lib/calib/rotation.h"
#include "lib/calib/spectral_calibration.h"
#include "lib/calib/statistics.h"
#include "lib/model/cpu_model.h"
#include "lib/model/observer.h"

namespace oscar::calib {

// Runs one whole sequence through a model from an empty cache (positions 0 .. T−1), reporting every layer's
// attention inputs to `observer`. A runner may split a sequence into several calls (pos0 > 0), except when the
// AttentionMass weighting is used, which needs each sequence in one call per layer.
class ForwardRunner {
 public:
  virtual ~ForwardRunner() = default;
  virtual const fmt::ModelConfig& config() const = 0;
  virtual void run_sequence(std::span<const int32_t> ids, model::Observer& observer) = 0;
};

// The CPU reference forward (one prefill call per sequence, fresh KvCache each time).
class CpuForwardRunner : public ForwardRunner {
 public:
  explicit CpuForwardRunner(model::CpuModel& model) : model_(model) {}
  const fmt::ModelConfig& config() const override { return model_.config(); }
  void run_sequence(std::span<const int32_t> ids, model::Observer& observer) override;

 private:
  model::CpuModel& model_;
};

struct CalibrationData {
  std::vector<std::vector<int32_t>> sequences;  // calibration token ids (each run from position 0)
  std::vector<std::vector<int32_t>> heldout;    // held-out ids for the error report and clip tuning; may be empty
                                                // (then no report, and every layer keeps the spec's clip ratios)
  std::vector<fmt::DataFileRecord> data_files;  // recorded in the bundle's provenance
  int64_t seq_len = 0;                          // recorded
};

// What the bundle stores (docs/method.md): Published = one rotation per layer (--rotation) with uniform INT2 and
// tuned clip ratios; Spectral = per-layer segment bit allocations in the attention-aware eigenbasis, fitted and
// selected on the held-out calibration sequences (lib/calib/spectral_calibration.h).
enum class Method : uint8_t { Published = 0, Spectral = 1 };
std::string_view method_name(Method m);                               // "published", "spectral"
Method parse_method(std::string_view name, const std::string& where);  // throws oscar::Error(where, ...)
// "oscar", "hadamard", "eigen", "none" (rotation_kind_name's spellings).
RotationKind parse_rotation_kind(std::string_view name, const std::string& where);
// The bundle's rotation_composition for a published rotation at this head_dim.
std::string rotation_composition_name(RotationKind kind, int64_t head_dim);

struct CalibrationOptions {
  // --method. The library default stays Published (today's bundles, byte for byte); the CLI defaults to Spectral.
  Method method = Method::Published;
  // --rotation (Published only): the rotation the bundle stores and the clip tuning uses. Non-default values are
  // recorded in the provenance as "rotation"; the default (oscar) adds nothing, so bundles stay byte-identical.
  RotationKind rotation = RotationKind::EigenHadamard;
  // --budget-bits, --k-weight, --k-weight-grid, --widths, --cayley, --spectral-fit-tokens, --proxy-queries,
  // --candidates, --whole-head-tolerance
  // (Spectral only; recorded in the provenance). spectral.spectral.align is ignored: the calibrator always uses
  // spectral_align(head_dim), so the layout grid is a function of the model only.
  SpectralCalibrationOptions spectral;
  // --error-feedback / --ef-damp / --ef-clip-feedback (lib/calib/ef_calibration.h): tables for every whole-head INT2
  // tensor of the final bundle (format 1.2). Off in the library (bundles as before); recorded only when on.
  ErrorFeedbackCalibration error_feedback;
  // --transform whiten / --transform-alpha (lib/calib/kv_transform.h): per-KV-head storage transforms fitted on the
  // held-out K/V (format 2.0; needs error feedback and held-out sequences). Off by default; recorded only when on.
  TransformCalibration transform;
  ValueWeighting value_weighting = ValueWeighting::QueryEnergy;  // --value-weighting query|attention_mass|uniform
  bool per_head = false;                // --per-head: one rotation per KV head instead of one per layer
  fmt::KvQuantSpec quant = fmt::KvQuantSpec::int2_default(128);  // head_dim must match the model; its clip ratios
                                                                 // are the reference (published 0.96 / 0.92)
  // --tune-clip / --no-clip-tuning. The library keeps tuning on with the logit_mse objective (its bundles as
  // before); the CLI defaults to fixed ratios: on qwen3-tiny-trained they beat logit_mse-tuned ones in KL and tie
  // with attention-tuned ones (docs/results.md, "Clip objective vs KL (cliptune)").
  bool tune_clip = true;
  ClipGrid clip_grid;                   // --clip-min / --clip-max / --clip-step
  // --clip-objective: what the tuned ratios minimize (clip_tuner.h). attention = the layer's attention output on
  // whole held-out sequences through the cache windows; logit_mse = the error report's metric.
  ClipObjective clip_objective = ClipObjective::LogitMse;
  int64_t clip_queries = 128;           // --clip-queries: queries per held-out sequence the attention objective scores
  int64_t heldout_max_tokens = 16384;   // --heldout-tokens: K/V samples kept per layer
  uint64_t seed = 0;                    // --seed: recorded (sequence sampling happens before calibrate())
  std::filesystem::path checkpoint;     // --checkpoint: statistics are saved here every checkpoint_every sequences
  int64_t checkpoint_every = 0;         // --checkpoint-every (0 = only at the end of each pass)
  bool resume = false;                  // --resume: start from `checkpoint` if it exists
  // Further settings that shape the result (the CLI's --num-seqs, --seq-len, --device, ...), recorded in the
  // bundle's provenance next to options_as_text(); keys must not collide with those.
  std::vector<std::pair<std::string, std::string>> extra_provenance;
  // Called after every sequence: stage ("queries", "values", "heldout"), sequences done, total.
  std::function<void(std::string_view stage, int64_t done, int64_t total)> progress;
};

struct CalibrationResult {
  fmt::Bundle bundle;
  std::string report;  // markdown: error table (mean over layers) and the clip-tuning gain
};

// Throws oscar::Error naming the option or sequence on invalid input (empty data, head_dim mismatch, a sequence
// longer than the model's max_position_embeddings, a checkpoint of another model, data or options).
// = validate_inputs + collect_statistics + group_moments + solve_spectra + assemble_bundle.
CalibrationResult calibrate(ForwardRunner& runner, const fmt::ModelFingerprint& fingerprint,
                            const CalibrationData& data, const CalibrationOptions& options);

// The checks calibrate() makes before any forward pass (what a GPU run must also pass): the quantization spec and
// its head_dim against the model's, non-empty data within max_position_embeddings, the clip grid.
void validate_inputs(const fmt::ModelConfig& cfg, const CalibrationData& data, const CalibrationOptions& options);

// ---- stage 1: statistics
// Runs every calibration sequence (both passes for QueryEnergy). With options.checkpoint set, the collector is
// saved there every checkpoint_every sequences and at the end of each pass, behind a header keyed by the model
// fingerprint, the calibration token ids and the result-shaping options; with options.resume a checkpoint whose key
// matches is continued (sequences already folded are skipped, so the result is bit-identical to an uninterrupted
// run), and one whose key differs is an oscar::Error naming the file.
StatisticsCollector collect_statistics(ForwardRunner& runner, const fmt::ModelFingerprint& fingerprint,
                                       const CalibrationData& data, const CalibrationOptions& options);

// The normalized moments a rotation is computed from, one per (layer, rotation group): groups = num_kv_heads with
// per_head, else 1 (the layer mean over its KV heads).
struct CalibrationMoments {
  int64_t num_layers = 0;
  int64_t groups = 1;
  int64_t head_dim = 0;
  std::vector<HeadMoments> moments;  // [layer * groups + group]
  const HeadMoments& at(int64_t layer, int64_t group) const { return moments[layer * groups + group]; }
};
CalibrationMoments group_moments(StatisticsCollector& stats, bool per_head);

// ---- stage 2: spectra
struct GroupSpectra {
  SymmetricEigen k;  // of Σ_Q
  SymmetricEigen v;  // of Σ_V
};
struct CalibrationSpectra {
  int64_t num_layers = 0;
  int64_t groups = 1;
  int64_t head_dim = 0;
  std::vector<GroupSpectra> spectra;  // [layer * groups + group]
  // Optional, for error feedback: Σ_Q of every KV head, [layer][num_kv_heads · d · d] (head_sigma_q()). Empty: the
  // key metric falls back to the held-out sequences' Σ_Q (what the GPU path has on the host), recorded in the bundle.
  std::vector<std::vector<double>> head_sigma_q;
  const GroupSpectra& at(int64_t layer, int64_t group) const { return spectra[layer * groups + group]; }
};
// LAPACK dsyevd for every matrix (symmetric_eigen's sign convention).
CalibrationSpectra solve_spectra(const CalibrationMoments& moments);
// Σ_Q per layer and KV head from the statistics, [layer][num_kv_heads · d · d] (CalibrationSpectra::head_sigma_q).
std::vector<std::vector<double>> head_sigma_q(StatisticsCollector& stats);
// The same from any collector's per-head moments (the GPU collector's, rt::GpuStatisticsCollector::head_sigma_q).
std::vector<std::vector<double>> head_sigma_q(const StatisticsShape& shape,
                                              const std::function<HeadMoments(int64_t layer, int64_t kv_head)>& moments);

// ---- stages 3 and 4: rotations, held-out error report, clip tuning, provenance
// `heldout_runner` runs data.heldout (any device; unused when data.heldout is empty).
CalibrationResult assemble_bundle(const CalibrationSpectra& spectra, ForwardRunner& heldout_runner,
                                  const fmt::ModelFingerprint& fingerprint, const CalibrationData& data,
                                  const CalibrationOptions& options);

// Fingerprint of a Hugging Face checkpoint directory: shapes from config.json, sha256 of config.json, and
// fmt::sha256_tensors over every layer's q/k/v/o projection weights plus q/k/v biases and q/k norms when present.
fmt::ModelFingerprint model_fingerprint(const std::filesystem::path& model_dir);

// The options as sorted key/value text (what the bundle's provenance records).
std::vector<std::pair<std::string, std::string>> options_as_text(const CalibrationOptions& options);

}  // namespace oscar::calib
