#include "formats/kv_quant_spec.h"

#include <fmt/format.h>

#include <cmath>

#include "formats/error.h"
#include "formats/kv_layout.h"

namespace oscar::fmt {
namespace {

bool supported_int_bits(int32_t bits) { return bits == 0 || (bits >= 1 && bits <= 4) || bits == 8; }

// Dims covered by the segments (Fp8/BF16 specs carry one segment [0, head_dim) to say how wide the head is).
int32_t covered_dims(const TensorQuantSpec& spec) { return spec.segments.empty() ? 0 : spec.segments.back().end; }

TensorQuantSpec whole_head(int64_t head_dim, KvStorage storage, int32_t bits, float clip_ratio) {
  TensorQuantSpec t;
  t.storage = storage;
  t.segments = {QuantSegment{0, static_cast<int32_t>(head_dim), bits}};
  t.clip_ratio = clip_ratio;
  return t;
}

void validate_tensor(const TensorQuantSpec& t, int64_t head_dim, const std::string& where) {
  if (!(t.clip_ratio > 0.0f && t.clip_ratio <= 1.0f))
    throw Error(where, ::fmt::format("clip_ratio {} is outside (0, 1]", t.clip_ratio));
  if (t.storage == KvStorage::BF16 || t.storage == KvStorage::Fp8E4M3) {
    if (!t.segments.empty() && (t.segments.size() != 1 || t.segments[0].begin != 0 || t.segments[0].end != head_dim))
      throw Error(where, "bf16/fp8 storage takes no segments other than one covering the whole head");
    return;
  }
  if (t.segments.empty()) throw Error(where, "integer storage needs at least one segment");
  int64_t next = 0;
  for (size_t i = 0; i < t.segments.size(); ++i) {
    const auto& s = t.segments[i];
    if (s.begin != next || s.end <= s.begin)
      throw Error(where, ::fmt::format("segment {} [{}, {}) does not continue the tiling at dim {}", i, s.begin, s.end,
                                       next));
    if (!supported_int_bits(s.bits))
      throw Error(where, ::fmt::format("segment {} has unsupported bit width {} (0, 1, 2, 3, 4, 8)", i, s.bits));
    next = s.end;
  }
  if (next != head_dim)
    throw Error(where, ::fmt::format("segments cover [0, {}) but head_dim is {}", next, head_dim));
}

}  // namespace

double TensorQuantSpec::bits_per_element(int64_t head_dim) const {
  if (head_dim <= 0) return 0.0;
  switch (storage) {
    case KvStorage::BF16: return 16.0;
    case KvStorage::Fp8E4M3: return 8.0 + 16.0 / static_cast<double>(head_dim);  // fp16 scale per head vector
    case KvStorage::Int: break;
  }
  double bits = 0.0;
  for (const auto& s : segments)
    if (s.bits > 0) bits += static_cast<double>(s.end - s.begin) * s.bits + 32.0;
  return bits / static_cast<double>(head_dim);
}

int32_t TensorQuantSpec::packed_code_bytes() const {
  switch (storage) {
    case KvStorage::BF16: return 2 * covered_dims(*this);
    case KvStorage::Fp8E4M3: return covered_dims(*this);
    case KvStorage::Int: break;
  }
  int32_t bytes = 0;
  for (const auto& s : segments) bytes += packed_bytes(s.end - s.begin, s.bits);
  return bytes;
}

KvQuantSpec KvQuantSpec::int2_default(int64_t head_dim) {
  KvQuantSpec spec;
  spec.head_dim = head_dim;
  spec.k = whole_head(head_dim, KvStorage::Int, 2, 0.96f);
  spec.v = whole_head(head_dim, KvStorage::Int, 2, 0.92f);
  spec.sink_tokens = 64;
  spec.recent_tokens = 256;
  return spec;
}

// Keeps the sink/recent windows of the struct defaults, so a uniform baseline differs from OSCAR only in rotation
// and clipping.
KvQuantSpec KvQuantSpec::uniform(int64_t head_dim, int32_t bits) {
  KvQuantSpec spec;
  spec.head_dim = head_dim;
  spec.k = whole_head(head_dim, KvStorage::Int, bits, 1.0f);
  spec.v = whole_head(head_dim, KvStorage::Int, bits, 1.0f);
  return spec;
}

void KvQuantSpec::validate(const std::string& where) const {
  if (head_dim <= 0) throw Error(where, ::fmt::format("head_dim {} must be positive", head_dim));
  if (sink_tokens < 0 || recent_tokens < 0)
    throw Error(where, ::fmt::format("sink_tokens {} / recent_tokens {} must be >= 0", sink_tokens, recent_tokens));
  validate_tensor(k, head_dim, where + " (k)");
  validate_tensor(v, head_dim, where + " (v)");
}

RecordLayout RecordLayout::from_spec(const TensorQuantSpec& spec, int64_t head_dim, const std::string& where) {
  validate_tensor(spec, head_dim, where);
  RecordLayout layout;
  layout.storage = spec.storage;
  layout.head_dim = static_cast<int32_t>(head_dim);
  if (spec.storage == KvStorage::BF16) {
    layout.code_bytes = 2 * layout.head_dim;
    return layout;
  }
  if (spec.storage == KvStorage::Fp8E4M3) {
    layout.code_bytes = layout.head_dim;
    layout.param_count = 1;
    return layout;
  }
  int32_t offset = 0;
  int32_t pairs = 0;
  for (const auto& s : spec.segments) {
    RecordSegment r;
    r.begin = s.begin;
    r.end = s.end;
    r.bits = s.bits;
    r.code_offset = offset;
    r.code_bytes = packed_bytes(s.end - s.begin, s.bits);
    r.param_index = s.bits > 0 ? pairs++ : -1;
    offset += r.code_bytes;
    layout.segments.push_back(r);
  }
  layout.code_bytes = offset;
  layout.param_count = 2 * pairs;
  return layout;
}

}  // namespace oscar::fmt
