// GPU kernels of kernels/kv_quantize and kernels/attention_decode against their CPU references:
// quantize-on-write bit-exact, decode attention NMSE <= 1e-5. Skips without a CUDA device.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <numeric>
#include <random>
#include <vector>

#include "../kernels/kv_cache_test_util.h"
#include "kernels/attention_decode/decode_attention.h"
#include "kernels/attention_decode/decode_attention_ref.h"
#include "kernels/kv_quantize/kv_quantize.h"
#include "kernels/kv_quantize/kv_quantize_ref.h"
#include "gpu_test_buffer.h"
#include "test_support.h"

namespace oscar {
namespace {

using test::gpu::have_gpu;

using test::gpu::DeviceBuffer;

class KvWriteGpu : public ::testing::TestWithParam<int> {};

TEST_P(KvWriteGpu, BitExactAgainstReferenceIncludingOutliers) {
  OSCAR_REQUIRE_DEVICE();
  const int d = GetParam(), heads = 3, tokens = 333, pages = 8, page_tokens = 64;
  const auto rot = test::random_rotation(d, 40 + d);
  auto x = test::random_bf16(static_cast<size_t>(tokens) * heads * d, d, 41, 50.0f);
  x[7] = fmt::f32_to_bf16(3000.0f);  // a single huge outlier: must be clipped identically
  for (int i = 0; i < d; ++i) x[static_cast<size_t>(5 * heads * d) + i] = fmt::f32_to_bf16(0.25f);  // constant head
  std::vector<int32_t> slots(static_cast<size_t>(pages * page_tokens));
  std::iota(slots.begin(), slots.end(), 0);
  std::shuffle(slots.begin(), slots.end(), std::mt19937(3));
  slots.resize(tokens);
  slots[11] = -1;
  for (auto mode : {kern::KvWriteMode::Int2, kern::KvWriteMode::Bf16}) {
    for (bool with_rotation : {true, false}) {
      for (float clip : {1.0f, 0.96f, 0.5f}) {
        const fmt::Int2PageGeometry g2{d, page_tokens};
        const fmt::Bf16PageGeometry gb{d, page_tokens};
        std::vector<uint8_t> int2(static_cast<size_t>(pages) * heads * g2.page_bytes(), 0);
        std::vector<uint16_t> bf16(static_cast<size_t>(pages) * heads * gb.page_bytes() / 2, 0);
        kern::KvWriteParams p;
        p.tokens = tokens;
        p.token_stride = heads * d;
        p.num_kv_heads = heads;
        p.head_dim = d;
        p.page_tokens = page_tokens;
        p.clip_ratio = clip;
        DeviceBuffer<uint16_t> dx(x);
        DeviceBuffer<float> drot(rot);
        DeviceBuffer<int32_t> dslots(slots);
        DeviceBuffer<uint8_t> dint2(int2);
        DeviceBuffer<uint16_t> dbf16(bf16);
        p.x = dx.ptr;
        p.rotation = with_rotation ? drot.ptr : nullptr;
        p.slots = dslots.ptr;
        p.int2_pool = dint2.ptr;
        p.bf16_pool = dbf16.ptr;
        ASSERT_EQ(kern::kv_write(p, mode, nullptr), kern::Status::Ok);
        ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
        p.x = x.data();
        p.rotation = with_rotation ? rot.data() : nullptr;
        p.slots = slots.data();
        p.int2_pool = int2.data();
        p.bf16_pool = bf16.data();
        kern::kv_write_ref(p, mode);
        if (mode == kern::KvWriteMode::Int2)
          EXPECT_EQ(dint2.download(), int2) << "d " << d << " rot " << with_rotation << " clip " << clip;
        else
          EXPECT_EQ(dbf16.download(), bf16) << "d " << d << " rot " << with_rotation;
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(HeadDims, KvWriteGpu, ::testing::Values(64, 128, 256));

struct GpuDecodeCase {
  std::vector<int32_t> lens;
  int q_heads, kv_heads;
  int64_t sink, recent;
  int splits;  // 0 = auto
};

class DecodeGpu : public ::testing::TestWithParam<GpuDecodeCase> {};

TEST_P(DecodeGpu, MatchesReference) {
  OSCAR_REQUIRE_DEVICE();
  const auto& dc = GetParam();
  const int d = 128;
  const auto rk = test::random_rotation(d, 51), rv = test::random_rotation(d, 52);
  test::HostPagedCache c;
  c.build(dc.lens, dc.kv_heads, d, rk, rv, 0.96f, 0.92f, 9);
  const auto q = test::random_bf16(dc.lens.size() * dc.q_heads * d, d, 77, 3.0f);
  DeviceBuffer<uint8_t> ki(c.k_int2), vi(c.v_int2);
  DeviceBuffer<uint16_t> kb(c.k_bf16), vb(c.v_bf16), dq(q);
  DeviceBuffer<int32_t> it(c.int2_table), bt(c.bf16_table), lens(c.lens);
  DeviceBuffer<float> drk(rk), drv(rv);
  const size_t n_out = dc.lens.size() * dc.q_heads * d;
  DeviceBuffer<float> dout(n_out);

  auto p = c.params(ki.ptr, vi.ptr, kb.ptr, vb.ptr, it.ptr, bt.ptr, lens.ptr);
  p.num_q_heads = dc.q_heads;
  p.q = dq.ptr;
  p.rotation_k = drk.ptr;
  p.rotation_v = drv.ptr;
  p.sink_tokens = dc.sink;
  p.recent_tokens = dc.recent;
  p.out = dout.ptr;
  p.num_splits = dc.splits;
  const int splits = dc.splits ? dc.splits : kern::decode_attention_num_splits(p.batch, p.num_q_heads, p.num_kv_heads, p.max_seq_len, p.page_tokens, 132);
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  const int auto_splits = kern::decode_attention_num_splits(p.batch, p.num_q_heads, p.num_kv_heads, p.max_seq_len, p.page_tokens, sms);
  const size_t ws = kern::decode_attention_workspace_bytes(p.batch, p.num_q_heads, d, std::max(splits, auto_splits));
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
  hp.rotation_k = rk.data();
  hp.rotation_v = rv.data();
  hp.sink_tokens = dc.sink;
  hp.recent_tokens = dc.recent;
  std::vector<float> want_f(n_out);
  hp.out = want_f.data();
  kern::decode_attention_ref(hp);
  const std::vector<double> want(want_f.begin(), want_f.end());
  const double err = test::nmse(got, want);
  RecordProperty("nmse", std::to_string(err));
  EXPECT_LE(err, 1e-5);
}

INSTANTIATE_TEST_SUITE_P(
    Cases, DecodeGpu,
    ::testing::Values(GpuDecodeCase{{1}, 32, 8, 64, 256, 0}, GpuDecodeCase{{300}, 32, 8, 64, 256, 0},
                      GpuDecodeCase{{4097}, 32, 8, 64, 256, 0}, GpuDecodeCase{{4097}, 64, 8, 64, 256, 0},
                      GpuDecodeCase{{4097}, 32, 8, 0, 0, 0}, GpuDecodeCase{{4097}, 64, 8, 0, 0, 7},
                      GpuDecodeCase{{300}, 16, 4, 0, 0, 1}, GpuDecodeCase{{4097, 1, 300, 77}, 32, 8, 64, 256, 0},
                      GpuDecodeCase{{4097, 1, 300, 77}, 64, 8, 16, 40, 3},
                      GpuDecodeCase{{4097, 300}, 32, 8, 1 << 30, 0, 0}));  // all-bf16 baseline

}  // namespace
}  // namespace oscar
