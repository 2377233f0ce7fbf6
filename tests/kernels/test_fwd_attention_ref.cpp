// attention_prefill_ref (packed varlen, token-major) against lib/model's exact_attention (one sequence,
// head-major cache layout) and against closed forms.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "kernels/attention_prefill/attention_prefill.h"
#include "lib/model/observer.h"

namespace oscar::kern {
namespace {

std::vector<float> randn(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.f, 1.f);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

TEST(FwdAttentionRef, PackedBatchMatchesExactAttentionPerSequence) {
  const int32_t hq = 6, hkv = 2, d = 16;
  const std::vector<int32_t> cu = {0, 1, 40, 40, 105};  // lengths 1, 39, 0, 65
  const int64_t T = cu.back();
  const std::vector<float> q = randn(T * hq * d, 1), k = randn(T * hkv * d, 2), v = randn(T * hkv * d, 3);
  std::vector<float> out(T * hq * d, NAN);
  PrefillAttentionRefArgs a;
  a.q = q.data();
  a.k = k.data();
  a.v = v.data();
  a.out = out.data();
  a.q_row_stride = a.out_row_stride = hq * d;
  a.k_row_stride = a.v_row_stride = hkv * d;
  a.cu_seqlens = cu;
  a.num_heads = hq;
  a.num_kv_heads = hkv;
  a.head_dim = d;
  a.scale = 1.f / std::sqrt(static_cast<float>(d));
  attention_prefill_ref(a);

  for (size_t s = 0; s + 1 < cu.size(); ++s) {
    const int64_t begin = cu[s], len = cu[s + 1] - begin;
    if (len == 0) continue;
    std::vector<float> qh(hq * len * d), kh(hkv * len * d), vh(hkv * len * d), o(len * hq * d);
    for (int64_t t = 0; t < len; ++t)
      for (int64_t i = 0; i < d; ++i) {
        for (int64_t h = 0; h < hq; ++h) qh[(h * len + t) * d + i] = q[((begin + t) * hq + h) * d + i];
        for (int64_t h = 0; h < hkv; ++h) {
          kh[(h * len + t) * d + i] = k[((begin + t) * hkv + h) * d + i];
          vh[(h * len + t) * d + i] = v[((begin + t) * hkv + h) * d + i];
        }
      }
    model::AttentionCall call;
    call.num_tokens = len;
    call.num_heads = hq;
    call.num_kv_heads = hkv;
    call.head_dim = d;
    call.cache_stride = len;
    call.scale = a.scale;
    call.q = qh.data();
    call.k = kh.data();
    call.v = vh.data();
    call.out = o.data();
    model::exact_attention(call);
    for (int64_t t = 0; t < len; ++t)
      for (int64_t j = 0; j < hq * d; ++j)
        ASSERT_NEAR(out[(begin + t) * hq * d + j], o[t * hq * d + j], 1e-5) << "seq " << s << " token " << t;
  }
}

TEST(FwdAttentionRef, EqualKeysAverageThePrefixOfValues) {
  // With every key equal, all scores of a query tie and softmax is uniform: out_i = mean(v_0 .. v_i).
  const int32_t d = 8;
  const int64_t T = 20;
  const std::vector<float> q = randn(T * d, 4), v = randn(T * d, 5);
  std::vector<float> k(T * d, 0.7f), out(T * d);
  const std::vector<int32_t> cu = {0, static_cast<int32_t>(T)};
  PrefillAttentionRefArgs a;
  a.q = q.data();
  a.k = k.data();
  a.v = v.data();
  a.out = out.data();
  a.q_row_stride = a.k_row_stride = a.v_row_stride = a.out_row_stride = d;
  a.cu_seqlens = cu;
  a.num_heads = a.num_kv_heads = 1;
  a.head_dim = d;
  a.scale = 0.35f;
  attention_prefill_ref(a);
  for (int64_t t = 0; t < T; ++t)
    for (int32_t i = 0; i < d; ++i) {
      double mean = 0;
      for (int64_t j = 0; j <= t; ++j) mean += v[j * d + i];
      EXPECT_NEAR(out[t * d + i], mean / (t + 1), 1e-6);
    }
}

// The kernel table (kPrefillKernels) that the traits, tests and benchmarks iterate: every enumerator but Auto once,
// names unique and found again by prefill_kernel_from_name, TMA kernels a subset of the wgmma ones, unknown names
// refused.
TEST(PrefillKernelTable, NamesRoundTripAndTraitsAgree) {
  std::set<std::string> names;
  int entries = 0;
  for (const PrefillKernelInfo& info : kPrefillKernels) {
    ++entries;
    EXPECT_NE(info.kernel, PrefillKernel::Auto);
    EXPECT_TRUE(names.insert(info.name).second) << "duplicate name " << info.name;
    PrefillKernel back = PrefillKernel::Auto;
    ASSERT_TRUE(prefill_kernel_from_name(info.name, &back)) << info.name;
    EXPECT_EQ(back, info.kernel) << info.name;
    EXPECT_STREQ(prefill_kernel_name(info.kernel), info.name);
    EXPECT_EQ(prefill_kernel_uses_wgmma(info.kernel), info.wgmma) << info.name;
    EXPECT_EQ(prefill_kernel_uses_tma(info.kernel), info.tma) << info.name;
    if (info.tma) EXPECT_TRUE(info.wgmma) << info.name << ": the TMA kernels are wgmma kernels";
    EXPECT_EQ(prefill_kernel_uses_clusters(info.kernel), info.cluster) << info.name;
    if (info.cluster) EXPECT_TRUE(info.tma) << info.name << ": the cluster kernels multicast by TMA";
  }
  // Every enumerator after Auto has a row (the enum is dense: Auto = 0, then the kernels in order).
  EXPECT_EQ(entries, static_cast<int>(PrefillKernel::V13));
  PrefillKernel k = PrefillKernel::V2;
  EXPECT_TRUE(prefill_kernel_from_name("auto", &k));
  EXPECT_EQ(k, PrefillKernel::Auto);
  EXPECT_FALSE(prefill_kernel_from_name("v9", &k)) << "v9 was removed";
  EXPECT_FALSE(prefill_kernel_from_name("v16", &k)) << "v14..v16 were removed";
  EXPECT_FALSE(prefill_kernel_from_name("", &k));
  EXPECT_FALSE(prefill_kernel_from_name("V7", &k)) << "names are lower case";
  EXPECT_EQ(k, PrefillKernel::Auto) << "a refused name leaves the output alone";
}

}  // namespace
}  // namespace oscar::kern
