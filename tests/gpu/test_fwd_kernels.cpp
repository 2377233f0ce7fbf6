// Forward-pass kernels (embedding, rmsnorm, rope_qkv, swiglu, attention_prefill) against their CPU references.
// Inputs are rounded to bf16 before the reference sees them, so the only differences left are the kernels' own
// arithmetic and output rounding: NMSE <= 1e-5 on fp32 outputs, <= 1e-4 on bf16 outputs.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <utility>
#include <span>
#include <vector>

#include "kernels/activation/swiglu.h"
#include "kernels/attention_prefill/attention_prefill.h"
#include "kernels/embedding/embedding.h"
#include "kernels/norm/rmsnorm.h"
#include "kernels/rope/rope_qkv.h"
#include "lib/model/cpu_model.h"
#include "runtime/device_buffer.h"
#include "test_fwd_gpu_support.h"
#include "test_support.h"

namespace oscar::kern {
namespace {

using rt::DeviceBuffer;
using rt::to_device;
using rt::to_host;
using test::fwd::bf16_round;
using test::fwd::nmse;
using test::fwd::randn;
using test::fwd::to_bf16;
using test::fwd::widen;

template <class T>
DeviceBuffer dev(const std::vector<T>& v) {
  return to_device(std::span<const T>(v));
}

void sync() { ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess); }

// Every prefill attention kernel of the table, in its order (v2 before v3, whose bits the test compares), then Auto.
std::vector<PrefillKernel> every_kernel_and_auto() {
  std::vector<PrefillKernel> kernels;
  for (const PrefillKernelInfo& info : kPrefillKernels) kernels.push_back(info.kernel);
  kernels.push_back(PrefillKernel::Auto);
  return kernels;
}

// v2 (the portable kernel) and every TMA kernel (the latest wgmma family), then Auto.
std::vector<PrefillKernel> v2_tma_kernels_and_auto() {
  std::vector<PrefillKernel> kernels = {PrefillKernel::V2};
  for (const PrefillKernelInfo& info : kPrefillKernels)
    if (info.tma) kernels.push_back(info.kernel);
  kernels.push_back(PrefillKernel::Auto);
  return kernels;
}

TEST(FwdGpuEmbedding, GatherIsExact) {
  OSCAR_REQUIRE_GPU();
  const int64_t vocab = 1000, hidden = 320;
  const std::vector<uint16_t> table = to_bf16(randn(vocab * hidden, 1));
  const std::vector<int32_t> ids = {0, 999, 17, 17, 1000, -3, 512};
  DeviceBuffer d_table = dev(table), d_ids = dev(ids), d_out(ids.size() * hidden * 4);
  ASSERT_EQ(embedding_gather(d_ids.as<int32_t>(), static_cast<int64_t>(ids.size()), d_table.as<uint16_t>(), vocab,
                             hidden, d_out.as<float>(), nullptr),
            Status::Ok);
  sync();
  std::vector<float> ref(ids.size() * hidden);
  embedding_gather_ref(ids, table.data(), vocab, hidden, ref.data());
  EXPECT_EQ(to_host(d_out.as<float>(), ref.size()), ref);
}

TEST(FwdGpuRmsNorm, PlainAndResidualVariantsMatchRef) {
  OSCAR_REQUIRE_GPU();
  // Vector kernel at 1, 2, 4 and 8 float4s per thread (64/1000, 2048, 4096, 8192), scalar for n % 4 != 0 (1001)
  // and n > 8192 (10240).
  for (const int64_t n : {64, 1000, 1001, 2048, 4096, 5120, 8192, 10240}) {
    const int64_t rows = 37;
    const std::vector<float> x = randn(rows * n, 2, 4.f), delta = randn(rows * n, 3);
    const std::vector<uint16_t> w = to_bf16(randn(n, 4));
    const std::vector<float> w32 = widen(w);
    DeviceBuffer d_x = dev(x), d_delta = dev(delta), d_w = dev(w), d_out(rows * n * 2);

    ASSERT_EQ(rmsnorm(d_x.as<float>(), rows, n, d_w.as<uint16_t>(), 1e-5f, d_out.as<uint16_t>(), nullptr), Status::Ok);
    sync();
    std::vector<float> ref(rows * n);
    rmsnorm_ref(x.data(), rows, n, w32.data(), 1e-5f, ref.data());
    EXPECT_LE(nmse(widen(to_host(d_out.as<uint16_t>(), ref.size())), ref), 1e-4) << "n=" << n;

    ASSERT_EQ(add_rmsnorm(d_x.as<float>(), d_delta.as<float>(), rows, n, d_w.as<uint16_t>(), 1e-5f,
                          d_out.as<uint16_t>(), nullptr),
              Status::Ok);
    sync();
    std::vector<float> residual = x;
    add_rmsnorm_ref(residual.data(), delta.data(), rows, n, w32.data(), 1e-5f, ref.data());
    EXPECT_EQ(to_host(d_x.as<float>(), residual.size()), residual) << "fp32 residual add is exact";
    EXPECT_LE(nmse(widen(to_host(d_out.as<uint16_t>(), ref.size())), ref), 1e-4) << "n=" << n;
  }
}

TEST(FwdGpuRmsNorm, HeadNormOnStridedRowsMatchesRef) {
  OSCAR_REQUIRE_GPU();
  const int64_t rows = 50, heads = 4, d = 128, stride = (heads + 4) * d;
  std::vector<float> x = randn(rows * stride, 5, 3.f);
  const std::vector<uint16_t> w = to_bf16(randn(d, 6));
  DeviceBuffer d_x = dev(x), d_w = dev(w);
  ASSERT_EQ(head_rmsnorm(d_x.as<float>(), rows, stride, heads, d, d_w.as<uint16_t>(), 1e-6f, nullptr), Status::Ok);
  sync();
  const std::vector<float> w32 = widen(w);
  head_rmsnorm_ref(x.data(), rows, stride, heads, d, w32.data(), 1e-6f);
  EXPECT_LE(nmse(to_host(d_x.as<float>(), x.size()), x), 1e-10);
}

TEST(FwdGpuSwiglu, VectorAndScalarPathsMatchRef) {
  OSCAR_REQUIRE_GPU();
  for (const int64_t inter : {192, 172, 14336}) {
    const int64_t rows = 33;
    const std::vector<uint16_t> gu = to_bf16(randn(rows * 2 * inter, 7, 2.f));
    DeviceBuffer d_gu = dev(gu), d_out(rows * inter * 2);
    ASSERT_EQ(swiglu(d_gu.as<uint16_t>(), rows, inter, d_out.as<uint16_t>(), nullptr), Status::Ok);
    sync();
    std::vector<float> ref(rows * inter);
    swiglu_ref(widen(gu).data(), rows, inter, ref.data());
    EXPECT_LE(nmse(widen(to_host(d_out.as<uint16_t>(), ref.size())), ref), 1e-4) << "inter=" << inter;
  }
}

struct RopeCase {
  int64_t hq, hkv, d;
  bool qk_norm, bias;
  int32_t pos0;
  int64_t pad = 0;  // extra row-stride elements on top of 8
};

// Positions first, first + step, ... for T tokens and the inv_freq table of a head_dim-d model with RoPE base theta.
struct RopeTables {
  std::vector<int32_t> pos;
  std::vector<float> inv_freq;
};
RopeTables rope_tables(int64_t T, int64_t d, double theta, int32_t step, int32_t first) {
  RopeTables r;
  r.pos.resize(static_cast<size_t>(T));
  for (int64_t t = 0; t < T; ++t) r.pos[t] = first + static_cast<int32_t>(t * step);
  fmt::ModelConfig cfg;
  cfg.head_dim = d;
  cfg.rope.theta = theta;
  r.inv_freq = model::rope_inv_freq(cfg);
  return r;
}

// Every output of one rope_qkv call (bf16 Q/K/V and, when asked for, the four fp32 observer copies), for
// bit-for-bit comparisons.
struct RopeOutputs {
  std::vector<uint16_t> q, k, v;
  std::vector<float> q32, k32, kpre32, v32;
  bool operator==(const RopeOutputs&) const = default;
};
// Runs rope_qkv with the inputs set in `a` (qkv or qkv_bf16, bias, norms, positions, inv_freq) into fresh outputs;
// with_f32: the fp32 observer copies too (the forward without an observer writes none).
RopeOutputs run_rope(const RopeQkvShape& s, RopeQkvArgs a, bool with_f32 = true) {
  const int64_t nq = s.num_tokens * s.num_heads * s.head_dim, nkv = s.num_tokens * s.num_kv_heads * s.head_dim;
  DeviceBuffer q(nq * 2), k(nkv * 2), v(nkv * 2), q32(nq * 4), k32(nkv * 4), kpre32(nkv * 4), v32(nkv * 4);
  a.q_out = q.as<uint16_t>();
  a.k_out = k.as<uint16_t>();
  a.v_out = v.as<uint16_t>();
  if (with_f32) {
    a.q_f32 = q32.as<float>();
    a.k_f32 = k32.as<float>();
    a.k_pre_rope_f32 = kpre32.as<float>();
    a.v_f32 = v32.as<float>();
  }
  EXPECT_EQ(rope_qkv(s, a, nullptr), Status::Ok);
  sync();
  RopeOutputs out{to_host(q.as<uint16_t>(), nq), to_host(k.as<uint16_t>(), nkv), to_host(v.as<uint16_t>(), nkv)};
  if (with_f32) {
    out.q32 = to_host(q32.as<float>(), nq);
    out.k32 = to_host(k32.as<float>(), nkv);
    out.kpre32 = to_host(kpre32.as<float>(), nkv);
    out.v32 = to_host(v32.as<float>(), nkv);
  }
  return out;
}

TEST(FwdGpuRope, FusedQkvPrepMatchesRef) {
  OSCAR_REQUIRE_GPU();
  // Vector path (d/2 a multiple of 8, 16-byte rows: d = 16, 32, 64, 128, 256) and the scalar fallback (d = 8, 96,
  // or a row stride that breaks 16-byte alignment, pad 1).
  for (const RopeCase c : {RopeCase{4, 2, 128, true, false, 31000}, RopeCase{8, 4, 8, false, true, 0},
                           RopeCase{32, 8, 128, false, false, 5}, RopeCase{6, 6, 64, true, true, 1000},
                           RopeCase{4, 2, 128, true, true, 7, 1}, RopeCase{2, 1, 256, true, true, 32000},
                           RopeCase{4, 1, 16, true, false, 3}, RopeCase{3, 1, 96, true, true, 11},
                           RopeCase{8, 8, 32, false, true, 65000}}) {
    const int64_t T = 45, slots = c.hq + 2 * c.hkv;
    const RopeQkvShape s{T, c.hq, c.hkv, c.d, slots * c.d + 8 + c.pad};  // padded rows: the stride is honoured
    const std::vector<float> qkv = randn(T * s.qkv_row_stride, 8, 2.f), bias = randn(slots * c.d, 9);
    const std::vector<uint16_t> qn = to_bf16(randn(c.d, 10)), kn = to_bf16(randn(c.d, 11));
    std::vector<int32_t> pos(T);
    for (int64_t t = 0; t < T; ++t) pos[t] = c.pos0 + static_cast<int32_t>(t * 7);  // gaps: positions are per token
    fmt::ModelConfig cfg;
    cfg.head_dim = c.d;
    cfg.rope.theta = 1e6;
    const std::vector<float> inv_freq = model::rope_inv_freq(cfg);

    DeviceBuffer d_qkv = dev(qkv), d_bias = dev(bias), d_qn = dev(qn), d_kn = dev(kn), d_pos = dev(pos),
                 d_inv = dev(inv_freq);
    const int64_t nq = T * c.hq * c.d, nk = T * c.hkv * c.d;
    RopeQkvArgs a;
    a.qkv = d_qkv.as<float>();
    a.bias = c.bias ? d_bias.as<float>() : nullptr;
    a.q_norm_weight = c.qk_norm ? d_qn.as<uint16_t>() : nullptr;
    a.k_norm_weight = c.qk_norm ? d_kn.as<uint16_t>() : nullptr;
    a.positions = d_pos.as<int32_t>();
    a.inv_freq = d_inv.as<float>();
    const RopeOutputs got = run_rope(s, a);

    std::vector<float> rq(nq), rkpre(nk), rk(nk), rv(nk);
    const std::vector<float> qn32 = widen(qn), kn32 = widen(kn);
    RopeQkvRefArgs r;
    r.qkv = qkv.data();
    r.bias = c.bias ? bias.data() : nullptr;
    r.q_norm_weight = c.qk_norm ? qn32.data() : nullptr;
    r.k_norm_weight = c.qk_norm ? kn32.data() : nullptr;
    r.positions = pos.data();
    r.inv_freq = inv_freq.data();
    r.q_out = rq.data();
    r.k_pre_rope_out = rkpre.data();
    r.k_out = rk.data();
    r.v_out = rv.data();
    rope_qkv_ref(s, r);
    const std::string what = "d=" + std::to_string(c.d) + " pad=" + std::to_string(c.pad);
    EXPECT_LE(nmse(got.q32, rq), 1e-5) << what;
    EXPECT_LE(nmse(got.kpre32, rkpre), 1e-5) << what;
    EXPECT_LE(nmse(got.k32, rk), 1e-5) << what;
    EXPECT_LE(nmse(got.v32, rv), 1e-5) << what;
    EXPECT_LE(nmse(widen(got.q), rq), 1e-4) << what;
    EXPECT_LE(nmse(widen(got.k), rk), 1e-4) << what;
    EXPECT_LE(nmse(widen(got.v), rv), 1e-4) << what;
  }
}

// The bf16 input (DeviceForwardOptions::qkv_bf16) is the fp32 input's path after one widening: fed the same values
// (bf16-representable fp32 against their bf16 bits, some of them -0), every output is bit-identical, on the vector
// path (row stride a multiple of 8) and on the scalar one (stride + 1), with Qwen3's q/k norm, with and without a
// bias (Qwen2's), with and without the fp32 observer copies.
TEST(FwdGpuRope, Bf16InputEqualsFp32InputOfTheSameValues) {
  OSCAR_REQUIRE_GPU();
  const int64_t T = 45, hq = 16, hkv = 4, d = 128, slots = hq + 2 * hkv, width = slots * d;
  std::vector<float> dense = randn(T * width, 30, 2.f);
  for (float& x : dense) x = fmt::bf16_to_f32(fmt::f32_to_bf16(x));
  for (int64_t i = 0; i < T * width; i += 53) dense[i] = -0.f;  // without a bias, -0 + 0 = +0 on both paths
  const std::vector<float> bias = randn(width, 31), nq = randn(d, 32), nk = randn(d, 33);
  std::vector<uint16_t> q_norm(d), k_norm(d);
  for (int64_t i = 0; i < d; ++i) {
    q_norm[i] = fmt::f32_to_bf16(1.f + 0.2f * nq[i]);
    k_norm[i] = fmt::f32_to_bf16(1.f + 0.2f * nk[i]);
  }
  const RopeTables tables = rope_tables(T, d, 1e6, 701, 3);
  DeviceBuffer d_bias = dev(bias), d_pos = dev(tables.pos), d_inv = dev(tables.inv_freq), d_qn = dev(q_norm),
               d_kn = dev(k_norm);
  for (const int64_t stride : {width, width + 1}) {
    SCOPED_TRACE(stride == width ? "vector path" : "scalar path");
    std::vector<float> qkv(T * stride, 0.f);
    std::vector<uint16_t> qkv_bits(T * stride, 0);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t i = 0; i < width; ++i) {
        qkv[t * stride + i] = dense[t * width + i];
        qkv_bits[t * stride + i] = fmt::f32_to_bf16(dense[t * width + i]);
      }
    DeviceBuffer d_f32 = dev(qkv), d_b16 = dev(qkv_bits);
    for (const bool with_bias : {true, false})
      for (const bool with_f32 : {true, false}) {
        SCOPED_TRACE(std::string(with_bias ? "bias" : "no bias") + (with_f32 ? ", fp32 copies" : ", no fp32 copies"));
        RopeQkvArgs a;
        a.bias = with_bias ? d_bias.as<float>() : nullptr;
        a.q_norm_weight = d_qn.as<uint16_t>();
        a.k_norm_weight = d_kn.as<uint16_t>();
        a.positions = d_pos.as<int32_t>();
        a.inv_freq = d_inv.as<float>();
        const RopeQkvShape shape{T, hq, hkv, d, stride};
        RopeQkvArgs from_f32 = a, from_bf16 = a;
        from_f32.qkv = d_f32.as<float>();
        from_bf16.qkv_bf16 = d_b16.as<uint16_t>();
        EXPECT_TRUE(run_rope(shape, from_f32, with_f32) == run_rope(shape, from_bf16, with_f32));
      }
  }
}

// Without the q/k norm both rope paths do the same per-element arithmetic with the same cos/sin values, so the
// vector kernel (16-byte rows) must reproduce the scalar one (row stride + 1 forces it) bit for bit.
TEST(FwdGpuRope, VectorPathEqualsScalarPathBitForBit) {
  OSCAR_REQUIRE_GPU();
  const int64_t T = 70, hq = 32, hkv = 8, d = 128, slots = hq + 2 * hkv, width = slots * d;
  std::vector<float> dense = randn(T * width, 20, 2.f);
  // Some exact -0 inputs: without a bias both paths must still agree on the sign of zero (bf16 bits differ).
  for (int64_t i = 0; i < T * width; i += 61) dense[i] = -0.f;
  const std::vector<float> bias = randn(width, 21);
  const RopeTables tables = rope_tables(T, d, 5e5, 113, 9);
  DeviceBuffer d_bias = dev(bias), d_pos = dev(tables.pos), d_inv = dev(tables.inv_freq);
  for (const bool with_bias : {true, false}) {
    SCOPED_TRACE(with_bias ? "bias" : "no bias");
    std::vector<RopeOutputs> outs;
    for (const int64_t stride : {width, width + 1}) {
      std::vector<float> qkv(T * stride, 0.f);
      for (int64_t t = 0; t < T; ++t) std::copy_n(dense.begin() + t * width, width, qkv.begin() + t * stride);
      DeviceBuffer d_qkv = dev(qkv);
      RopeQkvArgs a;
      a.qkv = d_qkv.as<float>();
      a.bias = with_bias ? d_bias.as<float>() : nullptr;
      a.positions = d_pos.as<int32_t>();
      a.inv_freq = d_inv.as<float>();
      outs.push_back(run_rope(RopeQkvShape{T, hq, hkv, d, stride}, a));
    }
    EXPECT_TRUE(outs[0] == outs[1]);
  }
}

TEST(FwdGpuRopeChecks, CanImplementRefusesWhatTheKernelCannotDo) {
  RopeQkvShape s{4, 8, 2, 128, 12 * 128};
  RopeQkvArgs a;
  EXPECT_EQ(rope_qkv_can_implement(s, a), Status::InvalidArgument);  // no pointers
  std::vector<float> dummy(16);  // host memory: only the checks run, nothing is launched
  std::vector<int32_t> pos(4);
  std::vector<uint16_t> w(128);
  a.qkv = a.inv_freq = dummy.data();
  a.positions = pos.data();
  a.q_out = a.k_out = a.v_out = w.data();
  EXPECT_EQ(rope_qkv_can_implement(s, a), Status::Ok);
  a.q_norm_weight = w.data();  // k norm missing
  EXPECT_EQ(rope_qkv_can_implement(s, a), Status::InvalidArgument);
  a.k_norm_weight = w.data();
  EXPECT_EQ(rope_qkv_can_implement(s, a), Status::Ok);
  a.qkv_bf16 = w.data();  // two inputs
  EXPECT_EQ(rope_qkv_can_implement(s, a), Status::InvalidArgument);
  a.qkv = nullptr;  // the bf16 one alone
  EXPECT_EQ(rope_qkv_can_implement(s, a), Status::Ok);
  a.qkv_bf16 = nullptr;
  a.qkv = dummy.data();
  s.qkv_row_stride = 12 * 128 - 1;  // rows narrower than the head slots
  EXPECT_EQ(rope_qkv_can_implement(s, a), Status::InvalidArgument);
  s.qkv_row_stride = 12 * 512;
  s.head_dim = 512;
  EXPECT_EQ(rope_qkv_can_implement(s, a), Status::Unsupported);
  s.head_dim = 127;
  EXPECT_EQ(rope_qkv_can_implement(s, a), Status::Unsupported);
}

struct AttentionCase {
  int32_t hq, hkv, d;
  std::vector<int32_t> lengths;
};

// bf16 q/k/v of a packed batch (dense rows: heads × d) on the device, the output buffer, and the arguments over them.
struct DeviceAttention {
  DeviceBuffer q, k, v, cu, out;
  PrefillAttentionArgs args;
};
DeviceAttention upload_attention(const std::vector<uint16_t>& q, const std::vector<uint16_t>& k,
                                 const std::vector<uint16_t>& v, const std::vector<int32_t>& cu, int32_t hq,
                                 int32_t hkv, int32_t d) {
  const int64_t T = cu.back();
  DeviceAttention g{dev(q), dev(k), dev(v), dev(cu), DeviceBuffer(std::max<int64_t>(T, 1) * hq * d * 2), {}};
  PrefillAttentionArgs& a = g.args;
  a.q = g.q.as<uint16_t>();
  a.k = g.k.as<uint16_t>();
  a.v = g.v.as<uint16_t>();
  a.out = g.out.as<uint16_t>();
  a.q_row_stride = a.out_row_stride = int64_t{hq} * d;
  a.k_row_stride = a.v_row_stride = int64_t{hkv} * d;
  a.cu_seqlens = g.cu.as<int32_t>();
  a.num_seqs = static_cast<int32_t>(cu.size() - 1);
  for (size_t s = 0; s + 1 < cu.size(); ++s) a.max_seqlen = std::max(a.max_seqlen, cu[s + 1] - cu[s]);
  a.total_tokens = T;
  a.num_heads = hq;
  a.num_kv_heads = hkv;
  a.head_dim = d;
  a.scale = 1.f / std::sqrt(static_cast<float>(d));
  return g;
}

// attention_prefill_ref over the same bf16 values (widened), with the args' shape and scale.
std::vector<float> attention_reference(const std::vector<uint16_t>& q, const std::vector<uint16_t>& k,
                                       const std::vector<uint16_t>& v, const std::vector<int32_t>& cu,
                                       const PrefillAttentionArgs& a) {
  const std::vector<float> q32 = widen(q), k32 = widen(k), v32 = widen(v);
  std::vector<float> ref(static_cast<size_t>(cu.back()) * a.num_heads * a.head_dim);
  PrefillAttentionRefArgs r;
  r.q = q32.data();
  r.k = k32.data();
  r.v = v32.data();
  r.out = ref.data();
  r.q_row_stride = r.out_row_stride = a.q_row_stride;
  r.k_row_stride = r.v_row_stride = a.k_row_stride;
  r.cu_seqlens = cu;
  r.num_heads = a.num_heads;
  r.num_kv_heads = a.num_kv_heads;
  r.head_dim = a.head_dim;
  r.scale = a.scale;
  attention_prefill_ref(r);
  return ref;
}

class FwdGpuAttention : public ::testing::TestWithParam<AttentionCase> {};

TEST_P(FwdGpuAttention, MatchesRef) {
  OSCAR_REQUIRE_GPU();
  const AttentionCase& c = GetParam();
  std::vector<int32_t> cu = {0};
  for (int32_t len : c.lengths) cu.push_back(cu.back() + len);
  const int64_t T = cu.back();
  const std::vector<uint16_t> q = to_bf16(randn(T * c.hq * c.d, 12, 2.f)), k = to_bf16(randn(T * c.hkv * c.d, 13, 2.f)),
                              v = to_bf16(randn(T * c.hkv * c.d, 14));
  DeviceAttention g = upload_attention(q, k, v, cu, c.hq, c.hkv, c.d);
  PrefillAttentionArgs& a = g.args;
  DeviceBuffer& d_out = g.out;
  const std::vector<float> ref = attention_reference(q, k, v, cu, a);
  std::vector<uint16_t> v2_bits;
  std::map<PrefillKernel, std::vector<uint16_t>> ran;  // each kernel's output bits
  for (const PrefillKernel kernel : every_kernel_and_auto()) {
    SCOPED_TRACE(std::string("kernel ") + prefill_kernel_name(kernel));
    // 0xFFFF is a bf16 NaN: an output element the kernel fails to write makes the NMSE NaN and the check fail.
    ASSERT_EQ(cudaMemset(d_out.data(), 0xFF, d_out.bytes()), cudaSuccess);
    a.kernel = kernel;
    // v4-v7 (wgmma) exist for head_dim 128 in sm_90a builds on sm_90 devices; elsewhere they must say Unsupported.
    const bool wgmma = prefill_kernel_uses_wgmma(kernel);
    if (wgmma && attention_prefill_can_implement(a) == Status::Unsupported) continue;
    if (wgmma) {
      const Status st = attention_prefill(a, nullptr);
      if (st == Status::Unsupported) {
        std::printf("  %s unsupported here (no sm_90a code or not an sm_90 device)\n", prefill_kernel_name(kernel));
        continue;
      }
      ASSERT_EQ(st, Status::Ok);
    } else {
      ASSERT_EQ(attention_prefill(a, nullptr), Status::Ok);
    }
    sync();
    const std::vector<uint16_t> bits = to_host(d_out.as<uint16_t>(), ref.size());
    const std::vector<float> got = widen(bits);
    const double err = nmse(got, ref);
    std::printf("  hq %d hkv %d d %d, %s: nmse %.3g\n", c.hq, c.hkv, c.d, prefill_kernel_name(kernel), err);
    EXPECT_LE(err, 1e-4);
    for (float x : got) ASSERT_TRUE(std::isfinite(x));
    if (kernel == PrefillKernel::V2) v2_bits = bits;
    ran[kernel] = bits;
    // v3 reorders only loads, barriers and independent MMAs; every accumulator sees v2's sequence of operations.
    if (kernel == PrefillKernel::V3) {
      EXPECT_TRUE(bits == v2_bits) << "v3 must be bit-identical to v2";
    }
  }
  // Auto is the kernel attention_prefill_auto_kernel names, bit for bit; where that loads by TMA and the caller
  // gives no total_tokens (the tensor maps need it), Auto runs v6 instead of refusing.
  const PrefillKernel named = attention_prefill_auto_kernel(c.d);
  if (ran.count(PrefillKernel::Auto) && ran.count(named)) {
    EXPECT_TRUE(ran[PrefillKernel::Auto] == ran[named]) << "Auto must run " << prefill_kernel_name(named);
  }
  if (prefill_kernel_uses_tma(named) && ran.count(PrefillKernel::V6)) {
    a.kernel = PrefillKernel::Auto;
    a.total_tokens = 0;
    ASSERT_EQ(cudaMemset(d_out.data(), 0xFF, d_out.bytes()), cudaSuccess);
    ASSERT_EQ(attention_prefill(a, nullptr), Status::Ok) << "Auto without total_tokens";
    sync();
    EXPECT_TRUE(to_host(d_out.as<uint16_t>(), ref.size()) == ran[PrefillKernel::V6])
        << "Auto without total_tokens must run v6";
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, FwdGpuAttention,
    ::testing::Values(AttentionCase{8, 4, 8, {1, 17, 64, 65, 130}},      // tinystories-llama2c-280k heads
                      AttentionCase{4, 4, 16, {128, 3, 200}},            // aidreams heads (MHA)
                      AttentionCase{8, 1, 64, {257, 64, 1}},             // MQA, 64-dim
                      AttentionCase{4, 2, 128, {1000, 1, 129}},          // qwen3-tiny heads
                      AttentionCase{32, 8, 128, {300, 77}},              // 8B-class GQA 4
                      AttentionCase{2, 1, 128, {4097}},                  // tiles past 4K
                      AttentionCase{6, 2, 40, {0, 50, 0, 33}},           // padded dims, empty sequences
                      AttentionCase{4, 4, 96, {150}},                    // 96 padded to 128
                      // v2 head packing: group 8 (pack 8, 16 tokens per block), 3 (pack 1), 6 (pack 2), 2 (pack 2)
                      AttentionCase{16, 2, 128, {33, 100, 17}},
                      AttentionCase{6, 2, 64, {129, 31}},
                      AttentionCase{12, 2, 32, {47, 200}},
                      AttentionCase{4, 2, 8, {255, 1, 16}},
                      AttentionCase{64, 8, 128, {97}},                   // 70B-class group 8
                      AttentionCase{32, 8, 128, {2048, 1, 511}}));       // 8B shape, long + short varlen

// 32K tokens: the whole reference is O(T²) and too slow on a CPU, so selected query rows are checked against a
// direct softmax over their prefix.
TEST(FwdGpuAttentionLong, ThirtyTwoKTokensSpotRows) {
  OSCAR_REQUIRE_GPU();
  const int32_t hq = 4, hkv = 1, d = 128, T = 32768;
  const std::vector<uint16_t> q = to_bf16(randn(int64_t{T} * hq * d, 15)), k = to_bf16(randn(int64_t{T} * hkv * d, 16)),
                              v = to_bf16(randn(int64_t{T} * hkv * d, 17));
  const std::vector<int32_t> cu = {0, T};
  DeviceAttention g = upload_attention(q, k, v, cu, hq, hkv, d);
  PrefillAttentionArgs& a = g.args;
  DeviceBuffer& d_out = g.out;
  for (const PrefillKernel kernel : every_kernel_and_auto()) {
    SCOPED_TRACE(std::string("kernel ") + prefill_kernel_name(kernel));
    a.kernel = kernel;
    ASSERT_EQ(cudaMemset(d_out.data(), 0xFF, d_out.bytes()), cudaSuccess);
    const Status st = attention_prefill(a, nullptr);
    // No sm_90a code, or not head_dim 128.
    if (prefill_kernel_uses_wgmma(kernel) && st == Status::Unsupported) continue;
    ASSERT_EQ(st, Status::Ok);
    sync();
    const std::vector<float> out = widen(to_host(d_out.as<uint16_t>(), int64_t{T} * hq * d));
    for (float x : out) ASSERT_TRUE(std::isfinite(x));
    std::vector<float> got, ref;
    for (const int32_t row : {0, 1, 31, 32, 63, 64, 4095, 20000, 32767})
      for (int32_t h = 0; h < hq; ++h) {
        std::vector<double> scores(row + 1);
        double mx = -INFINITY;
        for (int32_t j = 0; j <= row; ++j) {
          double dot = 0;
          for (int32_t i = 0; i < d; ++i)
            dot += double{fmt::bf16_to_f32(q[(int64_t{row} * hq + h) * d + i])} * fmt::bf16_to_f32(k[int64_t{j} * d + i]);
          scores[j] = dot * a.scale;
          mx = std::max(mx, scores[j]);
        }
        double den = 0;
        for (double& s : scores) den += (s = std::exp(s - mx));
        for (int32_t i = 0; i < d; ++i) {
          double acc = 0;
          for (int32_t j = 0; j <= row; ++j) acc += scores[j] * fmt::bf16_to_f32(v[int64_t{j} * d + i]);
          ref.push_back(static_cast<float>(acc / den));
          got.push_back(out[(int64_t{row} * hq + h) * d + i]);
        }
      }
    const double err = nmse(got, ref);
    std::printf("  32K spot rows, %s: nmse %.3g\n", prefill_kernel_name(kernel), err);
    EXPECT_LE(err, 1e-4);
  }
}

// Scores that climb along the keys: a slow ramp (0.03 log2 units per key, ~4 per 128-key tile: below v10's lazy
// rescale threshold of 8, so the reference max lags and P exceeds 1) and two jumps of 60 at keys 1700 and 2200.
// Over the 2500 keys the max climbs ~195 log2 units: a kernel that stopped moving its running max would overflow
// fp32 (2^128) and write inf/NaN; one that moved it wrongly would leave the double reference.
TEST(FwdGpuAttentionRescale, ClimbingScoresMoveTheRunningMax) {
  OSCAR_REQUIRE_GPU();
  const int32_t hq = 4, hkv = 1, d = 128, T = 2500;
  const float scale = 1.f / std::sqrt(static_cast<float>(d));
  // q = 0.25 in every dim, k_j = c_j + noise: score_j ≈ 0.25 · 128 · c_j · scale · log2(e) log2 units.
  const double log2_units_per_c = 0.25 * d * scale * 1.4426950408889634;
  std::vector<float> q32(int64_t{T} * hq * d, 0.25f), k32 = randn(int64_t{T} * hkv * d, 41, 0.3f);
  for (int32_t j = 0; j < T; ++j) {
    const double climb = 0.03 * j + (j >= 1700 ? 60.0 : 0.0) + (j >= 2200 ? 60.0 : 0.0);
    for (int32_t i = 0; i < d; ++i) k32[int64_t{j} * d + i] += static_cast<float>(climb / log2_units_per_c);
  }
  const std::vector<uint16_t> q = to_bf16(q32), k = to_bf16(k32), v = to_bf16(randn(int64_t{T} * hkv * d, 42));
  const std::vector<int32_t> cu = {0, T};
  DeviceAttention g = upload_attention(q, k, v, cu, hq, hkv, d);
  PrefillAttentionArgs& a = g.args;
  DeviceBuffer& d_out = g.out;
  const std::vector<float> ref = attention_reference(q, k, v, cu, a);
  for (const PrefillKernel kernel : v2_tma_kernels_and_auto()) {
    SCOPED_TRACE(std::string("kernel ") + prefill_kernel_name(kernel));
    a.kernel = kernel;
    ASSERT_EQ(cudaMemset(d_out.data(), 0xFF, d_out.bytes()), cudaSuccess);
    const Status st = attention_prefill(a, nullptr);
    if (prefill_kernel_uses_wgmma(kernel) && st == Status::Unsupported) continue;  // no sm_90a code / device
    ASSERT_EQ(st, Status::Ok);
    sync();
    const std::vector<float> got = widen(to_host(d_out.as<uint16_t>(), ref.size()));
    for (float x : got) ASSERT_TRUE(std::isfinite(x));
    const double err = nmse(got, ref);
    std::printf("  climbing scores, %s: nmse %.3g\n", prefill_kernel_name(kernel), err);
    EXPECT_LE(err, 1e-4);
  }
}

TEST(FwdGpuAttentionChecks, CanImplementRefusesWhatTheKernelCannotDo) {
  PrefillAttentionArgs a;
  a.num_seqs = 1;
  a.max_seqlen = 1;
  a.num_heads = 4;
  a.num_kv_heads = 3;  // not a divisor
  a.head_dim = 64;
  a.scale = 0.125f;
  a.q_row_stride = a.out_row_stride = 256;
  a.k_row_stride = a.v_row_stride = 192;
  EXPECT_EQ(attention_prefill_can_implement(a), Status::InvalidArgument);
  a.num_kv_heads = 2;
  a.k_row_stride = a.v_row_stride = 128;
  a.head_dim = 256;
  EXPECT_EQ(attention_prefill_can_implement(a), Status::Unsupported);
  a.head_dim = 12;  // not a multiple of 8
  EXPECT_EQ(attention_prefill_can_implement(a), Status::Unsupported);
  a.head_dim = 64;
  a.kernel = static_cast<PrefillKernel>(17);  // no such kernel
  EXPECT_EQ(attention_prefill_can_implement(a), Status::InvalidArgument);

  // v7's TMA descriptors span total_tokens rows: it must be given and cover the longest sequence. (Fake aligned
  // device pointers: can_implement never dereferences them.)
  a.head_dim = 128;
  a.q_row_stride = a.out_row_stride = 4 * 128;
  a.k_row_stride = a.v_row_stride = 2 * 128;
  a.max_seqlen = 300;
  static const int32_t cu_stub[2] = {0, 300};
  a.q = a.k = a.v = reinterpret_cast<const uint16_t*>(uintptr_t{0x10000});
  a.out = reinterpret_cast<uint16_t*>(uintptr_t{0x20000});
  a.cu_seqlens = cu_stub;
  for (const PrefillKernelInfo& info : kPrefillKernels) {
    if (!info.tma) continue;
    const PrefillKernel tma_kernel = info.kernel;
    SCOPED_TRACE(info.name);
    a.kernel = tma_kernel;
    a.total_tokens = 0;
    EXPECT_EQ(attention_prefill_can_implement(a), Status::InvalidArgument) << "total_tokens not given";
    a.total_tokens = 299;
    EXPECT_EQ(attention_prefill_can_implement(a), Status::InvalidArgument) << "fewer rows than max_seqlen";
    a.total_tokens = 300;
    EXPECT_EQ(attention_prefill_can_implement(a), Status::Ok);
  }
  a.kernel = PrefillKernel::V6;
  a.total_tokens = 0;
  EXPECT_EQ(attention_prefill_can_implement(a), Status::Ok) << "only the TMA kernels need it";

  // The cluster kernel (v12) splits each GQA group over a 2-CTA cluster: groups of 2, 4, 8 or 16 only (here 4 heads over 2 KV
  // heads first).
  for (const PrefillKernelInfo& info : kPrefillKernels) {
    if (!prefill_kernel_uses_clusters(info.kernel)) continue;
    SCOPED_TRACE(info.name);
    a.kernel = info.kernel;
    a.total_tokens = 300;
    for (const auto& [heads, expected] : {std::pair{4, Status::Ok}, std::pair{6, Status::Unsupported},
                                          std::pair{12, Status::Unsupported}, std::pair{2, Status::Unsupported},
                                          std::pair{32, Status::Ok}}) {
      a.num_heads = heads;  // group heads / 2
      a.q_row_stride = a.out_row_stride = int64_t{heads} * 128;
      EXPECT_EQ(attention_prefill_can_implement(a), expected) << "group " << heads / 2;
    }
  }
  a.kernel = PrefillKernel::V11;
  a.num_heads = 6;
  a.q_row_stride = a.out_row_stride = 6 * 128;
  EXPECT_EQ(attention_prefill_can_implement(a), Status::Ok) << "v11 takes any group";
}

}  // namespace
}  // namespace oscar::kern
