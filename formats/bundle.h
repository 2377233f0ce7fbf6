#pragma once
// fmt::Bundle — everything `oscar calibrate` produces for one model, as plain data, and its on-disk form: an
// HDF5 file (".oscar", formats 1.x and 2.0, specified in docs/format.md). Only formats/bundle.cpp touches HDF5.
//
// Guarantees:
//  * write_bundle() is atomic (AtomicFile) and deterministic: the same Bundle gives the same bytes (HDF5 object
//    timestamps are disabled), so a bundle's sha256 identifies a calibration.
//  * every dataset carries a "sha256" attribute over its raw little-endian bytes; read_bundle() recomputes it.
//  * read_bundle() refuses a newer MAJOR version, reads any minor of its majors (unknown objects are ignored),
//    and validates shapes, finiteness, the orthogonality of every rotation and that every storage transform's
//    stored inverse is its inverse, throwing oscar::Error naming the file.
#include <cstdint>
#include <filesystem>
#include <string>
#include <utility>
#include <vector>

#include "formats/kv_quant_spec.h"

namespace oscar::fmt {

class TensorStore;

// The newest format this code reads and writes. 2.0 = 1.3 + per-KV-head storage transforms (a 1.x reader would
// quantize with the rotation alone, so a bundle with transforms must not be readable as 1.x); a bundle without them
// is still written as 1.x, byte for byte as before.
inline constexpr int32_t kBundleFormatMajor = 2;
inline constexpr int32_t kBundleFormatMinor = 0;
// The newest minor of format 1: 1.1 per-layer segment layouts; 1.2 error-feedback tables; 1.3 the key metric the
// key tables are made from.
inline constexpr int32_t kBundleFormat1Minor = 3;

// Identifies the checkpoint a bundle was calibrated on; `oscar eval` refuses a bundle whose fingerprint differs.
struct ModelFingerprint {
  std::string architecture;  // "LlamaForCausalLM", ...
  int64_t num_layers = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t hidden_size = 0;
  int64_t vocab_size = 0;
  std::string config_sha256;       // of config.json's bytes
  std::string attention_sha256;    // sha256_tensors() over every layer's q/k/v/o projection weights (and biases)

  bool operator==(const ModelFingerprint&) const = default;
};

struct DataFileRecord {
  std::string path;  // as given on the command line
  std::string sha256;
  bool operator==(const DataFileRecord&) const = default;
};

struct CalibrationProvenance {
  std::vector<DataFileRecord> data_files;
  int64_t num_sequences = 0;          // calibration sequences (held-out ones not included)
  int64_t num_tokens = 0;             // calibration tokens
  int64_t seq_len = 0;
  int64_t num_heldout_sequences = 0;  // used for the error report and clip tuning
  uint64_t seed = 0;
  // Every calibration option as text, sorted by key; enough to rerun the calibration.
  std::vector<std::pair<std::string, std::string>> options;
  bool operator==(const CalibrationProvenance&) const = default;
};

// One decoder layer. `groups` is 1 when one rotation is shared by the layer's KV heads (the default) and
// num_kv_heads with per-head rotations. A head vector x (row) is stored as y = x · R.
struct LayerCalibration {
  std::vector<float> k_rotation;      // [groups, head_dim, head_dim] row-major, orthogonal
  std::vector<float> v_rotation;      // [groups, head_dim, head_dim]
  std::vector<double> k_eigenvalues;  // [groups, head_dim] of Σ_Q, descending
  std::vector<double> v_eigenvalues;  // [groups, head_dim] of Σ_V, descending
  float k_clip_ratio = 1.0f;
  float v_clip_ratio = 1.0f;
  // Format 1.1: this layer's own segment layouts (the spectral method's per-layer bit allocation); empty = the
  // bundle's quant.k / quant.v segments. layer_spec() resolves them.
  std::vector<QuantSegment> k_segments;
  std::vector<QuantSegment> v_segments;
  // Format 1.2: error-feedback rounding tables (docs/method.md, "Error-feedback rounding"); empty = round to
  // nearest. Only for a whole-head INT2 tensor. Per KV head h (num_kv_heads of them, also with a shared rotation,
  // because the metric is per KV head), in the storage (rotated) basis:
  //   *_ef_order[h, k]: the coordinate rounded at step k (a permutation of 0..d-1);
  //   *_ef_weights[h, k, m]: for m > k, U[k][m] / U[k][k] with U the upper Cholesky factor (in that order) of
  //   (M + damp·mean(diag M)·I)⁻¹; zero for m <= k. A writer rounds step k's coordinate, then subtracts
  //   (target − dequantized) · weights[k][m] from every later step m's target (fmaf, fp32, m ascending).
  std::vector<int32_t> k_ef_order;   // [num_kv_heads, head_dim]
  std::vector<float> k_ef_weights;   // [num_kv_heads, head_dim, head_dim] row-major, strictly upper triangular
  std::vector<int32_t> v_ef_order;
  std::vector<float> v_ef_weights;
  // Format 1.3 (only beside a key table): the key metric M_K[h] = Σ_Q of KV head h's query group, post-RoPE, in the
  // ORIGINAL (unrotated) basis, averaged over positions 0..Bundle::ef_metric_positions-1 — as collected, before any
  // --ef-context carry. From it a reader can rebuild the key tables for another context
  // (calib::retarget_key_tables) without the calibration data.
  std::vector<double> k_ef_metric;  // [num_kv_heads, head_dim, head_dim] row-major, symmetric
  // Format 2.0: a general invertible storage transform per KV head instead of the rotation (docs/method.md,
  // "Beyond rotations: a whitening transform under error feedback"; lib/calib/kv_transform.h). A tensor with one stores y = (x − μ)·A and reads
  // x̂ = ŷ·A⁻¹ + μ, where A = W·R (R this layer's rotation of the head's group, W = (Σ + εI)^(−α/2) from the head's
  // calibration covariance); its error-feedback tables are in A's basis (metric A⁻¹ M A⁻ᵀ). Keys may be centered
  // (μ_K: exact for attention, a constant per query that the softmax drops); values are not (no v_mean). Empty =
  // the tensor stores y = x·R (format 1.x).
  std::vector<float> k_transform;          // [num_kv_heads, head_dim, head_dim] row-major A_K
  std::vector<float> k_transform_inverse;  // [num_kv_heads, head_dim, head_dim] A_K⁻¹
  std::vector<float> k_mean;               // [num_kv_heads, head_dim] μ_K (present with k_transform; may be zero)
  std::vector<float> v_transform;          // [num_kv_heads, head_dim, head_dim] A_V
  std::vector<float> v_transform_inverse;  // [num_kv_heads, head_dim, head_dim] A_V⁻¹
  bool operator==(const LayerCalibration&) const = default;
};

// Attention-aware relative errors on held-out data (docs/method.md): rows are configurations such as
// "none", "hadamard+clip", "oscar+tuned_clip"; one value per row and layer.
struct ErrorReport {
  std::vector<std::string> rows;
  int64_t num_layers = 0;
  std::vector<double> k_relative_error;  // [rows, layers]: relative logit MSE
  std::vector<double> v_relative_error;  // [rows, layers]: relative (weighted) output MSE
  bool operator==(const ErrorReport&) const = default;
};

struct Bundle {
  // What the file says when read. write_bundle writes the version the content needs (required_format_major /
  // required_format_minor), so a bundle without error-feedback tables stays a byte-identical 1.1 file.
  int32_t format_major = 1;
  int32_t format_minor = 1;
  std::string producer;  // "oscar 0.1.0"
  ModelFingerprint model;
  CalibrationProvenance calibration;
  KvQuantSpec quant;
  int64_t rotation_groups = 1;       // 1 (shared per layer) or model.num_kv_heads (per head)
  std::string rotation_composition;  // "eigen*hadamard*bitrev" (OSCAR), or "eigen" when head_dim is not 2^k
  std::vector<LayerCalibration> layers;
  ErrorReport errors;
  // Format 1.2: with error-feedback tables, whether the rounding target is the unclipped rotated vector (the
  // clipping error is fed back too) or the clipped one. Meaningless without tables.
  bool ef_clip_feedback = true;
  // Format 1.3, with stored key metrics: what rebuilding the key tables needs besides the metric — the damping the
  // tables were factorized with (relative to mean(diag M)) and the positions the stored metric averages over — and
  // the positions 0..ef_key_context-1 the present key tables serve. 0 when there is no stored metric (then the
  // provenance says the context: calib::error_feedback_context).
  double ef_damp = 0;
  int64_t ef_metric_positions = 0;
  int64_t ef_key_context = 0;
};

// True when any layer carries error-feedback tables (format 1.2).
bool has_error_feedback(const Bundle& bundle);
// True when any layer stores its key metric (format 1.3).
bool has_key_metric(const Bundle& bundle);
// True when any layer stores a transform (format 2.0).
bool has_storage_transform(const Bundle& bundle);
// What write_bundle writes: 2.0 with storage transforms; else 1.3 with stored key metrics, 1.2 with error-feedback
// tables, 1.1 otherwise.
int32_t required_format_major(const Bundle& bundle);
int32_t required_format_minor(const Bundle& bundle);

// The spec layer `layer` is stored with: bundle.quant with the layer's own segments (when it has them) and clip ratios.
KvQuantSpec layer_spec(const Bundle& bundle, size_t layer);

// Writes atomically; throws oscar::Error naming `path` on any HDF5 failure or an inconsistent Bundle
// (the same checks read_bundle applies).
void write_bundle(const std::filesystem::path& path, const Bundle& bundle);
// Reads and validates; every problem is an oscar::Error whose where() is the file (and the object inside it).
Bundle read_bundle(const std::filesystem::path& path);
// The checks read_bundle applies, for a Bundle built in memory; `where` prefixes errors.
void validate_bundle(const Bundle& bundle, const std::string& where);

// One dataset of a bundle file with its stored "sha256" attribute and the sha256 recomputed over its bytes.
// `problem` is empty when both could be obtained; otherwise it says why not (unreadable dataset, missing
// attribute, implausible size). Used by `oscar verify`, which reports every dataset rather than the first failure.
struct DatasetChecksum {
  std::string object;  // "/layers/00000/k_rotation"
  std::string stored_sha256;
  std::string computed_sha256;
  std::string problem;
  bool ok() const { return problem.empty() && stored_sha256 == computed_sha256; }
};
// Walks every dataset of the HDF5 file in name order (no other validation, so a damaged bundle can be examined
// dataset by dataset). Throws oscar::Error naming the file only when it cannot be opened as HDF5 at all.
std::vector<DatasetChecksum> bundle_checksums(const std::filesystem::path& path);

// sha256 over tensors of a checkpoint, in the given order: the sha256 of the text manifest with one line per
// tensor, "name|DTYPE|dim,dim|sha256-of-raw-bytes\n". Missing tensors are an Error naming the tensor.
std::string sha256_tensors(const TensorStore& store, const std::vector<std::string>& names);

// Text spelling of KvStorage in bundles and reports: "bf16", "int", "fp8_e4m3".
std::string_view kv_storage_name(KvStorage s);
KvStorage parse_kv_storage(std::string_view name, const std::string& where);

}  // namespace oscar::fmt
