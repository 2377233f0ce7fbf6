// decode_attention (tensor-core INT2 pass + bf16 window pass + merge) against decode_attention_ref over the
// shapes the fast path special-cases: head_dim 64/128/256, GQA groups 1..8, page sizes that are not 64, windows
// that cut tiles and pages in the middle, explicit split counts (including more splits than tiles), a query
// with outlier channels (the per-head fp16 scaling of q), and a long sequence (thousands of online-softmax
// rescales across stages). Every case runs the three launch variants (Fused: window share + last-block merge
// inside the INT2 kernel, transposed scores at groups <= 4; FusedWide: the same with heads as score rows;
// Separate: window and merge kernels): NMSE <= 1e-5 against the double-precision reference, bit-identical output
// on a second call, and each fused variant within 1e-9 of Separate (the same sums in a different order). Skips
// without a CUDA device.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <sstream>
#include <string>
#include <vector>

#include "../kernels/kv_cache_test_util.h"
#include "kernels/attention_decode/decode_attention.h"
#include "kernels/attention_decode/decode_attention_ref.h"
#include "gpu_test_buffer.h"
#include "test_support.h"

namespace oscar {
namespace {

using test::gpu::have_gpu;

template <typename T>
struct DeviceArray {
  T* ptr = nullptr;
  size_t count = 0;
  explicit DeviceArray(size_t n) : count(n) { EXPECT_EQ(cudaMalloc(&ptr, std::max<size_t>(n, 1) * sizeof(T)), cudaSuccess); }
  explicit DeviceArray(const std::vector<T>& host) : DeviceArray(host.size()) {
    EXPECT_EQ(cudaMemcpy(ptr, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
  }
  ~DeviceArray() { cudaFree(ptr); }
  std::vector<T> download() const {
    std::vector<T> host(count);
    EXPECT_EQ(cudaMemcpy(host.data(), ptr, count * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
    return host;
  }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
};

struct Int2PathCase {
  std::vector<int32_t> lens;
  int head_dim, q_heads, kv_heads, page_tokens;
  int64_t sink, recent;
  int splits;           // 0 = auto
  float q_outlier;      // scale of every 37th query channel
  bool bf16_out;
};

std::string case_name(const ::testing::TestParamInfo<Int2PathCase>& info) {
  const auto& c = info.param;
  std::ostringstream name;
  name << "d" << c.head_dim << "_q" << c.q_heads << "kv" << c.kv_heads << "_page" << c.page_tokens << "_len"
       << c.lens.front() << "x" << c.lens.size() << "_sink" << c.sink << "recent" << c.recent << "_splits" << c.splits
       << (c.bf16_out ? "_bf16out" : "") << "_" << info.index;
  return name.str();
}

// What both tests set on top of HostPagedCache::params (host pointers for the reference, device ones for the kernel).
void set_query(kern::DecodeAttentionParams& p, int q_heads, const uint16_t* q, const float* rk, const float* rv,
               int64_t sink, int64_t recent) {
  p.num_q_heads = q_heads;
  p.q = q;
  p.rotation_k = rk;
  p.rotation_v = rv;
  p.sink_tokens = sink;
  p.recent_tokens = recent;
}

class DecodeInt2Paths : public ::testing::TestWithParam<Int2PathCase> {};

TEST_P(DecodeInt2Paths, MatchesReference) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  const auto& tc = GetParam();
  const int d = tc.head_dim;
  const auto rk = test::random_rotation(d, 61), rv = test::random_rotation(d, 62);
  test::HostPagedCache cache;
  cache.page_tokens = tc.page_tokens;
  cache.build(tc.lens, tc.kv_heads, d, rk, rv, 0.96f, 0.92f, 17);
  const auto q = test::random_bf16(tc.lens.size() * tc.q_heads * d, d, 78, tc.q_outlier);
  DeviceArray<uint8_t> ki(cache.k_int2), vi(cache.v_int2);
  DeviceArray<uint16_t> kb(cache.k_bf16), vb(cache.v_bf16), dq(q);
  DeviceArray<int32_t> it(cache.int2_table), bt(cache.bf16_table), lens(cache.lens);
  DeviceArray<float> drk(rk), drv(rv);
  const size_t n_out = tc.lens.size() * tc.q_heads * d;
  DeviceArray<float> dout(n_out);
  DeviceArray<uint16_t> dout_bf16(n_out);

  auto hp = cache.params(cache.k_int2.data(), cache.v_int2.data(), cache.k_bf16.data(), cache.v_bf16.data(),
                         cache.int2_table.data(), cache.bf16_table.data(), cache.lens.data());
  set_query(hp, tc.q_heads, q.data(), rk.data(), rv.data(), tc.sink, tc.recent);
  std::vector<float> want_f(n_out);
  hp.out = want_f.data();
  kern::decode_attention_ref(hp);
  const std::vector<double> want(want_f.begin(), want_f.end());

  // A created stream, as the engine uses: the fused kernel's programmatic dependent launch (its reads before
  // griddepcontrol.wait overlapping rotate_q) is then in play, which the legacy default stream may not allow.
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreate(&stream), cudaSuccess);
  struct StreamGuard {
    cudaStream_t s;
    ~StreamGuard() { cudaStreamDestroy(s); }
  } stream_guard{stream};
  // Fused runs the narrow (transposed-score) layout at groups <= 4; FusedWide the heads-as-rows one everywhere.
  using V = kern::DecodeAttentionVariant;
  const V variants[] = {V::Fused, V::FusedWide, V::Separate};
  const char* names[] = {"fused", "fused_wide", "separate"};
  std::vector<float> by_variant[3];
  for (int vi_index = 0; vi_index < 3; ++vi_index) {
    const V variant = variants[vi_index];
    const char* name = names[vi_index];
    SCOPED_TRACE(name);
    auto p = cache.params(ki.ptr, vi.ptr, kb.ptr, vb.ptr, it.ptr, bt.ptr, lens.ptr);
    p.variant = variant;
    set_query(p, tc.q_heads, dq.ptr, drk.ptr, drv.ptr, tc.sink, tc.recent);
    if (tc.bf16_out) p.out_bf16 = dout_bf16.ptr;
    else p.out = dout.ptr;
    p.num_splits = tc.splits;
    int sms = 0;
    ASSERT_EQ(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0), cudaSuccess);
    const int splits = tc.splits ? tc.splits
                                 : kern::decode_attention_num_splits(p.batch, p.num_q_heads, p.num_kv_heads, p.max_seq_len, p.page_tokens, sms);
    const size_t ws = kern::decode_attention_workspace_bytes(p.batch, p.num_q_heads, d, splits);
    DeviceArray<uint8_t> workspace(ws);
    // Garbage everywhere, arrival tickets included: the kernels must not rely on a cleared workspace.
    ASSERT_EQ(cudaMemset(workspace.ptr, 0xff, ws), cudaSuccess);
    p.workspace = workspace.ptr;
    p.workspace_bytes = ws;
    ASSERT_EQ(kern::decode_attention(p, stream), kern::Status::Ok);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    std::vector<float> got(n_out);
    if (tc.bf16_out) {
      const auto bits = dout_bf16.download();
      for (size_t i = 0; i < n_out; ++i) got[i] = fmt::bf16_to_f32(bits[i]);
    } else {
      got = dout.download();
    }
    // Twice, to catch state that leaks between launches (the workspace, tickets included, is not cleared).
    ASSERT_EQ(kern::decode_attention(p, stream), kern::Status::Ok);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    if (tc.bf16_out) {
      std::vector<float> again(n_out);
      const auto bits = dout_bf16.download();
      for (size_t i = 0; i < n_out; ++i) again[i] = fmt::bf16_to_f32(bits[i]);
      EXPECT_EQ(again, got) << "not deterministic";
    } else {
      EXPECT_EQ(dout.download(), got) << "not deterministic";
    }

    const double err = test::nmse(got, want);
    RecordProperty(std::string("nmse_") + name, std::to_string(err));
    std::printf("  %s nmse %.3g\n", name, err);
    EXPECT_LE(err, 1e-5);
    by_variant[vi_index] = got;
  }
  const std::vector<double> separate(by_variant[2].begin(), by_variant[2].end());
  for (int vi_index = 0; vi_index < 2; ++vi_index) {
    const double between = test::nmse(by_variant[vi_index], separate);
    std::printf("  %s vs separate nmse %.3g\n", names[vi_index], between);
    EXPECT_LE(between, tc.bf16_out ? 1e-4 : 1e-9) << names[vi_index];
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, DecodeInt2Paths,
    ::testing::Values(
        // head dims x groups, windows that cut tiles (sink 5, recent 37) and the default windows
        Int2PathCase{{1000}, 64, 8, 8, 64, 5, 37, 0, 3.0f, false},
        Int2PathCase{{1000}, 64, 16, 2, 64, 64, 256, 0, 3.0f, false},
        Int2PathCase{{777}, 128, 8, 4, 64, 5, 37, 0, 3.0f, false},
        Int2PathCase{{777}, 128, 8, 8, 64, 0, 0, 0, 3.0f, false},
        Int2PathCase{{777}, 128, 24, 8, 64, 3, 17, 5, 3.0f, false},
        Int2PathCase{{1500}, 256, 16, 2, 64, 5, 37, 0, 3.0f, false},
        Int2PathCase{{1500}, 256, 4, 4, 64, 64, 256, 0, 3.0f, false},
        // 64-token pages with a sink that is not a whole stage (20): stages straddle pages (the cp.async fill)
        Int2PathCase{{3000}, 128, 32, 8, 64, 20, 37, 0, 3.0f, false},
        // page sizes 16 and 48: tiles at every page boundary, pages that are not a whole stage
        Int2PathCase{{1111, 33, 400}, 128, 32, 8, 16, 20, 50, 0, 3.0f, false},
        Int2PathCase{{1111, 33, 400}, 128, 64, 8, 48, 7, 60, 0, 3.0f, false},
        // more splits than tiles; one split; INT2 range shorter than a tile
        Int2PathCase{{300}, 128, 32, 8, 64, 64, 200, 40, 3.0f, false},
        Int2PathCase{{2049}, 128, 32, 8, 64, 64, 256, 1, 3.0f, false},
        Int2PathCase{{75, 90}, 128, 32, 8, 64, 64, 3, 0, 3.0f, false},
        // queries with 200x outlier channels (fp16 range of the scaled query), bf16 output
        Int2PathCase{{3000}, 128, 64, 8, 64, 64, 256, 0, 200.0f, false},
        Int2PathCase{{3000}, 128, 32, 8, 64, 64, 256, 0, 200.0f, false},
        // the narrow (transposed-score) layout at head_dim 256, group 4, a page that is not a whole stage
        Int2PathCase{{1500, 97}, 256, 16, 4, 48, 5, 37, 0, 3.0f, false},
        Int2PathCase{{3000}, 128, 32, 8, 64, 64, 256, 0, 3.0f, true},
        // long: ~500 stages per split of online softmax
        Int2PathCase{{8192, 6000}, 128, 32, 4, 64, 64, 256, 3, 3.0f, false},
        // sequences that end inside the windows (no INT2 token: 50, 320 = sink + recent) next to ones with a few
        // (321, 400) in one batch; more splits than some sequences have tiles or window tokens
        Int2PathCase{{2000, 50, 320, 321, 400}, 128, 32, 8, 64, 64, 256, 0, 3.0f, false},
        Int2PathCase{{2000, 50, 320, 321, 400}, 64, 16, 4, 64, 64, 256, 33, 3.0f, true},
        // window shares longer than one 48-token chunk of the fused window pass (320 / 3 splits), head_dim 256
        Int2PathCase{{5000, 700}, 256, 8, 1, 64, 64, 256, 3, 3.0f, false},
        // every block's window share is 1-2 tokens: 60 splits over a sink-only window
        Int2PathCase{{4000, 3000}, 128, 32, 8, 16, 100, 0, 60, 3.0f, false}),
    case_name);

// A fused grid that leaves resident slots free is spread over the SMs (decode_attention_spread_smem_bytes): with
// 16 or 33 splits at batch 1 and 8 KV heads (128 / 264 blocks), no SM runs more than ceil(blocks / SMs) of them.
// The SM of each block comes from the kernel's phase trace. The output must still match the reference.
TEST(DecodeSpread, GridsBelowTheResidentSlotsSpreadOverTheSms) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  constexpr int d = 128, q_heads = 32, kv_heads = 8;
  const auto rk = test::random_rotation(d, 61), rv = test::random_rotation(d, 62);
  test::HostPagedCache cache;
  cache.page_tokens = 64;
  cache.build({4096}, kv_heads, d, rk, rv, 0.96f, 0.92f, 17);
  const auto q = test::random_bf16(q_heads * d, d, 78, 3.0f);
  DeviceArray<uint8_t> ki(cache.k_int2), vi(cache.v_int2);
  DeviceArray<uint16_t> kb(cache.k_bf16), vb(cache.v_bf16), dq(q);
  DeviceArray<int32_t> it(cache.int2_table), bt(cache.bf16_table), lens(cache.lens);
  DeviceArray<float> drk(rk), drv(rv), dout(q_heads * d);
  auto hp = cache.params(cache.k_int2.data(), cache.v_int2.data(), cache.k_bf16.data(), cache.v_bf16.data(),
                         cache.int2_table.data(), cache.bf16_table.data(), cache.lens.data());
  set_query(hp, q_heads, q.data(), rk.data(), rv.data(), 64, 256);
  std::vector<float> want_f(q_heads * d);
  hp.out = want_f.data();
  kern::decode_attention_ref(hp);
  const std::vector<double> want(want_f.begin(), want_f.end());
  int sms = 0;
  ASSERT_EQ(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0), cudaSuccess);
  for (int splits : {16, 33}) {
    SCOPED_TRACE(splits);
    auto p = cache.params(ki.ptr, vi.ptr, kb.ptr, vb.ptr, it.ptr, bt.ptr, lens.ptr);
    set_query(p, q_heads, dq.ptr, drk.ptr, drv.ptr, 64, 256);
    p.out = dout.ptr;
    p.num_splits = splits;
    const size_t ws = kern::decode_attention_workspace_bytes(1, q_heads, d, splits);
    DeviceArray<uint8_t> workspace(ws);
    p.workspace = workspace.ptr;
    p.workspace_bytes = ws;
    const int blocks = splits * kv_heads;
    DeviceArray<unsigned long long> trace(static_cast<size_t>(blocks) * kern::kDecodePhaseTraceWords);
    p.phase_trace = trace.ptr;
    ASSERT_EQ(kern::decode_attention(p, nullptr), kern::Status::Ok);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_LE(test::nmse(dout.download(), want), 1e-5);
    std::vector<int> per_sm(sms, 0);
    const auto words = trace.download();
    for (int b = 0; b < blocks; ++b) {
      const auto sm = words[static_cast<size_t>(b) * kern::kDecodePhaseTraceWords + 8];
      ASSERT_LT(sm, static_cast<unsigned long long>(sms));
      ++per_sm[sm];
    }
    const int most = *std::max_element(per_sm.begin(), per_sm.end());
    std::printf("  %d splits, %d blocks on %d SMs: at most %d per SM\n", splits, blocks, sms, most);
    EXPECT_LE(most, (blocks + sms - 1) / sms);
  }
}

}  // namespace
}  // namespace oscar
