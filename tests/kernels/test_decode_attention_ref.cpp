// decode_attention_ref and kv_write_ref against independent implementations: the record encoder of
// HeadQuantizer, and a naive double-precision attention in the ORIGINAL basis over dequantized K/V.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "formats/dtype.h"
#include "formats/kv_layout.h"
#include "kernels/attention_decode/decode_attention_ref.h"
#include "kernels/kv_quantize/kv_quantize_ref.h"
#include "kv_cache_test_util.h"
#include "lib/calib/quantizer_ref.h"
#include "test_support.h"

namespace oscar {
namespace {

TEST(KvWriteRef, PageSlotsHoldTheHeadQuantizerRecord) {
  const int d = 128, heads = 2, tokens = 70;
  const auto r = test::random_rotation(d, 1);
  const auto x = test::random_bf16(static_cast<size_t>(tokens) * heads * d, d, 2);
  const fmt::Int2PageGeometry geo{d, 64};
  std::vector<uint8_t> pool(static_cast<size_t>(4) * heads * geo.page_bytes(), 0);
  std::vector<int32_t> slots(tokens);
  for (int t = 0; t < tokens; ++t) slots[t] = t == 5 ? -1 : (3 - t / 64) * 64 + t % 64;  // pages 3, 2; token 5 skipped
  kern::KvWriteParams w;
  w.x = x.data();
  w.tokens = tokens;
  w.token_stride = heads * d;
  w.num_kv_heads = heads;
  w.head_dim = d;
  w.rotation = r.data();
  w.clip_ratio = 0.96f;
  w.slots = slots.data();
  w.int2_pool = pool.data();
  kern::kv_write_ref(w, kern::KvWriteMode::Int2);

  const auto spec = fmt::KvQuantSpec::int2_default(d);
  calib::HeadQuantizer hq(spec.k, d);
  std::vector<float> xf(d);
  std::vector<uint8_t> record(36);
  for (int t = 0; t < tokens; ++t) {
    for (int h = 0; h < heads; ++h) {
      const uint8_t* block = pool.data() + fmt::page_block_offset(3 - t / 64, h, heads, geo.page_bytes());
      const uint8_t* codes = block + (t % 64) * geo.code_row_bytes();
      const uint8_t* params = block + geo.params_offset() + (t % 64) * 4;
      if (t == 5) {
        EXPECT_TRUE(std::all_of(codes, codes + 32, [](uint8_t c) { return c == 0; }));
        continue;
      }
      for (int i = 0; i < d; ++i) xf[i] = fmt::bf16_to_f32(x[(static_cast<size_t>(t) * heads + h) * d + i]);
      hq.encode(xf, r, 0.96f, record);
      EXPECT_EQ(std::memcmp(codes, record.data(), 32), 0) << "t " << t << " h " << h;
      EXPECT_EQ(std::memcmp(params, record.data() + 32, 4), 0) << "t " << t << " h " << h;
    }
  }
}

struct DecodeCase {
  std::vector<int32_t> lens;
  int q_heads, kv_heads;
  int64_t sink, recent;
  bool rotate;
};

std::vector<double> naive_attention(const test::HostPagedCache& c, const DecodeCase& dc, const std::vector<uint16_t>& q,
                                    const std::vector<float>& rk, const std::vector<float>& rv) {
  const auto spec = fmt::KvQuantSpec::int2_default(c.head_dim);
  return test::naive_attention(c, spec.k, spec.v, dc.q_heads, dc.kv_heads, dc.sink, dc.recent, q, rk, rv);
}

class DecodeRef : public ::testing::TestWithParam<DecodeCase> {};

TEST_P(DecodeRef, MatchesNaiveAttentionOverDequantizedCache) {
  const auto& dc = GetParam();
  const int d = 128;
  const auto rk = dc.rotate ? test::random_rotation(d, 31) : std::vector<float>{};
  const auto rv = dc.rotate ? test::random_rotation(d, 32) : std::vector<float>{};
  test::HostPagedCache c;
  c.build(dc.lens, dc.kv_heads, d, rk, rv, 0.96f, 0.92f, 7);
  const auto q = test::random_bf16(dc.lens.size() * dc.q_heads * d, d, 99, 3.0f);
  auto p = c.params(c.k_int2.data(), c.v_int2.data(), c.k_bf16.data(), c.v_bf16.data(), c.int2_table.data(),
                    c.bf16_table.data(), c.lens.data());
  p.num_q_heads = dc.q_heads;
  p.q = q.data();
  p.rotation_k = dc.rotate ? rk.data() : nullptr;
  p.rotation_v = dc.rotate ? rv.data() : nullptr;
  p.sink_tokens = dc.sink;
  p.recent_tokens = dc.recent;
  std::vector<float> out(dc.lens.size() * dc.q_heads * d);
  p.out = out.data();
  kern::decode_attention_ref(p);
  const auto want = naive_attention(c, dc, q, rk, rv);
  EXPECT_LE(test::nmse(out, want), 1e-10);
}

INSTANTIATE_TEST_SUITE_P(Cases, DecodeRef,
                         ::testing::Values(DecodeCase{{1}, 4, 1, 0, 0, true},
                                           DecodeCase{{300}, 8, 2, 64, 32, true},
                                           DecodeCase{{300, 17, 130}, 8, 1, 16, 40, true},
                                           DecodeCase{{200}, 4, 2, 0, 0, false},
                                           DecodeCase{{150}, 4, 1, 1000, 0, true}));

TEST(DecodeRef, RejectsUnsupportedShapes) {
  kern::DecodeAttentionParams p;
  p.batch = 1;
  p.num_q_heads = 6;
  p.num_kv_heads = 4;
  EXPECT_EQ(kern::decode_attention_can_implement(p), kern::Status::InvalidArgument);
  p.num_q_heads = 32;
  p.num_kv_heads = 2;
  EXPECT_EQ(kern::decode_attention_can_implement(p), kern::Status::Unsupported);  // group 16
  p.num_kv_heads = 8;
  p.head_dim = 96;
  EXPECT_EQ(kern::decode_attention_can_implement(p), kern::Status::Unsupported);
}

TEST(DecodeRef, LaunchVariantAndWorkspace) {
  kern::DecodeAttentionParams p;
  p.batch = 0;
  p.num_q_heads = 32;
  p.num_kv_heads = 8;
  EXPECT_EQ(p.variant, kern::DecodeAttentionVariant::Fused);  // the default the engine runs
  EXPECT_EQ(kern::decode_attention_can_implement(p), kern::Status::Ok);
  p.variant = kern::DecodeAttentionVariant::Separate;
  EXPECT_EQ(kern::decode_attention_can_implement(p), kern::Status::Ok);
  p.variant = static_cast<kern::DecodeAttentionVariant>(7);
  EXPECT_EQ(kern::decode_attention_can_implement(p), kern::Status::InvalidArgument);
  // batch 2 x 32 heads, d 128, 3 splits: q_rot 64x128, 64 x 6 slots x (2 + 128), 64 tickets; 4 bytes each.
  EXPECT_EQ(kern::decode_attention_workspace_bytes(2, 32, 128, 3), size_t{4} * (64 * 128 + 64 * 6 * 130 + 64));
}

TEST(DecodeRef, RejectsMisalignedValueRotation) {
  // The fused merge reads R_v rows as float4: an R_v off a 16-byte boundary is refused, not read misaligned.
  alignas(16) static float rotation[2 * 128 * 128 + 4] = {};
  alignas(16) static uint16_t q[8 * 128] = {}, pool[2 * 64 * 128] = {};
  alignas(16) static float out[8 * 128] = {};
  const int32_t len = 64, table = 0;
  kern::DecodeAttentionParams p;
  p.batch = 1;
  p.num_q_heads = 8;
  p.num_kv_heads = 8;
  p.q = q;
  p.seq_lens = &len;
  p.max_seq_len = len;
  p.sink_tokens = len;  // every token bf16: no INT2 pools needed
  p.k_bf16_pool = pool;
  p.v_bf16_pool = pool + 64 * 128;
  p.bf16_page_table = &table;
  p.max_pages = 1;
  p.out = out;
  p.rotation_v = rotation;
  EXPECT_EQ(kern::decode_attention_can_implement(p), kern::Status::Ok);
  p.rotation_v = rotation + 1;
  EXPECT_EQ(kern::decode_attention_can_implement(p), kern::Status::Misaligned);
  p.rotation_k = rotation + 1;  // R_k is read one float at a time
  p.rotation_v = rotation + 4;
  EXPECT_EQ(kern::decode_attention_can_implement(p), kern::Status::Ok);
}

TEST(DecodeRef, SplitCountFillsTheGpuAtBatchOne) {
  // 132 SMs (H100 SXM), 8 KV heads of Llama-3-70B (groups of 8: splits up to 16K tokens), 128K tokens: at least 4
  // blocks per SM.
  const int splits = kern::decode_attention_num_splits(1, 64, 8, 131072, 64, 132);
  EXPECT_GE(8 * splits, 4 * 132);
  EXPECT_EQ(kern::decode_attention_num_splits(1, 64, 8, 100, 64, 132), 1);  // never shorter than two pages
  // One wave of 4 blocks per SM and no partial second wave: 64 x 8 = 512 pairs fit the 528 slots once.
  EXPECT_EQ(kern::decode_attention_num_splits(64, 64, 8, 16384, 64, 132), 1);
  EXPECT_EQ(kern::decode_attention_num_splits(8, 64, 8, 32768, 64, 132), 8);   // 512 blocks, not 9 x 64 = 576
  EXPECT_EQ(kern::decode_attention_num_splits(32, 64, 8, 32768, 64, 132), 2);  // 512 blocks, not 3 x 256 = 768
}

TEST(DecodeRef, SplitCountKeepsSplitsOfAtMostSixteenThousandTokens) {
  // Groups of 8 (Llama-3-70B). Past one wave of 16K-token splits the fill would give longer ones (32 x 128K: 2
  // splits of 64K); splits of 16K tokens (several waves the block scheduler balances) ran 6-7 % faster on the H100.
  EXPECT_EQ(kern::decode_attention_num_splits(32, 64, 8, 131072, 64, 132), 8);
  EXPECT_EQ(kern::decode_attention_num_splits(64, 64, 8, 131072, 64, 132), 8);
  EXPECT_EQ(kern::decode_attention_num_splits(8, 64, 8, 131072, 64, 132), 8);  // the fill: 8 splits of 16K already
  EXPECT_EQ(kern::decode_attention_num_splits(32, 64, 8, 32768, 64, 132), 2);
  EXPECT_EQ(kern::decode_attention_num_splits(32, 64, 8, 32769, 64, 132), 3);
  for (int context : {16384, 50000, 131072, 1 << 20}) {
    for (int batch : {1, 8, 32, 64, 256}) {
      const int splits = kern::decode_attention_num_splits(batch, 64, 8, context, 64, 132);
      EXPECT_LE((context + splits - 1) / splits, 16384) << batch << " x " << context << ": " << splits << " splits";
    }
  }
}

TEST(DecodeRef, SplitCountKeepsSplitsOfAtMostEightThousandTokensForGroupsOfFour) {
  // Qwen3-8B (32 query heads, 8 KV heads: the narrow layout): 16 splits of 8K at 8 x 128K and 32 x 128K ran 2.8 %
  // and 1 % faster than 8 of 16K on the H100; Llama-3-70B's groups of 8 keep 16K.
  EXPECT_EQ(kern::decode_attention_num_splits(8, 32, 8, 131072, 64, 132), 16);
  EXPECT_EQ(kern::decode_attention_num_splits(32, 32, 8, 131072, 64, 132), 16);
  EXPECT_EQ(kern::decode_attention_num_splits(8, 64, 8, 131072, 64, 132), 8);
  EXPECT_EQ(kern::decode_attention_num_splits(32, 32, 8, 32768, 64, 132), 4);
  EXPECT_EQ(kern::decode_attention_num_splits(32, 64, 8, 32768, 64, 132), 2);
  // Where the fill already cuts shorter splits it stays: 8 x 32K is 8 splits of 4K, batch 1 at 128K 66 of ~2K.
  EXPECT_EQ(kern::decode_attention_num_splits(8, 32, 8, 32768, 64, 132), 8);
  EXPECT_EQ(kern::decode_attention_num_splits(1, 32, 8, 131072, 64, 132), 66);
  for (int context : {8192, 50000, 131072, 1 << 20}) {
    for (int batch : {1, 8, 32, 64, 256}) {
      for (int q_heads : {8, 16, 32}) {  // groups 1, 2, 4
        const int splits = kern::decode_attention_num_splits(batch, q_heads, 8, context, 64, 132);
        EXPECT_LE((context + splits - 1) / splits, 8192) << batch << " x " << context << ", " << q_heads << " heads";
      }
    }
  }
}

TEST(DecodeRef, SpreadSharedMemoryCapsBlocksPerSm) {
  // H100: 132 SMs, 228 KiB per SM, 227 KiB opt-in per block, 1 KiB reserved per block; the INT2 kernel's ring
  // (d 128) is 55296 bytes, its static shared memory ~560.
  constexpr int kSms = 132, kPerSm = 233472, kReserved = 1024;
  constexpr size_t kRing = 55296, kStatic = 560;
  constexpr int kMostDynamic = 232448 - static_cast<int>(kStatic);
  auto fits = [&](size_t dynamic) { return kPerSm / static_cast<int64_t>(dynamic + kStatic + kReserved); };
  for (int64_t blocks : {1, 64, 128, 132, 133, 256, 264, 265, 392, 396}) {
    const size_t bytes =
        kern::decode_attention_spread_smem_bytes(kRing, blocks, kSms, kStatic, kMostDynamic, kPerSm, kReserved);
    const int64_t per_sm = (blocks + kSms - 1) / kSms;
    EXPECT_EQ(fits(bytes), per_sm) << blocks << " blocks: " << bytes << " bytes";
    EXPECT_GE(bytes, kRing);
    EXPECT_EQ(bytes % 128, 0u);
  }
  // A grid that fills the four natural slots per SM keeps the ring's size.
  EXPECT_EQ(kern::decode_attention_spread_smem_bytes(kRing, 512, kSms, kStatic, kMostDynamic, kPerSm, kReserved), kRing);
  EXPECT_EQ(kern::decode_attention_spread_smem_bytes(kRing, 528, kSms, kStatic, kMostDynamic, kPerSm, kReserved), kRing);
  // No device numbers: no change.
  EXPECT_EQ(kern::decode_attention_spread_smem_bytes(kRing, 64, 0, kStatic, kMostDynamic, kPerSm, kReserved), kRing);
}

TEST(DecodeRef, SplitCountAtBatchOneKeepsSplitsOfAboutTwoThousandTokens) {
  // Batch 1, 8 KV heads, 132 SMs: the fill is 66 splits; below 66K tokens that makes splits under 1024 tokens, so
  // splits of ~2K tokens with at least 64 blocks (the counts that ran fastest on the H100 at 4K..64K).
  EXPECT_EQ(kern::decode_attention_num_splits(1, 32, 8, 4096, 64, 132), 8);
  EXPECT_EQ(kern::decode_attention_num_splits(1, 32, 8, 8192, 64, 132), 8);
  EXPECT_EQ(kern::decode_attention_num_splits(1, 32, 8, 16384, 64, 132), 8);
  EXPECT_EQ(kern::decode_attention_num_splits(1, 32, 8, 32768, 64, 132), 16);
  EXPECT_EQ(kern::decode_attention_num_splits(1, 32, 8, 65536, 64, 132), 32);
  EXPECT_EQ(kern::decode_attention_num_splits(1, 32, 8, 131072, 64, 132), 66);  // 1986 tokens a split: the fill
  // Two KV heads: 32 splits keep 64 blocks; short sequences still never split under two pages.
  EXPECT_EQ(kern::decode_attention_num_splits(1, 8, 2, 4096, 64, 132), 32);
  EXPECT_EQ(kern::decode_attention_num_splits(1, 32, 8, 1000, 64, 132), 8);
  EXPECT_EQ(kern::decode_attention_num_splits(1, 32, 8, 500, 64, 132), 4);
  // Batch 8 (64 pairs) keeps the fill even at 4K: 8 splits of 512 tokens beat 4 of 1024 by 1.35x.
  EXPECT_EQ(kern::decode_attention_num_splits(8, 32, 8, 4096, 64, 132), 8);
}

}  // namespace
}  // namespace oscar
