#pragma once
// The seams of the forward pass. Calibration statistics, golden dumps and debugging plug in as Observers;
// eval's cache simulation plugs in as an AttentionBackend. The forward knows nothing about either.
#include <cstdint>

namespace oscar::model {

// What one layer's attention sees for the tokens of one forward call. All tensors are fp32, row-major,
// [heads, num_tokens, head_dim], valid only during the callback.
struct AttentionInputs {
  int64_t layer = 0;
  int64_t num_tokens = 0;  // T: the new tokens of this call
  int64_t pos0 = 0;        // absolute position of the first new token
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  const float* q = nullptr;           // [num_heads, T, d]    after q-norm (Qwen3) and RoPE
  const float* k_pre_rope = nullptr;  // [num_kv_heads, T, d] after k-norm, before RoPE
  const float* k = nullptr;           // [num_kv_heads, T, d] after RoPE: what a KV cache stores
  const float* v = nullptr;           // [num_kv_heads, T, d]
};

class Observer {
 public:
  virtual ~Observer() = default;
  virtual void on_attention_inputs(const AttentionInputs& in) = 0;
};

// One layer's attention over the cache. The cache already holds the new tokens' K/V at [pos0, pos0 + T).
struct AttentionCall {
  int64_t layer = 0;
  int64_t num_tokens = 0;  // T queries, at positions pos0 .. pos0+T-1
  int64_t pos0 = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t cache_stride = 0;  // tokens between heads in k/v (the cache capacity)
  float scale = 0;           // 1/sqrt(head_dim)
  const float* q = nullptr;  // [num_heads, T, d]
  const float* k = nullptr;  // [num_kv_heads, cache_stride, d], keys 0 .. pos0+T-1 valid, post-RoPE
  const float* v = nullptr;  // [num_kv_heads, cache_stride, d]
  float* out = nullptr;      // [T, num_heads * d]  (the layout o_proj consumes)
};

// Causal GQA attention. The default is exact fp32 softmax attention; eval substitutes one that reads a
// simulated quantized cache.
class AttentionBackend {
 public:
  virtual ~AttentionBackend() = default;
  virtual void attend(const AttentionCall& call) = 0;
};

// Exact causal softmax attention in fp32 (the reference every other backend is compared with).
void exact_attention(const AttentionCall& call);

}  // namespace oscar::model
