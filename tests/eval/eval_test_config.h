#pragma once
// The small model shape the cache-mode tests build formats for (2 layers, 4 query / 2 KV heads).
#include <cstdint>

#include "formats/model_config.h"

namespace oscar::eval::test {

inline fmt::ModelConfig small_config(int64_t head_dim) {
  fmt::ModelConfig cfg;
  cfg.hidden_size = 64;
  cfg.num_layers = 2;
  cfg.num_heads = 4;
  cfg.num_kv_heads = 2;
  cfg.head_dim = head_dim;
  cfg.vocab_size = 32;
  cfg.max_position_embeddings = 4096;
  return cfg;
}

}  // namespace oscar::eval::test
