#include "kernels/kv_quantize/kv_quantize_ref.h"

#include <fmt/format.h>

#include <cstring>
#include <optional>
#include <span>
#include <vector>

#include "formats/dtype.h"
#include "formats/error.h"
#include "formats/kv_layout.h"
#include "lib/calib/error_feedback.h"
#include "lib/calib/quantizer_ref.h"

namespace oscar::kern {

void kv_write_ref(const KvWriteParams& p, KvWriteMode mode) {
  if (Status s = kv_write_can_implement(p, mode); s != Status::Ok)
    throw Error("kv_write_ref", ::fmt::format("params rejected: {}", status_name(s)));
  const int32_t d = p.head_dim;
  const fmt::Int2PageGeometry int2{d, p.page_tokens};
  const fmt::Bf16PageGeometry bf16{d, p.page_tokens};
  std::span<const float> rotation;
  if (p.rotation) rotation = std::span<const float>(p.rotation, static_cast<size_t>(d) * d);
  std::vector<float> x(static_cast<size_t>(d)), y(static_cast<size_t>(d));
  std::vector<uint8_t> codes(static_cast<size_t>(d / 4));
  std::vector<uint8_t> ef_codes(static_cast<size_t>(d));  // one unpacked code per dim
  // Segmented records come from the CPU reference quantizer itself, then are scattered into the page regions.
  std::optional<calib::HeadQuantizer> seg_quantizer;
  std::vector<uint8_t> record;
  if (mode == KvWriteMode::Fp8) {
    fmt::TensorQuantSpec spec;
    spec.storage = fmt::KvStorage::Fp8E4M3;
    spec.segments = {{0, d, 8}};
    seg_quantizer.emplace(spec, d, "kv_write_ref");
    record.resize(static_cast<size_t>(seg_quantizer->record_bytes()));
  }
  const fmt::Fp8PageGeometry fp8{d, p.page_tokens};
  if (mode == KvWriteMode::Segmented) {
    const fmt::SegmentedPageGeometry& g = *p.geometry;
    fmt::TensorQuantSpec spec;
    spec.storage = fmt::KvStorage::Int;
    for (int32_t s = 0; s < g.num_segments; ++s) spec.segments.push_back({g.seg_begin[s], g.seg_end[s], g.seg_bits[s]});
    seg_quantizer.emplace(spec, d, "kv_write_ref");
    record.resize(static_cast<size_t>(seg_quantizer->record_bytes()));
  }
  for (int64_t t = 0; t < p.tokens; ++t) {
    const int32_t slot = p.slots[t];
    if (slot < 0) continue;
    const int32_t page = slot / p.page_tokens;
    const int32_t offset = slot % p.page_tokens;
    for (int32_t h = 0; h < p.num_kv_heads; ++h) {
      const int64_t row = t * p.token_stride + static_cast<int64_t>(h) * d;
      for (int32_t i = 0; i < d; ++i)
        x[static_cast<size_t>(i)] = p.x_f32 ? p.x_f32[row + i] : fmt::bf16_to_f32(p.x[row + i]);
      // Format 2.0 transforms: x − μ in fp32 (one rounding, as the kernels stage it), then this head's matrix.
      if (p.head_mean)
        for (int32_t i = 0; i < d; ++i) x[static_cast<size_t>(i)] -= p.head_mean[static_cast<int64_t>(h) * d + i];
      if (p.rotation)
        rotation = std::span<const float>(p.rotation + h * p.rotation_head_stride, static_cast<size_t>(d) * d);
      if (mode == KvWriteMode::Fp8) {
        // The record is d codes then the fp16 scale; the page keeps codes and scales in separate arrays.
        seg_quantizer->encode(x, {}, 1.0f, record);
        uint8_t* block = p.int2_pool + fmt::page_block_offset(page, h, p.num_kv_heads, fp8.page_bytes());
        std::memcpy(block + static_cast<size_t>(offset) * fp8.code_row_bytes(), record.data(), static_cast<size_t>(d));
        std::memcpy(block + fp8.scales_offset() + static_cast<size_t>(offset) * 2, record.data() + d, 2);
        continue;
      }
      if (mode == KvWriteMode::Bf16) {
        calib::rotate(x, rotation, y);
        uint16_t* dst = p.bf16_pool +
                        fmt::page_block_offset(page, h, p.num_kv_heads, bf16.page_bytes()) / 2 +
                        static_cast<size_t>(offset) * d;
        for (int32_t i = 0; i < d; ++i) dst[i] = fmt::f32_to_bf16(y[static_cast<size_t>(i)]);
        continue;
      }
      if (mode == KvWriteMode::Segmented) {
        const fmt::SegmentedPageGeometry& g = *p.geometry;
        seg_quantizer->encode(x, rotation, p.clip_ratio, record);
        uint8_t* block = p.int2_pool + fmt::page_block_offset(page, h, p.num_kv_heads, g.page_bytes());
        for (int32_t s = 0; s < g.num_segments; ++s) {
          std::memcpy(block + g.code_row_offset(s, offset), record.data() + g.seg_code_offset[s],
                      static_cast<size_t>(g.seg_code_bytes[s]));
          if (g.seg_param[s] >= 0)
            std::memcpy(block + g.param_offset(offset, g.seg_param[s]), record.data() + g.code_bytes + 4 * g.seg_param[s], 4);
        }
        continue;
      }
      calib::IntParams params;
      if (p.ef_order) {
        // The stored-table rounding on quantize_int2's own rotation, clip and params (calib::quantize_int2 is
        // rotate + clip_in_place + int_params + int_codes, which error_feedback_codes_stored repeats before it
        // changes only the codes), so a diagonal table reproduces the RTN bytes.
        const auto dd = static_cast<size_t>(d);
        calib::rotate(x, rotation, y);
        params = calib::error_feedback_codes_stored(
            y, p.clip_ratio, 2, std::span<const int32_t>(p.ef_order + h * dd, dd),
            std::span<const float>(p.ef_weights + h * dd * dd, dd * dd), p.ef_clip_feedback, ef_codes);
        calib::pack_codes(ef_codes, 2, codes);
      } else {
        calib::quantize_int2(x, rotation, p.clip_ratio, codes, params);
      }
      uint8_t* block = p.int2_pool + fmt::page_block_offset(page, h, p.num_kv_heads, int2.page_bytes());
      std::memcpy(block + static_cast<size_t>(offset) * int2.code_row_bytes(), codes.data(), codes.size());
      const uint16_t pair[2] = {params.scale_f16, params.zero_f16};
      std::memcpy(block + int2.params_offset() + static_cast<size_t>(offset) * 4, pair, 4);
    }
  }
}

}  // namespace oscar::kern

namespace oscar::kern {

// Host-only precondition check shared by the kernel launcher and the reference, so both reject the same inputs.
Status kv_write_can_implement(const KvWriteParams& p, KvWriteMode mode) {
  if (p.tokens < 0 || p.num_kv_heads <= 0 || p.page_tokens <= 0) return Status::InvalidArgument;
  if (p.head_dim != 64 && p.head_dim != 128 && p.head_dim != 256) return Status::Unsupported;
  if (p.token_stride < static_cast<int64_t>(p.num_kv_heads) * p.head_dim) return Status::InvalidArgument;
  if (p.tokens == 0) return Status::Ok;
  if (p.ef_order || p.ef_weights) {
    if (mode != KvWriteMode::Int2) return Status::Unsupported;
    if (!p.ef_order || !p.ef_weights) return Status::InvalidArgument;
    if (reinterpret_cast<uintptr_t>(p.ef_weights) % 16 != 0 || reinterpret_cast<uintptr_t>(p.ef_order) % 4 != 0)
      return Status::Misaligned;
  }
  if (p.rotation_head_stride != 0 && p.rotation_head_stride != static_cast<int64_t>(p.head_dim) * p.head_dim)
    return Status::InvalidArgument;
  if (p.rotation_head_stride != 0 && !p.rotation) return Status::InvalidArgument;
  if (mode == KvWriteMode::Fp8) {
    if (!p.x == !p.x_f32 || !p.slots || !p.int2_pool) return Status::InvalidArgument;
    if (p.rotation || p.clip_ratio != 1.0f || p.head_mean) return Status::Unsupported;
    if (reinterpret_cast<uintptr_t>(p.int2_pool) % 16 != 0) return Status::Misaligned;
    if (reinterpret_cast<uintptr_t>(p.x) % 2 != 0 || reinterpret_cast<uintptr_t>(p.x_f32) % 4 != 0)
      return Status::Misaligned;
    return Status::Ok;
  }
  if (!p.x || !p.slots || p.x_f32) return Status::InvalidArgument;
  if (mode == KvWriteMode::Int2 || mode == KvWriteMode::Segmented) {
    if (!p.int2_pool) return Status::InvalidArgument;
    if (!(p.clip_ratio > 0.0f && p.clip_ratio <= 1.0f)) return Status::InvalidArgument;
    // Code rows are written as uint32 words and (scale, zero) as one uint32.
    if (reinterpret_cast<uintptr_t>(p.int2_pool) % 16 != 0) return Status::Misaligned;
  } else {
    if (!p.bf16_pool) return Status::InvalidArgument;
    if (reinterpret_cast<uintptr_t>(p.bf16_pool) % 16 != 0) return Status::Misaligned;
  }
  if (mode == KvWriteMode::Segmented) {
    const fmt::SegmentedPageGeometry* g = p.geometry;
    if (!g || g->head_dim != p.head_dim || g->page_tokens != p.page_tokens) return Status::InvalidArgument;
    if (g->num_segments < 1 || g->num_segments > fmt::kMaxPageSegments) return Status::Unsupported;
    int32_t next = 0;
    for (int32_t s = 0; s < g->num_segments; ++s) {
      const int32_t bits = g->seg_bits[s];
      if (g->seg_begin[s] != next || g->seg_end[s] <= next) return Status::InvalidArgument;
      if (!(bits == 0 || (bits >= 1 && bits <= 4) || bits == 8)) return Status::Unsupported;
      next = g->seg_end[s];
    }
    if (next != p.head_dim) return Status::InvalidArgument;
  }
  if (reinterpret_cast<uintptr_t>(p.x) % 2 != 0) return Status::Misaligned;
  return Status::Ok;
}

}  // namespace oscar::kern
