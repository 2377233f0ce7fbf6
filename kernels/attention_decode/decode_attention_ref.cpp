#include "kernels/attention_decode/decode_attention_ref.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <span>
#include <vector>

#include "formats/dtype.h"
#include "formats/error.h"
#include "formats/kv_layout.h"
#include "lib/calib/quantizer_ref.h"

namespace oscar::kern {
namespace {

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

int32_t decode_attention_num_splits(int32_t batch, int32_t num_q_heads, int32_t num_kv_heads, int32_t max_seq_len,
                                    int32_t page_tokens, int32_t sm_count) {
  // The INT2 kernel keeps four 128-thread blocks resident per SM (registers and its shared-memory ring), and
  // every block of a launch has the same work. So the best grid is one that fills those slots once: a second,
  // partial wave would leave most SMs idle for a whole block's time (9 splits x 64 blocks on 528 slots runs as
  // two waves). Above one wave of (sequence, KV head) pairs, one split each.
  const int64_t base_blocks = std::max<int64_t>(1, static_cast<int64_t>(batch) * num_kv_heads);
  const int64_t slots = 4 * static_cast<int64_t>(std::max(sm_count, 1));
  int64_t wanted = slots / base_blocks;
  // Batch x KV heads <= 8 (batch 1 of an 8-KV-head model) at contexts where that fill cuts splits of fewer than
  // 1024 tokens: the work per SM is then small, and the per-split costs lead (each block's query setup, window
  // share and ticket; the last block's merge of every split's partial). Measured on the H100 at 8 KV heads
  // (decodesplits.sh, 4K to 128K): 8 splits (64 blocks) were fastest at 4K and 8K, 16 at 16K and 32K, 33 = 66 at
  // 64K, the fill (66) at 128K, so: splits of ~2K tokens, but at least 64 blocks. Larger batches keep the fill: at
  // 8 x 4K, 4 splits ran 1.35x slower than its 8, the window share of each block growing with the batch's windows.
  if (base_blocks <= 8 && static_cast<int64_t>(max_seq_len) < 1024 * wanted) {
    const int64_t by_tokens = (static_cast<int64_t>(max_seq_len) + 2047) / 2048;
    const int64_t min_blocks_splits = (64 + base_blocks - 1) / base_blocks;
    wanted = std::min(wanted, std::max(by_tokens, min_blocks_splits));
  }
  // Splits longer than 16K tokens (the fill at batch x KV heads >= 256: 32 x 128K gets 2 splits of 64K): one
  // wave of long blocks ends with a tail, because the SMs finish the same work up to ~20 % apart (8 x 128K: last
  // blocks end 234-282 us). Splits of at most 16K tokens give several waves, which the block scheduler balances as
  // SMs free up. Measured on the H100 at 32 x 128K (decodesplits.sh waves): 8 splits 0.928x (qwen3-8b, 84 % of
  // D2D) and 0.940x (llama3-70b) the time of 2; 16 splits 0.918x / 0.959x; at 8 x 128K the fill's 8 splits of
  // 16K were within 3 % of 16-32.
  // Groups of at most 4 heads run the narrow layout (one MMA row set per head, fewer scores per lane), whose
  // blocks cost less to set up and merge, so there shorter splits pay: at most 8K tokens. Measured on the H100
  // (decodesplits.sh waves, two runs each): qwen3-8b (group 4) 8 x 128K with 16 splits 0.972x / 0.974x the time of
  // 8, 32 x 128K 16 splits 0.989x / 0.992x of 8; llama3-70b (group 8, the wide layout) 8 x 128K 16 splits
  // 0.998x / 1.049x of 8, so 16K stays its bound.
  const int64_t group = num_kv_heads > 0 ? std::max<int64_t>(1, num_q_heads / num_kv_heads) : 1;
  const int64_t longest_split_tokens = group <= 4 ? 8192 : 16384;
  wanted = std::max(wanted, (static_cast<int64_t>(max_seq_len) + longest_split_tokens - 1) / longest_split_tokens);
  const int64_t min_split_tokens = 2 * static_cast<int64_t>(std::max(page_tokens, 1));
  const int64_t most = std::max<int64_t>(1, (static_cast<int64_t>(max_seq_len) + min_split_tokens - 1) / min_split_tokens);
  return static_cast<int32_t>(std::clamp<int64_t>(wanted, 1, std::min<int64_t>(most, 256)));
}

size_t decode_attention_spread_smem_bytes(size_t kernel_smem, int64_t blocks, int sms, size_t static_smem,
                                          int most_dynamic, int smem_per_sm, int reserved_per_block) {
  // The block scheduler stacks blocks on some SMs while others stay empty when more fit one SM than the grid
  // needs (batch 1, 8 KV heads, 16 splits = 128 blocks on the H100: 72 SMs ran 1 block, 28 ran 2, 32 none, and
  // the doubled SMs ended the call ~10 us after the others; bench/results/2026-12-07e, decodetrace).
  if (sms <= 0 || blocks <= 0 || smem_per_sm <= 0) return kernel_smem;
  const int64_t per_sm = (blocks + sms - 1) / sms;
  // At most per_sm blocks fit when per_sm + 1 do not: (bytes + static + reserved) * (per_sm + 1) > smem_per_sm.
  const int64_t needed = smem_per_sm / (per_sm + 1) + 1 - static_cast<int64_t>(static_smem) - reserved_per_block;
  if (needed <= static_cast<int64_t>(kernel_smem)) return kernel_smem;
  const int64_t rounded = (needed + 127) / 128 * 128;
  return rounded > most_dynamic ? kernel_smem : static_cast<size_t>(rounded);
}

size_t decode_attention_workspace_bytes(int32_t batch, int32_t num_q_heads, int32_t head_dim, int32_t splits) {
  // The rotated query, then per (sequence, query head) 2 * splits partial slots: the INT2 kernel's splits and
  // the window kernel's (at most as many).
  const size_t rows = static_cast<size_t>(batch) * num_q_heads;
  const size_t slots = rows * 2 * static_cast<size_t>(std::max(splits, 1));
  // + one 32-bit arrival ticket per row (at least one per (sequence, KV head)).
  return (rows * static_cast<size_t>(head_dim) + slots * (2 + static_cast<size_t>(head_dim)) + rows) * sizeof(float);
}

Status decode_attention_can_implement(const DecodeAttentionParams& p) {
  if (p.batch < 0 || p.num_q_heads <= 0 || p.num_kv_heads <= 0 || p.page_tokens <= 0 || p.max_seq_len < 0 ||
      p.sink_tokens < 0 || p.recent_tokens < 0 || p.num_splits < 0)
    return Status::InvalidArgument;
  if (p.variant != DecodeAttentionVariant::Fused && p.variant != DecodeAttentionVariant::Separate &&
      p.variant != DecodeAttentionVariant::FusedWide)
    return Status::InvalidArgument;
  if (p.head_dim != 64 && p.head_dim != 128 && p.head_dim != 256) return Status::Unsupported;
  if (p.num_q_heads % p.num_kv_heads != 0) return Status::InvalidArgument;
  if (p.num_q_heads / p.num_kv_heads > 8) return Status::Unsupported;
  if (p.page_tokens % 16 != 0) return Status::Unsupported;
  // Geometries are checked even for an empty batch: a layout the kernel cannot read is refused up front.
  if (!p.k_geometry != !p.v_geometry) return Status::InvalidArgument;
  if (p.quant_storage != fmt::KvStorage::Int && p.quant_storage != fmt::KvStorage::Fp8E4M3)
    return Status::InvalidArgument;
  if (p.quant_storage == fmt::KvStorage::Fp8E4M3 && p.k_geometry) return Status::InvalidArgument;
  for (const fmt::SegmentedPageGeometry* g : {p.k_geometry, p.v_geometry}) {
    if (!g) continue;
    if (g->head_dim != p.head_dim || g->page_tokens != p.page_tokens) return Status::InvalidArgument;
    if (g->num_segments < 1 || g->num_segments > fmt::kMaxPageSegments) return Status::Unsupported;
    if (!g->blocks_of_16()) return Status::Unsupported;
    int32_t next = 0;
    for (int32_t s = 0; s < g->num_segments; ++s) {
      const int32_t bits = g->seg_bits[s];
      if (g->seg_begin[s] != next || g->seg_end[s] <= next) return Status::InvalidArgument;
      if (bits < 0 || bits > 4) return Status::Unsupported;  // 8-bit segments: no unpack in the segmented kernel
      next = g->seg_end[s];
    }
    if (next != p.head_dim) return Status::InvalidArgument;
  }
  if (p.batch == 0) return Status::Ok;
  if (!p.q || !p.seq_lens || (!p.out == !p.out_bf16)) return Status::InvalidArgument;
  const int64_t pages_needed = (static_cast<int64_t>(p.max_seq_len) + p.page_tokens - 1) / p.page_tokens;
  if (p.max_pages < pages_needed) return Status::InvalidArgument;
  const bool all_bf16 = p.sink_tokens >= p.max_seq_len;
  const bool any_bf16 = p.sink_tokens > 0 || p.recent_tokens > 0;
  if (!all_bf16) {
    if (!p.k_int2_pool || !p.v_int2_pool || !p.int2_page_table) return Status::InvalidArgument;
    if (!aligned16(p.k_int2_pool) || !aligned16(p.v_int2_pool)) return Status::Misaligned;
  }
  if (any_bf16) {
    if (!p.k_bf16_pool || !p.v_bf16_pool || !p.bf16_page_table) return Status::InvalidArgument;
    if (!aligned16(p.k_bf16_pool) || !aligned16(p.v_bf16_pool)) return Status::Misaligned;
  }
  // The fused merge reads rows of R_v as float4.
  if (p.rotation_v && !aligned16(p.rotation_v)) return Status::Misaligned;
  const int64_t dd = static_cast<int64_t>(p.head_dim) * p.head_dim;
  for (const auto& [rot, stride] : {std::pair{p.rotation_k, p.rotation_k_head_stride},
                                    std::pair{p.rotation_v, p.rotation_v_head_stride}})
    if ((stride != 0 && stride != dd) || (stride != 0 && !rot)) return Status::InvalidArgument;
  return Status::Ok;
}

void read_cached_head_ref(const DecodeAttentionParams& p, bool value, int32_t b, int32_t h, int64_t t, float* out) {
  const int32_t d = p.head_dim;
  const int32_t len = p.seq_lens[b];
  const int32_t logical_page = static_cast<int32_t>(t / p.page_tokens);
  const int32_t offset = static_cast<int32_t>(t % p.page_tokens);
  if (fmt::is_high_precision_token(t, len, p.sink_tokens, p.recent_tokens)) {
    const fmt::Bf16PageGeometry geo{d, p.page_tokens};
    const int32_t page = p.bf16_page_table[static_cast<int64_t>(b) * p.max_pages + logical_page];
    const uint16_t* pool = value ? p.v_bf16_pool : p.k_bf16_pool;
    const uint16_t* row = pool + fmt::page_block_offset(page, h, p.num_kv_heads, geo.page_bytes()) / 2 +
                          static_cast<size_t>(offset) * d;
    for (int32_t i = 0; i < d; ++i) out[i] = fmt::bf16_to_f32(row[i]);
    return;
  }
  const int32_t page = p.int2_page_table[static_cast<int64_t>(b) * p.max_pages + logical_page];
  if (p.quant_storage == fmt::KvStorage::Fp8E4M3) {
    const fmt::Fp8PageGeometry geo{d, p.page_tokens};
    const uint8_t* block = (value ? p.v_int2_pool : p.k_int2_pool) +
                           fmt::page_block_offset(page, h, p.num_kv_heads, geo.page_bytes());
    uint16_t scale_f16;
    std::memcpy(&scale_f16, block + geo.scales_offset() + static_cast<size_t>(offset) * 2, 2);
    const float scale = fmt::f16_to_f32(scale_f16);
    const uint8_t* row = block + static_cast<size_t>(offset) * geo.code_row_bytes();
    for (int32_t i = 0; i < d; ++i) out[i] = calib::e4m3_to_f32(row[i]) * scale;  // HeadQuantizer::decode's product
    return;
  }
  if (const fmt::SegmentedPageGeometry* g = value ? p.v_geometry : p.k_geometry) {
    const uint8_t* block =
        (value ? p.v_int2_pool : p.k_int2_pool) + fmt::page_block_offset(page, h, p.num_kv_heads, g->page_bytes());
    std::vector<uint8_t> codes;
    for (int32_t s = 0; s < g->num_segments; ++s) {
      const int32_t n = g->seg_end[s] - g->seg_begin[s];
      if (g->seg_bits[s] == 0) {
        std::fill_n(out + g->seg_begin[s], n, 0.0f);
        continue;
      }
      calib::IntParams params;
      std::memcpy(&params.scale_f16, block + g->param_offset(offset, g->seg_param[s]), 2);
      std::memcpy(&params.zero_f16, block + g->param_offset(offset, g->seg_param[s]) + 2, 2);
      codes.assign(static_cast<size_t>(n), 0);
      calib::unpack_codes(std::span<const uint8_t>(block + g->code_row_offset(s, offset),
                                                   static_cast<size_t>(g->seg_code_bytes[s])),
                          g->seg_bits[s], codes);
      for (int32_t i = 0; i < n; ++i) out[g->seg_begin[s] + i] = calib::int_dequant(codes[static_cast<size_t>(i)], params);
    }
    return;
  }
  const fmt::Int2PageGeometry geo{d, p.page_tokens};
  const uint8_t* block = (value ? p.v_int2_pool : p.k_int2_pool) +
                         fmt::page_block_offset(page, h, p.num_kv_heads, geo.page_bytes());
  calib::IntParams params;
  std::memcpy(&params.scale_f16, block + geo.params_offset() + static_cast<size_t>(offset) * 4, 2);
  std::memcpy(&params.zero_f16, block + geo.params_offset() + static_cast<size_t>(offset) * 4 + 2, 2);
  std::vector<uint8_t> codes(static_cast<size_t>(d));
  calib::unpack_codes(std::span<const uint8_t>(block + static_cast<size_t>(offset) * geo.code_row_bytes(),
                                               static_cast<size_t>(geo.code_row_bytes())),
                      2, codes);
  for (int32_t i = 0; i < d; ++i) out[i] = calib::int_dequant(codes[static_cast<size_t>(i)], params);
}

void decode_attention_ref(const DecodeAttentionParams& p) {
  if (Status s = decode_attention_can_implement(p); s != Status::Ok)
    throw Error("decode_attention_ref", ::fmt::format("params rejected: {}", status_name(s)));
  const int32_t d = p.head_dim;
  const int32_t group = p.num_q_heads / p.num_kv_heads;
  const auto du = static_cast<size_t>(d);
  std::span<const float> rk, rv;
  std::vector<float> q(du), q_rot(du), k(du), v(du), o_rot(du), o(du);
  std::vector<double> scores, acc(du);
  for (int32_t b = 0; b < p.batch; ++b) {
    const int32_t len = p.seq_lens[b];
    for (int32_t hq = 0; hq < p.num_q_heads; ++hq) {
      const int32_t h = hq / group;
      if (p.rotation_k) rk = std::span<const float>(p.rotation_k + h * p.rotation_k_head_stride, du * du);
      if (p.rotation_v) rv = std::span<const float>(p.rotation_v + h * p.rotation_v_head_stride, du * du);
      const uint16_t* qsrc = p.q + (static_cast<size_t>(b) * p.num_q_heads + hq) * du;
      for (size_t i = 0; i < du; ++i) q[i] = fmt::bf16_to_f32(qsrc[i]);
      calib::rotate(q, rk, q_rot);
      scores.assign(static_cast<size_t>(len), 0.0);
      double max_score = -std::numeric_limits<double>::infinity();
      for (int64_t t = 0; t < len; ++t) {
        read_cached_head_ref(p, false, b, h, t, k.data());
        double s = 0.0;
        for (size_t i = 0; i < du; ++i) s += static_cast<double>(q_rot[i]) * k[i];
        s *= p.softmax_scale;
        scores[static_cast<size_t>(t)] = s;
        max_score = std::max(max_score, s);
      }
      std::fill(acc.begin(), acc.end(), 0.0);
      double denom = 0.0;
      for (int64_t t = 0; t < len; ++t) {
        const double w = std::exp(scores[static_cast<size_t>(t)] - max_score);
        denom += w;
        read_cached_head_ref(p, true, b, h, t, v.data());
        for (size_t i = 0; i < du; ++i) acc[i] += w * v[i];
      }
      for (size_t i = 0; i < du; ++i) o_rot[i] = denom > 0.0 ? static_cast<float>(acc[i] / denom) : 0.0f;
      calib::unrotate(o_rot, rv, o);
      const size_t base = (static_cast<size_t>(b) * p.num_q_heads + hq) * du;
      for (size_t i = 0; i < du; ++i) {
        if (p.out)
          p.out[base + i] = o[i];
        else
          p.out_bf16[base + i] = fmt::f32_to_bf16(o[i]);
      }
    }
  }
}

}  // namespace oscar::kern
