// KvCache's device pools (runtime/kv_cache.h). Both pools are one allocation each, sliced per layer and K/V, so
// a cache is two cudaMallocs whatever the model depth.
#include "formats/error.h"
#include "runtime/kv_cache.h"

namespace oscar::rt {

KvCache::KvCache(const KvCacheLayout& layout, const KvCachePlan& plan)
    : tables_(layout, plan.int2_pages, plan.bf16_pages) {
  const int64_t tensors = layout.num_layers * 2;
  if (layout.quantized && plan.int2_pages > 0) {
    // Per-layer page sizes (segmented layouts): each (layer, K/V) pool is pages x KV heads x its page bytes.
    size_t offset = 0;
    for (int64_t t = 0; t < tensors; ++t) {
      int2_pool_offset_.push_back(offset);
      offset += static_cast<size_t>(plan.int2_pages) * static_cast<size_t>(layout.num_kv_heads) *
                layout.quantized_page_bytes(t / 2, t % 2 == 1);
    }
    int2_ = DeviceBuffer(offset, "KV cache INT2 pool");
  }
  bf16_pool_bytes_ = layout.bf16_page_bytes() / static_cast<size_t>(tensors) * static_cast<size_t>(plan.bf16_pages);
  bf16_ = DeviceBuffer(bf16_pool_bytes_ * static_cast<size_t>(tensors), "KV cache bf16 pool");
}

uint8_t* KvCache::int2_pool(int64_t layer, bool value) const {
  if (int2_.empty()) return nullptr;
  return int2_.as<uint8_t>() + int2_pool_offset_[static_cast<size_t>(layer * 2 + (value ? 1 : 0))];
}

uint16_t* KvCache::bf16_pool(int64_t layer, bool value) const {
  return reinterpret_cast<uint16_t*>(bf16_.as<uint8_t>() +
                                     static_cast<size_t>(layer * 2 + (value ? 1 : 0)) * bf16_pool_bytes_);
}

}  // namespace oscar::rt
