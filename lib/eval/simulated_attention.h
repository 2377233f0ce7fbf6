#pragma once
// SimulatedCacheAttention — a model::AttentionBackend that reproduces what a decode-time quantized KV cache returns,
// also when a whole sequence runs in one teacher-forced forward call.
//
// Semantics (docs/eval.md): the query at position t reads key/value j
//   * from the bf16 copy when j < sink or j is in t's recent window (j > t - recent),
//   * from the quantized copy otherwise (for KIVI keys: once j's whole 32-token group has left the window),
// exactly as a decode cache that quantizes a token once, when it leaves the recent window, would hold it at step t.
// Every cached token is quantized once: the backend keeps per layer a bf16 copy and a quantized (dequantized fp32)
// copy of K and V and appends to both as the cache grows, so prefill + decode calls (generation) and one
// teacher-forced call give the same attention inputs. A call at pos0 == 0 starts a new sequence.
//
// Attention is scored against both copies and each (query, key) score is taken from the copy the mask names;
// P·V is split the same way by the value mask. Queries are processed in blocks with GEMMs; the work of a block does
// not depend on the thread count, so results are deterministic.
#include <cstdint>
#include <vector>

#include "lib/eval/cache_modes.h"
#include "lib/model/observer.h"

namespace oscar::eval {

class SimulatedCacheAttention : public model::AttentionBackend {
 public:
  // `format` must outlive the backend.
  explicit SimulatedCacheAttention(const CacheFormat& format);
  void attend(const model::AttentionCall& call) override;

  // Tokens of `layer` whose quantized K / V exist (tests: a token is quantized once and only when needed).
  int64_t quantized_keys(int64_t layer) const;
  int64_t quantized_values(int64_t layer) const;
  const CacheFormat& format() const { return format_; }

 private:
  struct LayerState {
    int64_t stride = 0;   // tokens per KV head in the copies (the model cache's capacity)
    int64_t length = 0;   // tokens copied in bf16
    int64_t k_quantized = 0, v_quantized = 0;  // tokens [0, n) have a quantized copy (sink tokens stay unused)
    std::vector<float> k_bf16, v_bf16, k_quant, v_quant;  // [num_kv_heads, stride, head_dim]
  };
  void update_copies(const model::AttentionCall& call, LayerState& s) const;

  const CacheFormat& format_;
  std::vector<LayerState> layers_;
};

}  // namespace oscar::eval
