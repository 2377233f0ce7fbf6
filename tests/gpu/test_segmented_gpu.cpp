// Segmented (spectral) KV pages on the GPU (label gpu; skips without a device):
//  * kv_write in KvWriteMode::Segmented against kv_write_ref, bit-exact pools, layouts with every width 0..4 and
//    8, 3-bit fields across bytes, segments off 16-dim boundaries, head_dim 64/128/256, with and without clip;
//  * decode_attention over segmented pages (decode_attention_seg.cuh) against the double-precision
//    decode_attention_ref: several layouts incl. 0-, 1- and 3-bit segments (compiled layouts and the generic kernel),
//    head_dim 64/128/256, groups 1/2/4/8,
//    windows that cut tiles, forced split counts; NMSE <= 1e-5 like the INT2 path tests;
//  * rt::Engine on qwen3-tiny-trained with a spectral bundle made here (calib::calibrate, Method::Spectral, widths
//    {0, 1, 2, 3, 4}): greedy agreement with the bf16 engine on the first tokens, and logits close to the CPU
//    simulation of the same bundle (eval::simulated_logits).
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <random>
#include <vector>

#include "../kernels/kv_cache_test_util.h"
#include "formats/tokenizer.h"
#include "kernels/attention_decode/decode_attention.h"
#include "kernels/attention_decode/decode_attention_ref.h"
#include "kernels/kv_quantize/kv_quantize.h"
#include "kernels/kv_quantize/kv_quantize_ref.h"
#include "lib/calib/calibrator.h"
#include "lib/eval/cache_modes.h"
#include "lib/eval/evaluator.h"
#include "lib/model/cpu_model.h"
#include "lib/model/generate.h"
#include "runtime/engine.h"
#include "test_fwd_gpu_support.h"
#include "gpu_test_buffer.h"
#include "test_support.h"

namespace oscar {
namespace {

using Segs = std::vector<fmt::QuantSegment>;

using test::gpu::have_gpu;

template <typename T>
using Dev = test::gpu::DeviceBuffer<T>;

// ---- kv_write ----------------------------------------------------------------------------------------------------

struct SegWriteCase {
  int d;
  Segs segs;
};

class SegKvWriteGpu : public ::testing::TestWithParam<SegWriteCase> {};

TEST_P(SegKvWriteGpu, BitExactWithTheReference) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  const int d = GetParam().d, heads = 3, tokens = 150, page_tokens = 64, pages = 5;
  const auto geo = fmt::segmented_page_geometry(GetParam().segs, d, page_tokens);
  const auto x = test::random_bf16(static_cast<size_t>(tokens) * heads * d, d, 21);
  const auto rot = test::random_rotation(d, 22);
  std::vector<int32_t> slots(static_cast<size_t>(pages) * page_tokens);
  std::iota(slots.begin(), slots.end(), 0);
  std::shuffle(slots.begin(), slots.end(), std::mt19937(3));
  slots.resize(tokens);
  slots[11] = -1;
  for (bool with_rotation : {true, false}) {
    for (float clip : {1.0f, 0.96f, 0.5f}) {
      std::vector<uint8_t> pool(static_cast<size_t>(pages) * heads * geo.page_bytes(), 0);
      kern::KvWriteParams p;
      p.tokens = tokens;
      p.token_stride = heads * d;
      p.num_kv_heads = heads;
      p.head_dim = d;
      p.page_tokens = page_tokens;
      p.clip_ratio = clip;
      p.geometry = &geo;
      Dev<uint16_t> dx(x);
      Dev<float> drot(rot);
      Dev<int32_t> dslots(slots);
      Dev<uint8_t> dpool(pool);
      p.x = dx.ptr;
      p.rotation = with_rotation ? drot.ptr : nullptr;
      p.slots = dslots.ptr;
      p.int2_pool = dpool.ptr;
      ASSERT_EQ(kern::kv_write(p, kern::KvWriteMode::Segmented, nullptr), kern::Status::Ok);
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      p.x = x.data();
      p.rotation = with_rotation ? rot.data() : nullptr;
      p.slots = slots.data();
      p.int2_pool = pool.data();
      kern::kv_write_ref(p, kern::KvWriteMode::Segmented);
      const auto got = dpool.download();
      size_t first_diff = 0;
      while (first_diff < got.size() && got[first_diff] == pool[first_diff]) ++first_diff;
      EXPECT_EQ(first_diff, got.size()) << "d " << d << " rot " << with_rotation << " clip " << clip
                                        << ": first differing byte " << first_diff;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Layouts, SegKvWriteGpu,
    ::testing::Values(SegWriteCase{128, {{0, 48, 4}, {48, 112, 2}, {112, 128, 0}}},
                      SegWriteCase{128, {{0, 16, 4}, {16, 48, 3}, {48, 96, 2}, {96, 112, 1}, {112, 128, 0}}},
                      SegWriteCase{64, {{0, 40, 3}, {40, 64, 8}}},
                      SegWriteCase{256, {{0, 32, 4}, {32, 160, 2}, {160, 224, 1}, {224, 256, 0}}},
                      // the 3-bit layouts the decode kernel reads (16-dim blocks, odd block counts)
                      SegWriteCase{128, {{0, 48, 3}, {48, 128, 1}}},
                      SegWriteCase{128, {{0, 16, 1}, {16, 64, 3}, {64, 128, 2}}},
                      SegWriteCase{256, {{0, 48, 4}, {48, 96, 3}, {96, 256, 2}}}));

// ---- decode ------------------------------------------------------------------------------------------------------

struct SegDecodeCase {
  int d;
  Segs k, v;
  std::vector<int32_t> lens;
  int q_heads, kv_heads;
  int64_t sink, recent;
  int splits;
};

class SegDecodeGpu : public ::testing::TestWithParam<SegDecodeCase> {};

TEST_P(SegDecodeGpu, MatchesReference) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  const auto& tc = GetParam();
  const int d = tc.d;
  const auto rk = test::random_rotation(d, 61), rv = test::random_rotation(d, 62);
  const auto kg = fmt::segmented_page_geometry(tc.k, d, 64), vg = fmt::segmented_page_geometry(tc.v, d, 64);
  test::HostPagedCache cache;
  cache.k_geo = &kg;
  cache.v_geo = &vg;
  cache.build(tc.lens, tc.kv_heads, d, rk, rv, 0.96f, 0.92f, 17);
  const auto q = test::random_bf16(tc.lens.size() * tc.q_heads * d, d, 78, 3.0f);
  Dev<uint8_t> ki(cache.k_int2), vi(cache.v_int2);
  Dev<uint16_t> kb(cache.k_bf16), vb(cache.v_bf16), dq(q);
  Dev<int32_t> it(cache.int2_table), bt(cache.bf16_table), lens(cache.lens);
  Dev<float> drk(rk), drv(rv);
  const size_t n_out = tc.lens.size() * tc.q_heads * d;
  Dev<float> dout(std::vector<float>(n_out, 0.f));
  auto p = cache.params(ki.ptr, vi.ptr, kb.ptr, vb.ptr, it.ptr, bt.ptr, lens.ptr);
  p.num_q_heads = tc.q_heads;
  p.q = dq.ptr;
  p.rotation_k = drk.ptr;
  p.rotation_v = drv.ptr;
  p.sink_tokens = tc.sink;
  p.recent_tokens = tc.recent;
  p.out = dout.ptr;
  p.num_splits = tc.splits;
  int sms = 0;
  ASSERT_EQ(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0), cudaSuccess);
  const int splits =
      tc.splits ? tc.splits : kern::decode_attention_num_splits(p.batch, p.num_q_heads, p.num_kv_heads, p.max_seq_len, 64, sms);
  const size_t ws = kern::decode_attention_workspace_bytes(p.batch, p.num_q_heads, d, splits);
  Dev<uint8_t> workspace(std::vector<uint8_t>(ws, 0));
  p.workspace = workspace.ptr;
  p.workspace_bytes = ws;
  ASSERT_EQ(kern::decode_attention(p, nullptr), kern::Status::Ok);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const std::vector<float> got = dout.download();
  ASSERT_EQ(kern::decode_attention(p, nullptr), kern::Status::Ok);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  EXPECT_EQ(dout.download(), got) << "not deterministic";

  auto hp = cache.params(cache.k_int2.data(), cache.v_int2.data(), cache.k_bf16.data(), cache.v_bf16.data(),
                         cache.int2_table.data(), cache.bf16_table.data(), cache.lens.data());
  hp.num_q_heads = tc.q_heads;
  hp.q = q.data();
  hp.rotation_k = rk.data();
  hp.rotation_v = rv.data();
  hp.sink_tokens = tc.sink;
  hp.recent_tokens = tc.recent;
  std::vector<float> want_f(n_out);
  hp.out = want_f.data();
  kern::decode_attention_ref(hp);
  const double err = test::nmse(got, std::vector<double>(want_f.begin(), want_f.end()));
  RecordProperty("nmse", std::to_string(err));
  std::printf("  nmse %.3g\n", err);
  EXPECT_LE(err, 1e-5);
}

const Segs kK128{{0, 48, 4}, {48, 112, 2}, {112, 128, 0}};
const Segs kV128{{0, 16, 4}, {16, 80, 2}, {80, 112, 1}, {112, 128, 0}};
const Segs kInt2_128{{0, 128, 2}};
INSTANTIATE_TEST_SUITE_P(
    Layouts, SegDecodeGpu,
    ::testing::Values(SegDecodeCase{128, kK128, kV128, {1000}, 8, 2, 5, 37, 0},       // group 4
                      SegDecodeCase{128, kV128, kK128, {700, 33, 300}, 8, 8, 16, 40, 0},  // group 1, batch 3
                      SegDecodeCase{128, kInt2_128, kK128, {2000}, 16, 2, 64, 256, 3},   // group 8, forced splits
                      SegDecodeCase{128, {{0, 16, 1}, {16, 128, 2}}, {{0, 128, 4}}, {500}, 4, 1, 0, 0, 0},
                      SegDecodeCase{64, {{0, 16, 4}, {16, 48, 2}, {48, 64, 0}}, {{0, 32, 2}, {32, 64, 1}}, {900}, 8, 1,
                                    4, 16, 0},
                      SegDecodeCase{256, {{0, 64, 4}, {64, 192, 2}, {192, 256, 0}}, {{0, 32, 4}, {32, 256, 2}}, {800},
                                    8, 2, 4, 16, 0},
                      SegDecodeCase{128, kK128, kV128, {6000}, 8, 1, 64, 256, 0}));  // many rescales

// 3-bit segments. The first three pairs have compiled kernels (decode_attention_seg.cuh kSegCompiledLayouts128: the
// calibrator's qwen3-tiny pick K 48x3b + 80x1b | V INT2, whose V takes the INT2-fragment path, and the two bench
// layouts); the fourth (one 2-bit segment for K and V) is routed to the INT2 kernel; the others run the generic
// kernel. 3-bit regions of odd block counts put token rows at 2 mod 4 bytes (the unaligned reads).
const Segs kK3b1b{{0, 48, 3}, {48, 128, 1}};
const Segs kV3b{{0, 32, 3}, {32, 96, 2}, {96, 128, 0}};
const Segs kBenchK{{0, 32, 4}, {32, 80, 2}, {80, 128, 0}};
const Segs kBenchV{{0, 16, 4}, {16, 96, 2}, {96, 128, 0}};
const Segs kMix5{{0, 16, 4}, {16, 48, 3}, {48, 96, 2}, {96, 112, 1}, {112, 128, 0}};
INSTANTIATE_TEST_SUITE_P(
    ThreeBit, SegDecodeGpu,
    ::testing::Values(SegDecodeCase{128, kK3b1b, kInt2_128, {1500}, 4, 2, 64, 256, 0},          // compiled, group 2
                      SegDecodeCase{128, kK3b1b, kV3b, {700, 33, 1200}, 16, 2, 5, 37, 0},        // compiled, group 8
                      SegDecodeCase{128, kBenchK, kBenchV, {2000}, 8, 2, 16, 40, 3},            // compiled, group 4
                      SegDecodeCase{128, kInt2_128, kInt2_128, {900, 64}, 8, 8, 4, 16, 0},      // INT2 kernel, group 1
                      SegDecodeCase{128, kMix5, {{0, 48, 3}, {48, 80, 4}, {80, 128, 1}}, {700, 33, 1200}, 8, 2, 16,
                                    40, 0},                                                     // generic 4/3/2/1/0
                      SegDecodeCase{128, {{0, 16, 1}, {16, 64, 3}, {64, 128, 2}}, {{0, 80, 3}, {80, 128, 2}}, {1000},
                                    8, 2, 0, 0, 3},                                             // generic, no windows
                      SegDecodeCase{64, {{0, 16, 3}, {16, 64, 2}}, {{0, 48, 3}, {48, 64, 1}}, {900}, 8, 1, 4, 16, 0},
                      SegDecodeCase{256, {{0, 48, 4}, {48, 96, 3}, {96, 256, 2}}, {{0, 80, 3}, {80, 256, 1}}, {800}, 4,
                                    4, 4, 16, 0},                                               // d 256, group 1
                      SegDecodeCase{128, kMix5, kV3b, {6000}, 8, 1, 64, 256, 0}));              // many rescales

// Whole-head INT4 K and V: the engine's int4 baseline cache. d 128 has a compiled kernel (kSegCompiledLayouts128);
// 64 and 256 run the generic one.
const Segs kInt4_128{{0, 128, 4}};
INSTANTIATE_TEST_SUITE_P(
    Int4, SegDecodeGpu,
    ::testing::Values(SegDecodeCase{128, kInt4_128, kInt4_128, {1500}, 32, 8, 64, 256, 0},       // Qwen3-8B group 4
                      SegDecodeCase{128, kInt4_128, kInt4_128, {700, 33, 1200}, 8, 8, 5, 37, 0},  // group 1, batch 3
                      SegDecodeCase{128, kInt4_128, kInt4_128, {6000}, 16, 2, 0, 0, 3},           // no windows
                      SegDecodeCase{64, {{0, 64, 4}}, {{0, 64, 4}}, {900}, 8, 2, 4, 16, 0},
                      SegDecodeCase{256, {{0, 256, 4}}, {{0, 256, 4}}, {800}, 4, 1, 4, 16, 0}));

// ---- engine ------------------------------------------------------------------------------------------------------

namespace fs = std::filesystem;
const char* const kQwen3 = "models/qwen3-tiny-trained";

std::vector<int32_t> text_ids(const fs::path& dir, const char* text_file, size_t offset_bytes, size_t max_tokens) {
  std::ifstream in(test::fixtures_dir() / "text" / text_file, std::ios::binary);
  in.seekg(static_cast<std::streamoff>(offset_bytes));
  std::string text(32768, '\0');
  in.read(text.data(), static_cast<std::streamsize>(text.size()));
  text.resize(static_cast<size_t>(in.gcount()));
  std::vector<int32_t> ids = fmt::Tokenizer::load(dir)->encode(text, true);
  if (ids.size() > max_tokens) ids.resize(max_tokens);
  return ids;
}

std::vector<float> as_vector(std::span<const float> s) { return {s.begin(), s.end()}; }

TEST(EngineSpectral, GreedyAgreesWithBf16AndLogitsTrackTheCpuSimulation) {
  OSCAR_REQUIRE_GPU();
  OSCAR_REQUIRE_FIXTURE(kQwen3);
  const fs::path dir = test::fixtures_dir() / kQwen3;
  auto cpu = model::CpuModel::load(dir);
  calib::CpuForwardRunner runner(*cpu);
  calib::CalibrationData data;
  for (size_t i = 0; i < 3; ++i) data.sequences.push_back(text_ids(dir, "tiny-shakespeare.txt", 20000 * i, 256));
  // The spectral method fits its layouts on held-out calibration sequences and picks k_weight on others.
  for (size_t i = 0; i < 4; ++i) data.heldout.push_back(text_ids(dir, "war-and-peace.txt", 30000 * i, 256));
  data.seq_len = 256;
  calib::CalibrationOptions opt;
  opt.method = calib::Method::Spectral;
  opt.quant = fmt::KvQuantSpec::int2_default(cpu->config().head_dim);
  // With 1/2/4-bit widths the 2.28-bit budget leaves room for one segment only (each adds 32 bits of scale/zero
  // per token) and the calibrator picks whole-head INT2; allowing 0-bit segments gives real multi-segment layouts,
  // and 3 bits lets them use the 3-bit unpack.
  opt.spectral.spectral.widths = {0, 1, 2, 3, 4};
  opt.spectral.k_weight = 4.0;
  opt.spectral.fit_tokens = 512;
  fmt::Bundle bundle = calib::calibrate(runner, calib::model_fingerprint(dir), data, opt).bundle;
  bool any_segmented = false;
  for (size_t l = 0; l < bundle.layers.size(); ++l) {
    const fmt::KvQuantSpec s = fmt::layer_spec(bundle, l);
    any_segmented |= s.k.segments.size() > 1 || s.v.segments.size() > 1;
    std::printf("  layer %zu: K", l);
    for (const auto& g : s.k.segments) std::printf(" %db[%d,%d)", g.bits, g.begin, g.end);
    std::printf("  V");
    for (const auto& g : s.v.segments) std::printf(" %db[%d,%d)", g.bits, g.begin, g.end);
    std::printf("\n");
  }
  ASSERT_TRUE(any_segmented) << "the calibrator chose whole-head layouts only: nothing segmented to test";

  const std::vector<int32_t> ids = text_ids(dir, "tinystories-sample.txt", 0, 8 + 120);
  ASSERT_EQ(ids.size(), 128u);
  const std::vector<int32_t> prompt(ids.begin(), ids.begin() + 8), forced(ids.begin() + 8, ids.end());
  auto run = [&](rt::CacheMode mode, const fmt::Bundle* b, int64_t sink, int64_t recent) {
    rt::EngineOptions o;
    o.cache = mode;
    o.sink_tokens = sink;
    o.recent_tokens = recent;
    o.keep_logits = true;
    o.cache_budget_bytes = size_t{64} << 20;
    auto e = rt::Engine::load(dir, o, b);
    std::vector<std::vector<float>> rows;
    const int64_t s = e->add_sequence(prompt);
    rows.push_back(as_vector(e->last_logits(s)));
    for (int32_t t : forced) {
      e->set_next_token(s, t);
      e->step();
      rows.push_back(as_vector(e->last_logits(s)));
    }
    return rows;
  };
  const auto bf16 = run(rt::CacheMode::Bf16, nullptr, 0, 0);
  const auto seg = run(rt::CacheMode::Oscar, &bundle, 4, 16);

  // The CPU simulation of the same bundle and windows, teacher-forced over prompt + forced.
  eval::ModeOptions mo;
  mo.windows = {4, 16};
  mo.bundle = &bundle;
  auto fmt_sim = eval::CacheFormat::create(eval::CacheMode::Oscar, cpu->config(), mo);
  const std::vector<float> sim = eval::simulated_logits(*cpu, *fmt_sim, ids);
  const auto V = static_cast<size_t>(cpu->config().vocab_size);
  double nmse_sim = 0, nmse_bf16 = 0;
  int agree = 0, rows = 0;
  for (size_t i = 0; i < seg.size(); ++i) {
    const size_t pos = prompt.size() - 1 + i;  // the position whose logits row this is
    if (pos + 1 < 4 + 16 + 1) continue;        // still inside the windows: no quantized read yet
    const std::vector<float> want(sim.begin() + static_cast<std::ptrdiff_t>(pos * V),
                                  sim.begin() + static_cast<std::ptrdiff_t>((pos + 1) * V));
    nmse_sim += test::fwd::nmse(seg[i], want);
    nmse_bf16 += test::fwd::nmse(seg[i], bf16[i]);
    const auto am = [](const std::vector<float>& r) { return std::max_element(r.begin(), r.end()) - r.begin(); };
    agree += am(seg[i]) == am(bf16[i]);
    ++rows;
  }
  ASSERT_GT(rows, 100);
  nmse_sim /= rows;
  nmse_bf16 /= rows;
  std::printf("  spectral engine vs CPU simulation: mean logits nmse %.3g; vs bf16 engine %.3g; top-1 agreement "
              "with bf16 %d/%d\n", nmse_sim, nmse_bf16, agree, rows);
  // The engine computes what the simulation computes (bf16 GEMMs and fp16 tensor-core products differ from the
  // CPU's fp32 by ~1e-4 NMSE); the quantization itself moves the logits more than that.
  EXPECT_LT(nmse_sim, 2e-3);
  EXPECT_GT(agree, rows * 8 / 10);

  // Greedy continuation: the first tokens agree with the bf16 engine.
  auto greedy = [&](rt::CacheMode mode, const fmt::Bundle* b) {
    rt::EngineOptions o;
    o.cache = mode;
    o.sink_tokens = 4;
    o.recent_tokens = 16;
    o.cache_budget_bytes = size_t{64} << 20;
    auto e = rt::Engine::load(dir, o, b);
    const std::vector<int32_t> long_prompt(ids.begin(), ids.begin() + 96);
    const int64_t s = e->add_sequence(long_prompt);
    std::vector<int32_t> out{e->next_token(s)};
    for (int i = 0; i < 15; ++i) out.push_back(e->step().front().token);
    return out;
  };
  const auto g_bf16 = greedy(rt::CacheMode::Bf16, nullptr);
  const auto g_seg = greedy(rt::CacheMode::Oscar, &bundle);
  int same_prefix = 0;
  while (same_prefix < 16 && g_bf16[same_prefix] == g_seg[same_prefix]) ++same_prefix;
  std::printf("  greedy: first %d of 16 tokens identical to bf16\n", same_prefix);
  EXPECT_GE(same_prefix, 4);
}

}  // namespace
}  // namespace oscar
