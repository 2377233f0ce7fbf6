// The kernels' references with per-KV-head storage transforms (bundle format 2.0): kv_write_ref subtracts the head's
// mean and applies the head's matrix (bf16 windows and INT2 records, error-feedback tables too), and
// decode_attention_ref reading with A⁻ᵀ per head for both K and V returns the attention of the dequantized vectors
// x̂ = ŷ·A⁻¹ + μ in the original basis: the matrices the engine passes are the right ones, and the key mean drops
// out of the softmax. Also the preconditions of the new fields.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "formats/dtype.h"
#include "formats/kv_layout.h"
#include "kernels/attention_decode/decode_attention_ref.h"
#include "kernels/kv_quantize/kv_quantize_ref.h"
#include "kv_cache_test_util.h"
#include "kv_transform_test_util.h"
#include "lib/calib/quantizer_ref.h"
#include "test_support.h"

namespace oscar {
namespace {

TEST(KvTransformRef, WriteSubtractsTheMeanAndAppliesEachHeadsMatrix) {
  const int d = 64, heads = 3, tokens = 40;
  const auto tf = test::random_head_transforms(d, heads, 5);
  const auto x = test::random_bf16(static_cast<size_t>(tokens) * heads * d, d, 6);
  const fmt::Int2PageGeometry g2{d, 64};
  const fmt::Bf16PageGeometry gb{d, 64};
  std::vector<uint8_t> int2(static_cast<size_t>(heads) * g2.page_bytes(), 0);
  std::vector<uint16_t> bf16(static_cast<size_t>(heads) * gb.page_bytes() / 2, 0);
  std::vector<int32_t> slots(tokens);
  for (int t = 0; t < tokens; ++t) slots[t] = t;
  kern::KvWriteParams w;
  w.x = x.data();
  w.tokens = tokens;
  w.token_stride = heads * d;
  w.num_kv_heads = heads;
  w.head_dim = d;
  w.rotation = tf.a.data();
  w.rotation_head_stride = d * d;
  w.head_mean = tf.mean.data();
  w.clip_ratio = 0.96f;
  w.slots = slots.data();
  w.int2_pool = int2.data();
  w.bf16_pool = bf16.data();
  kern::kv_write_ref(w, kern::KvWriteMode::Int2);
  kern::kv_write_ref(w, kern::KvWriteMode::Bf16);
  std::vector<float> xc(d), y(d);
  std::vector<uint8_t> codes(d / 4);
  for (int h = 0; h < heads; ++h)
    for (int t = 0; t < tokens; ++t) {
      for (int i = 0; i < d; ++i) xc[i] = fmt::bf16_to_f32(x[(t * heads + h) * d + i]) - tf.mean[h * d + i];
      const std::span<const float> a(tf.a.data() + h * d * d, d * d);
      calib::rotate(xc, a, y);
      const uint16_t* row = bf16.data() + fmt::page_block_offset(0, h, heads, gb.page_bytes()) / 2 + t * d;
      for (int i = 0; i < d; ++i) ASSERT_EQ(row[i], fmt::f32_to_bf16(y[i])) << "head " << h << " token " << t;
      calib::IntParams params;
      calib::quantize_int2(xc, a, 0.96f, codes, params);
      const uint8_t* block = int2.data() + fmt::page_block_offset(0, h, heads, g2.page_bytes());
      ASSERT_EQ(std::vector<uint8_t>(block + t * g2.code_row_bytes(), block + (t + 1) * g2.code_row_bytes()), codes);
    }
}

TEST(KvTransformRef, DecodeWithTheInverseTransposeIsAttentionOfTheDequantizedVectors) {
  const int d = 64, q_heads = 8, kv_heads = 2, group = q_heads / kv_heads;
  const int64_t sink = 16, recent = 32;
  const auto kt = test::random_head_transforms(d, kv_heads, 11), vt = test::random_head_transforms(d, kv_heads, 12);
  test::HostPagedCache c;
  c.k_transform = kt.a;
  c.k_mean = kt.mean;
  c.v_transform = vt.a;
  c.build({300, 77}, kv_heads, d, {}, {}, 0.96f, 0.92f, 13);
  const auto q = test::random_bf16(c.lens.size() * q_heads * d, d, 14, 3.0f);
  auto p = c.params(c.k_int2.data(), c.v_int2.data(), c.k_bf16.data(), c.v_bf16.data(), c.int2_table.data(),
                    c.bf16_table.data(), c.lens.data());
  p.num_q_heads = q_heads;
  p.q = q.data();
  p.rotation_k = kt.read.data();
  p.rotation_v = vt.read.data();
  p.rotation_k_head_stride = p.rotation_v_head_stride = d * d;
  p.sink_tokens = sink;
  p.recent_tokens = recent;
  std::vector<float> got(c.lens.size() * q_heads * d);
  p.out = got.data();
  kern::decode_attention_ref(p);

  // Naive, in the original basis: window tokens x̂ = bf16((x − μ)·A)·A⁻¹ + μ, the others the INT2 record of
  // (x − μ)·A decoded and mapped back the same way; q as given; fp64.
  const calib::HeadQuantizer kq(fmt::KvQuantSpec::int2_default(d).k, d), vq(fmt::KvQuantSpec::int2_default(d).v, d);
  auto dequant = [&](const test::HeadTransforms& t, bool keys, int h, const uint16_t* src, bool window,
                     std::vector<double>& out) {
    std::vector<float> xc(d), y(d), y_hat(d);
    for (int i = 0; i < d; ++i) xc[i] = fmt::bf16_to_f32(src[i]) - (keys ? t.mean[h * d + i] : 0.f);
    calib::rotate(xc, std::span<const float>(t.a.data() + h * d * d, d * d), y);
    if (window)
      for (int i = 0; i < d; ++i) y_hat[i] = fmt::bf16_to_f32(fmt::f32_to_bf16(y[i]));
    else
      (keys ? kq : vq).fake_quantize(y, 1, {}, keys ? 0.96f : 0.92f, calib::Basis::Original, y_hat);
    out.assign(d, 0.0);
    for (int j = 0; j < d; ++j) {
      double acc = keys ? t.mean[h * d + j] : 0.0;
      for (int i = 0; i < d; ++i) acc += static_cast<double>(y_hat[i]) * t.a_inv[h * d * d + i * d + j];
      out[j] = acc;
    }
  };
  std::vector<double> want(got.size(), 0.0);
  for (int b = 0; b < static_cast<int>(c.lens.size()); ++b) {
    const int len = c.lens[b];
    for (int hq = 0; hq < q_heads; ++hq) {
      const int h = hq / group;
      std::vector<double> s(len), k, v;
      std::vector<std::vector<double>> vals(len);
      double mx = -INFINITY;
      for (int t = 0; t < len; ++t) {
        const bool window = fmt::is_high_precision_token(t, len, sink, recent);
        const size_t off = (static_cast<size_t>(t) * kv_heads + h) * d;
        dequant(kt, true, h, c.keys[b].data() + off, window, k);
        dequant(vt, false, h, c.values[b].data() + off, window, vals[t]);
        double dot = 0;
        for (int i = 0; i < d; ++i) dot += fmt::bf16_to_f32(q[(static_cast<size_t>(b) * q_heads + hq) * d + i]) * k[i];
        s[t] = dot / std::sqrt(static_cast<double>(d));
        mx = std::max(mx, s[t]);
      }
      double den = 0;
      for (int t = 0; t < len; ++t) den += std::exp(s[t] - mx);
      for (int t = 0; t < len; ++t)
        for (int i = 0; i < d; ++i)
          want[(static_cast<size_t>(b) * q_heads + hq) * d + i] += std::exp(s[t] - mx) / den * vals[t][i];
    }
  }
  const double err = test::nmse(got, want);
  EXPECT_LE(err, 1e-9) << "the mean or a matrix is applied wrongly";
  // The mean matters: without subtracting it the logits of window and INT2 tokens would differ by q·μ. Reading
  // with the wrong matrices (A instead of A⁻ᵀ) gives a different answer.
  p.rotation_k = kt.a.data();
  std::vector<float> wrong(got.size());
  p.out = wrong.data();
  kern::decode_attention_ref(p);
  EXPECT_GT(test::nmse(wrong, want), 1e-3);
}

TEST(KvTransformRef, PreconditionsOfThePerHeadFields) {
  std::vector<float> m(64 * 64 * 2, 0.f), mean(128, 0.f);
  std::vector<uint16_t> x(128, 0);
  std::vector<int32_t> slots(1, 0);
  std::vector<uint8_t> pool(1 << 16);
  kern::KvWriteParams w;
  w.x = x.data();
  w.tokens = 1;
  w.token_stride = 128;
  w.num_kv_heads = 2;
  w.head_dim = 64;
  w.slots = slots.data();
  w.int2_pool = pool.data() + (16 - reinterpret_cast<uintptr_t>(pool.data()) % 16) % 16;
  w.rotation = m.data();
  w.rotation_head_stride = 64 * 64;
  w.head_mean = mean.data();
  EXPECT_EQ(kern::kv_write_can_implement(w, kern::KvWriteMode::Int2), kern::Status::Ok);
  w.rotation_head_stride = 100;  // neither 0 nor head_dim²
  EXPECT_EQ(kern::kv_write_can_implement(w, kern::KvWriteMode::Int2), kern::Status::InvalidArgument);
  w.rotation_head_stride = 64 * 64;
  w.rotation = nullptr;  // a stride without matrices
  EXPECT_EQ(kern::kv_write_can_implement(w, kern::KvWriteMode::Int2), kern::Status::InvalidArgument);
  w.rotation_head_stride = 0;
  w.clip_ratio = 1.0f;
  EXPECT_EQ(kern::kv_write_can_implement(w, kern::KvWriteMode::Fp8), kern::Status::Unsupported);  // FP8 has no mean
}

}  // namespace
}  // namespace oscar
