#pragma once
// rt::Engine — batched autoregressive generation on the GPU over the paged KV cache (runtime/kv_cache.h).
//
//   add_sequence(prompt)  prefill with DeviceModel::forward (add_sequences: several prompts in one packed forward); a DeviceObserver catches each layer's post-RoPE K/V
//                         and writes them into the cache (kern::kv_write: bf16 for sink/window, INT2 for the rest),
//                         and the last logits give the sequence's first new token (next_token()).
//   step()                one token for every live sequence: embedding → per layer [rmsnorm → QKV GEMM → fused
//                         bias/q-k-norm/RoPE at each sequence's own position → append K/V to the cache →
//                         kern::decode_attention (q·R_k inside the kernel, output ·R_vᵀ) → o_proj → residual →
//                         rmsnorm → gate|up GEMM → SwiGLU → down → residual] → lm_head → greedy or sampled token.
//   free_sequence(id)     gives the sequence's pages back.
//
// Cache formats: bf16 (the baseline; every token bf16, no windows), int2 (per-token INT2, no rotation, no clip —
// eval's "int2"), int4 (eval's "int4": per-token INT4, no rotation, no clip; one 4-bit segment through the segmented
// kernels), fp8 (eval's "fp8": e4m3 codes + one fp16 scale per head vector, fmt::Fp8PageGeometry pages, no rotation,
// no clip), hadamard2 (eval's "hadamard2": a seeded random-sign Hadamard rotation per layer and tensor, no
// clip), oscar (a calibration bundle's per-layer rotations and clip ratios; eval's "oscar"). The windows default
// to the bundle's (oscar) or fmt::KvQuantSpec::int2_default's (int2, int4, fp8, hadamard2) and can be overridden.
//
// fold_v (EngineOptions): R_v is folded into the weights at load (W_v ← per KV head R_vᵀ·W_v, its bias ← b·R_v,
// W_o ← per query head W_o·R_v; DeviceModel::fold_value_rotation), so the projection already produces V in the
// rotated basis: the cache stores it as is and the decode kernel runs with rotation_v = null. Exact in real
// arithmetic; the folded weights are rounded to bf16 again (docs/runtime.md gives the effect on logits).
//
// Head dims the decode kernels do not implement (they take 64, 128, 256) are padded with zeros up to the next one
// in the bf16 mode: zero dims add nothing to q·k and produce zero output dims, so the result is exact (the tiny
// llama2.c fixtures have head_dim 8). Quantized modes refuse them, because padded zeros would change the per-token
// min/max and so the quantization itself.
//
// This header needs no CUDA headers; the host parts (format resolution, bundle checks) are in engine_format.cpp
// and build without nvcc.
#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "formats/bundle.h"
#include "formats/model_config.h"
#include "lib/model/generate.h"

namespace oscar::rt {

class DeviceModel;
class KvCache;

enum class CacheMode { Bf16, Int2, Oscar, Hadamard2, Int4, Fp8 };
// "bf16", "int2", "oscar", "hadamard2", "int4", "fp8"
std::string_view cache_mode_name(CacheMode mode);
CacheMode parse_cache_mode(std::string_view name, const std::string& where);  // oscar::Error naming `where`

// The resolved storage format of one engine: what is written, per layer.
struct CacheFormat {
  CacheMode mode = CacheMode::Bf16;
  int64_t model_head_dim = 0;
  int64_t cache_head_dim = 0;  // model_head_dim, or the padded kernel size (bf16 mode only)
  bool quantized = false;
  int64_t sink_tokens = 0;     // quantized modes
  int64_t recent_tokens = 0;
  std::vector<std::vector<float>> k_rotation, v_rotation;  // per layer [d, d] row-major (y = x·R); empty = none
  std::vector<float> k_clip_ratio, v_clip_ratio;           // per layer; 1 = no clipping
  // True when the engine folded v_rotation into W_v / W_o (EngineOptions::fold_v): V arrives rotated and neither
  // the cache write nor the decode kernel applies R_v. v_rotation keeps the matrices for the record.
  bool v_rotation_folded = false;
  // Quantized modes, per layer: the segment layout of the K / V pages (one 2-bit segment over the head = INT2;
  // bundle 1.1 per-layer spectral layouts otherwise, widths 0/1/2/4 on 16-dim boundaries).
  std::vector<std::vector<fmt::QuantSegment>> k_segments, v_segments;
  // What the quantized pages hold: Int (the segments above) or Fp8E4M3 (fp8 mode: fmt::Fp8PageGeometry pages; the
  // segments then read {0, d, 8} for the record).
  fmt::KvStorage quant_storage = fmt::KvStorage::Int;
  // oscar mode with bundle 1.2 error-feedback tables (issue #10), per layer as the bundle stores them: order
  // [num_kv_heads, d] and weights [num_kv_heads, d, d]; an empty entry (or an empty vector) = round to nearest. Only
  // whole-head INT2 tensors (resolve_cache_format refuses the rest), also in a segmented format, whose pages for
  // such a tensor are INT2 pages; their INT2 write runs kern::kv_write's error-feedback writer, bit-exact with
  // kv_write_ref.
  std::vector<std::vector<int32_t>> k_ef_order, v_ef_order;
  std::vector<std::vector<float>> k_ef_weights, v_ef_weights;
  bool ef_clip_feedback = false;  // fmt::Bundle::ef_clip_feedback
  // oscar mode with bundle 2.0 storage transforms (lib/calib/kv_transform.h), per layer; an empty entry = the
  // tensor is stored with the layer's one R above. The writers' per-KV-head matrices A [num_kv_heads, d, d] and the
  // keys' mean μ_K [num_kv_heads, d] (subtracted before A, bf16 windows included, so q·μ_K never enters a logit);
  // the decode kernel's per-KV-head A⁻ᵀ (q' = q·A_K⁻ᵀ, o = o'·A_V⁻¹). Not with fold_v.
  std::vector<std::vector<float>> k_transform, v_transform, k_mean, k_read, v_read;
  bool storage_transforms() const;  // some layer has one
  bool value_transforms() const;     // some layer stores V through its own A
  bool value_rotations() const;      // some layer rotates V by an R_v
  bool has_transform(int64_t layer, bool value) const;  // this tensor is stored through its own A
  // Bytes rt::Engine keeps on the device for this format, once per engine (not per sequence): the fp32 R of each
  // layer and tensor (unless a storage transform replaces it or R_v is folded), the transforms' A, A⁻ᵀ and μ_K, and
  // the error-feedback tables.
  int64_t device_bytes() const;
  int64_t key_table_context = 0;  // the positions 0..N-1 the K tables serve (calib::error_feedback_context); 0 = none
  bool error_feedback() const;    // some layer has a table
  bool fp8() const { return quant_storage == fmt::KvStorage::Fp8E4M3; }
  bool segmented() const;  // some layer stores integer segments other than whole-head INT2
};

struct KvCacheLayout;
// The cache shape of a format: quantized page bytes per layer when some layer is segmented.
KvCacheLayout cache_layout(const fmt::ModelConfig& cfg, const CacheFormat& format);

// The smallest head dim the decode kernels implement that holds `head_dim` (64, 128 or 256); throws
// oscar::Error(where, ...) above 256.
int64_t padded_cache_head_dim(int64_t head_dim, const std::string& where);

// Builds the format for `mode`. oscar needs `bundle` (already checked against the model with
// check_bundle_matches); its quantization must be what the kernels implement: integer segments on 16-dim
// boundaries of widths 0, 1, 2, 4 (whole-head INT2 or a per-layer spectral layout) for K and V, one rotation per
// layer (not per KV head). sink/recent override the windows when set. hadamard2 takes
// its rotations from `hadamard_seed` exactly as eval::CacheFormat does (eval::random_sign_hadamard, the same
// per-layer seeds), so the engine and the CPU simulation store the same codes.
// Every problem is an oscar::Error(where, ...).
CacheFormat resolve_cache_format(const fmt::ModelConfig& cfg, CacheMode mode, const fmt::Bundle* bundle,
                                 std::optional<int64_t> sink_tokens, std::optional<int64_t> recent_tokens,
                                 const std::string& where, uint64_t hadamard_seed = 0);

// KV-cache bytes of a format (`oscar info`), counted from the record layouts (fmt::RecordLayout: codes of every
// segment + one fp16 scale/zero pair per segment), per layer so that bundle 1.1 per-layer layouts count right.
struct KvFootprintRow {
  int64_t context = 0;
  double bf16_bytes = 0;    // every token bf16
  double stored_bytes = 0;  // the format: first sink and last recent tokens bf16, the rest quantized records
  // What rt::Engine's paged cache holds for one sequence of this length (KvPageTables): an INT2 page per logical
  // page past the sink (quantize-on-write) plus the live bf16 sink/window pages, whole 64-token pages. -1 when the
  // engine cannot run the format (layouts its kernels lack, head_dim outside 64/128/256 when quantized).
  double engine_bytes = -1;
};
struct KvFootprint {
  std::string mode;                 // "bf16", "int2", "hadamard2", "oscar"
  int64_t sink_tokens = 0, recent_tokens = 0;  // 0 / 0 for bf16
  double bf16_bytes_per_token = 0;   // K and V, all layers and KV heads
  double quant_bytes_per_token = 0;  // K and V records of a quantized token (bf16 mode: = bf16_bytes_per_token)
  double k_bits_per_element = 16, v_bits_per_element = 16;  // means over layers, fp16 scale/zero included
  std::vector<int64_t> k_record_bytes, v_record_bytes;       // per layer, one token of one KV head
  std::vector<std::string> k_layout, v_layout;               // per layer, e.g. "2b[0,128)" or "4b[0,32) 2b[32,128)"
  std::vector<KvFootprintRow> rows;                          // one per context
  int64_t engine_format_bytes = -1;  // CacheFormat::device_bytes (unfolded); -1 when the engine cannot run it
};
// mode "bf16", "int2", "hadamard2" or "oscar" (needs `bundle`; its per-layer layouts are used as stored).
// Windows: the bundle's (oscar) or the int2 defaults, unless overridden. oscar::Error(where, ...) on problems.
KvFootprint kv_footprint(const fmt::ModelConfig& cfg, CacheMode mode, const fmt::Bundle* bundle,
                         std::span<const int64_t> contexts, std::optional<int64_t> sink_tokens,
                         std::optional<int64_t> recent_tokens, const std::string& where);

// Throws oscar::Error(bundle_where, ...) naming both models (architecture, shapes, config sha256, attention
// weights sha256, whichever differ) when the bundle was calibrated on another checkpoint.
void check_bundle_matches(const fmt::Bundle& bundle, const fmt::ModelFingerprint& model,
                          const std::string& bundle_where, const std::string& model_where);

struct EngineOptions {
  CacheMode cache = CacheMode::Bf16;
  std::filesystem::path bundle;             // read for CacheMode::Oscar (unless a Bundle is passed to load)
  std::optional<int64_t> sink_tokens;       // window overrides (quantized modes)
  std::optional<int64_t> recent_tokens;
  size_t cache_budget_bytes = size_t{1} << 30;  // both pools together
  int64_t max_sequences = 8;                    // live sequences at once; sizes the bf16 window pool
  model::SamplingOptions sampling;              // temperature 0 = greedy; sequence s samples with seed + s
  bool keep_logits = false;                     // keep each sequence's last logits row (last_logits())
  bool fold_v = false;          // --fold-v: fold R_v into W_v / W_o at load (needs the engine's own DeviceModel)
  uint64_t hadamard_seed = 0;   // hadamard2's random signs (eval's --seed)
  // Run the prefill's cache writes on a side stream overlapping the forward (rt::PrefillLayerWriter; the cache is
  // bit-identical either way). Not a user option: tests and benchmarks set it to compare. On since the GPU suite
  // passed with it (2026-12-07, H100): kv_write_bench's Qwen3-8B 32K prefill with the EF writes costs +75.7 ms
  // overlapped vs +81.2 ms on the forward's stream (a low-priority stream finds few idle SMs beside the GEMMs).
  bool overlap_prefill_writes = true;
  // --ef-context: rebuild the bundle's error-feedback key tables for positions 0..N-1 at load (bundle 1.3 stores
  // their metric: calib::retarget_key_tables); 0 = the tables as stored.
  int64_t key_table_context = 0;
};

class Engine {
 public:
  // Loads the model (DeviceModel::load) and builds the cache. For CacheMode::Oscar the bundle comes from
  // `bundle` when given, else from options.bundle; either is refused unless its fingerprint matches the model
  // (calib::model_fingerprint of model_dir).
  // `shared_model`, when given, is used instead of uploading the weights again, so several engines (one per cache
  // format, as rt::evaluate_on_gpu runs them in lockstep) hold one copy of the weights; it must have been loaded
  // from model_dir. The engines then share its stream, so they must be driven from one host thread. fold_v with a
  // rotated V rewrites the weights, so it refuses a shared model.
  static std::unique_ptr<Engine> load(const std::filesystem::path& model_dir, const EngineOptions& options,
                                      const fmt::Bundle* bundle = nullptr,
                                      std::shared_ptr<DeviceModel> shared_model = nullptr);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  const fmt::ModelConfig& config() const;
  const CacheFormat& cache_format() const;
  const KvCache& cache() const;
  DeviceModel& model();

  // Rebuilds the error-feedback key tables for positions 0..positions-1 from the bundle's stored key metric and
  // uploads them (eval runs each context with its own tables). Only with no live sequence (the cached records were
  // rounded with the old tables). Throws oscar::Error when the format has no key tables or the bundle stores no
  // metric (format 1.2, calibrate --no-ef-key-metric). Same positions as now: nothing happens.
  void set_key_table_context(int64_t positions);
  // Whether set_key_table_context can work: the format has key tables and the bundle stores their metric.
  bool rebuilds_key_tables() const;

  // Prefills `prompt` (ids in the vocabulary, non-empty) as a new sequence and picks its first new token
  // (next_token). Throws oscar::Error when max_sequences are live or the cache has no room; nothing is kept then.
  int64_t add_sequence(std::span<const int32_t> prompt);
  // Prefills several prompts as new sequences in one packed forward (each attends only to itself; the GEMMs see
  // every prompt's tokens at once, which is what makes a batch of short prompts fast) and picks each one's first
  // new token. Returns their ids in prompt order; a sequence's id, and so its sampling seed, are what adding the
  // prompts one by one in that order would give. All or nothing: an empty prompt or an id outside the vocabulary
  // (named by the prompt's index), more than max_sequences live, or a cache without room for every prompt throws
  // oscar::Error and keeps none of them. The forward's scratch grows with the prompts' total tokens.
  std::vector<int64_t> add_sequences(std::span<const std::span<const int32_t>> prompts);
  std::vector<int64_t> add_sequences(const std::vector<std::vector<int32_t>>& prompts);

  struct StepToken {
    int64_t sequence = 0;
    int32_t token = 0;  // the token picked by this step (the next input)
  };
  // Feeds every live sequence its next_token() and picks the following one. All sequences advance or, when the
  // cache cannot hold one more token for each, none does (oscar::Error; free sequences and retry).
  std::vector<StepToken> step();

  void free_sequence(int64_t seq);
  std::vector<int64_t> sequences() const;  // live ids, ascending

  // The token the next step() feeds; set_next_token overrides it (teacher forcing, stop handling by callers).
  int32_t next_token(int64_t seq) const;
  void set_next_token(int64_t seq, int32_t token);
  // Prompt plus every token fed since (the ids whose K/V are in the cache).
  const std::vector<int32_t>& tokens(int64_t seq) const;
  // fp32 logits [vocab] of the last prefill/step of `seq`; requires options.keep_logits.
  std::span<const float> last_logits(int64_t seq) const;

  struct Impl;

 private:
  explicit Engine(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace oscar::rt
