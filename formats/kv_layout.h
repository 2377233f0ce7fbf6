#pragma once
// Byte layouts of quantized KV-cache records and pages. Shared by host code (reference quantizer, runtime, eval)
// and device code (kernels/), so it includes nothing from CUDA and every helper is constexpr/inline.
//
// Code packing (all Int bit widths): within a segment, the code of rotated dim j sits at bit offset j*bits of a
// little-endian bitstream that starts on a byte boundary. For INT2 this means dim j is in byte j/4 at bits
// 2*(j%4), so one uint32 holds 16 consecutive dims and one 128-bit load holds 64. We chose the plain bitstream over
// the published "dims i, d/4+i, d/2+i, 3d/4+i in byte i" interleave because it is the same rule for 1..8 bits
// and a lane that owns a contiguous dim range (the decode kernel's split of the head) unpacks its codes from one
// aligned word with shifts only.
//
// INT2 record of one token and one KV head (head_dim d): d/4 code bytes, then fp16 scale, then fp16 zero
// (= 2.25 bits/elem at d = 128). In a page the records are stored structure-of-arrays: all code rows first, then
// all (scale, zero) pairs, so code rows stay 16-byte aligned for vector loads (a 36-byte AoS record would not be).
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "formats/kv_quant_spec.h"

#if defined(__CUDACC__)
#define OSCAR_HD __host__ __device__
#else
#define OSCAR_HD
#endif

namespace oscar::fmt {

// Tokens per cache page. 64 keeps a page of one KV head (d = 128) at 2304 bytes for INT2 and 16 KiB for bf16,
// and the split-K granularity of the decode kernel is whole pages.
inline constexpr int32_t kKvPageTokens = 64;

// Bytes of packed codes for `count` values of `bits` bits (a segment starts on a byte boundary).
OSCAR_HD constexpr int32_t packed_bytes(int32_t count, int32_t bits) { return (count * bits + 7) / 8; }

// The logical INT2 record (what pack/unpack produce for one head vector); pages store it split, see Int2Page.
template <int HeadDim>
struct Int2Record {
  static_assert(HeadDim % 16 == 0, "INT2 rows are whole uint32 words of 16 codes");
  uint8_t codes[HeadDim / 4];
  uint16_t scale_f16;
  uint16_t zero_f16;
};
static_assert(sizeof(Int2Record<64>) == 20);
static_assert(sizeof(Int2Record<128>) == 36);
static_assert(sizeof(Int2Record<256>) == 68);
static_assert(sizeof(Int2Record<128>) * 8 == 288, "2.25 bits per element at head_dim 128");

// One page of one KV head in INT2: [page_tokens][d/4] code rows, then [page_tokens] (scale, zero) fp16 pairs.
struct Int2PageGeometry {
  int32_t head_dim = 128;
  int32_t page_tokens = kKvPageTokens;
  OSCAR_HD constexpr int32_t code_row_bytes() const { return head_dim / 4; }
  OSCAR_HD constexpr int32_t params_offset() const { return page_tokens * code_row_bytes(); }
  OSCAR_HD constexpr int32_t page_bytes() const { return params_offset() + page_tokens * 4; }
};
static_assert(Int2PageGeometry{128, 64}.page_bytes() == 2304);
static_assert(Int2PageGeometry{64, 64}.params_offset() % 16 == 0);
static_assert(Int2PageGeometry{128, 64}.page_bytes() % 16 == 0, "pages keep 16-byte alignment of the pool");

// One page of one KV head in bf16: [page_tokens][d] rotated values.
struct Bf16PageGeometry {
  int32_t head_dim = 128;
  int32_t page_tokens = kKvPageTokens;
  OSCAR_HD constexpr int32_t page_bytes() const { return page_tokens * head_dim * 2; }
};

// One page of one KV head in FP8 (KvStorage::Fp8E4M3, the eval baseline): [page_tokens][d] e4m3 code rows, then
// [page_tokens] fp16 scales (value = e4m3(code) * scale). SoA like Int2PageGeometry: a d-byte row is a whole
// number of 16-byte vectors, and the scale array starts on a 16-byte boundary (page_tokens * d, d % 16 == 0).
struct Fp8PageGeometry {
  int32_t head_dim = 128;
  int32_t page_tokens = kKvPageTokens;
  OSCAR_HD constexpr int32_t code_row_bytes() const { return head_dim; }
  OSCAR_HD constexpr int32_t scales_offset() const { return page_tokens * head_dim; }
  OSCAR_HD constexpr int32_t page_bytes() const { return scales_offset() + page_tokens * 2; }
};
static_assert(Fp8PageGeometry{128, 64}.page_bytes() == 8320, "8.125 bits per element at head_dim 128");
static_assert(Fp8PageGeometry{64, 64}.scales_offset() % 16 == 0 && Fp8PageGeometry{64, 16}.page_bytes() % 16 == 0);
static_assert(Fp8PageGeometry{256, 64}.page_bytes() % 16 == 0, "pages keep 16-byte alignment of the pool");

// Pools hold pages of all KV heads of a layer: page p of KV head h starts at (p * num_kv_heads + h) * page_bytes,
// so the heads of one logical page are adjacent and one page id serves every head (one page table per sequence).
OSCAR_HD constexpr size_t page_block_offset(int32_t page, int32_t kv_head, int32_t num_kv_heads, int32_t page_bytes) {
  return (static_cast<size_t>(page) * num_kv_heads + kv_head) * static_cast<size_t>(page_bytes);
}

// A token of a sequence of length `seq_len` is kept in bf16 when it is one of the first `sink` tokens or one of
// the last `recent` ones; all others are quantized.
OSCAR_HD constexpr bool is_high_precision_token(int64_t t, int64_t seq_len, int64_t sink, int64_t recent) {
  return t < sink || t >= seq_len - recent;
}

// The general (segmented) record of a TensorQuantSpec: codes of every segment back to back (each segment starts
// on a byte boundary), then one fp16 (scale, zero) pair per segment with bits > 0. Fp8E4M3: head_dim e4m3 bytes
// then one fp16 scale. BF16: head_dim bf16 values.
struct RecordSegment {
  int32_t begin = 0;
  int32_t end = 0;
  int32_t bits = 2;
  int32_t code_offset = 0;  // byte offset of this segment's codes in the record
  int32_t code_bytes = 0;
  int32_t param_index = -1;  // index of its (scale, zero) pair; -1 for a dropped (0-bit) segment
};

struct RecordLayout {
  KvStorage storage = KvStorage::Int;
  int32_t head_dim = 0;
  std::vector<RecordSegment> segments;
  int32_t code_bytes = 0;    // all codes
  int32_t param_count = 0;   // fp16 values after the codes
  int32_t record_bytes() const { return code_bytes + 2 * param_count; }

  // Validates `spec` (throws oscar::Error(where, ...)) and lays it out for `head_dim`.
  static RecordLayout from_spec(const TensorQuantSpec& spec, int64_t head_dim, const std::string& where);
};


// Pages of a segmented record (per-layer spectral layouts; whole-head INT2 is the one-segment case). SoA like
// Int2PageGeometry, one level finer: the codes of segment s of every token of the page form one region
// [page_tokens][seg_code_bytes[s]] (regions in segment order, region s at page_tokens * seg_code_offset[s]), then
// [page_tokens][param_pairs] fp16 (scale, zero) pairs. Each token's bits inside a region are exactly the record's
// bitstream for that segment (formats/kv_layout.h rules above), so a record is recovered by concatenating the
// token's rows. Splitting by segment keeps every 16-dim block of a width-w segment on a 2w-byte boundary (a whole
// aligned word for the decode kernel), which a token-major record row would not (a 1-bit segment shifts the rest
// by 2 bytes). With one 2-bit segment over the head the bytes are identical to Int2PageGeometry.
inline constexpr int32_t kMaxPageSegments = 16;

struct SegmentedPageGeometry {
  int32_t head_dim = 0;
  int32_t page_tokens = kKvPageTokens;
  int32_t num_segments = 0;
  int32_t code_bytes = 0;   // codes of one record (all segments)
  int32_t param_pairs = 0;  // (scale, zero) pairs of one record: segments with bits > 0
  int32_t seg_begin[kMaxPageSegments] = {};
  int32_t seg_end[kMaxPageSegments] = {};
  int32_t seg_bits[kMaxPageSegments] = {};
  int32_t seg_code_offset[kMaxPageSegments] = {};  // in the record; its region starts at page_tokens times this
  int32_t seg_code_bytes[kMaxPageSegments] = {};
  int32_t seg_param[kMaxPageSegments] = {};  // pair index, -1 for a 0-bit segment

  OSCAR_HD constexpr int32_t record_bytes() const { return code_bytes + 4 * param_pairs; }
  OSCAR_HD constexpr int32_t page_bytes() const { return page_tokens * record_bytes(); }
  OSCAR_HD constexpr int32_t code_row_offset(int32_t s, int32_t token) const {
    return page_tokens * seg_code_offset[s] + token * seg_code_bytes[s];
  }
  OSCAR_HD constexpr int32_t params_offset() const { return page_tokens * code_bytes; }
  OSCAR_HD constexpr int32_t param_offset(int32_t token, int32_t pair) const {
    return params_offset() + (token * param_pairs + pair) * 4;
  }
  // One 2-bit segment over the whole head: the pages are byte-identical to fmt::Int2PageGeometry's, so the INT2
  // kernels read and write them (decode, and the engine's writer with error-feedback tables).
  OSCAR_HD constexpr bool whole_head_int2() const { return num_segments == 1 && seg_bits[0] == 2; }
  // True when every segment starts and ends on a 16-dim boundary (what the decode kernel takes).
  OSCAR_HD constexpr bool blocks_of_16() const {
    for (int32_t s = 0; s < num_segments; ++s)
      if (seg_begin[s] % 16 != 0 || seg_end[s] % 16 != 0) return false;
    return true;
  }
};

// Lays out `n` segments that tile [0, head_dim) (validated by the caller, e.g. RecordLayout::from_spec); returns
// num_segments = 0 when n exceeds kMaxPageSegments.
constexpr SegmentedPageGeometry segmented_page_geometry(const QuantSegment* segs, int32_t n, int32_t head_dim,
                                                        int32_t page_tokens) {
  SegmentedPageGeometry g;
  g.head_dim = head_dim;
  g.page_tokens = page_tokens;
  if (n <= 0 || n > kMaxPageSegments) return g;
  g.num_segments = n;
  for (int32_t s = 0; s < n; ++s) {
    g.seg_begin[s] = segs[s].begin;
    g.seg_end[s] = segs[s].end;
    g.seg_bits[s] = segs[s].bits;
    g.seg_code_offset[s] = g.code_bytes;
    g.seg_code_bytes[s] = packed_bytes(segs[s].end - segs[s].begin, segs[s].bits);
    g.seg_param[s] = segs[s].bits > 0 ? g.param_pairs++ : -1;
    g.code_bytes += g.seg_code_bytes[s];
  }
  return g;
}

inline SegmentedPageGeometry segmented_page_geometry(const std::vector<QuantSegment>& segs, int32_t head_dim,
                                                     int32_t page_tokens) {
  return segmented_page_geometry(segs.data(), static_cast<int32_t>(segs.size()), head_dim, page_tokens);
}

namespace detail {
inline constexpr QuantSegment kInt2Whole128[] = {{0, 128, 2}};
inline constexpr QuantSegment kSpectral128[] = {{0, 48, 4}, {48, 112, 2}, {112, 128, 0}};
inline constexpr QuantSegment kOneBit64[] = {{0, 16, 1}, {16, 64, 4}};
}  // namespace detail
// One 2-bit segment over the head is byte-identical to the INT2 page.
static_assert(segmented_page_geometry(detail::kInt2Whole128, 1, 128, 64).page_bytes() ==
              Int2PageGeometry{128, 64}.page_bytes());
static_assert(segmented_page_geometry(detail::kInt2Whole128, 1, 128, 64).param_offset(5, 0) ==
              Int2PageGeometry{128, 64}.params_offset() + 5 * 4);
static_assert(segmented_page_geometry(detail::kInt2Whole128, 1, 128, 64).code_row_offset(0, 7) ==
              7 * Int2PageGeometry{128, 64}.code_row_bytes());
// K 48x4b + 64x2b + 16x0b: 24 + 16 code bytes, two pairs = 48 bytes per record (3 bits per element).
static_assert(segmented_page_geometry(detail::kSpectral128, 3, 128, 64).record_bytes() == 48);
static_assert(segmented_page_geometry(detail::kSpectral128, 3, 128, 64).code_row_offset(1, 0) == 64 * 24);
static_assert(segmented_page_geometry(detail::kSpectral128, 3, 128, 64).seg_param[2] == -1);
// A 1-bit segment first: the 4-bit region still starts on a 32-byte boundary (64 tokens x 2 bytes).
static_assert(segmented_page_geometry(detail::kOneBit64, 2, 64, 64).code_row_offset(1, 0) % 32 == 0);
static_assert(segmented_page_geometry(detail::kOneBit64, 2, 64, 64).page_bytes() % 16 == 0);

}  // namespace oscar::fmt
