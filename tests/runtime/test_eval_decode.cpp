// The decode-engine driver of `oscar eval` (runtime/eval_decode.h), on the CPU:
//  * run_lockstep against a fake decoder whose logits are a known function of the fed tokens: every reported row
//    is the row of the true prefix (teacher forcing feeds the right ids at the right positions), greedy chains are
//    each decoder's own, the batch limit holds and every sequence is freed;
//  * evaluate_with_decoders over the CPU simulation fed token by token (prefill + decode calls) against
//    eval::evaluate's one teacher-forced forward on a real checkpoint (bf16 and int2);
//  * the cache budget: KvPageTables planned from eval_cache_budget_bytes grows `batch` sequences to the longest
//    job, and one page less runs out;
//  * mode split, schedule checks, the longest job and report merging.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <random>

#include "formats/bundle.h"
#include "formats/error.h"
#include "formats/kv_layout.h"
#include "formats/tokenizer.h"
#include "lib/eval/cache_modes.h"
#include "lib/eval/evaluator.h"
#include "lib/eval/simulated_attention.h"
#include "lib/model/cpu_model.h"
#include "lib/model/generate.h"
#include "runtime/engine.h"
#include "runtime/eval_decode.h"
#include "runtime/kv_cache.h"
#include "test_support.h"

namespace oscar::rt {
namespace {

namespace fs = std::filesystem;

// ---- run_lockstep with a fake decoder ----------------------------------------------------------------------------

constexpr int64_t kFakeVocab = 37;

// The fake model: after tokens x_0..x_t the logits peak at h(x_0..x_t) (salted per decoder), so the row of a
// position names the exact prefix that produced it.
int32_t prefix_hash(std::span<const int32_t> ids, uint64_t salt) {
  uint64_t h = 1469598103934665603ull ^ salt;
  for (int32_t x : ids) h = (h ^ static_cast<uint64_t>(x + 1)) * 1099511628211ull;
  return static_cast<int32_t>(h % kFakeVocab);
}
std::vector<float> peak_row(int32_t at) {
  std::vector<float> row(kFakeVocab);
  for (int64_t v = 0; v < kFakeVocab; ++v) row[v] = -static_cast<float>(std::abs(v - at));
  return row;
}

class FakeDecoder : public Decoder {
 public:
  explicit FakeDecoder(uint64_t salt) : salt_(salt) {}
  int64_t add_sequence(std::span<const int32_t> prompt) override {
    EXPECT_FALSE(prompt.empty());
    const int64_t id = next_id_++;
    Seq& s = seqs_[id];
    s.tokens.assign(prompt.begin(), prompt.end());
    refresh(s);
    prefill_lengths.push_back(static_cast<int64_t>(prompt.size()));
    max_live = std::max(max_live, static_cast<int64_t>(seqs_.size()));
    return id;
  }
  std::vector<float> prefill_logits(std::span<const int32_t> prompt) override {
    std::vector<float> all;
    for (size_t t = 0; t < prompt.size(); ++t) {
      const auto row = peak_row(prefix_hash(prompt.first(t + 1), salt_));
      all.insert(all.end(), row.begin(), row.end());
    }
    return all;
  }
  int32_t next_token(int64_t seq) const override { return seqs_.at(seq).next; }
  void set_next_token(int64_t seq, int32_t token) override { seqs_.at(seq).next = token; }
  void step() override {
    for (auto& [id, s] : seqs_) {
      s.tokens.push_back(s.next);
      refresh(s);
    }
    ++steps;
  }
  std::span<const float> last_logits(int64_t seq) const override { return seqs_.at(seq).logits; }
  void free_sequence(int64_t seq) override { ASSERT_EQ(seqs_.erase(seq), 1u); }
  int64_t live() const { return static_cast<int64_t>(seqs_.size()); }

  std::vector<int64_t> prefill_lengths;
  int64_t max_live = 0;
  int64_t steps = 0;

 private:
  struct Seq {
    std::vector<int32_t> tokens;
    std::vector<float> logits;
    int32_t next = 0;
  };
  void refresh(Seq& s) const {
    s.logits = peak_row(prefix_hash(s.tokens, salt_));
    s.next = static_cast<int32_t>(std::max_element(s.logits.begin(), s.logits.end()) - s.logits.begin());
  }
  uint64_t salt_;
  std::map<int64_t, Seq> seqs_;
  int64_t next_id_ = 0;
};

std::vector<int32_t> random_ids(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int32_t> ids(n);
  for (auto& x : ids) x = static_cast<int32_t>(rng() % kFakeVocab);
  return ids;
}

void check_lockstep(int64_t batch, int64_t prefill) {
  SCOPED_TRACE(::testing::Message() << "batch " << batch << ", prefill " << prefill);
  // Lengths and greedy counts that make jobs finish at different steps (continuous batching), including a
  // one-token job and jobs shorter than the prefill.
  const std::vector<std::pair<size_t, int64_t>> shapes = {{20, 0}, {1, 3}, {7, 5}, {33, 0}, {2, 1}, {12, 4}, {5, 0}};
  std::vector<std::vector<int32_t>> ids;
  std::vector<DecodeJob> jobs;
  for (size_t j = 0; j < shapes.size(); ++j) ids.push_back(random_ids(shapes[j].first, 100 + j));
  for (size_t j = 0; j < shapes.size(); ++j) jobs.push_back({ids[j], shapes[j].second, j % 2 == 0 || j == 5});

  FakeDecoder a(1), b(2);
  std::vector<Decoder*> decoders{&a, &b};
  std::map<std::pair<size_t, int64_t>, int> seen;
  const auto generated = run_lockstep(decoders, jobs, {batch, prefill}, [&](std::span<const DecodedRow> rows) {
    for (const DecodedRow& r : rows) {
      ASSERT_LT(r.job, jobs.size());
      ASSERT_TRUE(jobs[r.job].want_rows);
      ASSERT_GE(r.position, 0);
      ASSERT_LT(r.position, static_cast<int64_t>(ids[r.job].size()));
      ASSERT_EQ(r.logits.size(), 2u);
      const auto prefix = std::span<const int32_t>(ids[r.job]).first(static_cast<size_t>(r.position + 1));
      for (uint64_t d = 0; d < 2; ++d) {
        const auto expected = peak_row(prefix_hash(prefix, d + 1));
        ASSERT_TRUE(std::equal(expected.begin(), expected.end(), r.logits[d].begin(), r.logits[d].end()))
            << "job " << r.job << " position " << r.position << " decoder " << d;
      }
      ++seen[{r.job, r.position}];
    }
  });
  // Every row of every job that wants rows, exactly once.
  for (size_t j = 0; j < jobs.size(); ++j)
    for (int64_t t = 0; t < static_cast<int64_t>(ids[j].size()); ++t) {
      const auto it = seen.find(std::make_pair(j, t));
      EXPECT_EQ(it == seen.end() ? 0 : it->second, jobs[j].want_rows ? 1 : 0) << "job " << j << " row " << t;
    }
  // Greedy chains: each decoder continues from the true ids with its own picks.
  ASSERT_EQ(generated.size(), jobs.size());
  for (size_t j = 0; j < jobs.size(); ++j)
    for (uint64_t d = 0; d < 2; ++d) {
      std::vector<int32_t> seq = ids[j], expected;
      for (int64_t k = 0; k < jobs[j].new_tokens; ++k) {
        expected.push_back(prefix_hash(seq, d + 1));
        seq.push_back(expected.back());
      }
      EXPECT_EQ(generated[j][d], expected) << "job " << j << " decoder " << d;
    }
  for (const FakeDecoder* f : {&a, &b}) {
    EXPECT_LE(f->max_live, batch);
    EXPECT_EQ(f->live(), 0);
    ASSERT_EQ(f->prefill_lengths.size(), jobs.size());
    for (size_t j = 0; j < jobs.size(); ++j)
      EXPECT_EQ(f->prefill_lengths[j], std::min<int64_t>(prefill, static_cast<int64_t>(ids[j].size())));
  }
  EXPECT_EQ(a.steps, b.steps);
}

TEST(EvalLockstep, RowsAreTheTruePrefixesAndGreedyChainsAreEachDecodersOwn) {
  for (int64_t batch : {1, 3, 16})
    for (int64_t prefill : {1, 4}) check_lockstep(batch, prefill);
}

TEST(EvalLockstep, BatchOfOneTakesTheSumOfTheJobsSteps) {
  // With one live sequence, steps = sum over jobs of (fed after the prefill) + (greedy tokens after the first).
  std::vector<std::vector<int32_t>> ids = {random_ids(10, 1), random_ids(4, 2)};
  std::vector<DecodeJob> jobs = {{ids[0], 3, false}, {ids[1], 0, true}};
  FakeDecoder a(1);
  std::vector<Decoder*> decoders{&a};
  run_lockstep(decoders, jobs, {1, 2}, {});
  EXPECT_EQ(a.steps, (10 - 2 + 2) + (4 - 2));
}

TEST(EvalLockstep, RefusesBadInput) {
  FakeDecoder a(1);
  std::vector<Decoder*> decoders{&a};
  std::vector<int32_t> none;
  std::vector<DecodeJob> empty_job = {{none, 1, false}};
  EXPECT_THROW(run_lockstep(decoders, empty_job, {}, {}), Error);
  std::vector<int32_t> one = {3};
  std::vector<DecodeJob> jobs = {{one, 1, false}};
  EXPECT_THROW(run_lockstep(decoders, jobs, {0, 1}, {}), Error);
  EXPECT_THROW(run_lockstep(decoders, jobs, {1, 0}, {}), Error);
}

// ---- the driver over the CPU simulation vs eval::evaluate -----------------------------------------------------

// The CPU simulation behind the Decoder interface: per sequence a KV cache and a SimulatedCacheAttention, fed one
// token per forward call after the prefill — the call pattern of the GPU engine.
class CpuSimulationDecoder : public Decoder {
 public:
  CpuSimulationDecoder(model::CpuModel& model, const eval::CacheFormat& format, int64_t capacity)
      : model_(model), format_(format), capacity_(capacity) {}
  int64_t add_sequence(std::span<const int32_t> prompt) override {
    const int64_t id = next_id_++;
    Seq& s = seqs_[id];
    s.cache = std::make_unique<model::KvCache>(model_.config(), capacity_);
    s.attention = std::make_unique<eval::SimulatedCacheAttention>(format_);
    feed(s, prompt);
    return id;
  }
  std::vector<float> prefill_logits(std::span<const int32_t> prompt) override {
    model::KvCache cache(model_.config(), capacity_);
    eval::SimulatedCacheAttention attention(format_);
    model::ForwardOptions fo;
    fo.attention = &attention;
    return model_.forward(prompt, cache, fo);
  }
  int32_t next_token(int64_t seq) const override { return seqs_.at(seq).next; }
  void set_next_token(int64_t seq, int32_t token) override { seqs_.at(seq).next = token; }
  void step() override {
    for (auto& [id, s] : seqs_) {
      const int32_t token = s.next;
      feed(s, std::span<const int32_t>(&token, 1));
    }
  }
  std::span<const float> last_logits(int64_t seq) const override { return seqs_.at(seq).logits; }
  void free_sequence(int64_t seq) override { seqs_.erase(seq); }

 private:
  struct Seq {
    std::unique_ptr<model::KvCache> cache;
    std::unique_ptr<eval::SimulatedCacheAttention> attention;
    std::vector<float> logits;
    int32_t next = 0;
  };
  void feed(Seq& s, std::span<const int32_t> ids) {
    model::ForwardOptions fo;
    fo.attention = s.attention.get();
    fo.last_logits_only = true;
    s.logits = model_.forward(ids, *s.cache, fo);
    std::mt19937_64 unused;
    s.next = model::pick_next_token(s.logits, model::SamplingOptions{}, unused);
  }
  model::CpuModel& model_;
  const eval::CacheFormat& format_;
  int64_t capacity_;
  std::map<int64_t, Seq> seqs_;
  int64_t next_id_ = 0;
};

const char* const kTinyStories = "models/tinystories-llama2c-280k-hf";

std::vector<int32_t> text_ids(const fs::path& model, const char* text_file, size_t offset_bytes, size_t count) {
  std::ifstream in(test::fixtures_dir() / "text" / text_file, std::ios::binary);
  in.seekg(static_cast<std::streamoff>(offset_bytes));
  std::string text(16384, '\0');
  in.read(text.data(), static_cast<std::streamsize>(text.size()));
  text.resize(static_cast<size_t>(in.gcount()));
  std::vector<int32_t> ids = fmt::Tokenizer::load(model)->encode(text, true);
  EXPECT_GE(ids.size(), count);
  ids.resize(count);
  return ids;
}

TEST(EvalWithDecoders, TokenByTokenCpuSimulationMatchesTeacherForcedEvaluate) {
  OSCAR_REQUIRE_FIXTURE(kTinyStories);
  OSCAR_REQUIRE_FIXTURE("text/tinystories-sample.txt");
  const fs::path dir = test::fixtures_dir() / kTinyStories;
  auto model = model::CpuModel::load(dir);
  const int64_t context = 200;  // the model has 256 positions
  eval::ContextSequences ctx{context, {text_ids(dir, "tinystories-sample.txt", 0, context),
                                       text_ids(dir, "tinystories-sample.txt", 40000, context)}};
  const std::vector<eval::ContextSequences> data = {ctx};
  eval::EvalOptions opt;
  opt.modes = {eval::CacheMode::BF16, eval::CacheMode::Int2};
  opt.mode_options.windows = {4, 16};
  opt.greedy_prompts = 1;
  opt.greedy_tokens = 12;

  const eval::EvalReport cpu = eval::evaluate(*model, nullptr, data, opt);

  const auto bf16 = eval::CacheFormat::create(eval::CacheMode::BF16, model->config(), opt.mode_options);
  const auto int2 = eval::CacheFormat::create(eval::CacheMode::Int2, model->config(), opt.mode_options);
  const int64_t capacity = max_eval_cache_tokens(data, opt);
  EXPECT_EQ(capacity, context - 1);
  CpuSimulationDecoder reference(*model, *bf16, capacity), int2_decoder(*model, *int2, capacity);
  std::vector<Decoder*> modes{&reference, &int2_decoder};
  const eval::EvalReport dec = evaluate_with_decoders(model->config(), nullptr, data, opt, reference, modes, {2, 3});

  ASSERT_EQ(cpu.results.size(), 2u);
  ASSERT_EQ(dec.results.size(), 2u);
  for (size_t i = 0; i < 2; ++i) {
    const eval::ModeResult &c = cpu.results[i], &d = dec.results[i];
    SCOPED_TRACE(c.mode);
    EXPECT_EQ(d.mode, c.mode);
    EXPECT_EQ(d.all.positions, 2 * (context - 1));
    EXPECT_EQ(d.beyond.positions, c.beyond.positions);
    EXPECT_EQ(d.greedy_prompts, 1);
    EXPECT_EQ(d.footprint.bytes_per_token, c.footprint.bytes_per_token);
    // Prefill/decode splits change fp32 rounding only (~1e-5 in logits), which can flip a rare bf16/INT2 rounding
    // of a K/V element: perplexities agree to 0.1 %, KL to a small fraction of itself.
    EXPECT_NEAR(d.all.perplexity, c.all.perplexity, 1e-3 * c.all.perplexity);
    EXPECT_NEAR(d.beyond.perplexity, c.beyond.perplexity, 1e-3 * c.beyond.perplexity);
    EXPECT_NEAR(d.all.top1_agreement, c.all.top1_agreement, 0.01);
    std::printf("%s: ppl %.5f vs %.5f, KL>win %.6f vs %.6f, greedy %.1f vs %.1f\n", c.mode.c_str(), d.all.perplexity,
                c.all.perplexity, d.beyond.kl_mean, c.beyond.kl_mean, d.greedy_mean_agreement,
                c.greedy_mean_agreement);
  }
  // bf16 compared with itself.
  EXPECT_EQ(dec.results[0].all.kl_mean, 0.0);
  EXPECT_EQ(dec.results[0].all.top1_agreement, 1.0);
  EXPECT_EQ(dec.results[0].greedy_mean_agreement, 12.0);
  // int2 really quantizes, and the two paths agree on how much it costs.
  const eval::ModeResult &ci = cpu.results[1], &di = dec.results[1];
  EXPECT_GT(ci.beyond.kl_mean, 1e-4);
  EXPECT_NEAR(di.beyond.kl_mean, ci.beyond.kl_mean, 0.05 * ci.beyond.kl_mean);
  EXPECT_NEAR(di.beyond.kl_p99, ci.beyond.kl_p99, 0.15 * ci.beyond.kl_p99);
}

TEST(EvalWithDecoders, RetrievalCellsFollowEvaluatesOrder) {
  OSCAR_REQUIRE_FIXTURE(kTinyStories);
  const fs::path dir = test::fixtures_dir() / kTinyStories;
  auto model = model::CpuModel::load(dir);
  auto tok = fmt::Tokenizer::load(dir);
  eval::EvalOptions opt;
  opt.modes = {eval::CacheMode::Int2, eval::CacheMode::BF16};
  opt.mode_options.windows = {4, 16};
  opt.retrieval = true;
  opt.retrieval_lengths = {200, 250};  // 250 + 12 > 256 positions: skipped with a warning, as evaluate() does
  opt.retrieval_depths = {0.0, 1.0};
  opt.retrieval_new_tokens = 12;
  const std::vector<eval::ContextSequences> data;
  const eval::EvalReport cpu = eval::evaluate(*model, tok.get(), data, opt);
  const auto bf16 = eval::CacheFormat::create(eval::CacheMode::BF16, model->config(), opt.mode_options);
  const auto int2 = eval::CacheFormat::create(eval::CacheMode::Int2, model->config(), opt.mode_options);
  CpuSimulationDecoder reference(*model, *bf16, 256), int2_decoder(*model, *int2, 256);
  std::vector<Decoder*> modes{&int2_decoder, &reference};
  const eval::EvalReport dec = evaluate_with_decoders(model->config(), tok.get(), data, opt, reference, modes, {3, 1});
  ASSERT_EQ(dec.retrieval.size(), cpu.retrieval.size());
  ASSERT_EQ(dec.retrieval.size(), 2u * 2u * 2u);  // tasks x depths x modes
  for (size_t i = 0; i < cpu.retrieval.size(); ++i) {
    EXPECT_EQ(dec.retrieval[i].mode, cpu.retrieval[i].mode);
    EXPECT_EQ(dec.retrieval[i].task, cpu.retrieval[i].task);
    EXPECT_EQ(dec.retrieval[i].length, cpu.retrieval[i].length);
    EXPECT_EQ(dec.retrieval[i].depth, cpu.retrieval[i].depth);
    EXPECT_EQ(dec.retrieval[i].trials, 1);
  }
  EXPECT_EQ(dec.warnings, cpu.warnings);
  ASSERT_EQ(dec.warnings.size(), 2u);
}

// --ef-context auto on the decoder path: before each context's run and each retrieval length's run, with no live
// sequence, every decoder is told how many positions its caches will hold (the oscar engine rebuilds its key tables
// then); with auto off nobody is told.
class TableRecordingDecoder : public CpuSimulationDecoder {
 public:
  using CpuSimulationDecoder::CpuSimulationDecoder;
  int64_t add_sequence(std::span<const int32_t> prompt) override {
    ++live;
    return CpuSimulationDecoder::add_sequence(prompt);
  }
  void free_sequence(int64_t seq) override {
    --live;
    CpuSimulationDecoder::free_sequence(seq);
  }
  void use_key_tables_for(int64_t positions) override {
    EXPECT_EQ(live, 0) << "tables changed under " << live << " live sequence(s)";
    calls.push_back(positions);
  }
  int64_t live = 0;
  std::vector<int64_t> calls;
};

TEST(EvalWithDecoders, KeyTablesFollowEachContextAndRetrievalLength) {
  OSCAR_REQUIRE_FIXTURE(kTinyStories);
  OSCAR_REQUIRE_FIXTURE("text/tinystories-sample.txt");
  const fs::path dir = test::fixtures_dir() / kTinyStories;
  auto model = model::CpuModel::load(dir);
  auto tok = fmt::Tokenizer::load(dir);
  const std::vector<eval::ContextSequences> data = {
      {60, {text_ids(dir, "tinystories-sample.txt", 0, 60)}},
      {90, {text_ids(dir, "tinystories-sample.txt", 20000, 90)}}};
  fmt::Bundle with_metric;  // only has_key_metric() is read on this path (no oscar mode runs)
  with_metric.layers.resize(1);
  with_metric.layers[0].k_ef_metric = {1.0};
  eval::EvalOptions opt;
  opt.modes = {eval::CacheMode::Int2};
  opt.mode_options.windows = {4, 16};
  opt.mode_options.bundle = &with_metric;
  opt.greedy_prompts = 0;
  opt.retrieval = true;
  opt.retrieval_lengths = {180, 220};
  opt.retrieval_depths = {0.5};
  opt.retrieval_new_tokens = 8;
  const auto bf16 = eval::CacheFormat::create(eval::CacheMode::BF16, model->config(), opt.mode_options);
  const auto int2 = eval::CacheFormat::create(eval::CacheMode::Int2, model->config(), opt.mode_options);
  for (const bool per_context : {true, false}) {
    opt.key_tables_per_context = per_context;
    TableRecordingDecoder reference(*model, *bf16, 256), int2_decoder(*model, *int2, 256);
    std::vector<Decoder*> modes{&int2_decoder};
    const eval::EvalReport r = evaluate_with_decoders(model->config(), tok.get(), data, opt, reference, modes, {2, 1});
    EXPECT_EQ(r.retrieval.size(), 2u * 2u);  // tasks x lengths
    const std::vector<int64_t> expected =
        per_context ? std::vector<int64_t>{60, 90, 188, 228} : std::vector<int64_t>{};
    EXPECT_EQ(int2_decoder.calls, expected);
    EXPECT_EQ(reference.calls, expected);
    EXPECT_EQ(int2_decoder.live, 0);
  }
}

// ---- cache budget ----------------------------------------------------------------------------------------------

fmt::ModelConfig qwen3_tiny_shape() {
  fmt::ModelConfig cfg;
  cfg.hidden_size = 512;
  cfg.intermediate_size = 1024;
  cfg.num_layers = 6;
  cfg.num_heads = 4;
  cfg.num_kv_heads = 2;
  cfg.head_dim = 128;
  cfg.vocab_size = 4096;
  cfg.max_position_embeddings = 4096;
  return cfg;
}

// Grows `batch` sequences in lockstep (prefill of 1 token, then one token per step) to `tokens`; false when the
// cache runs out.
bool grows_to(const KvCacheLayout& layout, size_t budget, int64_t batch, int64_t tokens) {
  try {
    const KvCachePlan plan = plan_kv_cache(layout, budget, batch, "test");
    KvPageTables tables(layout, plan.int2_pages, plan.bf16_pages);
    std::vector<int64_t> seqs;
    for (int64_t b = 0; b < batch; ++b) seqs.push_back(tables.create_sequence());
    for (int64_t len = 1; len <= tokens; ++len) tables.extend(seqs, std::vector<int64_t>(seqs.size(), len), "test");
  } catch (const Error&) {
    return false;
  }
  return true;
}

TEST(EvalCacheBudget, HoldsTheBatchAtTheLongestJobAndNoMore) {
  const fmt::ModelConfig cfg = qwen3_tiny_shape();
  const size_t int2_page = cache_layout(cfg, resolve_cache_format(cfg, CacheMode::Int2, nullptr, 16, 64, "test"))
                               .int2_page_bytes();
  // Variant 2: INT2 pages re-laid per layer as K [0,64)@4 [64,128)@2, V [0,32)@4 [32,128)@2 (spectral-style
  // segments, larger pages than INT2): the budget must follow the engine's per-layer page sizes.
  for (const int variant : {0, 1, 2}) {
    const CacheMode mode = variant == 0 ? CacheMode::Bf16 : CacheMode::Int2;
    for (const auto& [sink, recent] : std::vector<std::pair<int64_t, int64_t>>{{16, 64}, {4, 100}, {0, 0}}) {
      CacheFormat f = resolve_cache_format(cfg, mode, nullptr, sink, recent, "test");
      if (variant == 2) {
        f.k_segments.assign(static_cast<size_t>(cfg.num_layers), {{0, 64, 4}, {64, 128, 2}});
        f.v_segments.assign(static_cast<size_t>(cfg.num_layers), {{0, 32, 4}, {32, 128, 2}});
        ASSERT_TRUE(f.segmented());
      }
      const KvCacheLayout layout = cache_layout(cfg, f);
      if (variant == 2) {
        ASSERT_GT(layout.int2_page_bytes(), int2_page);
      }
      for (const int64_t batch : {1, 3}) {
        for (const int64_t tokens : {1, 64, 65, 700}) {
          SCOPED_TRACE(::testing::Message() << cache_mode_name(mode) << (variant == 2 ? " segmented" : "") << " sink " << sink << " recent " << recent
                                            << " batch " << batch << " tokens " << tokens);
          const size_t budget = eval_cache_budget_bytes(cfg, f, batch, tokens);
          EXPECT_TRUE(grows_to(layout, budget, batch, tokens));
          // One INT2 page less (bf16 mode: one bf16 page less) cannot hold the last token of the last sequence.
          // (Sequences still inside the sink need no INT2 page; the budget keeps one for them anyway.)
          const size_t page = f.quantized ? layout.int2_page_bytes() : layout.bf16_page_bytes();
          if (!f.quantized || tokens > sink) {
            EXPECT_FALSE(grows_to(layout, budget - page, batch, tokens));
          }
        }
      }
    }
  }
}

// ---- small host pieces -----------------------------------------------------------------------------------------

TEST(EvalGpuPlan, EngineModesAndCpuOnlyModes) {
  EXPECT_EQ(engine_cache_mode(eval::CacheMode::BF16), CacheMode::Bf16);
  EXPECT_EQ(engine_cache_mode(eval::CacheMode::Int2), CacheMode::Int2);
  EXPECT_EQ(engine_cache_mode(eval::CacheMode::Oscar), CacheMode::Oscar);
  EXPECT_EQ(engine_cache_mode(eval::CacheMode::Hadamard2), CacheMode::Hadamard2);
  EXPECT_EQ(engine_cache_mode(eval::CacheMode::Int4), CacheMode::Int4);
  EXPECT_EQ(engine_cache_mode(eval::CacheMode::Fp8), CacheMode::Fp8);
  EXPECT_FALSE(engine_cache_mode(eval::CacheMode::Kivi2).has_value());
  const ModeSplit split = split_engine_modes(eval::parse_cache_modes("kivi2,oscar,fp8,bf16,int4,int2", "test"));
  EXPECT_EQ(split.engine, (std::vector<eval::CacheMode>{eval::CacheMode::Oscar, eval::CacheMode::Fp8,
                                                        eval::CacheMode::BF16, eval::CacheMode::Int4,
                                                        eval::CacheMode::Int2}));
  EXPECT_EQ(split.cpu_only, (std::vector<eval::CacheMode>{eval::CacheMode::Kivi2}));
}

TEST(EvalGpuPlan, PrefillMustStayInsideTheSink) {
  EXPECT_NO_THROW(check_schedule({8, 1}, {64, 256}));
  EXPECT_NO_THROW(check_schedule({8, 64}, {64, 256}));
  EXPECT_NO_THROW(check_schedule({8, 1}, {0, 0}));  // no sink: one token, the least a prefill can take
  try {
    check_schedule({8, 65}, {64, 256});
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("--prefill-tokens"), std::string::npos) << e.what();
  }
  EXPECT_THROW(check_schedule({8, 2}, {0, 16}), Error);
  EXPECT_THROW(check_schedule({0, 1}, {64, 256}), Error);
  EXPECT_THROW(check_schedule({8, 0}, {64, 256}), Error);
}

TEST(EvalGpuPlan, LongestJob) {
  std::vector<eval::ContextSequences> data = {{100, {std::vector<int32_t>(100)}}, {300, {std::vector<int32_t>(300)}}};
  eval::EvalOptions o;
  o.greedy_prompts = 2;
  o.greedy_tokens = 32;
  // Teacher forcing feeds context - 1 ids; a greedy prompt of context - 32 ids plus 31 fed picks is as long.
  EXPECT_EQ(max_eval_cache_tokens(data, o), 299);
  o.greedy_tokens = 0;
  EXPECT_EQ(max_eval_cache_tokens(data, o), 299);
  o.retrieval = true;
  o.retrieval_lengths = {200, 500};
  o.retrieval_new_tokens = 12;
  EXPECT_EQ(max_eval_cache_tokens(data, o), 511);
  data.push_back({4000, {}});  // a context with no sequences runs nothing
  EXPECT_EQ(max_eval_cache_tokens(data, o), 511);
}

eval::ModeResult result_of(const std::string& mode, int64_t context) {
  eval::ModeResult r;
  r.mode = mode;
  r.context = context;
  return r;
}

TEST(EvalGpuPlan, MergedReportsFollowContextThenModeOrder) {
  eval::EvalOptions o;
  o.modes = {eval::CacheMode::Int2, eval::CacheMode::Kivi2, eval::CacheMode::BF16};
  o.retrieval_lengths = {100, 50};
  o.retrieval_depths = {0.0, 0.5};
  const std::vector<eval::ContextSequences> data = {{256, {}}, {128, {}}};
  eval::EvalReport gpu, cpu;
  for (int64_t c : {256, 128})
    for (const char* m : {"int2", "bf16"}) gpu.results.push_back(result_of(m, c));
  for (int64_t c : {256, 128}) cpu.results.push_back(result_of("kivi2", c));
  for (const char* task : {"passkey", "needle"})
    for (int64_t len : {100, 50})
      for (double depth : {0.0, 0.5}) {
        gpu.retrieval.push_back({"int2", task, len, depth, 1, 0});
        gpu.retrieval.push_back({"bf16", task, len, depth, 1, 1});
        cpu.retrieval.push_back({"kivi2", task, len, depth, 1, 0});
      }
  gpu.warnings = {"w1", "w2"};
  cpu.warnings = {"w2", "w3"};
  const eval::EvalReport m = merge_reports(gpu, cpu, data, o);
  std::vector<std::pair<int64_t, std::string>> order;
  for (const auto& r : m.results) order.emplace_back(r.context, r.mode);
  EXPECT_EQ(order, (std::vector<std::pair<int64_t, std::string>>{
                       {256, "int2"}, {256, "kivi2"}, {256, "bf16"}, {128, "int2"}, {128, "kivi2"}, {128, "bf16"}}));
  ASSERT_EQ(m.retrieval.size(), 24u);
  for (size_t i = 0; i < m.retrieval.size(); ++i) {
    const auto& c = m.retrieval[i];
    EXPECT_EQ(c.mode, std::string(eval::cache_mode_name(o.modes[i % 3])));
    EXPECT_EQ(c.depth, o.retrieval_depths[(i / 3) % 2]);
    EXPECT_EQ(c.length, o.retrieval_lengths[(i / 6) % 2]);
    EXPECT_EQ(c.task, i < 12 ? "passkey" : "needle");
  }
  EXPECT_EQ(m.warnings, (std::vector<std::string>{"w1", "w2", "w3"}));
}

}  // namespace
}  // namespace oscar::rt
