#pragma once
// Test-only helpers shared by tests/kernels (CPU) and tests/gpu: random orthogonal rotations, random K/V with
// outliers, and a host-side paged cache filled through kv_write_ref (page ids shuffled so the page tables matter).
#include <Eigen/Dense>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#include "formats/dtype.h"
#include "formats/kv_layout.h"
#include "kernels/attention_decode/decode_attention.h"
#include "kernels/kv_quantize/kv_quantize_ref.h"
#include "lib/calib/quantizer_ref.h"

namespace oscar::test {

// Haar-ish random orthogonal matrix (QR of a Gaussian matrix, in double), stored row-major fp32.
inline std::vector<float> random_rotation(int d, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> n01;
  Eigen::MatrixXd g(d, d);
  for (int i = 0; i < d; ++i)
    for (int j = 0; j < d; ++j) g(i, j) = n01(rng);
  Eigen::HouseholderQR<Eigen::MatrixXd> qr(g);
  Eigen::MatrixXd q = qr.householderQ();
  std::vector<float> r(static_cast<size_t>(d) * d);
  for (int i = 0; i < d; ++i)
    for (int j = 0; j < d; ++j) r[static_cast<size_t>(i) * d + j] = static_cast<float>(q(i, j));
  return r;
}

// bf16 bit patterns of Gaussian values with a few large per-channel outliers (what real keys look like).
inline std::vector<uint16_t> random_bf16(size_t count, int d, uint32_t seed, float outlier_scale = 20.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> n01;
  std::vector<uint16_t> out(count);
  for (size_t i = 0; i < count; ++i) {
    const int dim = static_cast<int>(i % static_cast<size_t>(d));
    float v = n01(rng);
    if (dim % 37 == 5) v *= outlier_scale;
    out[i] = fmt::f32_to_bf16(v);
  }
  return out;
}

inline double nmse(const std::vector<float>& got, const std::vector<double>& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    num += (got[i] - want[i]) * (got[i] - want[i]);
    den += want[i] * want[i];
  }
  return den > 0 ? num / den : num;
}

// A host paged cache of one layer holding `lens[b]` tokens of each sequence; keys/values given in the original
// basis as bf16 [b][t][kv_head][d]. Every token is written both as INT2 and as bf16 (rotated), so any window
// setting reads valid data; the decode params choose which one each token uses.
struct HostPagedCache {
  int32_t batch = 0, num_kv_heads = 0, head_dim = 0, page_tokens = fmt::kKvPageTokens, max_pages = 0;
  std::vector<int32_t> lens;
  std::vector<std::vector<uint16_t>> keys, values;  // per sequence [t][kv_head][d] bf16 bits
  std::vector<uint8_t> k_int2, v_int2;
  std::vector<uint16_t> k_bf16, v_bf16;
  std::vector<int32_t> int2_table, bf16_table;
  // Segmented pages (set both before build): the quantized pools hold these geometries' pages instead of INT2.
  const fmt::SegmentedPageGeometry* k_geo = nullptr;
  const fmt::SegmentedPageGeometry* v_geo = nullptr;
  // FP8 pages (fmt::Fp8PageGeometry, KvWriteMode::Fp8) in the quantized pools instead; needs empty rotations.
  bool fp8 = false;
  // Bundle 2.0 storage transforms (set before build): per-KV-head matrices [kv_heads, d, d] used instead of the
  // rotations (non-empty ones), and the keys' mean [kv_heads, d] subtracted first.
  std::vector<float> k_transform, v_transform, k_mean;

  void build(const std::vector<int32_t>& seq_lens, int32_t kv_heads, int32_t d, const std::vector<float>& rot_k,
             const std::vector<float>& rot_v, float clip_k, float clip_v, uint32_t seed) {
    lens = seq_lens;
    batch = static_cast<int32_t>(lens.size());
    num_kv_heads = kv_heads;
    head_dim = d;
    const int32_t max_len = *std::max_element(lens.begin(), lens.end());
    max_pages = std::max(1, (max_len + page_tokens - 1) / page_tokens);
    const int32_t total_pages = batch * max_pages;
    // Page ids are a permutation (different for the two pools) so a wrong table lookup reads wrong data.
    std::mt19937 rng(seed);
    std::vector<int32_t> perm_a(static_cast<size_t>(total_pages)), perm_b(static_cast<size_t>(total_pages));
    std::iota(perm_a.begin(), perm_a.end(), 0);
    std::iota(perm_b.begin(), perm_b.end(), 0);
    std::shuffle(perm_a.begin(), perm_a.end(), rng);
    std::shuffle(perm_b.begin(), perm_b.end(), rng);
    int2_table.assign(perm_a.begin(), perm_a.end());
    bf16_table.assign(perm_b.begin(), perm_b.end());
    const fmt::Int2PageGeometry int2{d, page_tokens};
    const fmt::Bf16PageGeometry bf16{d, page_tokens};
    const fmt::Fp8PageGeometry fp8_geo{d, page_tokens};
    const auto k_page = fp8 ? fp8_geo.page_bytes() : k_geo ? k_geo->page_bytes() : int2.page_bytes();
    const auto v_page = fp8 ? fp8_geo.page_bytes() : v_geo ? v_geo->page_bytes() : int2.page_bytes();
    k_int2.assign(static_cast<size_t>(total_pages) * kv_heads * k_page, 0);
    v_int2.assign(static_cast<size_t>(total_pages) * kv_heads * v_page, 0);
    k_bf16.assign(static_cast<size_t>(total_pages) * kv_heads * bf16.page_bytes() / 2, 0);
    v_bf16 = k_bf16;
    keys.clear();
    values.clear();
    for (int32_t b = 0; b < batch; ++b) {
      const size_t n = static_cast<size_t>(lens[b]) * kv_heads * d;
      keys.push_back(random_bf16(n, d, seed * 7919u + 2 * b + 1));
      values.push_back(random_bf16(n, d, seed * 7919u + 2 * b + 2, 4.0f));
      std::vector<int32_t> int2_slots(static_cast<size_t>(lens[b])), bf16_slots(static_cast<size_t>(lens[b]));
      for (int32_t t = 0; t < lens[b]; ++t) {
        const int32_t lp = t / page_tokens;
        int2_slots[static_cast<size_t>(t)] = int2_table[static_cast<size_t>(b) * max_pages + lp] * page_tokens + t % page_tokens;
        bf16_slots[static_cast<size_t>(t)] = bf16_table[static_cast<size_t>(b) * max_pages + lp] * page_tokens + t % page_tokens;
      }
      write(keys[b], lens[b], k_transform.empty() ? rot_k : k_transform, clip_k, int2_slots, bf16_slots, k_int2,
            k_bf16, k_geo, !k_transform.empty(), k_mean);
      write(values[b], lens[b], v_transform.empty() ? rot_v : v_transform, clip_v, int2_slots, bf16_slots, v_int2,
            v_bf16, v_geo, !v_transform.empty(), {});
    }
  }

  // Decode params pointing at the given (host or device) buffers.
  kern::DecodeAttentionParams params(const uint8_t* ki, const uint8_t* vi, const uint16_t* kb, const uint16_t* vb,
                                     const int32_t* it, const int32_t* bt, const int32_t* seq_lens) const {
    kern::DecodeAttentionParams p;
    p.batch = batch;
    p.num_kv_heads = num_kv_heads;
    p.head_dim = head_dim;
    p.page_tokens = page_tokens;
    p.seq_lens = seq_lens;
    p.max_seq_len = *std::max_element(lens.begin(), lens.end());
    p.k_int2_pool = ki;
    p.v_int2_pool = vi;
    p.k_bf16_pool = kb;
    p.v_bf16_pool = vb;
    p.int2_page_table = it;
    p.bf16_page_table = bt;
    p.max_pages = max_pages;
    p.k_geometry = k_geo;
    p.v_geometry = v_geo;
    if (fp8) p.quant_storage = fmt::KvStorage::Fp8E4M3;
    p.softmax_scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
    return p;
  }

 private:
  void write(const std::vector<uint16_t>& x, int32_t len, const std::vector<float>& rot, float clip,
             const std::vector<int32_t>& int2_slots, const std::vector<int32_t>& bf16_slots,
             std::vector<uint8_t>& int2_pool, std::vector<uint16_t>& bf16_pool,
             const fmt::SegmentedPageGeometry* geo, bool per_head = false,
             const std::vector<float>& mean = {}) const {
    kern::KvWriteParams w;
    w.rotation_head_stride = per_head ? static_cast<int64_t>(head_dim) * head_dim : 0;
    w.head_mean = mean.empty() ? nullptr : mean.data();
    w.x = x.data();
    w.tokens = len;
    w.token_stride = static_cast<int64_t>(num_kv_heads) * head_dim;
    w.num_kv_heads = num_kv_heads;
    w.head_dim = head_dim;
    w.page_tokens = page_tokens;
    w.rotation = rot.empty() ? nullptr : rot.data();
    w.clip_ratio = clip;
    w.int2_pool = int2_pool.data();
    w.bf16_pool = bf16_pool.data();
    w.slots = int2_slots.data();
    w.geometry = geo;
    if (fp8) {
      w.rotation = nullptr;  // KvWriteMode::Fp8 takes none; build() is only called with empty ones for fp8
      w.clip_ratio = 1.0f;
    }
    kern::kv_write_ref(w, fp8 ? kern::KvWriteMode::Fp8 : geo ? kern::KvWriteMode::Segmented : kern::KvWriteMode::Int2);
    w.rotation = rot.empty() ? nullptr : rot.data();
    w.clip_ratio = clip;
    w.slots = bf16_slots.data();
    kern::kv_write_ref(w, kern::KvWriteMode::Bf16);
  }
};

// Head vectors that reach every branch of the Fp8E4M3 rule (quantizer_ref.h step 4), one kind per row (row % 8);
// shared by the FP8 ref test and the FP8 GPU tests.
inline std::vector<float> fp8_special_rows(int d, int rows, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> n01;
  std::vector<float> x(static_cast<size_t>(rows) * d);
  for (int r = 0; r < rows; ++r) {
    float* row = x.data() + static_cast<size_t>(r) * d;
    for (int i = 0; i < d; ++i) row[i] = n01(rng) * (i % 37 == 5 ? 20.0f : 1.0f);
    switch (r % 8) {
      case 1: std::fill_n(row, d, 0.0f); break;  // scale 0, every code 0
      case 2:  // scale 1 exactly; midpoints between 3-bit mantissas in binades 2^-6 .. 2^2 (ties to even), ±448
        for (int i = 0; i < d; ++i)
          row[i] = (1.0f + (2 * (i % 8) + 1) / 16.0f) * std::ldexp(i % 2 ? 1.0f : -1.0f, i % 9 - 6);
        row[0] = 448.0f;
        row[1] = -448.0f;
        break;
      case 3:  // scale 1; whole and half subnormal quanta, 7.5 quanta rounding up into 2^-6
        for (int i = 0; i < d; ++i)
          row[i] = (static_cast<float>(i % 11) + (i % 3 == 0 ? 0.5f : 0.0f)) * 0x1p-9f * (i % 2 ? 1.0f : -1.0f);
        row[d - 1] = -448.0f;
        break;
      case 4:  // amax / 448 is an fp16 subnormal
        for (int i = 0; i < d; ++i) row[i] *= 1e-4f;
        break;
      case 5:  // f16(amax / 448) rounds down: amax / scale > 448 saturates
        for (int i = 0; i < d; ++i) row[i] = std::ldexp(n01(rng), 3);
        row[7] = 1000.3f;
        break;
      case 6:  // a single positive outlier with everything else tiny
        for (int i = 0; i < d; ++i) row[i] = 1e-3f * n01(rng);
        row[d / 2] = 3000.0f;
        break;
      default: break;
    }
  }
  return x;
}

// Naive attention in the original basis over a HostPagedCache built with clips 0.96 (K) / 0.92 (V): dequantized K/V
// (HeadQuantizer of the given specs for quantized tokens, bf16(xR)Rᵀ for the sink/recent window tokens), q as given
// [batch, q_heads, d] bf16, double everywhere. Returns [batch, q_heads, d]. The decode kernels' references check
// against it (INT2 and segmented layouts alike).
inline std::vector<double> naive_attention(const HostPagedCache& c, const fmt::TensorQuantSpec& k_spec,
                                           const fmt::TensorQuantSpec& v_spec, int q_heads, int kv_heads,
                                           int64_t sink, int64_t recent, const std::vector<uint16_t>& q,
                                           const std::vector<float>& rk, const std::vector<float>& rv) {
  const int d = c.head_dim, group = q_heads / kv_heads;
  calib::HeadQuantizer kq(k_spec, d), vq(v_spec, d);
  std::vector<double> out(static_cast<size_t>(c.batch) * q_heads * d, 0.0);
  std::vector<float> x(d), y(d), k(d), v(d);
  auto dequant = [&](const calib::HeadQuantizer& hq, const std::vector<float>& r, float clip, bool window,
                     std::vector<float>& res) {
    if (!window) {
      hq.fake_quantize(x, 1, r, clip, calib::Basis::Original, res);
      return;
    }
    calib::rotate(x, r, y);
    for (auto& e : y) e = fmt::bf16_to_f32(fmt::f32_to_bf16(e));
    calib::unrotate(y, r, res);
  };
  for (int b = 0; b < c.batch; ++b) {
    const int len = c.lens[b];
    for (int hq = 0; hq < q_heads; ++hq) {
      const int h = hq / group;
      std::vector<double> s(len);
      std::vector<std::vector<float>> vals(len);
      double mx = -INFINITY;
      for (int t = 0; t < len; ++t) {
        const bool window = fmt::is_high_precision_token(t, len, sink, recent);
        const size_t off = (static_cast<size_t>(t) * c.num_kv_heads + h) * d;
        for (int i = 0; i < d; ++i) x[i] = fmt::bf16_to_f32(c.keys[b][off + i]);
        dequant(kq, rk, 0.96f, window, k);
        for (int i = 0; i < d; ++i) x[i] = fmt::bf16_to_f32(c.values[b][off + i]);
        dequant(vq, rv, 0.92f, window, v);
        vals[t] = v;
        double dot = 0;
        for (int i = 0; i < d; ++i)
          dot += fmt::bf16_to_f32(q[(static_cast<size_t>(b) * q_heads + hq) * d + i]) * double(k[i]);
        s[t] = dot / std::sqrt(double(d));
        mx = std::max(mx, s[t]);
      }
      double den = 0;
      for (int t = 0; t < len; ++t) den += std::exp(s[t] - mx);
      for (int t = 0; t < len; ++t)
        for (int i = 0; i < d; ++i)
          out[(static_cast<size_t>(b) * q_heads + hq) * d + i] += std::exp(s[t] - mx) / den * vals[t][i];
    }
  }
  return out;
}

}  // namespace oscar::test
