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

}  // namespace oscar::fmt
