#pragma once
// DeviceModel — the GPU forward pass (prefill) of the models the CPU reference supports (Llama, Mistral, Qwen2,
// Qwen3), for calibration and eval at real sizes.
//
// Numerics: weights are bf16 on the device; the residual stream is fp32; every GEMM takes bf16 operands and
// accumulates in fp32 (cuBLASLt); projections feeding norms or the residual (QKV, o_proj, down_proj, lm_head)
// come out in fp32, gate|up in bf16; attention runs on bf16 Q/K/V with fp32 softmax and accumulation.
// A batch is several sequences of different lengths packed back to back (cu_seqlens); each sequence starts at
// position 0 and attends only to itself.
#include <cstdint>
#include <filesystem>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "formats/model_config.h"
#include "kernels/attention_prefill/attention_prefill.h"
#include "kernels/common/status.h"
#include "runtime/device_buffer.h"
#include "runtime/lt_gemm.h"

namespace oscar::fmt {
class TensorStore;
}

namespace oscar::rt {

using Stream = kern::Stream;
class ForwardProfiler;  // runtime/forward_profiler.h

// Token ids of several sequences, concatenated; cu_seqlens[s] .. cu_seqlens[s+1] are sequence s's tokens.
struct PackedBatch {
  std::vector<int32_t> ids;
  std::vector<int32_t> cu_seqlens{0};

  static PackedBatch from_sequences(std::span<const std::vector<int32_t>> sequences);
  void add_sequence(std::span<const int32_t> sequence_ids);
  int64_t num_tokens() const { return static_cast<int64_t>(ids.size()); }
  int64_t num_sequences() const { return static_cast<int64_t>(cu_seqlens.size()) - 1; }
  int32_t max_seqlen() const;
};

// What one layer's attention sees, on the device. fp32 (unrounded) copies made only when an observer is set that
// wants them (DeviceObserver::wants_fp32); the bf16 K/V the attention reads always.
// Layout is token-major, the GEMM's natural one: element (token t, head h, dim i) is at (t * heads + h) * d + i.
// Valid only during the callback; work on `stream` (or synchronize it) before returning.
struct DeviceAttentionInputs {
  int64_t layer = 0;
  int64_t num_tokens = 0;  // T: all tokens of the packed batch
  int64_t num_sequences = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  const int32_t* cu_seqlens = nullptr;  // device [num_sequences + 1]
  const int32_t* positions = nullptr;   // device [T], position of each token within its sequence
  const float* q = nullptr;             // device [T, num_heads, d]    after q-norm (Qwen3) and RoPE
  const float* k_pre_rope = nullptr;    // device [T, num_kv_heads, d] after k-norm, before RoPE
  const float* k = nullptr;             // device [T, num_kv_heads, d] after RoPE: what a KV cache stores
  const float* v = nullptr;             // device [T, num_kv_heads, d]
  // The forward's own bf16 K (post-RoPE) and V [T, num_kv_heads, d]: the fp32 k / v above rounded to nearest even,
  // bit for bit what the attention kernel reads. The next layer's QKV prep overwrites them in `stream`'s order.
  const uint16_t* k_bf16 = nullptr;
  const uint16_t* v_bf16 = nullptr;
  Stream stream = nullptr;              // the forward's stream; the tensors are ready in its order
};

class DeviceObserver {
 public:
  virtual ~DeviceObserver() = default;
  virtual void on_attention_inputs(const DeviceAttentionInputs& in) = 0;
  // false: the observer reads only k_bf16 / v_bf16, and the forward neither allocates nor writes the fp32 copies
  // (q, k_pre_rope, k and v are null): at 32K tokens of an 8B model that is ~0.9 GiB of scratch and ~1 GB of
  // writes per layer it saves. A cache writer stores bf16 K/V anyway; calibration statistics want fp32.
  virtual bool wants_fp32() const { return true; }
};

enum class LogitsRows { All, LastPerSequence, None };
enum class LogitsType { F32, BF16 };

struct DeviceForwardOptions {
  DeviceObserver* observer = nullptr;
  LogitsRows rows = LogitsRows::All;
  LogitsType type = LogitsType::F32;
  // Benchmarks: which prefill attention kernel runs, and an optional per-op timer (runtime/forward_profiler.h).
  kern::PrefillKernel attention_kernel = kern::PrefillKernel::Auto;
  ForwardProfiler* profiler = nullptr;
  // How the GEMMs' cuBLASLt algorithms are chosen (runtime/lt_gemm.h). Heuristic is deterministic; Timed picks
  // the fastest of the heuristic's candidates per shape on first use (not bit-reproducible across processes).
  GemmSelection gemm_selection = GemmSelection::Heuristic;
  // Residual adds in the o_proj / down_proj GEMM epilogues (runtime/decoder_layer.h); false: the separate
  // add_rmsnorm kernel, for benchmarks that compare the two.
  bool residual_in_gemm = true;
  // The QKV projection's output in bf16 (as transformers' bias-free bf16 q/k/v_proj hand it on) instead of
  // fp32: half the bytes the GEMM writes and the RoPE kernel reads. Off by default (the CPU reference keeps fp32);
  // a forward with an fp32-observer (calibration) keeps fp32 either way.
  bool qkv_bf16 = false;
};

// The logits of the last forward, on the device: [rows, vocab] row-major (rows = T, or one per non-empty
// sequence for LastPerSequence, in sequence order).
// Valid until the next forward of the same model.
struct LogitsView {
  const void* data = nullptr;
  int64_t rows = 0;
  int64_t vocab = 0;
  LogitsType type = LogitsType::F32;
  Stream stream = nullptr;
  std::vector<float> to_host() const;  // waits for the forward, widens bf16
};

// Device pointers to a loaded model's weights, for executors other than forward() (the decode engine,
// runtime/engine.h). Layouts as forward() uses them; valid while the DeviceModel lives. bf16 bits unless noted.
struct DeviceLayerWeights {
  const uint16_t* input_norm = nullptr;           // [H]
  const uint16_t* post_attention_norm = nullptr;  // [H]
  const uint16_t* q_norm = nullptr;               // [d], null without Qwen3's q/k norm
  const uint16_t* k_norm = nullptr;               // [d]
  const uint16_t* qkv = nullptr;                  // [q_dim + 2 kv_dim, H]: q_proj, k_proj, v_proj stacked
  const float* qkv_bias = nullptr;                // fp32 [q_dim + 2 kv_dim], null without biases
  const uint16_t* o = nullptr;                    // [H, q_dim]
  const uint16_t* gate_up = nullptr;              // [2 I, H]: gate_proj, up_proj stacked
  const uint16_t* down = nullptr;                 // [H, I]
};
struct DeviceWeights {
  const uint16_t* embed = nullptr;       // [V, H]
  const uint16_t* lm_head = nullptr;     // [V, H] (the embedding when tied)
  const uint16_t* final_norm = nullptr;  // [H]
  const float* inv_freq = nullptr;       // fp32 [d / 2]
  std::vector<DeviceLayerWeights> layers;
};

// One decoder layer's weights in owned device buffers (layouts as DeviceLayerWeights). A resident DeviceModel holds
// one per layer; layer streaming (runtime/layer_stream.h) holds two and refills them with the hooks below.
struct DeviceLayerBuffers {
  DeviceBuffer input_norm, post_attention_norm, q_norm, k_norm, qkv, qkv_bias, o, gate_up, down;
  DeviceLayerWeights view() const;
  size_t bytes() const;
};

// The checks load() and random() apply to a configuration (dimensions, head_dim, no sliding window).
void validate_device_config(const fmt::ModelConfig& cfg, const std::string& where);

// Per-layer hooks for layer streaming. Each gives exactly the values DeviceModel::random / load put in a resident
// model (random() and load() are built on them), so a streamed layer equals the resident one bit for bit.
// Layer `layer` of DeviceModel::random(cfg, seed), generated on `stream` into `out` (buffers grown as needed).
void generate_random_layer(const fmt::ModelConfig& cfg, uint64_t seed, int64_t layer, DeviceLayerBuffers& out,
                           Stream stream);
// random()'s bf16 [V, H] token embedding, generated on `stream`.
DeviceBuffer generate_random_embedding(const fmt::ModelConfig& cfg, uint64_t seed, Stream stream);
// Layer `layer` of a checkpoint converted on the host as load() converts it (bf16; fp32 biases). Every missing or
// mis-shaped tensor is an oscar::Error naming the tensor and its file.
struct HostLayerWeights {
  std::vector<uint16_t> input_norm, post_attention_norm, q_norm, k_norm, qkv, o, gate_up, down;
  std::vector<float> qkv_bias;  // empty without biases
};
HostLayerWeights read_checkpoint_layer(const fmt::TensorStore& store, const fmt::ModelConfig& cfg, int64_t layer);
// load()'s bf16 [V, H] token embedding.
std::vector<uint16_t> read_checkpoint_embedding(const fmt::TensorStore& store, const fmt::ModelConfig& cfg);
// Enqueues the upload of `host` into `out` on `stream` (buffers grown as needed). Pageable host memory: the copy has
// left `host` when the call returns.
void upload_layer(const HostLayerWeights& host, DeviceLayerBuffers& out, Stream stream);

// Throws oscar::Error naming `flag` (e.g. "--device cuda") when this process can use no CUDA device (no GPU, no
// driver, a driver older than the runtime), so commands fail with one clear line before loading anything.
void require_cuda_device(const std::string& flag);

class DeviceModel {
 public:
  // DIR/config.json and the safetensors checkpoint in DIR, uploaded as bf16 from bf16/fp16/fp32 tensors. Every
  // missing or mis-shaped tensor is an oscar::Error naming the tensor and its file.
  static std::unique_ptr<DeviceModel> load(const std::filesystem::path& model_dir);
  // Deterministic random weights of any shape, generated on the device from a counter-based hash of
  // (seed, tensor, element), so an 8B model needs neither host RNG time nor host memory. Linear weights are
  // uniform with variance 1/fan_in, norm weights 1 ± 0.1, biases ±0.1: activations stay O(1) through depth.
  static std::unique_ptr<DeviceModel> random(const fmt::ModelConfig& cfg, uint64_t seed);

  ~DeviceModel();
  DeviceModel(const DeviceModel&) = delete;
  DeviceModel& operator=(const DeviceModel&) = delete;

  const fmt::ModelConfig& config() const;
  Stream stream() const;
  size_t weight_bytes() const;
  DeviceWeights weights() const;

  // Folds a V rotation into layer `layer`'s resident weights (runtime/device_model_fold.cu): per KV head h the
  // v_proj rows become R_gᵀ·W_v[h] and its bias b[h]·R_g, per query head j the o_proj columns W_o[:, j]·R_g (g: the
  // rotation group of h, or of j's KV head), so forward() then yields v·R_v and the same outputs in exact
  // arithmetic. `rotation` is host fp32 [groups, d, d] row-major (y = x·R), groups 1 or num_kv_heads. Computed in
  // fp32 from the bf16 weights on stream() (fixed summation order: deterministic), rounded back to bf16 (RNE).
  // Throws oscar::Error for a layer or rotation of the wrong size.
  void fold_value_rotation(int64_t layer, std::span<const float> rotation, int64_t groups);

  // Prefill of a packed batch. Enqueues on stream() and returns without waiting (observers and
  // LogitsView::to_host synchronize as they need). Throws oscar::Error for an id outside the vocabulary or a
  // malformed cu_seqlens. Positions past max_position_embeddings are not refused: RoPE extrapolates, as in
  // transformers. An empty batch gives 0 rows.
  LogitsView forward(const PackedBatch& batch, const DeviceForwardOptions& options = {});
  // Shapes whose GEMM algorithm was chosen by timing so far, and how many of them kept another than the
  // heuristic's first (DeviceForwardOptions::gemm_selection = Timed).
  int64_t gemm_timed_shapes() const;
  int64_t gemm_timed_changed() const;

  struct Impl;  // opaque; public only so the implementation's free helpers can name it

 private:
  explicit DeviceModel(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace oscar::rt
