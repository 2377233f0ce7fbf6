// Per-KV-head storage transforms (bundle format 2.0) on the GPU against the CPU references: kv_write with a matrix
// per head and the keys' mean (INT2 round-to-nearest through the per-head path, INT2 with error-feedback tables,
// bf16 windows) bit-exact with kv_write_ref, at head_dim 64/128/256 and 1/3/8 KV heads; decode attention reading
// with a matrix per KV head (A⁻ᵀ) for q and the output, every variant, NMSE <= 1e-5 against decode_attention_ref.
// Skips without a CUDA device.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "../kernels/kv_cache_test_util.h"
#include "../kernels/kv_transform_test_util.h"
#include "../kernels/kv_write_ef_util.h"
#include "formats/dtype.h"
#include "formats/kv_layout.h"
#include "gpu_test_buffer.h"
#include "kernels/attention_decode/decode_attention.h"
#include "kernels/attention_decode/decode_attention_ref.h"
#include "kernels/kv_quantize/kv_quantize.h"
#include "kernels/kv_quantize/kv_quantize_ref.h"
#include "test_support.h"

namespace oscar {
namespace {

using test::gpu::DeviceBuffer;

class KvTransformWriteGpu : public ::testing::TestWithParam<int> {};

TEST_P(KvTransformWriteGpu, BitExactWithReference) {
  OSCAR_REQUIRE_DEVICE();
  const int d = GetParam(), tokens = 203, page_tokens = 64;
  const int pages = (tokens + page_tokens - 1) / page_tokens + 1;
  int compared = 0;
  for (int heads : {1, 3, 8}) {
    const auto tf = test::random_head_transforms(d, heads, 300 + d + heads);
    const auto tables = test::random_ef_tables(d, heads, 400 + d + heads);
    const int64_t stride = static_cast<int64_t>(heads) * d + 8;  // x a slice of a wider row
    std::vector<uint16_t> x(static_cast<size_t>(tokens) * stride, fmt::f32_to_bf16(123.f));
    const auto g = test::random_bf16(static_cast<size_t>(tokens) * heads * d, d, 500 + heads, 20.0f);
    for (int t = 0; t < tokens; ++t)
      for (int h = 0; h < heads; ++h)
        for (int i = 0; i < d; ++i)  // the key mean on top, as post-RoPE keys have
          x[t * stride + h * d + i] = fmt::f32_to_bf16(fmt::bf16_to_f32(g[(t * heads + h) * d + i]) + tf.mean[h * d + i]);
    std::vector<int32_t> slots(static_cast<size_t>(pages) * page_tokens);
    std::iota(slots.begin(), slots.end(), 0);
    std::shuffle(slots.begin(), slots.end(), std::mt19937(7 + heads));
    slots.resize(tokens);
    for (int t = 0; t < tokens; t += 7) slots[t] = -1;
    for (const int kind : {0, 1, 2}) {  // INT2 RTN, INT2 EF, bf16
      for (const bool with_mean : {false, true}) {
        const fmt::Int2PageGeometry g2{d, page_tokens};
        const fmt::Bf16PageGeometry gb{d, page_tokens};
        std::vector<uint8_t> int2(static_cast<size_t>(pages) * heads * g2.page_bytes(), 0xab);
        std::vector<uint16_t> bf16(static_cast<size_t>(pages) * heads * gb.page_bytes() / 2, 0xabab);
        kern::KvWriteParams p;
        p.tokens = tokens;
        p.token_stride = stride;
        p.num_kv_heads = heads;
        p.head_dim = d;
        p.page_tokens = page_tokens;
        p.clip_ratio = 0.96f;
        p.rotation_head_stride = static_cast<int64_t>(d) * d;
        p.ef_clip_feedback = true;
        DeviceBuffer<uint16_t> dx(x);
        DeviceBuffer<float> da(tf.a), dmean(tf.mean), dw(tables.weights);
        DeviceBuffer<int32_t> dslots(slots), dorder(tables.order);
        DeviceBuffer<uint8_t> dint2(int2);
        DeviceBuffer<uint16_t> dbf16(bf16);
        p.x = dx.ptr;
        p.rotation = da.ptr;
        p.head_mean = with_mean ? dmean.ptr : nullptr;
        p.slots = dslots.ptr;
        p.int2_pool = dint2.ptr;
        p.bf16_pool = dbf16.ptr;
        if (kind == 1) p.ef_order = dorder.ptr, p.ef_weights = dw.ptr;
        const kern::KvWriteMode mode = kind == 2 ? kern::KvWriteMode::Bf16 : kern::KvWriteMode::Int2;
        ASSERT_EQ(kern::kv_write(p, mode, nullptr), kern::Status::Ok);
        ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
        p.x = x.data();
        p.rotation = tf.a.data();
        p.head_mean = with_mean ? tf.mean.data() : nullptr;
        p.slots = slots.data();
        p.int2_pool = int2.data();
        p.bf16_pool = bf16.data();
        if (kind == 1) p.ef_order = tables.order.data(), p.ef_weights = tables.weights.data();
        kern::kv_write_ref(p, mode);
        if (kind == 2)
          EXPECT_EQ(dbf16.download(), bf16) << "d " << d << " heads " << heads << " mean " << with_mean;
        else
          EXPECT_EQ(dint2.download(), int2) << "d " << d << " heads " << heads << " kind " << kind << " mean "
                                            << with_mean;
        ++compared;
      }
    }
  }
  EXPECT_EQ(compared, 3 * 3 * 2);
}

INSTANTIATE_TEST_SUITE_P(HeadDims, KvTransformWriteGpu, ::testing::Values(64, 128, 256));

struct TransformDecodeCase {
  std::vector<int32_t> lens;
  int q_heads, kv_heads;
  kern::DecodeAttentionVariant variant;
};

class KvTransformDecodeGpu : public ::testing::TestWithParam<TransformDecodeCase> {};

TEST_P(KvTransformDecodeGpu, MatchesReference) {
  OSCAR_REQUIRE_DEVICE();
  const auto& dc = GetParam();
  const int d = 128;
  const auto kt = test::random_head_transforms(d, dc.kv_heads, 61), vt = test::random_head_transforms(d, dc.kv_heads, 62);
  test::HostPagedCache c;
  c.k_transform = kt.a;
  c.k_mean = kt.mean;
  c.v_transform = vt.a;
  c.build(dc.lens, dc.kv_heads, d, {}, {}, 0.96f, 0.92f, 19);
  const auto q = test::random_bf16(dc.lens.size() * dc.q_heads * d, d, 87, 3.0f);
  DeviceBuffer<uint8_t> ki(c.k_int2), vi(c.v_int2);
  DeviceBuffer<uint16_t> kb(c.k_bf16), vb(c.v_bf16), dq(q);
  DeviceBuffer<int32_t> it(c.int2_table), bt(c.bf16_table), lens(c.lens);
  DeviceBuffer<float> drk(kt.read), drv(vt.read);
  const size_t n_out = dc.lens.size() * dc.q_heads * d;
  DeviceBuffer<float> dout(n_out);
  auto p = c.params(ki.ptr, vi.ptr, kb.ptr, vb.ptr, it.ptr, bt.ptr, lens.ptr);
  p.num_q_heads = dc.q_heads;
  p.q = dq.ptr;
  p.rotation_k = drk.ptr;
  p.rotation_v = drv.ptr;
  p.rotation_k_head_stride = p.rotation_v_head_stride = static_cast<int64_t>(d) * d;
  p.sink_tokens = 64;
  p.recent_tokens = 256;
  p.out = dout.ptr;
  p.variant = dc.variant;
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  const int splits = kern::decode_attention_num_splits(p.batch, p.num_q_heads, p.num_kv_heads, p.max_seq_len, p.page_tokens, sms);
  const size_t ws = kern::decode_attention_workspace_bytes(p.batch, p.num_q_heads, d, splits);
  DeviceBuffer<uint8_t> workspace(ws);
  p.workspace = workspace.ptr;
  p.workspace_bytes = ws;
  ASSERT_EQ(kern::decode_attention(p, nullptr), kern::Status::Ok);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const auto got = dout.download();

  auto hp = c.params(c.k_int2.data(), c.v_int2.data(), c.k_bf16.data(), c.v_bf16.data(), c.int2_table.data(),
                     c.bf16_table.data(), c.lens.data());
  hp.num_q_heads = dc.q_heads;
  hp.q = q.data();
  hp.rotation_k = kt.read.data();
  hp.rotation_v = vt.read.data();
  hp.rotation_k_head_stride = hp.rotation_v_head_stride = static_cast<int64_t>(d) * d;
  hp.sink_tokens = 64;
  hp.recent_tokens = 256;
  std::vector<float> want_f(n_out);
  hp.out = want_f.data();
  kern::decode_attention_ref(hp);
  const double err = test::nmse(got, std::vector<double>(want_f.begin(), want_f.end()));
  RecordProperty("nmse", std::to_string(err));
  EXPECT_LE(err, 1e-5);
}

INSTANTIATE_TEST_SUITE_P(
    Cases, KvTransformDecodeGpu,
    ::testing::Values(TransformDecodeCase{{4097, 1, 300, 77}, 32, 8, kern::DecodeAttentionVariant::Fused},
                      TransformDecodeCase{{4097, 1, 300, 77}, 64, 8, kern::DecodeAttentionVariant::Fused},
                      TransformDecodeCase{{4097, 300}, 32, 8, kern::DecodeAttentionVariant::Separate},
                      TransformDecodeCase{{4097, 300}, 16, 8, kern::DecodeAttentionVariant::FusedWide},
                      TransformDecodeCase{{2000}, 8, 1, kern::DecodeAttentionVariant::Fused}),
    // A readable, stable name: the default prints the case's bytes, pointers included, which differ between the
    // ctest discovery run and the test run.
    [](const ::testing::TestParamInfo<TransformDecodeCase>& info) {
      const TransformDecodeCase& c = info.param;
      const char* variant = c.variant == kern::DecodeAttentionVariant::Fused       ? "fused"
                            : c.variant == kern::DecodeAttentionVariant::Separate  ? "separate"
                            : c.variant == kern::DecodeAttentionVariant::FusedWide ? "fusedwide"
                                                                                   : "other";
      return "q" + std::to_string(c.q_heads) + "_kv" + std::to_string(c.kv_heads) + "_seqs" +
             std::to_string(c.lens.size()) + "_" + variant;
    });

}  // namespace
}  // namespace oscar
