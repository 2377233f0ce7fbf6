#pragma once
// The paged KV cache of the decode engine (runtime/engine.h). Storage follows formats/kv_layout.h: two pools of
// pages, INT2 pages (codes + fp16 scale/zero) and bf16 pages, both in the rotated basis of the layer.
//
// Page ids. One page id names the same logical page in every layer and for both K and V (each layer's K and V
// pools have one slot per id), so a sequence has ONE INT2 page table and ONE bf16 page table for the whole model,
// and the decode kernel gets the same tables for every layer. The memory cost of one id is therefore
// num_layers x 2 (K, V) x num_kv_heads x the page geometry's bytes.
//
// What is stored where (quantized modes, sink S, recent window R, sequence length L):
//  * every token t >= S is quantized to INT2 the moment it is written ("quantize on write"), also while it is
//    still inside the recent window;
//  * tokens t < S, and tokens written while inside the window (t >= L - R at write time), are also written bf16;
//  * a logical page's bf16 page is released as soon as none of its tokens is in the sink or the window.
// Why not keep the window in bf16 only and flush tokens to INT2 in batches as they leave it: the decode kernel
// picks bf16 or INT2 per token from the CURRENT length (fmt::is_high_precision_token), so a token needs its INT2
// copy on the very step it leaves the window, and sequences of a batch leave at different steps. Quantizing on
// write satisfies that with no extra launch, quantizes x·R from the unrounded rotation (exactly
// calib::quantize_int2 of the bf16 input, one rounding instead of bf16-then-INT2), and costs 2.25 bits per element
// for the at most R + page_tokens window tokens, 14% of their bf16 bytes. The batching that remains is the page
// release: bf16 memory is given back a whole page at a time.
// In the bf16 mode (no quantization) every token is written bf16 and no INT2 pool exists.
//
// The host side (PageAllocator, KvPageTables, plan_kv_cache) is plain C++ and tested without a GPU; KvCache adds
// the device pools (runtime/kv_cache_device.cu).
#include <cstddef>
#include <cstdint>
#include <map>
#include <span>
#include <string>
#include <vector>

#include "runtime/device_buffer.h"

namespace oscar::rt {

// A free list of page ids [0, capacity). Deterministic: a fresh allocator hands out 0, 1, 2, ...; released ids
// are reused last-released-first (the page most likely still in L2).
class PageAllocator {
 public:
  explicit PageAllocator(int32_t capacity = 0);
  int32_t capacity() const { return static_cast<int32_t>(in_use_.size()); }
  int32_t free_pages() const { return static_cast<int32_t>(free_.size()); }
  int32_t used_pages() const { return capacity() - free_pages(); }
  // A free page id, or -1 when every page is in use.
  int32_t allocate();
  // Throws oscar::Error for an id outside [0, capacity) or one that is not allocated (double release).
  void release(int32_t page);

 private:
  std::vector<int32_t> free_;    // stack: back() is handed out next
  std::vector<uint8_t> in_use_;  // per page id
};

// Shape and policy of a cache.
struct KvCacheLayout {
  int64_t num_layers = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 128;     // of the cache (runtime/engine.h pads smaller model head dims to a kernel size)
  int64_t page_tokens = 64;   // fmt::kKvPageTokens
  bool quantized = true;      // false: bf16 only, no INT2 pool, sink/recent unused
  int64_t sink_tokens = 64;
  int64_t recent_tokens = 256;
  // Segmented (spectral) layers: bytes of one quantized page of one KV head per layer, K and V
  // (fmt::SegmentedPageGeometry::page_bytes). Empty: every layer's quantized pages are Int2PageGeometry.
  std::vector<int32_t> k_page_bytes, v_page_bytes;

  // Bytes of one quantized page of one KV head of `layer`, K (value = false) or V.
  size_t quantized_page_bytes(int64_t layer, bool value) const;
  // Bytes of one page id over all layers, K and V, all KV heads.
  size_t int2_page_bytes() const;
  size_t bf16_page_bytes() const;
  // Most bf16 pages one sequence holds at any time in a quantized mode: the sink's pages and the window's.
  int64_t bf16_pages_per_sequence() const;
  // Throws oscar::Error(where, ...) for non-positive sizes or negative windows.
  void validate(const std::string& where) const;
};

// How a memory budget becomes pages.
struct KvCachePlan {
  int32_t int2_pages = 0;
  int32_t bf16_pages = 0;
  size_t bytes = 0;  // of both pools: what KvCache allocates, <= the budget
};

// bf16 mode: the whole budget in bf16 pages. Quantized modes: bf16 pages for the windows of `max_sequences`
// sequences (fewer if the budget is smaller), the rest INT2 pages. Throws oscar::Error(where, ...) naming the
// budget when it cannot hold one sequence's windows plus one INT2 page (bf16 mode: one page), or when more than
// 2^31 pages would result.
KvCachePlan plan_kv_cache(const KvCacheLayout& layout, size_t budget_bytes, int64_t max_sequences,
                          const std::string& where);

// Host bookkeeping: sequences, their lengths and page tables, the two allocators.
class KvPageTables {
 public:
  KvPageTables(const KvCacheLayout& layout, int32_t int2_pages, int32_t bf16_pages);

  const KvCacheLayout& layout() const { return layout_; }
  const PageAllocator& int2_pages() const { return int2_; }
  const PageAllocator& bf16_pages() const { return bf16_; }

  // A new empty sequence; ids are never reused.
  int64_t create_sequence();
  // Releases every page of the sequence. Throws oscar::Error for an unknown id.
  void free_sequence(int64_t seq);
  bool contains(int64_t seq) const { return seqs_.count(seq) != 0; }
  int64_t length(int64_t seq) const;  // tokens written (or being written) so far
  int64_t num_sequences() const { return static_cast<int64_t>(seqs_.size()); }

  // Grows each listed sequence to new_lengths[i] tokens: allocates the pages that tokens [length, new_length)
  // are written to and releases bf16 pages that have left the window at the new length. All or nothing: when
  // a pool cannot supply the pages (counting the pages this call releases), throws oscar::Error(where, ...)
  // saying which pool and how many pages, and changes nothing.
  void extend(std::span<const int64_t> seqs, std::span<const int64_t> new_lengths, const std::string& where);

  // Where token t of `seq` is written: page * page_tokens + offset, or -1 when this token has no copy in that
  // pool (the slots array kern::kv_write takes). Valid for tokens of the last extend.
  int32_t bf16_slot(int64_t seq, int64_t t) const;
  int32_t int2_slot(int64_t seq, int64_t t) const;

  // Row length of the page tables for these sequences: their largest logical page count (at least 1).
  int32_t table_width(std::span<const int64_t> seqs) const;
  // The decode kernel's tables, [seqs.size(), width] row-major. Logical pages without a page in that pool
  // (never read by the kernel at the current lengths) hold 0 rather than -1, so even a wrong read stays inside
  // the pool.
  void fill_tables(std::span<const int64_t> seqs, int32_t width, int32_t* int2_table, int32_t* bf16_table) const;

  // Pages of one pool referenced by `seq` (tests, statistics).
  int64_t int2_pages_of(int64_t seq) const;
  int64_t bf16_pages_of(int64_t seq) const;

 private:
  struct Sequence {
    int64_t length = 0;
    std::vector<int32_t> int2;  // per logical page: page id or -1
    std::vector<int32_t> bf16;
  };
  const Sequence& get(int64_t seq, const std::string& where) const;
  bool bf16_page_needed(int64_t logical_page, int64_t length) const;

  KvCacheLayout layout_;
  PageAllocator int2_, bf16_;
  std::map<int64_t, Sequence> seqs_;
  int64_t next_id_ = 0;
};

// The device pools plus their bookkeeping. Pool of layer l, tensor K (value = false) or V: pages
// [page id][kv head][geometry], page_block_offset in formats/kv_layout.h.
class KvCache {
 public:
  // Allocates both pools on the current device (throws oscar::Error when out of memory).
  KvCache(const KvCacheLayout& layout, const KvCachePlan& plan);

  KvPageTables& tables() { return tables_; }
  const KvPageTables& tables() const { return tables_; }
  const KvCacheLayout& layout() const { return tables_.layout(); }
  size_t device_bytes() const { return int2_.bytes() + bf16_.bytes(); }

  uint8_t* int2_pool(int64_t layer, bool value) const;    // null in the bf16 mode
  uint16_t* bf16_pool(int64_t layer, bool value) const;

 private:
  KvPageTables tables_;
  DeviceBuffer int2_, bf16_;
  std::vector<size_t> int2_pool_offset_;  // per layer x {K, V}: byte offset of its pool in int2_
  size_t bf16_pool_bytes_ = 0;
};

}  // namespace oscar::rt
