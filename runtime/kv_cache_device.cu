// KvCache's device pools (runtime/kv_cache.h). Both pools are one allocation each, sliced per layer and K/V, so
// a cache is two cudaMallocs whatever the model depth.
#include "formats/error.h"
#include "runtime/kv_cache.h"

namespace oscar::rt {

KvCache::KvCache(const KvCacheLayout& layout, const KvCachePlan& plan)
    : tables_(layout, plan.int2_pages, plan.bf16_pages) {
  const int64_t tensors = layout.num_layers * 2;
  if (layout.quantized && plan.int2_pages > 0) {
    int2_pool_bytes_ = layout.int2_page_bytes() / static_cast<size_t>(tensors) * static_cast<size_t>(plan.int2_pages);
    int2_ = DeviceBuffer(int2_pool_bytes_ * static_cast<size_t>(tensors), "KV cache INT2 pool");
  }
  bf16_pool_bytes_ = layout.bf16_page_bytes() / static_cast<size_t>(tensors) * static_cast<size_t>(plan.bf16_pages);
  bf16_ = DeviceBuffer(bf16_pool_bytes_ * static_cast<size_t>(tensors), "KV cache bf16 pool");
}

uint8_t* KvCache::int2_pool(int64_t layer, bool value) const {
  if (int2_.empty()) return nullptr;
  return int2_.as<uint8_t>() + static_cast<size_t>(layer * 2 + (value ? 1 : 0)) * int2_pool_bytes_;
}

uint16_t* KvCache::bf16_pool(int64_t layer, bool value) const {
  return reinterpret_cast<uint16_t*>(bf16_.as<uint8_t>() +
                                     static_cast<size_t>(layer * 2 + (value ? 1 : 0)) * bf16_pool_bytes_);
}

}  // namespace oscar::rt
