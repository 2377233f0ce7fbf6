#include "runtime/kv_cache.h"

#include <algorithm>
#include <limits>

#include "formats/error.h"
#include "formats/kv_layout.h"

namespace oscar::rt {

// ---------------------------------------------------------------------------------------------------------------
// PageAllocator

PageAllocator::PageAllocator(int32_t capacity) {
  if (capacity < 0) throw Error("PageAllocator", "negative capacity");
  in_use_.assign(static_cast<size_t>(capacity), 0);
  free_.reserve(static_cast<size_t>(capacity));
  for (int32_t p = capacity - 1; p >= 0; --p) free_.push_back(p);
}

int32_t PageAllocator::allocate() {
  if (free_.empty()) return -1;
  const int32_t page = free_.back();
  free_.pop_back();
  in_use_[static_cast<size_t>(page)] = 1;
  return page;
}

void PageAllocator::release(int32_t page) {
  if (page < 0 || page >= capacity())
    throw Error("PageAllocator::release", "page " + std::to_string(page) + " outside [0, " +
                                              std::to_string(capacity()) + ")");
  if (!in_use_[static_cast<size_t>(page)])
    throw Error("PageAllocator::release", "page " + std::to_string(page) + " is not allocated");
  in_use_[static_cast<size_t>(page)] = 0;
  free_.push_back(page);
}

// ---------------------------------------------------------------------------------------------------------------
// Layout and budget

namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

size_t KvCacheLayout::quantized_page_bytes(int64_t layer, bool value) const {
  const std::vector<int32_t>& per_layer = value ? v_page_bytes : k_page_bytes;
  if (!per_layer.empty()) return static_cast<size_t>(per_layer.at(static_cast<size_t>(layer)));
  const fmt::Int2PageGeometry geo{static_cast<int32_t>(head_dim), static_cast<int32_t>(page_tokens)};
  return static_cast<size_t>(geo.page_bytes());
}

size_t KvCacheLayout::int2_page_bytes() const {
  size_t bytes = 0;
  for (int64_t l = 0; l < num_layers; ++l) bytes += quantized_page_bytes(l, false) + quantized_page_bytes(l, true);
  return static_cast<size_t>(num_kv_heads) * bytes;
}

size_t KvCacheLayout::bf16_page_bytes() const {
  const fmt::Bf16PageGeometry geo{static_cast<int32_t>(head_dim), static_cast<int32_t>(page_tokens)};
  return static_cast<size_t>(num_layers * 2 * num_kv_heads) * static_cast<size_t>(geo.page_bytes());
}

int64_t KvCacheLayout::bf16_pages_per_sequence() const {
  // The window [L - R, L) touches at most ceil(R / P) + 1 pages when it does not start on a page boundary.
  return ceil_div(sink_tokens, page_tokens) + ceil_div(recent_tokens, page_tokens) + 1;
}

void KvCacheLayout::validate(const std::string& where) const {
  if (num_layers <= 0 || num_kv_heads <= 0 || head_dim <= 0 || page_tokens <= 0)
    throw Error(where, "cache layers, KV heads, head_dim and page_tokens must be positive");
  if (head_dim % 16 != 0) throw Error(where, "cache head_dim must be a multiple of 16, got " + std::to_string(head_dim));
  if (quantized && (sink_tokens < 0 || recent_tokens < 0))
    throw Error(where, "sink and recent windows must be >= 0");
  for (const std::vector<int32_t>* per_layer : {&k_page_bytes, &v_page_bytes}) {
    if (per_layer->empty()) continue;
    if (static_cast<int64_t>(per_layer->size()) != num_layers)
      throw Error(where, "per-layer page bytes for " + std::to_string(per_layer->size()) + " layers, the cache has " +
                             std::to_string(num_layers));
    for (int32_t b : *per_layer)
      if (b <= 0 || b % 16 != 0)
        throw Error(where, "quantized page bytes " + std::to_string(b) + " must be a positive multiple of 16");
  }
}

KvCachePlan plan_kv_cache(const KvCacheLayout& layout, size_t budget_bytes, int64_t max_sequences,
                          const std::string& where) {
  layout.validate(where);
  if (max_sequences <= 0) throw Error(where, "max_sequences must be positive");
  const size_t bf16_bytes = layout.bf16_page_bytes();
  const size_t int2_bytes = layout.int2_page_bytes();
  auto to_pages = [&](size_t n, const char* pool) {
    if (n > static_cast<size_t>(std::numeric_limits<int32_t>::max()))
      throw Error(where, std::string("budget gives more than 2^31 ") + pool + " pages");
    return static_cast<int32_t>(n);
  };
  KvCachePlan plan;
  if (!layout.quantized) {
    plan.bf16_pages = to_pages(budget_bytes / bf16_bytes, "bf16");
    if (plan.bf16_pages < 1)
      throw Error(where, "budget of " + std::to_string(budget_bytes) + " bytes is less than one bf16 page (" +
                             std::to_string(bf16_bytes) + " bytes over all layers)");
  } else {
    const size_t per_sequence = static_cast<size_t>(layout.bf16_pages_per_sequence());
    const size_t needed_one = per_sequence * bf16_bytes + int2_bytes;
    if (budget_bytes < needed_one)
      throw Error(where, "budget of " + std::to_string(budget_bytes) + " bytes cannot hold one sequence's bf16 " +
                             "windows (" + std::to_string(per_sequence) + " pages of " + std::to_string(bf16_bytes) +
                             " bytes) plus one INT2 page (" + std::to_string(int2_bytes) + " bytes)");
    const size_t bf16_pages =
        std::min(per_sequence * static_cast<size_t>(max_sequences), (budget_bytes - int2_bytes) / bf16_bytes);
    plan.bf16_pages = to_pages(bf16_pages, "bf16");
    plan.int2_pages = to_pages((budget_bytes - bf16_pages * bf16_bytes) / int2_bytes, "INT2");
  }
  plan.bytes = static_cast<size_t>(plan.bf16_pages) * bf16_bytes + static_cast<size_t>(plan.int2_pages) * int2_bytes;
  return plan;
}

// ---------------------------------------------------------------------------------------------------------------
// KvPageTables

KvPageTables::KvPageTables(const KvCacheLayout& layout, int32_t int2_pages, int32_t bf16_pages)
    : layout_(layout), int2_(layout.quantized ? int2_pages : 0), bf16_(bf16_pages) {
  layout_.validate("KvPageTables");
}

int64_t KvPageTables::create_sequence() {
  const int64_t id = next_id_++;
  seqs_.emplace(id, Sequence{});
  return id;
}

const KvPageTables::Sequence& KvPageTables::get(int64_t seq, const std::string& where) const {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) throw Error(where, "unknown sequence id " + std::to_string(seq));
  return it->second;
}

void KvPageTables::free_sequence(int64_t seq) {
  const Sequence& s = get(seq, "KvPageTables::free_sequence");
  for (int32_t p : s.int2)
    if (p >= 0) int2_.release(p);
  for (int32_t p : s.bf16)
    if (p >= 0) bf16_.release(p);
  seqs_.erase(seq);
}

int64_t KvPageTables::length(int64_t seq) const { return get(seq, "KvPageTables::length").length; }

bool KvPageTables::bf16_page_needed(int64_t logical_page, int64_t length) const {
  if (!layout_.quantized) return true;
  const int64_t first = logical_page * layout_.page_tokens;
  const int64_t end = first + layout_.page_tokens;
  return first < layout_.sink_tokens || end > length - layout_.recent_tokens;
}

void KvPageTables::extend(std::span<const int64_t> seqs, std::span<const int64_t> new_lengths,
                          const std::string& where) {
  if (seqs.size() != new_lengths.size()) throw Error(where, "one new length per sequence");
  const int64_t P = layout_.page_tokens;
  const bool q = layout_.quantized;

  // Pass 1: count, change nothing.
  int64_t int2_needed = 0, bf16_needed = 0, bf16_released = 0;
  for (size_t i = 0; i < seqs.size(); ++i) {
    const Sequence& s = get(seqs[i], where);
    for (size_t j = 0; j < i; ++j)
      if (seqs[j] == seqs[i]) throw Error(where, "sequence " + std::to_string(seqs[i]) + " listed twice");
    const int64_t L0 = s.length, L1 = new_lengths[i];
    if (L1 <= L0)
      throw Error(where, "sequence " + std::to_string(seqs[i]) + ": new length " + std::to_string(L1) +
                             " is not past the current " + std::to_string(L0));
    if (ceil_div(L1, P) > std::numeric_limits<int32_t>::max() / P)
      throw Error(where, "sequence longer than the 32-bit slot range");
    for (int64_t page = 0; page < ceil_div(L1, P); ++page) {
      const int64_t first = std::max(page * P, L0), end = std::min((page + 1) * P, L1);
      const bool has_new = first < end;
      const bool had = page < static_cast<int64_t>(s.bf16.size()) && s.bf16[static_cast<size_t>(page)] >= 0;
      const bool had_int2 = page < static_cast<int64_t>(s.int2.size()) && s.int2[static_cast<size_t>(page)] >= 0;
      if (q && has_new && end > layout_.sink_tokens && !had_int2) ++int2_needed;
      // A new token is written bf16 when it is in the sink or inside the window at the new length.
      const bool new_bf16 = has_new && (!q || first < layout_.sink_tokens || end > L1 - layout_.recent_tokens);
      if (!had && new_bf16) ++bf16_needed;
      if (had && !bf16_page_needed(page, L1)) ++bf16_released;
    }
  }
  if (int2_needed > int2_.free_pages())
    throw Error(where, "KV cache out of INT2 pages: " + std::to_string(int2_needed) + " needed, " +
                           std::to_string(int2_.free_pages()) + " of " + std::to_string(int2_.capacity()) +
                           " free (raise the cache budget or free sequences)");
  if (bf16_needed > bf16_.free_pages() + bf16_released)
    throw Error(where, "KV cache out of bf16 pages: " + std::to_string(bf16_needed) + " needed, " +
                           std::to_string(bf16_.free_pages() + bf16_released) + " of " +
                           std::to_string(bf16_.capacity()) + " free (raise the cache budget or free sequences)");

  // Pass 2: releases first, so pages one sequence gives back serve another in the same call.
  for (size_t i = 0; i < seqs.size(); ++i) {
    Sequence& s = seqs_.at(seqs[i]);
    for (size_t page = 0; page < s.bf16.size(); ++page)
      if (s.bf16[page] >= 0 && !bf16_page_needed(static_cast<int64_t>(page), new_lengths[i])) {
        bf16_.release(s.bf16[page]);
        s.bf16[page] = -1;
      }
  }
  for (size_t i = 0; i < seqs.size(); ++i) {
    Sequence& s = seqs_.at(seqs[i]);
    const int64_t L0 = s.length, L1 = new_lengths[i];
    const auto pages = static_cast<size_t>(ceil_div(L1, P));
    s.int2.resize(pages, -1);
    s.bf16.resize(pages, -1);
    for (size_t page = static_cast<size_t>(L0 / P); page < pages; ++page) {
      const int64_t first = std::max(static_cast<int64_t>(page) * P, L0);
      const int64_t end = std::min(static_cast<int64_t>(page + 1) * P, L1);
      if (first >= end) continue;
      if (q && end > layout_.sink_tokens && s.int2[page] < 0) s.int2[page] = int2_.allocate();
      const bool new_bf16 = !q || first < layout_.sink_tokens || end > L1 - layout_.recent_tokens;
      if (new_bf16 && s.bf16[page] < 0) s.bf16[page] = bf16_.allocate();
    }
    s.length = L1;
  }
}

int32_t KvPageTables::bf16_slot(int64_t seq, int64_t t) const {
  const Sequence& s = get(seq, "KvPageTables::bf16_slot");
  if (t < 0 || t >= s.length) return -1;
  const bool q = layout_.quantized;
  if (q && t >= layout_.sink_tokens && t < s.length - layout_.recent_tokens) return -1;
  const int32_t page = s.bf16[static_cast<size_t>(t / layout_.page_tokens)];
  if (page < 0) return -1;
  return static_cast<int32_t>(page * layout_.page_tokens + t % layout_.page_tokens);
}

int32_t KvPageTables::int2_slot(int64_t seq, int64_t t) const {
  const Sequence& s = get(seq, "KvPageTables::int2_slot");
  if (!layout_.quantized || t < layout_.sink_tokens || t < 0 || t >= s.length) return -1;
  const int32_t page = s.int2[static_cast<size_t>(t / layout_.page_tokens)];
  if (page < 0) return -1;
  return static_cast<int32_t>(page * layout_.page_tokens + t % layout_.page_tokens);
}

int32_t KvPageTables::table_width(std::span<const int64_t> seqs) const {
  int64_t width = 1;
  for (int64_t seq : seqs)
    width = std::max(width, ceil_div(get(seq, "KvPageTables::table_width").length, layout_.page_tokens));
  return static_cast<int32_t>(width);
}

void KvPageTables::fill_tables(std::span<const int64_t> seqs, int32_t width, int32_t* int2_table,
                               int32_t* bf16_table) const {
  for (size_t i = 0; i < seqs.size(); ++i) {
    const Sequence& s = get(seqs[i], "KvPageTables::fill_tables");
    if (static_cast<int64_t>(s.bf16.size()) > width) throw Error("KvPageTables::fill_tables", "width too small");
    for (int32_t page = 0; page < width; ++page) {
      const size_t at = i * static_cast<size_t>(width) + static_cast<size_t>(page);
      const bool in = page < static_cast<int32_t>(s.bf16.size());
      int2_table[at] = in ? std::max(s.int2[static_cast<size_t>(page)], 0) : 0;
      bf16_table[at] = in ? std::max(s.bf16[static_cast<size_t>(page)], 0) : 0;
    }
  }
}

int64_t KvPageTables::int2_pages_of(int64_t seq) const {
  const Sequence& s = get(seq, "KvPageTables::int2_pages_of");
  return std::count_if(s.int2.begin(), s.int2.end(), [](int32_t p) { return p >= 0; });
}

int64_t KvPageTables::bf16_pages_of(int64_t seq) const {
  const Sequence& s = get(seq, "KvPageTables::bf16_pages_of");
  return std::count_if(s.bf16.begin(), s.bf16.end(), [](int32_t p) { return p >= 0; });
}

}  // namespace oscar::rt
