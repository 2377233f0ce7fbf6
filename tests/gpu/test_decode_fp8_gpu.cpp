// The FP8 (e4m3) cache baseline on the GPU: kv_write in KvWriteMode::Fp8 bit-exact against kv_write_ref and
// calib::HeadQuantizer (ties, saturation, zeros, subnormal codes, ±448, fp16-subnormal scales, NaN / inf inputs),
// and decode attention over FP8 pages against the double-precision reference (NMSE <= 1e-5, fp32 out) across head
// dims, GQA groups, page sizes, windows that cut pages, 1..40 splits and a 14K-token sequence. Skips without a
// CUDA device.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "../kernels/kv_cache_test_util.h"
#include "kernels/attention_decode/decode_attention.h"
#include "kernels/attention_decode/decode_attention_ref.h"
#include "kernels/kv_quantize/kv_quantize.h"
#include "kernels/kv_quantize/kv_quantize_ref.h"
#include "lib/calib/quantizer_ref.h"
#include "gpu_test_buffer.h"
#include "test_support.h"

namespace oscar {
namespace {

using test::gpu::have_gpu;

using test::gpu::DeviceBuffer;

class KvWriteFp8Gpu : public ::testing::TestWithParam<int> {};

TEST_P(KvWriteFp8Gpu, BitExactAgainstReferenceAndHeadQuantizer) {
  OSCAR_REQUIRE_DEVICE();
  const int d = GetParam(), heads = 3, tokens = 333, pages = 8, page_tokens = 64;
  const int stride = heads * d + 8;  // a slice of a wider buffer (as K in the fused QKV output)
  const auto rows = test::fp8_special_rows(d, tokens * heads, 90 + d);
  std::vector<float> xf(static_cast<size_t>(tokens) * stride, 0.0f);
  for (int t = 0; t < tokens; ++t)
    std::memcpy(xf.data() + static_cast<size_t>(t) * stride, rows.data() + static_cast<size_t>(t) * heads * d,
                sizeof(float) * heads * d);
  // fp32 only: NaN and infinities (NaN ignored by the max and coded 0x7f; an infinite amax gives an inf scale).
  xf[static_cast<size_t>(13) * stride + 3] = std::numeric_limits<float>::quiet_NaN();
  xf[static_cast<size_t>(21) * stride + d + 1] = -std::numeric_limits<float>::infinity();
  xf[static_cast<size_t>(29) * stride + 2] = 3e38f;  // amax / 448 overflows fp16: scale inf
  std::vector<uint16_t> xb(xf.size());
  for (size_t i = 0; i < xf.size(); ++i) xb[i] = fmt::f32_to_bf16(xf[i]);
  std::vector<int32_t> slots(static_cast<size_t>(pages * page_tokens));
  std::iota(slots.begin(), slots.end(), 0);
  std::shuffle(slots.begin(), slots.end(), std::mt19937(3));
  slots.resize(tokens);
  slots[11] = -1;
  const fmt::Fp8PageGeometry geo{d, page_tokens};
  fmt::TensorQuantSpec spec;
  spec.storage = fmt::KvStorage::Fp8E4M3;
  spec.segments = {{0, d, 8}};
  const calib::HeadQuantizer hq(spec, d);
  for (bool f32 : {false, true}) {
    std::vector<uint8_t> pool(static_cast<size_t>(pages) * heads * geo.page_bytes(), 0);
    DeviceBuffer<uint16_t> dxb(xb);
    DeviceBuffer<float> dxf(xf);
    DeviceBuffer<int32_t> dslots(slots);
    DeviceBuffer<uint8_t> dpool(pool);
    kern::KvWriteParams p;
    p.tokens = tokens;
    p.token_stride = stride;
    p.num_kv_heads = heads;
    p.head_dim = d;
    p.page_tokens = page_tokens;
    p.x = f32 ? nullptr : dxb.ptr;
    p.x_f32 = f32 ? dxf.ptr : nullptr;
    p.slots = dslots.ptr;
    p.int2_pool = dpool.ptr;
    ASSERT_EQ(kern::kv_write(p, kern::KvWriteMode::Fp8, nullptr), kern::Status::Ok);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    const auto got = dpool.download();
    p.x = f32 ? nullptr : xb.data();
    p.x_f32 = f32 ? xf.data() : nullptr;
    p.slots = slots.data();
    p.int2_pool = pool.data();
    kern::kv_write_ref(p, kern::KvWriteMode::Fp8);
    EXPECT_EQ(got, pool) << "d " << d << " fp32 rows " << f32;

    // Directly against the record encoder, token by token (the reference above is built on it too; this pins
    // the page layout: codes row + scale at scales_offset).
    std::vector<float> x(static_cast<size_t>(d));
    std::vector<uint8_t> record(static_cast<size_t>(hq.record_bytes()));
    int mismatched = 0, saturated = 0, nan_codes = 0;
    for (int t = 0; t < tokens; ++t) {
      if (slots[static_cast<size_t>(t)] < 0) continue;
      for (int h = 0; h < heads; ++h) {
        const size_t src = static_cast<size_t>(t) * stride + static_cast<size_t>(h) * d;
        for (int i = 0; i < d; ++i) x[static_cast<size_t>(i)] = f32 ? xf[src + i] : fmt::bf16_to_f32(xb[src + i]);
        hq.encode(x, {}, 1.0f, record);
        const int slot = slots[static_cast<size_t>(t)];
        const uint8_t* block = got.data() + fmt::page_block_offset(slot / page_tokens, h, heads, geo.page_bytes());
        const int off = slot % page_tokens;
        mismatched += std::memcmp(block + static_cast<size_t>(off) * d, record.data(), static_cast<size_t>(d)) != 0 ||
                      std::memcmp(block + geo.scales_offset() + off * 2, record.data() + d, 2) != 0;
        for (int i = 0; i < d; ++i) {
          saturated += (record[static_cast<size_t>(i)] & 0x7f) == 0x7e;
          nan_codes += record[static_cast<size_t>(i)] == 0x7f;
        }
      }
    }
    EXPECT_EQ(mismatched, 0) << "d " << d << " fp32 rows " << f32;
    EXPECT_GT(saturated, 0);  // the ±448 / saturating rows were exercised
    if (f32) {
      EXPECT_GT(nan_codes, 0);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(HeadDims, KvWriteFp8Gpu, ::testing::Values(64, 128, 256));

struct Fp8DecodeCase {
  int d;
  std::vector<int32_t> lens;
  int q_heads, kv_heads;
  int page_tokens;
  int64_t sink, recent;
  int splits;  // 0 = auto
};

std::string case_name(const ::testing::TestParamInfo<Fp8DecodeCase>& info) {
  const auto& c = info.param;
  return "d" + std::to_string(c.d) + "_g" + std::to_string(c.q_heads / c.kv_heads) + "_n" +
         std::to_string(c.lens.size()) + "_len" + std::to_string(c.lens[0]) + "_p" + std::to_string(c.page_tokens) +
         "_w" + std::to_string(c.sink) + "_" + std::to_string(c.recent) + "_s" + std::to_string(c.splits) + "_" +
         std::to_string(info.index);
}

class DecodeFp8Gpu : public ::testing::TestWithParam<Fp8DecodeCase> {};

TEST_P(DecodeFp8Gpu, MatchesDoubleReference) {
  OSCAR_REQUIRE_DEVICE();
  const auto& dc = GetParam();
  const int d = dc.d;
  test::HostPagedCache c;
  c.page_tokens = dc.page_tokens;
  c.fp8 = true;
  c.build(dc.lens, dc.kv_heads, d, {}, {}, 1.0f, 1.0f, 17 + d);
  const auto q = test::random_bf16(dc.lens.size() * dc.q_heads * d, d, 78, 3.0f);
  DeviceBuffer<uint8_t> ki(c.k_int2), vi(c.v_int2);
  DeviceBuffer<uint16_t> kb(c.k_bf16), vb(c.v_bf16), dq(q);
  DeviceBuffer<int32_t> it(c.int2_table), bt(c.bf16_table), lens(c.lens);
  const size_t n_out = dc.lens.size() * dc.q_heads * d;
  DeviceBuffer<float> dout(n_out);

  auto p = c.params(ki.ptr, vi.ptr, kb.ptr, vb.ptr, it.ptr, bt.ptr, lens.ptr);
  ASSERT_EQ(p.quant_storage, fmt::KvStorage::Fp8E4M3);
  p.num_q_heads = dc.q_heads;
  p.q = dq.ptr;
  p.sink_tokens = dc.sink;
  p.recent_tokens = dc.recent;
  p.out = dout.ptr;
  p.num_splits = dc.splits;
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  const int auto_splits = kern::decode_attention_num_splits(p.batch, p.num_q_heads, p.num_kv_heads, p.max_seq_len, p.page_tokens, sms);
  const size_t ws = kern::decode_attention_workspace_bytes(p.batch, p.num_q_heads, d, std::max(dc.splits, auto_splits));
  DeviceBuffer<uint8_t> workspace(ws);
  p.workspace = workspace.ptr;
  p.workspace_bytes = ws;
  ASSERT_EQ(kern::decode_attention(p, nullptr), kern::Status::Ok);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const auto got = dout.download();
  // Fused is the default variant; FP8 must run the separate kernels whatever is asked, with the same result.
  p.variant = kern::DecodeAttentionVariant::Separate;
  ASSERT_EQ(kern::decode_attention(p, nullptr), kern::Status::Ok);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  EXPECT_EQ(dout.download(), got) << "deterministic, variant-independent";

  auto hp = c.params(c.k_int2.data(), c.v_int2.data(), c.k_bf16.data(), c.v_bf16.data(), c.int2_table.data(),
                     c.bf16_table.data(), c.lens.data());
  hp.num_q_heads = dc.q_heads;
  hp.q = q.data();
  hp.sink_tokens = dc.sink;
  hp.recent_tokens = dc.recent;
  std::vector<float> want_f(n_out);
  hp.out = want_f.data();
  kern::decode_attention_ref(hp);
  const std::vector<double> want(want_f.begin(), want_f.end());
  const double err = test::nmse(got, want);
  RecordProperty("nmse", std::to_string(err));
  EXPECT_LE(err, 1e-5);
  // A zero reference would make the NMSE bound meaningless.
  double norm = 0;
  for (double w : want) norm += w * w;
  EXPECT_GT(norm, 0.0);
}

INSTANTIATE_TEST_SUITE_P(
    Cases, DecodeFp8Gpu,
    ::testing::Values(
        // head dims x groups, windows cutting pages, auto splits
        Fp8DecodeCase{64, {1500}, 8, 8, 64, 64, 256, 0}, Fp8DecodeCase{64, {1500}, 32, 8, 64, 5, 37, 0},
        Fp8DecodeCase{64, {1500}, 16, 2, 64, 16, 40, 3}, Fp8DecodeCase{128, {2049}, 8, 8, 64, 64, 256, 0},
        Fp8DecodeCase{128, {2049}, 32, 8, 64, 16, 40, 0}, Fp8DecodeCase{128, {2049}, 64, 8, 64, 0, 0, 7},
        Fp8DecodeCase{256, {1100}, 4, 4, 64, 64, 256, 0}, Fp8DecodeCase{256, {1100}, 16, 4, 64, 3, 61, 2},
        Fp8DecodeCase{256, {1100}, 16, 2, 64, 0, 0, 0},
        // page sizes 16 / 32, groups 2 / 4 / 8
        Fp8DecodeCase{128, {999}, 16, 8, 16, 17, 33, 0}, Fp8DecodeCase{128, {999}, 32, 8, 32, 64, 100, 5},
        Fp8DecodeCase{64, {777}, 64, 8, 16, 0, 1, 40},
        // batches of different lengths, including one inside the windows only and a single token
        Fp8DecodeCase{128, {4097, 1, 300, 77}, 32, 8, 64, 64, 256, 0},
        Fp8DecodeCase{128, {4097, 1, 300, 77}, 64, 8, 64, 16, 40, 3},
        Fp8DecodeCase{64, {2000, 65, 1000}, 16, 4, 32, 8, 24, 1},
        // splits 1 .. 40 on one sequence
        Fp8DecodeCase{128, {3000}, 32, 8, 64, 64, 256, 1}, Fp8DecodeCase{128, {3000}, 32, 8, 64, 64, 256, 13},
        Fp8DecodeCase{128, {3000}, 32, 8, 64, 64, 256, 40},
        // 14K tokens, every head dim's group-8 path and group 1
        Fp8DecodeCase{128, {14000}, 16, 2, 64, 64, 256, 0}, Fp8DecodeCase{256, {14000}, 8, 1, 64, 64, 256, 0},
        Fp8DecodeCase{64, {14000}, 4, 4, 64, 0, 0, 0}),
    case_name);

TEST(DecodeFp8GpuCheck, RejectsGeometriesWithFp8) {
  OSCAR_REQUIRE_DEVICE();
  const fmt::QuantSegment seg[] = {{0, 128, 2}};
  const auto geo = fmt::segmented_page_geometry(seg, 1, 128, 64);
  kern::DecodeAttentionParams p;
  p.num_q_heads = 8;
  p.num_kv_heads = 2;
  p.quant_storage = fmt::KvStorage::Fp8E4M3;
  p.k_geometry = p.v_geometry = &geo;
  EXPECT_EQ(kern::decode_attention(p, nullptr), kern::Status::InvalidArgument);
}

}  // namespace
}  // namespace oscar
