// Links the installed oscar::runtime and plans an INT2 KV cache on the host (no GPU needed): a check that the
// package's CUDA/BLAS/TBB link interface is complete. Expected numbers are recomputed here from the layout.
#include <cstdio>

#include "formats/error.h"
#include "runtime/kv_cache.h"

int main() {
  try {
    oscar::rt::KvCacheLayout layout;
    layout.num_layers = 2;
    layout.num_kv_heads = 2;
    layout.head_dim = 128;
    const size_t budget = size_t{64} << 20;
    const auto plan = oscar::rt::plan_kv_cache(layout, budget, 1, "consumer");
    const size_t bytes = plan.int2_pages * layout.int2_page_bytes() + plan.bf16_pages * layout.bf16_page_bytes();
    std::printf("plan: int2_pages=%d bf16_pages=%d bytes=%zu\n", plan.int2_pages, plan.bf16_pages, plan.bytes);
    const bool ok = plan.int2_pages > 0 && plan.bytes == bytes && plan.bytes <= budget;
    std::printf("plan check: %s\n", ok ? "ok" : "INCONSISTENT");
    return ok ? 0 : 1;
  } catch (const oscar::Error& e) {
    std::fprintf(stderr, "plan_cache_consumer: error: %s\n", e.what());
    return 1;
  }
}
