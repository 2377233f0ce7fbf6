// rt::Engine end to end on the shared fixtures (runtime/engine.h):
//  * bf16 cache: greedy tokens == DeviceModel full-recompute greedy tokens (32 tokens), llama2.c TinyStories
//    (head_dim 8, padded to the kernels' 64) and qwen3-tiny-trained (head_dim 128, GQA);
//  * batching: sequences stepped together, and prompts prefilled together (add_sequences), give the tokens they
//    give alone; a refused packed prefill keeps nothing;
//  * INT2 caches while the context is inside sink + recent window: logits bit-identical to the same engine with
//    every token bf16 (int2 vs bf16; oscar vs oscar with an all-bf16 window), then the INT2 path engages
//    (logits change) with a small, finite KL to bf16;
//  * an OSCAR bundle made here with the calibration API, refused for another model;
//  * the memory budget: pool bytes within it, running out is an oscar::Error, and the engine keeps working.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <vector>

#include "formats/error.h"
#include "formats/tokenizer.h"
#include "lib/calib/calibrator.h"
#include "lib/model/cpu_model.h"
#include "lib/model/generate.h"
#include "runtime/device_model.h"
#include "runtime/engine.h"
#include "runtime/kv_cache.h"
#include "test_fwd_gpu_support.h"
#include "test_support.h"

namespace oscar::rt {
namespace {

namespace fs = std::filesystem;

const char* const kTinyStories = "models/tinystories-llama2c-280k-hf";
const char* const kQwen3 = "models/qwen3-tiny-trained";

fs::path model_dir(const char* rel) { return test::fixtures_dir() / rel; }

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

int32_t argmax(std::span<const float> row) {
  std::mt19937_64 unused;
  return model::pick_next_token(row, model::SamplingOptions{}, unused);  // greedy, lowest id on ties
}

// KL(p || q) of the softmaxes of two logit rows, in double.
double kl_divergence(std::span<const float> p_logits, std::span<const float> q_logits) {
  auto log_softmax = [](std::span<const float> x) {
    const double m = *std::max_element(x.begin(), x.end());
    double sum = 0;
    for (float v : x) sum += std::exp(v - m);
    std::vector<double> out(x.size());
    for (size_t i = 0; i < x.size(); ++i) out[i] = x[i] - m - std::log(sum);
    return out;
  };
  const std::vector<double> lp = log_softmax(p_logits), lq = log_softmax(q_logits);
  double kl = 0;
  for (size_t i = 0; i < lp.size(); ++i) kl += std::exp(lp[i]) * (lp[i] - lq[i]);
  return kl;
}

bool bit_identical(std::span<const float> a, std::span<const float> b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size_bytes()) == 0;
}

std::vector<float> as_vector(std::span<const float> s) { return {s.begin(), s.end()}; }

// ---- bf16 cache == full recompute -----------------------------------------------------------------------------

class EngineRecompute : public ::testing::TestWithParam<const char*> {};

TEST_P(EngineRecompute, Bf16GreedyTokensMatchDeviceModelFullRecompute) {
  OSCAR_REQUIRE_GPU();
  OSCAR_REQUIRE_FIXTURE(GetParam());
  const fs::path dir = model_dir(GetParam());
  const std::vector<int32_t> prompt = text_ids(dir, "tinystories-sample.txt", 0, 12);
  constexpr int kNewTokens = 32;

  EngineOptions opt;
  opt.cache = CacheMode::Bf16;
  opt.keep_logits = true;
  opt.cache_budget_bytes = size_t{64} << 20;
  auto engine = Engine::load(dir, opt);
  const int64_t seq = engine->add_sequence(prompt);
  std::vector<int32_t> engine_tokens{engine->next_token(seq)};
  std::vector<std::vector<float>> engine_logits{as_vector(engine->last_logits(seq))};
  while (engine_tokens.size() < kNewTokens) {
    engine_tokens.push_back(engine->step().at(0).token);
    engine_logits.push_back(as_vector(engine->last_logits(seq)));
  }
  EXPECT_EQ(engine->tokens(seq).size(), prompt.size() + kNewTokens - 1);

  // The reference: a fresh prefill of the whole sequence for every new token (no cache at all).
  auto reference = DeviceModel::load(dir);
  std::vector<int32_t> ids = prompt;
  std::vector<int32_t> ref_tokens;
  double worst_nmse = 0;
  for (int i = 0; i < kNewTokens; ++i) {
    PackedBatch batch;
    batch.add_sequence(ids);
    DeviceForwardOptions fo;
    fo.rows = LogitsRows::LastPerSequence;
    const std::vector<float> logits = reference->forward(batch, fo).to_host();
    ref_tokens.push_back(argmax(logits));
    ids.push_back(ref_tokens.back());
    worst_nmse = std::max(worst_nmse, test::fwd::nmse(engine_logits[static_cast<size_t>(i)], logits));
    if (ref_tokens.back() != engine_tokens[static_cast<size_t>(i)]) break;  // later rows see different inputs
  }
  EXPECT_EQ(engine_tokens, ref_tokens);
  // Only the attention kernel's summation order (and its fp32 probabilities vs. flash prefill's bf16 ones) differ.
  EXPECT_LT(worst_nmse, 1e-3);
  std::cout << GetParam() << ": worst logits nmse engine vs recompute " << worst_nmse << "\n";
}

INSTANTIATE_TEST_SUITE_P(Fixtures, EngineRecompute, ::testing::Values(kTinyStories, kQwen3),
                         [](const auto& info) { return std::string(info.param == kQwen3 ? "Qwen3" : "TinyStories"); });

// Three prompts of different lengths, so the sequences sit at different positions and page counts in every step.
std::vector<std::vector<int32_t>> batch_prompts(const fs::path& dir) {
  return {text_ids(dir, "tiny-shakespeare.txt", 0, 5), text_ids(dir, "tiny-shakespeare.txt", 4000, 70),
          text_ids(dir, "tinystories-sample.txt", 100, 130)};
}

// Small windows, so that the INT2 cache reads INT2 pages within a few steps.
EngineOptions batch_options(CacheMode mode, bool keep_logits) {
  EngineOptions opt;
  opt.cache = mode;
  opt.sink_tokens = 4;
  opt.recent_tokens = 16;
  opt.keep_logits = keep_logits;
  opt.cache_budget_bytes = size_t{64} << 20;
  return opt;
}

// A prompt alone in its own engine: the prefill's logits (with keep_logits) and the tokens after `steps` steps.
struct AloneRun {
  std::vector<float> first_logits;
  std::vector<int32_t> tokens;
};
AloneRun run_alone(const fs::path& dir, const EngineOptions& opt, const std::vector<int32_t>& prompt, int steps) {
  auto e = Engine::load(dir, opt);
  const int64_t s = e->add_sequence(prompt);
  AloneRun run;
  if (opt.keep_logits) run.first_logits = as_vector(e->last_logits(s));
  for (int i = 0; i < steps; ++i) e->step();
  run.tokens = e->tokens(s);
  return run;
}

TEST(EngineBatch, SequencesSteppedTogetherMatchEachAlone) {
  OSCAR_REQUIRE_GPU();
  OSCAR_REQUIRE_FIXTURE(kQwen3);
  const fs::path dir = model_dir(kQwen3);
  const std::vector<std::vector<int32_t>> prompts = batch_prompts(dir);
  constexpr int kSteps = 20;
  for (const CacheMode mode : {CacheMode::Bf16, CacheMode::Int2}) {
    const EngineOptions opt = batch_options(mode, false);
    std::vector<AloneRun> alone;
    for (const auto& p : prompts) alone.push_back(run_alone(dir, opt, p, kSteps));
    auto e = Engine::load(dir, opt);
    std::vector<int64_t> ids;
    for (const auto& p : prompts) ids.push_back(e->add_sequence(p));
    for (int i = 0; i < kSteps; ++i) {
      const auto out = e->step();
      ASSERT_EQ(out.size(), prompts.size());
    }
    for (size_t i = 0; i < prompts.size(); ++i)
      EXPECT_EQ(e->tokens(ids[i]), alone[i].tokens) << "sequence " << i << ", cache " << cache_mode_name(mode);
    // Freeing one leaves the others stepping.
    e->free_sequence(ids[1]);
    EXPECT_EQ(e->step().size(), 2u);
  }
}

// Engine::add_sequences: one packed prefill of several prompts gives each prompt's first logits (up to the GEMMs'
// summation over a taller matrix: cuBLASLt may pick another algorithm for more rows) and the same greedy tokens as
// prefilling it alone, in the bf16 and INT2 caches (the INT2 writes of a packed prefill land in each sequence's
// own pages).
TEST(EngineBatch, PromptsPrefilledTogetherMatchEachAlone) {
  OSCAR_REQUIRE_GPU();
  OSCAR_REQUIRE_FIXTURE(kQwen3);
  const fs::path dir = model_dir(kQwen3);
  const std::vector<std::vector<int32_t>> prompts = batch_prompts(dir);
  constexpr int kSteps = 16;
  for (const CacheMode mode : {CacheMode::Bf16, CacheMode::Int2}) {
    const EngineOptions opt = batch_options(mode, true);
    std::vector<AloneRun> alone;
    for (const auto& p : prompts) alone.push_back(run_alone(dir, opt, p, kSteps));
    auto e = Engine::load(dir, opt);
    const std::vector<int64_t> ids = e->add_sequences(prompts);
    ASSERT_EQ(ids.size(), prompts.size());
    for (size_t i = 0; i < prompts.size(); ++i) {
      EXPECT_EQ(ids[i], static_cast<int64_t>(i)) << "ids as adding one by one gives";
      EXPECT_EQ(e->tokens(ids[i]), prompts[i]);
      const std::vector<float> together = as_vector(e->last_logits(ids[i]));
      ASSERT_EQ(together.size(), alone[i].first_logits.size());
      EXPECT_LE(test::fwd::nmse(together, alone[i].first_logits), 1e-4) << "prompt " << i << ", " << cache_mode_name(mode);
      EXPECT_EQ(argmax(together), argmax(alone[i].first_logits)) << "prompt " << i;
    }
    for (int i = 0; i < kSteps; ++i) ASSERT_EQ(e->step().size(), prompts.size());
    for (size_t i = 0; i < prompts.size(); ++i)
      EXPECT_EQ(e->tokens(ids[i]), alone[i].tokens) << "prompt " << i << ", cache " << cache_mode_name(mode);
  }
}

// Greedy decoding without keep_logits picks on the device (kern::argmax_rows); with keep_logits the host picks
// from the downloaded rows (model::pick_next_token). Same tokens, prefill and steps, bf16 and INT2 caches, and the
// kept rows' argmax is the token picked.
TEST(EngineGreedy, TokensPickedOnTheDeviceEqualTheHostArgmax) {
  OSCAR_REQUIRE_GPU();
  OSCAR_REQUIRE_FIXTURE(kQwen3);
  const fs::path dir = model_dir(kQwen3);
  const std::vector<std::vector<int32_t>> prompts = {text_ids(dir, "tinystories-sample.txt", 0, 12),
                                                     text_ids(dir, "tiny-shakespeare.txt", 9000, 90)};
  constexpr int kSteps = 24;
  for (const CacheMode mode : {CacheMode::Bf16, CacheMode::Int2}) {
    std::vector<std::vector<int32_t>> tokens[2];
    for (const bool keep : {false, true}) {
      auto e = Engine::load(dir, batch_options(mode, keep));
      const std::vector<int64_t> ids = e->add_sequences(prompts);
      for (int i = 0; i < kSteps; ++i) {
        for (const auto& st : e->step()) {
          if (keep) {
            EXPECT_EQ(argmax(e->last_logits(st.sequence)), st.token);
          }
        }
      }
      for (const int64_t id : ids) tokens[keep ? 1 : 0].push_back(e->tokens(id));
    }
    EXPECT_EQ(tokens[0], tokens[1]) << cache_mode_name(mode);
  }
}

// A refused batch keeps none of its prompts: no sequence, no page, and the engine works afterwards.
TEST(EngineBatch, PackedPrefillIsAllOrNothing) {
  OSCAR_REQUIRE_GPU();
  OSCAR_REQUIRE_FIXTURE(kQwen3);
  OSCAR_REQUIRE_FIXTURE("text/war-and-peace.txt");
  const fs::path dir = model_dir(kQwen3);
  EngineOptions opt;
  opt.cache = CacheMode::Int2;
  opt.sink_tokens = 4;
  opt.recent_tokens = 16;
  opt.max_sequences = 3;
  // 3 sequences x 3 bf16 window pages of 393216 bytes, the rest (655360 bytes) 11 INT2 pages of 55296.
  opt.cache_budget_bytes = size_t{4} << 20;
  auto e = Engine::load(dir, opt);
  const int64_t int2_pages = e->cache().tables().int2_pages().capacity();
  ASSERT_GT(int2_pages, 2);
  const std::vector<int32_t> text = text_ids(dir, "war-and-peace.txt", 0, 100000);
  // Two prompts that fit alone but not together (each needs more than half of the INT2 pages).
  const auto half = static_cast<size_t>((int2_pages / 2 + 1) * 64 + 20);
  ASSERT_LT(half, text.size());
  const std::vector<int32_t> big(text.begin(), text.begin() + static_cast<std::ptrdiff_t>(half));
  const auto nothing_kept = [&] {
    EXPECT_TRUE(e->sequences().empty());
    EXPECT_EQ(e->cache().tables().int2_pages().used_pages(), 0);
    EXPECT_EQ(e->cache().tables().bf16_pages().used_pages(), 0);
  };
  EXPECT_THROW(e->add_sequences({big, big}), Error);
  nothing_kept();
  // A bad id in the second prompt is named by its index.
  try {
    e->add_sequences({std::vector<int32_t>{1, 2, 3}, std::vector<int32_t>{4, -1}});
    FAIL() << "expected a refused id";
  } catch (const Error& err) {
    EXPECT_NE(std::string(err.what()).find("prompt 1"), std::string::npos) << err.what();
  }
  nothing_kept();
  EXPECT_THROW(e->add_sequences({std::vector<int32_t>{1}, std::vector<int32_t>{}}), Error);
  EXPECT_THROW(e->add_sequences({{1}, {2}, {3}, {4}}), Error);  // max_sequences = 3
  nothing_kept();
  const std::vector<int64_t> ids = e->add_sequences({big, std::vector<int32_t>(text.begin(), text.begin() + 40)});
  ASSERT_EQ(ids.size(), 2u);
  EXPECT_EQ(e->step().size(), 2u);
}

// ---- INT2 / OSCAR caches ---------------------------------------------------------------------------------------

// A bundle calibrated here with the library API on a few sequences of the Qwen3 fixture (CPU reference forward).
const fmt::Bundle& qwen3_bundle() {
  static const fmt::Bundle bundle = [] {
    const fs::path dir = model_dir(kQwen3);
    auto cpu = model::CpuModel::load(dir);
    calib::CpuForwardRunner runner(*cpu);
    calib::CalibrationData data;
    for (size_t i = 0; i < 4; ++i) data.sequences.push_back(text_ids(dir, "tiny-shakespeare.txt", 20000 * i, 256));
    data.seq_len = 256;
    calib::CalibrationOptions opt;
    opt.quant = fmt::KvQuantSpec::int2_default(cpu->config().head_dim);
    opt.tune_clip = false;  // no held-out data: the published clip ratios
    return calib::calibrate(runner, calib::model_fingerprint(dir), data, opt).bundle;
  }();
  return bundle;
}

struct ForcedRun {
  std::vector<std::vector<float>> logits;  // one row per fed position (prefill's last row first)
  std::vector<int64_t> lengths;            // cache length the row was computed at (tokens fed)
};

// Prefill prompt, then feed `forced` token by token (teacher forcing), keeping every logits row.
ForcedRun run_forced(const fs::path& dir, EngineOptions opt, const fmt::Bundle* bundle,
                     const std::vector<int32_t>& prompt, const std::vector<int32_t>& forced) {
  opt.keep_logits = true;
  opt.cache_budget_bytes = size_t{64} << 20;
  auto e = Engine::load(dir, opt, bundle);
  ForcedRun run;
  const int64_t s = e->add_sequence(prompt);
  run.logits.push_back(as_vector(e->last_logits(s)));
  run.lengths.push_back(static_cast<int64_t>(prompt.size()));
  for (int32_t token : forced) {
    e->set_next_token(s, token);
    e->step();
    run.logits.push_back(as_vector(e->last_logits(s)));
    run.lengths.push_back(static_cast<int64_t>(e->tokens(s).size()));
  }
  return run;
}

class EngineQuantized : public ::testing::Test {
 protected:
  void SetUp() override {
    OSCAR_REQUIRE_GPU();
    OSCAR_REQUIRE_FIXTURE(kQwen3);
    dir_ = model_dir(kQwen3);
    const std::vector<int32_t> ids = text_ids(dir_, "tinystories-sample.txt", 0, 8 + 120);
    ASSERT_EQ(ids.size(), 8u + 120u);
    prompt_.assign(ids.begin(), ids.begin() + 8);
    forced_.assign(ids.begin() + 8, ids.end());
  }
  EngineOptions windows(CacheMode mode, int64_t sink, int64_t recent) const {
    EngineOptions o;
    o.cache = mode;
    o.sink_tokens = sink;
    o.recent_tokens = recent;
    return o;
  }
  fs::path dir_;
  std::vector<int32_t> prompt_, forced_;
};

TEST_F(EngineQuantized, Int2IsBitIdenticalToBf16InsideTheWindowsThenCloseInKl) {
  const ForcedRun bf16 = run_forced(dir_, windows(CacheMode::Bf16, 0, 0), nullptr, prompt_, forced_);
  const ForcedRun int2 = run_forced(dir_, windows(CacheMode::Int2, 4, 16), nullptr, prompt_, forced_);
  ASSERT_EQ(bf16.logits.size(), int2.logits.size());
  int differing = 0;
  double kl_sum = 0;
  int kl_rows = 0;
  for (size_t i = 0; i < bf16.logits.size(); ++i) {
    // Row i >= 1 comes from the step whose decode kernel ran at seq_len lengths[i]; it reads INT2 pages only
    // when some token t >= sink has t < seq_len - recent. Row 0 is the prefill's (no cache read at all).
    const int64_t kernel_len = bf16.lengths[i];
    if (kernel_len <= 4 + 16) {
      EXPECT_TRUE(bit_identical(bf16.logits[i], int2.logits[i])) << "row " << i << " (cache length " << kernel_len
                                                                 << ") is inside the windows";
    } else {
      differing += !bit_identical(bf16.logits[i], int2.logits[i]);
      const double kl = kl_divergence(bf16.logits[i], int2.logits[i]);
      ASSERT_TRUE(std::isfinite(kl)) << "row " << i;
      kl_sum += kl;
      ++kl_rows;
    }
  }
  ASSERT_GT(kl_rows, 100);
  EXPECT_GT(differing, kl_rows / 2) << "the INT2 pages are not being read";
  const double mean_kl = kl_sum / kl_rows;
  std::cout << "int2 (no rotation), sink 4 recent 16: mean KL to bf16 " << mean_kl << " over " << kl_rows
            << " rows\n";
  EXPECT_GT(mean_kl, 0.0);
  // Sanity bound only (plain INT2 on outlier-heavy keys is the bad baseline): far below the ~8 nats of an
  // unrelated distribution over 4096 tokens.
  EXPECT_LT(mean_kl, 3.0);
}

TEST_F(EngineQuantized, OscarBundleInsideTheWindowsIsExactThenSmallKl) {
  const fmt::Bundle& bundle = qwen3_bundle();
  const ForcedRun bf16 = run_forced(dir_, windows(CacheMode::Bf16, 0, 0), nullptr, prompt_, forced_);
  // The same rotations with every token in the sink (1024 > 128 tokens): bf16 pages only, in the rotated basis.
  const ForcedRun wide = run_forced(dir_, windows(CacheMode::Oscar, 1024, 0), &bundle, prompt_, forced_);
  const ForcedRun oscar = run_forced(dir_, windows(CacheMode::Oscar, 4, 16), &bundle, prompt_, forced_);
  const ForcedRun int2 = run_forced(dir_, windows(CacheMode::Int2, 4, 16), nullptr, prompt_, forced_);

  double kl_oscar = 0, kl_int2 = 0, worst_rotated_nmse = 0;
  int rows = 0;
  for (size_t i = 0; i < bf16.logits.size(); ++i) {
    // Rotating K/V (and q, and the output back) is exact up to rounding: the all-bf16 rotated cache tracks bf16.
    worst_rotated_nmse = std::max(worst_rotated_nmse, test::fwd::nmse(wide.logits[i], bf16.logits[i]));
    if (bf16.lengths[i] <= 4 + 16) {
      EXPECT_TRUE(bit_identical(wide.logits[i], oscar.logits[i])) << "row " << i << " is inside the windows";
      continue;
    }
    const double ko = kl_divergence(bf16.logits[i], oscar.logits[i]);
    const double ki = kl_divergence(bf16.logits[i], int2.logits[i]);
    ASSERT_TRUE(std::isfinite(ko) && std::isfinite(ki)) << "row " << i;
    kl_oscar += ko;
    kl_int2 += ki;
    ++rows;
  }
  ASSERT_GT(rows, 100);
  kl_oscar /= rows;
  kl_int2 /= rows;
  std::cout << "sink 4 recent 16, " << rows << " rows: mean KL to bf16 oscar " << kl_oscar << ", int2 " << kl_int2
            << "; rotated all-bf16 worst nmse " << worst_rotated_nmse << "\n";
  EXPECT_LT(worst_rotated_nmse, 1e-3);
  EXPECT_GT(kl_oscar, 0.0);
  EXPECT_LT(kl_oscar, 0.5);
  // The method's claim, on a bundle from 4 x 256 calibration tokens: the rotation makes INT2 hurt less.
  EXPECT_LT(kl_oscar, kl_int2);
}

TEST(EngineBundle, RefusedForAnotherModelNamingBoth) {
  OSCAR_REQUIRE_FIXTURE(kQwen3);
  OSCAR_REQUIRE_FIXTURE(kTinyStories);
  // A bundle for Qwen3 (fingerprint only matters here), loaded against the TinyStories model. The check runs
  // before anything touches the device.
  fmt::Bundle bundle;
  bundle.model = calib::model_fingerprint(model_dir(kQwen3));
  EngineOptions opt;
  opt.cache = CacheMode::Oscar;
  try {
    Engine::load(model_dir(kTinyStories), opt, &bundle);
    FAIL() << "expected a fingerprint error";
  } catch (const Error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("Qwen3ForCausalLM"), std::string::npos) << what;
    EXPECT_NE(what.find("LlamaForCausalLM"), std::string::npos) << what;
    EXPECT_NE(what.find(model_dir(kTinyStories).string()), std::string::npos) << what;
  }
}

// ---- memory budget ---------------------------------------------------------------------------------------------

TEST(EngineBudget, PoolsStayWithinTheBudgetAndRunningOutIsAnError) {
  OSCAR_REQUIRE_GPU();
  OSCAR_REQUIRE_FIXTURE(kQwen3);
  OSCAR_REQUIRE_FIXTURE("text/war-and-peace.txt");
  const fs::path dir = model_dir(kQwen3);
  // Qwen3-tiny: 6 layers x (K, V) x 2 KV heads = 24 page blocks. bf16 page 24 x 16 KiB = 393216 bytes, INT2 page
  // 24 x 2304 = 55296 bytes. Sink 4 + recent 16 need 3 bf16 pages per sequence; 1.5 MiB leaves 7 INT2 pages:
  // 7 x 64 = 448 tokens of one sequence.
  EngineOptions opt;
  opt.cache = CacheMode::Int2;
  opt.sink_tokens = 4;
  opt.recent_tokens = 16;
  opt.max_sequences = 1;
  opt.cache_budget_bytes = 1572864;
  auto e = Engine::load(dir, opt);
  EXPECT_EQ(e->cache().tables().bf16_pages().capacity(), 3);
  EXPECT_EQ(e->cache().tables().int2_pages().capacity(), 7);
  EXPECT_EQ(e->cache().device_bytes(), 3u * 393216u + 7u * 55296u);
  EXPECT_LE(e->cache().device_bytes(), opt.cache_budget_bytes);

  const std::vector<int32_t> too_long = text_ids(dir, "war-and-peace.txt", 0, 449);
  ASSERT_EQ(too_long.size(), 449u);
  EXPECT_THROW(e->add_sequence(too_long), Error);
  EXPECT_TRUE(e->sequences().empty());  // nothing kept
  EXPECT_EQ(e->cache().tables().int2_pages().used_pages(), 0);

  const std::vector<int32_t> prompt(too_long.begin(), too_long.begin() + 300);
  const int64_t s = e->add_sequence(prompt);
  EXPECT_THROW(e->add_sequence(prompt), Error);  // max_sequences = 1
  for (int i = 0; i < 448 - 300; ++i) e->step();
  EXPECT_EQ(e->tokens(s).size(), 448u);
  try {
    e->step();
    FAIL() << "expected the cache to be full";
  } catch (const Error& err) {
    EXPECT_NE(std::string(err.what()).find("out of INT2 pages"), std::string::npos) << err.what();
  }
  EXPECT_EQ(e->tokens(s).size(), 448u);  // the failed step changed nothing
  e->free_sequence(s);
  const int64_t s2 = e->add_sequence(prompt);
  EXPECT_EQ(e->step().at(0).sequence, s2);
}

}  // namespace
}  // namespace oscar::rt
