#pragma once
// CPU reference forward of Llama / Mistral / Qwen2 / Qwen3, matched to transformers (fp32 eager) to 1e-3.
// Compute is fp32; weights stay as stored (bf16/fp16/fp32, memory-mapped) and are widened block by block inside
// the GEMMs, so an 8B checkpoint does not need 32 GB of RAM.
#include <cstdint>
#include <filesystem>
#include <memory>
#include <span>
#include <vector>

#include "formats/model_config.h"
#include "formats/safetensors.h"
#include "lib/model/observer.h"

namespace oscar::model {

// fp32 KV cache for incremental decoding: per layer K and V as [num_kv_heads, capacity, head_dim].
class KvCache {
 public:
  KvCache(const fmt::ModelConfig& cfg, int64_t capacity);
  int64_t length() const { return length_; }
  int64_t capacity() const { return capacity_; }
  int64_t num_layers() const { return static_cast<int64_t>(k_.size()); }
  float* k(int64_t layer) { return k_[layer].data(); }
  float* v(int64_t layer) { return v_[layer].data(); }
  const float* k(int64_t layer) const { return k_[layer].data(); }
  const float* v(int64_t layer) const { return v_[layer].data(); }
  void set_length(int64_t n) { length_ = n; }
  void clear() { length_ = 0; }

 private:
  int64_t capacity_ = 0;
  int64_t length_ = 0;
  std::vector<std::vector<float>> k_, v_;
};

struct ForwardOptions {
  Observer* observer = nullptr;          // sees each layer's Q/K/V
  AttentionBackend* attention = nullptr;  // nullptr: exact_attention
  bool last_logits_only = false;          // return [1, vocab] for the last token only (decode)
};

class CpuModel {
 public:
  // Loads DIR/config.json and the safetensors checkpoint in DIR; every missing or mis-shaped tensor is an
  // oscar::Error naming the tensor and the file.
  static std::unique_ptr<CpuModel> load(const std::filesystem::path& model_dir);
  // Random weights of the given shape, deterministic by seed (tests and benchmarks of shapes with no checkpoint).
  static std::unique_ptr<CpuModel> random(const fmt::ModelConfig& cfg, uint64_t seed);

  virtual ~CpuModel() = default;
  virtual const fmt::ModelConfig& config() const = 0;
  virtual const fmt::TensorStore* weights() const = 0;  // nullptr for random models

  // Runs `ids` at positions cache.length() .. cache.length()+T-1, appends their K/V to the cache and returns
  // logits [T, vocab] (or [1, vocab] with last_logits_only). Throws if the cache would overflow.
  virtual std::vector<float> forward(std::span<const int32_t> ids, KvCache& cache,
                                     const ForwardOptions& opt = {}) = 0;
};

// RoPE inverse frequencies exactly as transformers computes them (default / linear / llama3), length head_dim/2.
std::vector<float> rope_inv_freq(const fmt::ModelConfig& cfg);

}  // namespace oscar::model
