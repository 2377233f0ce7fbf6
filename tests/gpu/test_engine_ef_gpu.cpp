// rt::Engine with a bundle carrying error-feedback tables (issue #10, bundle format 1.2) on qwen3-tiny-trained:
//  * the prefill's INT2 records (K and V, every layer and KV head, every token past the sink) are bit for bit what
//    kern::kv_write_ref writes from the same bf16 K/V with the bundle's rotation, clip and tables — and differ
//    from the RTN records, so the tables are really used;
//  * `oscar eval --device cuda` on that bundle (every position decoded: the decode-step writes) agrees with the CPU
//    simulation, which rounds with calib::error_feedback_codes_stored, within the tolerances of
//    test_eval_gpu.cpp's EngineMetricsMatchTheCpuSimulation (PPL 1 %, KL beyond the windows 20 %);
//  * a bundle without tables gives the engine's RTN records (format unchanged), a malformed table is refused.
// The bundle is calibrated here (calib::calibrate, published clip ratios) and gets tables from
// calib::error_feedback_table of a correlated random metric per (layer, KV head, tensor): the engine/simulation
// agreement does not depend on which metric made them.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "../kernels/kv_write_ef_util.h"
#include "datasets/pack.h"
#include "formats/bundle.h"
#include "formats/dtype.h"
#include "formats/error.h"
#include "formats/kv_layout.h"
#include "formats/tokenizer.h"
#include "kernels/kv_quantize/kv_quantize_ref.h"
#include "lib/calib/calibrator.h"
#include "lib/calib/ef_calibration.h"
#include "lib/eval/evaluator.h"
#include "lib/model/cpu_model.h"
#include "runtime/device_model.h"
#include "runtime/engine.h"
#include "runtime/eval_gpu.h"
#include "runtime/kv_cache.h"
#include "gpu_test_buffer.h"
#include "qwen3_docs_fixture.h"
#include "test_support.h"

namespace oscar::rt {
namespace {

namespace fs = std::filesystem;

using test::qwen3_docs::kCalibrationText;
using test::qwen3_docs::kLinuxDocs;
using test::qwen3_docs::kPythonDocs;
const char* const kQwen3 = test::qwen3_docs::kModel;

fmt::Bundle with_tables(fmt::Bundle b, int64_t kv_heads, int64_t d) {
  for (size_t l = 0; l < b.layers.size(); ++l) {
    const auto k = test::random_ef_tables(static_cast<int>(d), static_cast<int>(kv_heads), 1000u + 2u * l);
    const auto v = test::random_ef_tables(static_cast<int>(d), static_cast<int>(kv_heads), 1001u + 2u * l);
    b.layers[l].k_ef_order = k.order;
    b.layers[l].k_ef_weights = k.weights;
    b.layers[l].v_ef_order = v.order;
    b.layers[l].v_ef_weights = v.weights;
  }
  b.ef_clip_feedback = true;
  return b;
}

// Each layer's post-RoPE K/V of a forward, fp32 [T, Hkv, d], copied to the host.
class KvCapture : public DeviceObserver {
 public:
  std::vector<std::vector<float>> k, v;
  void on_attention_inputs(const DeviceAttentionInputs& in) override {
    const auto n = static_cast<size_t>(in.num_tokens * in.num_kv_heads * in.head_dim);
    const auto l = static_cast<size_t>(in.layer);
    if (k.size() <= l) {
      k.resize(l + 1);
      v.resize(l + 1);
    }
    k[l].resize(n);
    v[l].resize(n);
    const auto st = reinterpret_cast<cudaStream_t>(in.stream);
    EXPECT_EQ(cudaMemcpyAsync(k[l].data(), in.k, n * 4, cudaMemcpyDeviceToHost, st), cudaSuccess);
    EXPECT_EQ(cudaMemcpyAsync(v[l].data(), in.v, n * 4, cudaMemcpyDeviceToHost, st), cudaSuccess);
    EXPECT_EQ(cudaStreamSynchronize(st), cudaSuccess);
  }
};

class EngineEf : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (!test::gpu::have_gpu() || !test::qwen3_docs::fixtures_present())
      return;
    dir_ = new fs::path(test::fixtures_dir() / kQwen3);
    cpu_ = model::CpuModel::load(*dir_).release();
    tok_ = fmt::Tokenizer::load(*dir_).release();
    rtn_ = new fmt::Bundle(test::qwen3_docs::calibrated_bundle(*cpu_, *tok_));
    ef_ = new fmt::Bundle(with_tables(*rtn_, cpu_->config().num_kv_heads, cpu_->config().head_dim));
    ef_real_ = new fmt::Bundle(test::qwen3_docs::ef_bundle(*cpu_, *tok_, false));
    tf_ = new fmt::Bundle(test::qwen3_docs::ef_bundle(*cpu_, *tok_, true));
  }
  void SetUp() override {
    OSCAR_REQUIRE_DEVICE();
    OSCAR_REQUIRE_FIXTURE(kQwen3);
    OSCAR_REQUIRE_FIXTURE(kCalibrationText);
    OSCAR_REQUIRE_FIXTURE(kPythonDocs);
    OSCAR_REQUIRE_FIXTURE(kLinuxDocs);
    ASSERT_NE(cpu_, nullptr);
  }
  static fs::path* dir_;
  static model::CpuModel* cpu_;
  static fmt::Tokenizer* tok_;
  static fmt::Bundle *rtn_, *ef_;
  // Calibrated with real kv tables, without and with bundle 2.0 storage transforms.
  static fmt::Bundle *ef_real_, *tf_;
};
fmt::Bundle* EngineEf::ef_real_ = nullptr;
fmt::Bundle* EngineEf::tf_ = nullptr;
fs::path* EngineEf::dir_ = nullptr;
model::CpuModel* EngineEf::cpu_ = nullptr;
fmt::Tokenizer* EngineEf::tok_ = nullptr;
fmt::Bundle* EngineEf::rtn_ = nullptr;
fmt::Bundle* EngineEf::ef_ = nullptr;

std::vector<int32_t> prompt_ids(const fmt::Tokenizer& tok, size_t tokens) {
  std::ifstream in(test::fixtures_dir() / kPythonDocs, std::ios::binary);
  std::string text(16384, '\0');
  in.read(text.data(), static_cast<std::streamsize>(text.size()));
  text.resize(static_cast<size_t>(in.gcount()));
  std::vector<int32_t> ids = tok.encode(text, true);
  if (ids.size() > tokens) ids.resize(tokens);
  return ids;
}

// Prefills `prompt` and returns, per layer and K/V, the engine's INT2 pool next to kv_write_ref's pool written
// from the same bf16 K/V (a separate forward of the engine's own DeviceModel: the same kernels on the same ids).
struct PoolPair {
  std::vector<uint8_t> engine, ref, ref_rtn;
  bool segmented = false;  // a spectral (non-INT2) tensor of a mixed bundle: not compared here (EngineSpectral is)
};
// key_table_context: EngineOptions::key_table_context at load; set_context > 0: Engine::set_key_table_context after.
// The reference rounds with the tables the engine's format reports (tables_out gets them, per layer).
std::vector<PoolPair> prefill_pools(const fs::path& dir, const fmt::Bundle& bundle, const std::vector<int32_t>& prompt,
                                    int64_t& sink, bool overlap = true, int64_t key_table_context = 0,
                                    int64_t set_context = 0, std::vector<std::vector<float>>* tables_out = nullptr) {
  EngineOptions o;
  o.overlap_prefill_writes = overlap;
  o.key_table_context = key_table_context;
  o.cache = CacheMode::Oscar;
  o.sink_tokens = 4;
  o.recent_tokens = 16;
  o.cache_budget_bytes = size_t{64} << 20;
  auto e = Engine::load(dir, o, &bundle);
  if (set_context > 0) e->set_key_table_context(set_context);
  const int64_t seq = e->add_sequence(prompt);
  const CacheFormat& f = e->cache_format();
  if (tables_out) *tables_out = f.k_ef_weights;
  sink = f.sink_tokens;
  KvCapture cap;
  PackedBatch batch;
  batch.add_sequence(prompt);
  DeviceForwardOptions fo;
  fo.rows = LogitsRows::LastPerSequence;
  fo.observer = &cap;
  e->model().forward(batch, fo);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);

  const fmt::ModelConfig& cfg = e->config();
  const auto T = static_cast<int64_t>(prompt.size());
  const int d = static_cast<int>(f.cache_head_dim), heads = static_cast<int>(cfg.num_kv_heads);
  const KvCache& cache = e->cache();
  const size_t pool_bytes = static_cast<size_t>(cache.tables().int2_pages().capacity()) * heads *
                            fmt::Int2PageGeometry{d, static_cast<int32_t>(cache.layout().page_tokens)}.page_bytes();
  std::vector<int32_t> slots(static_cast<size_t>(T));
  for (int64_t t = 0; t < T; ++t) slots[static_cast<size_t>(t)] = cache.tables().int2_slot(seq, t);
  std::vector<PoolPair> out;
  for (int64_t l = 0; l < cfg.num_layers; ++l)
    for (const bool value : {false, true}) {
      PoolPair pp;
      const auto& segs = (value ? f.v_segments : f.k_segments)[static_cast<size_t>(l)];
      if (segs.size() != 1 || segs[0].bits != 2) {
        pp.segmented = true;
        out.push_back(std::move(pp));
        continue;
      }
      pp.engine.resize(pool_bytes);
      EXPECT_EQ(cudaMemcpy(pp.engine.data(), cache.int2_pool(l, value), pool_bytes, cudaMemcpyDeviceToHost),
                cudaSuccess);
      const std::vector<float>& src = value ? cap.v[static_cast<size_t>(l)] : cap.k[static_cast<size_t>(l)];
      std::vector<uint16_t> x(src.size());
      for (size_t i = 0; i < src.size(); ++i) x[i] = fmt::f32_to_bf16(src[i]);
      kern::KvWriteParams p;
      p.x = x.data();
      p.tokens = T;
      p.token_stride = static_cast<int64_t>(heads) * d;
      p.num_kv_heads = heads;
      p.head_dim = d;
      p.page_tokens = static_cast<int32_t>(cache.layout().page_tokens);
      const auto& rot = (value ? f.v_rotation : f.k_rotation)[static_cast<size_t>(l)];
      p.rotation = rot.empty() || (value && f.v_rotation_folded) ? nullptr : rot.data();
      // Bundle 2.0: the tensor's per-KV-head transform (and the keys' mean) instead.
      const auto& tf = value ? f.v_transform : f.k_transform;
      if (static_cast<size_t>(l) < tf.size() && !tf[static_cast<size_t>(l)].empty()) {
        p.rotation = tf[static_cast<size_t>(l)].data();
        p.rotation_head_stride = static_cast<int64_t>(d) * d;
        p.head_mean = value ? nullptr : f.k_mean[static_cast<size_t>(l)].data();
      }
      p.clip_ratio = (value ? f.v_clip_ratio : f.k_clip_ratio)[static_cast<size_t>(l)];
      p.slots = slots.data();
      pp.ref_rtn.assign(pool_bytes, 0);
      p.int2_pool = pp.ref_rtn.data();
      kern::kv_write_ref(p, kern::KvWriteMode::Int2);
      const auto& order = (value ? f.v_ef_order : f.k_ef_order)[static_cast<size_t>(l)];
      const auto& weights = (value ? f.v_ef_weights : f.k_ef_weights)[static_cast<size_t>(l)];
      if (!order.empty()) {
        p.ef_order = order.data();
        p.ef_weights = weights.data();
        p.ef_clip_feedback = f.ef_clip_feedback;
        pp.ref.assign(pool_bytes, 0);
        p.int2_pool = pp.ref.data();
        kern::kv_write_ref(p, kern::KvWriteMode::Int2);
      } else {
        pp.ref = pp.ref_rtn;
      }
      // Compare only the records the prefill wrote: zero the engine pool's other bytes.
      std::vector<uint8_t> mask(pool_bytes, 0);
      const fmt::Int2PageGeometry geo{d, p.page_tokens};
      for (int64_t t = 0; t < T; ++t) {
        const int32_t s = slots[static_cast<size_t>(t)];
        if (s < 0) continue;
        for (int h = 0; h < heads; ++h) {
          const size_t block = fmt::page_block_offset(s / p.page_tokens, h, heads, geo.page_bytes());
          std::fill_n(mask.begin() + static_cast<std::ptrdiff_t>(block + (s % p.page_tokens) * geo.code_row_bytes()),
                      geo.code_row_bytes(), 1);
          std::fill_n(mask.begin() + static_cast<std::ptrdiff_t>(block + geo.params_offset() + (s % p.page_tokens) * 4),
                      4, 1);
        }
      }
      for (size_t i = 0; i < pool_bytes; ++i)
        if (!mask[i]) pp.engine[i] = pp.ref[i] = pp.ref_rtn[i] = 0;
      out.push_back(std::move(pp));
    }
  return out;
}

TEST_F(EngineEf, PrefillRecordsAreTheReferenceWritersBitForBit) {
  const std::vector<int32_t> prompt = prompt_ids(*tok_, 150);
  ASSERT_EQ(prompt.size(), 150u);
  int64_t sink = 0;
  const auto ef = prefill_pools(*dir_, *ef_, prompt, sink);
  ASSERT_EQ(ef.size(), static_cast<size_t>(2 * cpu_->config().num_layers));
  int differing_from_rtn = 0;
  for (size_t i = 0; i < ef.size(); ++i) {
    const auto m = std::mismatch(ef[i].engine.begin(), ef[i].engine.end(), ef[i].ref.begin());
    EXPECT_EQ(m.first, ef[i].engine.end()) << "layer " << i / 2 << (i % 2 ? " V" : " K") << ": first differing byte "
                                           << (m.first - ef[i].engine.begin());
    differing_from_rtn += ef[i].ref != ef[i].ref_rtn;
  }
  EXPECT_EQ(differing_from_rtn, static_cast<int>(ef.size())) << "every tensor has a table, so its codes change";
  // The writes on the forward's stream (overlap off) give the same records as on the side stream above.
  const auto serial = prefill_pools(*dir_, *ef_, prompt, sink, /*overlap=*/false);
  for (size_t i = 0; i < ef.size(); ++i)
    EXPECT_EQ(serial[i].engine, ef[i].engine) << "layer " << i / 2 << (i % 2 ? " V" : " K");
  // The same bundle without tables: the engine writes the RTN records (today's format and path).
  const auto rtn = prefill_pools(*dir_, *rtn_, prompt, sink);
  for (size_t i = 0; i < rtn.size(); ++i) {
    EXPECT_EQ(rtn[i].engine, rtn[i].ref_rtn) << "layer " << i / 2 << (i % 2 ? " V" : " K");
    EXPECT_EQ(rtn[i].engine.size(), ef[i].engine.size());
  }
}

// A bundle 1.3 (key metric stored): the engine rebuilds its key tables for another context at load
// (EngineOptions::key_table_context) or later (set_key_table_context); both give the tables
// calib::bundle_for_context makes on the host, and the prefill's records are kv_write_ref's with them.
TEST_F(EngineEf, KeyTablesRebuiltForTheServingContext) {
  const fmt::ModelConfig& cfg = cpu_->config();
  const int64_t d = cfg.head_dim, hkv = cfg.num_kv_heads;
  fmt::Bundle b = *rtn_;
  std::vector<std::vector<double>> metrics;
  std::mt19937 rng(11);
  std::normal_distribution<double> n01;
  for (size_t l = 0; l < b.layers.size(); ++l) {
    std::vector<double> m(static_cast<size_t>(hkv * d * d));
    for (int64_t h = 0; h < hkv; ++h) {
      std::vector<double> g(static_cast<size_t>(d * d));
      for (double& x : g) x = n01(rng);
      for (int64_t i = 0; i < d; ++i)
        for (int64_t j = 0; j < d; ++j) {
          double acc = 0;
          for (int64_t k = 0; k < d; ++k) acc += g[static_cast<size_t>(i * d + k)] * g[static_cast<size_t>(j * d + k)];
          m[static_cast<size_t>((h * d + i) * d + j)] = acc / static_cast<double>(d);
        }
    }
    calib::symmetrize_metric(m, d);
    metrics.push_back(std::move(m));
  }
  calib::ErrorFeedbackCalibration eo;
  eo.mode = calib::ErrorFeedbackMode::K;
  ASSERT_EQ(calib::add_error_feedback_tables(b, metrics, eo), static_cast<int64_t>(b.layers.size()));
  calib::store_key_metrics(b, metrics, 64, 64, eo.damp);
  const fmt::Bundle at300 = calib::bundle_for_context(b, cfg, 300);
  ASSERT_NE(at300.layers[0].k_ef_weights, b.layers[0].k_ef_weights);

  const std::vector<int32_t> prompt = prompt_ids(*tok_, 150);
  int64_t sink = 0;
  std::vector<std::vector<float>> stored, at_load, later;
  const auto as_stored = prefill_pools(*dir_, b, prompt, sink, true, 0, 0, &stored);
  const auto loaded = prefill_pools(*dir_, b, prompt, sink, true, 300, 0, &at_load);
  const auto set = prefill_pools(*dir_, b, prompt, sink, true, 0, 300, &later);
  for (size_t l = 0; l < b.layers.size(); ++l) {
    EXPECT_EQ(stored[l], b.layers[l].k_ef_weights) << "layer " << l;
    EXPECT_EQ(at_load[l], at300.layers[l].k_ef_weights) << "layer " << l;
    EXPECT_EQ(later[l], at300.layers[l].k_ef_weights) << "layer " << l;
  }
  for (size_t i = 0; i < loaded.size(); ++i) {
    EXPECT_EQ(loaded[i].engine, loaded[i].ref) << "layer " << i / 2 << (i % 2 ? " V" : " K");
    EXPECT_EQ(set[i].engine, loaded[i].engine) << "layer " << i / 2 << (i % 2 ? " V" : " K");
    if (i % 2 == 0) {
      EXPECT_NE(loaded[i].engine, as_stored[i].engine) << "layer " << i / 2 << " K: tables unused?";
    }
  }
  // A bundle without the metric cannot be retargeted; a live sequence blocks it.
  EngineOptions o;
  o.cache = CacheMode::Oscar;
  o.cache_budget_bytes = size_t{64} << 20;
  auto plain = Engine::load(*dir_, o, ef_);
  EXPECT_FALSE(plain->rebuilds_key_tables());
  EXPECT_THROW(plain->set_key_table_context(300), Error);
  auto e = Engine::load(*dir_, o, &b);
  EXPECT_TRUE(e->rebuilds_key_tables());
  e->add_sequence(prompt);
  EXPECT_THROW(e->set_key_table_context(300), Error);
}

// Several prefills in one engine, the second shorter and the third longer than any before (the staging buffers
// are reused, then reallocated while pair 0's last write may still be in flight), then decode steps, which read
// every pool: with the prefill writes overlapped on the side stream, every step's logits are bit for bit those of an
// engine that writes on the forward's stream.
TEST_F(EngineEf, OverlappedPrefillWritesMatchSerialOnesAcrossPrefillsAndSteps) {
  const std::vector<int32_t> ids = prompt_ids(*tok_, 700);
  ASSERT_EQ(ids.size(), 700u);
  const std::vector<std::vector<int32_t>> prompts = {std::vector<int32_t>(ids.begin(), ids.begin() + 200),
                                                     std::vector<int32_t>(ids.begin() + 200, ids.begin() + 237),
                                                     std::vector<int32_t>(ids.begin() + 237, ids.end())};
  std::vector<std::vector<std::vector<float>>> logits(2);  // [mode][step * sequences + s]
  std::vector<std::vector<int32_t>> tokens(2);
  for (const bool overlap : {true, false}) {
    EngineOptions o;
    o.cache = CacheMode::Oscar;
    o.sink_tokens = 4;
    o.recent_tokens = 16;
    o.cache_budget_bytes = size_t{64} << 20;
    o.keep_logits = true;
    o.overlap_prefill_writes = overlap;
    auto e = Engine::load(*dir_, o, ef_);
    std::vector<int64_t> seqs;
    for (const auto& p : prompts) seqs.push_back(e->add_sequence(p));
    auto& out = logits[overlap ? 0 : 1];
    for (int step = 0; step < 4; ++step) {
      for (const int64_t s : seqs) {
        const auto row = e->last_logits(s);
        out.emplace_back(row.begin(), row.end());
        tokens[overlap ? 0 : 1].push_back(e->next_token(s));
      }
      e->step();
    }
  }
  ASSERT_EQ(logits[0].size(), 12u);
  EXPECT_EQ(tokens[0], tokens[1]);
  for (size_t i = 0; i < logits[0].size(); ++i) {
    ASSERT_EQ(logits[0][i].size(), static_cast<size_t>(cpu_->config().vocab_size));
    EXPECT_EQ(logits[0][i], logits[1][i]) << "step " << i / 3 << " sequence " << i % 3;
  }
}

// A spectral bundle whose layouts are mixed: layer 1's V is segmented (so the whole cache uses segmented pages), every
// other tensor is whole-head INT2 with a table. The engine writes those with the INT2 writer into their (byte-identical)
// segmented pages, tables applied: bit for bit kv_write_ref with the tables.
TEST_F(EngineEf, MixedSpectralBundleWritesTablesOnItsWholeHeadTensors) {
  fmt::Bundle mixed = *ef_;
  mixed.layers[1].v_segments = {{0, 64, 4}, {64, 128, 0}};
  mixed.layers[1].v_ef_order.clear();
  mixed.layers[1].v_ef_weights.clear();
  const std::vector<int32_t> prompt = prompt_ids(*tok_, 150);
  int64_t sink = 0;
  const auto pools = prefill_pools(*dir_, mixed, prompt, sink);
  ASSERT_EQ(pools.size(), static_cast<size_t>(2 * cpu_->config().num_layers));
  int compared = 0;
  for (size_t i = 0; i < pools.size(); ++i) {
    EXPECT_EQ(pools[i].segmented, i == 3) << i;
    if (pools[i].segmented) continue;
    const auto m = std::mismatch(pools[i].engine.begin(), pools[i].engine.end(), pools[i].ref.begin());
    EXPECT_EQ(m.first, pools[i].engine.end()) << "layer " << i / 2 << (i % 2 ? " V" : " K")
                                               << ": first differing byte " << (m.first - pools[i].engine.begin());
    EXPECT_NE(pools[i].ref, pools[i].ref_rtn) << "layer " << i / 2 << (i % 2 ? " V" : " K");
    ++compared;
  }
  EXPECT_EQ(compared, 2 * cpu_->config().num_layers - 1);
}

// The GPU engine's metrics against the CPU simulation's (test_eval_gpu.cpp's bounds: PPL 1 %, top-1 3 points, KL
// beyond the windows 20 %).
void expect_gpu_matches_cpu(const eval::ModeResult& g, const eval::ModeResult& c) {
  auto relative = [](double a, double b) { return std::abs(a - b) / std::abs(b); };
  EXPECT_EQ(g.beyond.positions, c.beyond.positions);
  EXPECT_LT(relative(g.all.perplexity, c.all.perplexity), 0.01);
  EXPECT_LT(relative(g.beyond.perplexity, c.beyond.perplexity), 0.01);
  EXPECT_NEAR(g.beyond.top1_agreement, c.beyond.top1_agreement, 0.03);
  EXPECT_GT(g.beyond.kl_mean, 0.0);
  EXPECT_LT(relative(g.beyond.kl_mean, c.beyond.kl_mean), 0.20);
}

TEST_F(EngineEf, EvalMetricsMatchTheCpuSimulation) {
  const std::vector<eval::ContextSequences> data = test::qwen3_docs::heldout(*tok_, 768, 2);
  eval::EvalOptions opt;
  opt.modes = eval::parse_cache_modes("oscar", "test");
  opt.mode_options.windows = {16, 64};
  opt.mode_options.bundle = ef_;
  opt.greedy_prompts = 1;
  opt.greedy_tokens = 16;
  const eval::EvalReport cpu = eval::evaluate(*cpu_, tok_, data, opt);
  GpuEvalOptions gpu;
  gpu.schedule = {2, 1};
  const eval::EvalReport dev = evaluate_on_gpu(*dir_, tok_, data, opt, gpu);
  ASSERT_EQ(cpu.results.size(), 1u);
  ASSERT_EQ(dev.results.size(), 1u);
  const eval::ModeResult &c = cpu.results[0], &g = dev.results[0];
  std::printf("EF oscar cpu : ppl %.4f (>win %.4f) KL>win %.5f top1>win %.4f\n", c.all.perplexity,
              c.beyond.perplexity, c.beyond.kl_mean, c.beyond.top1_agreement);
  std::printf("EF oscar cuda: ppl %.4f (>win %.4f) KL>win %.5f top1>win %.4f\n", g.all.perplexity,
              g.beyond.perplexity, g.beyond.kl_mean, g.beyond.top1_agreement);
  expect_gpu_matches_cpu(g, c);
}

// Bundle 2.0: the engine writes y = (x − μ)·A per KV head (the per-head kv_write paths, EF tables in A's basis):
// its prefill records are kv_write_ref's with the same transforms, and they differ from the same calibration's
// without transforms.
TEST_F(EngineEf, TransformPrefillRecordsAreTheReferenceWritersBitForBit) {
  ASSERT_TRUE(fmt::has_storage_transform(*tf_));
  const std::vector<int32_t> prompt = prompt_ids(*tok_, 150);
  int64_t sink = 0;
  const auto tf = prefill_pools(*dir_, *tf_, prompt, sink);
  const auto plain = prefill_pools(*dir_, *ef_real_, prompt, sink);
  ASSERT_EQ(tf.size(), static_cast<size_t>(2 * cpu_->config().num_layers));
  int differ = 0;
  for (size_t i = 0; i < tf.size(); ++i) {
    const auto m = std::mismatch(tf[i].engine.begin(), tf[i].engine.end(), tf[i].ref.begin());
    EXPECT_EQ(m.first, tf[i].engine.end()) << "layer " << i / 2 << (i % 2 ? " V" : " K") << ": first differing byte "
                                           << (m.first - tf[i].engine.begin());
    differ += tf[i].engine != plain[i].engine;
  }
  EXPECT_EQ(differ, static_cast<int>(tf.size())) << "every tensor has a transform, so its records change";
}

// The GPU engine with transforms (per-head A⁻ᵀ on q and on the output, μ_K in the windows) against the CPU cache
// simulation of the same bundle (x̂ = ŷ·A⁻¹ + μ), as EvalMetricsMatchTheCpuSimulation; and the transform beats the
// same calibration without it on the GPU too.
TEST_F(EngineEf, TransformEvalMetricsMatchTheCpuSimulation) {
  const std::vector<eval::ContextSequences> data = test::qwen3_docs::heldout(*tok_, 768, 2);
  auto run = [&](const fmt::Bundle* b) {
    eval::EvalOptions opt;
    opt.modes = eval::parse_cache_modes("oscar", "test");
    opt.mode_options.windows = {16, 64};
    opt.mode_options.bundle = b;
    opt.greedy_prompts = 0;
    GpuEvalOptions gpu;
    gpu.schedule = {2, 1};
    return std::pair{eval::evaluate(*cpu_, tok_, data, opt).results.at(0),
                     evaluate_on_gpu(*dir_, tok_, data, opt, gpu).results.at(0)};
  };
  const auto [c, g] = run(tf_);
  const auto [c0, g0] = run(ef_real_);
  std::printf("transform oscar cpu : ppl %.4f (>win %.4f) KL>win %.5f top1>win %.4f\n", c.all.perplexity,
              c.beyond.perplexity, c.beyond.kl_mean, c.beyond.top1_agreement);
  std::printf("transform oscar cuda: ppl %.4f (>win %.4f) KL>win %.5f top1>win %.4f\n", g.all.perplexity,
              g.beyond.perplexity, g.beyond.kl_mean, g.beyond.top1_agreement);
  std::printf("EF-only   oscar cuda: KL>win %.5f (cpu %.5f)\n", g0.beyond.kl_mean, c0.beyond.kl_mean);
  expect_gpu_matches_cpu(g, c);
  EXPECT_LT(g.beyond.kl_mean, g0.beyond.kl_mean);
}

TEST_F(EngineEf, FoldVRefusesValueTransformsAndFoldsBesideKeyTransforms) {
  EngineOptions o;
  o.cache = CacheMode::Oscar;
  o.cache_budget_bytes = size_t{64} << 20;
  o.fold_v = true;
  try {
    Engine::load(*dir_, o, tf_);
    FAIL() << "--fold-v accepted a bundle with value transforms";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("--fold-v"), std::string::npos) << e.what();
  }
  // Key transforms alone leave V's orthogonal R_v, which folds: the folded engine tracks the unfolded one.
  fmt::Bundle keys_only = *tf_;
  for (fmt::LayerCalibration& l : keys_only.layers) {
    l.v_transform.clear();
    l.v_transform_inverse.clear();
  }
  ASSERT_TRUE(fmt::has_storage_transform(keys_only));
  const std::vector<eval::ContextSequences> data = test::qwen3_docs::heldout(*tok_, 768, 2);
  eval::EvalOptions opt;
  opt.modes = eval::parse_cache_modes("oscar", "test");
  opt.mode_options.windows = {16, 64};
  opt.mode_options.bundle = &keys_only;
  opt.greedy_prompts = 0;
  GpuEvalOptions gpu;
  gpu.schedule = {2, 1};
  const eval::ModeResult plain = evaluate_on_gpu(*dir_, tok_, data, opt, gpu).results.at(0);
  gpu.fold_v = true;
  const eval::ModeResult folded = evaluate_on_gpu(*dir_, tok_, data, opt, gpu).results.at(0);
  std::printf("key transforms only, cuda: KL>win %.5f, fold-v %.5f\n", plain.beyond.kl_mean, folded.beyond.kl_mean);
  EXPECT_LT(std::abs(folded.all.perplexity - plain.all.perplexity) / plain.all.perplexity, 0.005);
  EXPECT_LT(std::abs(folded.beyond.kl_mean - plain.beyond.kl_mean) / plain.beyond.kl_mean, 0.10);
}

TEST_F(EngineEf, MalformedTableIsRefusedNamingTheLayer) {
  fmt::Bundle bad = *ef_;
  bad.layers[1].v_ef_order[0] = bad.layers[1].v_ef_order[1];  // not a permutation
  EngineOptions o;
  o.cache = CacheMode::Oscar;
  o.cache_budget_bytes = size_t{64} << 20;
  try {
    Engine::load(*dir_, o, &bad);
    FAIL() << "a malformed table was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("layer 1 V error feedback"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace oscar::rt
