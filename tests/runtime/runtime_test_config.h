// The model shape the engine-format tests resolve bundles against: only the attention geometry matters to
// rt::resolve_cache_format (4 query heads over `kv_heads` KV heads, hidden = 4 · head_dim), so the tests share it.
#pragma once

#include <cstdint>

#include "formats/model_config.h"

namespace oscar::rt {

inline fmt::ModelConfig test_attention_config(int64_t layers, int64_t kv_heads, int64_t head_dim) {
  fmt::ModelConfig c;
  c.num_layers = layers;
  c.num_heads = 4;
  c.num_kv_heads = kv_heads;
  c.head_dim = head_dim;
  c.hidden_size = 4 * head_dim;
  return c;
}

}  // namespace oscar::rt
