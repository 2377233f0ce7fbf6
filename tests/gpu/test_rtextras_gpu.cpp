// Runtime extras on the GPU (runtime/engine.h, runtime/device_model.h):
//  * DeviceModel::fold_value_rotation: every folded bf16 weight (v_proj rows, its bias, o_proj columns) within one
//    bf16 rounding of the fp64 product computed here from the unfolded weights, for one rotation per layer and for
//    one per KV head (GQA: a query head uses its KV head's matrix);
//  * EngineOptions::fold_v on qwen3-tiny-trained with hadamard2: same greedy tokens mostly, logits NMSE vs the
//    unfolded engine far below that engine's own INT2 error vs the bf16 cache (bf16 re-rounding of W_v / W_o is
//    small next to quantization); a shared DeviceModel is refused;
//  * hadamard2 through `oscar eval --device cuda` (rt::evaluate_on_gpu) against the CPU simulation, the tolerances
//    of EvalGpu.EngineMetricsMatchTheCpuSimulation; with --fold-v too.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "datasets/pack.h"
#include "formats/dtype.h"
#include "formats/error.h"
#include "formats/tokenizer.h"
#include "lib/eval/cache_modes.h"
#include "lib/eval/evaluator.h"
#include "lib/model/cpu_model.h"
#include "lib/model/generate.h"
#include "runtime/device_model.h"
#include "runtime/engine.h"
#include "runtime/eval_gpu.h"
#include "gpu_test_buffer.h"
#include "test_support.h"

namespace oscar::rt {
namespace {

namespace fs = std::filesystem;

const char* const kQwen3 = "models/qwen3-tiny-trained";

using test::gpu::have_gpu;

std::vector<uint16_t> download_bf16(const uint16_t* p, size_t n) {
  std::vector<uint16_t> h(n);
  check_cuda(cudaDeviceSynchronize(), "sync");
  check_cuda(cudaMemcpy(h.data(), p, n * 2, cudaMemcpyDeviceToHost), "download");
  return h;
}
std::vector<float> download_f32(const float* p, size_t n) {
  std::vector<float> h(n);
  check_cuda(cudaDeviceSynchronize(), "sync");
  check_cuda(cudaMemcpy(h.data(), p, n * 4, cudaMemcpyDeviceToHost), "download");
  return h;
}

// Random orthogonal d x d (Gram-Schmidt of a Gaussian matrix, rows orthonormal), fp32 row-major.
std::vector<float> random_orthogonal(int64_t d, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> n(0, 1);
  std::vector<double> m(static_cast<size_t>(d * d));
  for (double& x : m) x = n(rng);
  for (int64_t i = 0; i < d; ++i) {
    for (int64_t k = 0; k < i; ++k) {
      double dot = 0;
      for (int64_t j = 0; j < d; ++j) dot += m[i * d + j] * m[k * d + j];
      for (int64_t j = 0; j < d; ++j) m[i * d + j] -= dot * m[k * d + j];
    }
    double norm = 0;
    for (int64_t j = 0; j < d; ++j) norm += m[i * d + j] * m[i * d + j];
    for (int64_t j = 0; j < d; ++j) m[i * d + j] /= std::sqrt(norm);
  }
  return std::vector<float>(m.begin(), m.end());
}

// |got - want| in units of bf16 ulps of want (want rounded to bf16 first): 0 = identical rounding.
int bf16_ulps(uint16_t got, double want) {
  const uint16_t w = fmt::f32_to_bf16(static_cast<float>(want));
  return std::abs(static_cast<int>(static_cast<int16_t>(got)) - static_cast<int>(static_cast<int16_t>(w)));
}

class FoldValueRotation : public ::testing::TestWithParam<int> {};

TEST_P(FoldValueRotation, FoldedWeightsAreTheFp64ProductWithinOneBf16Rounding) {
  OSCAR_REQUIRE_DEVICE();
  const bool per_head = GetParam() == 1;
  fmt::ModelConfig cfg;
  cfg.hidden_size = 256;
  cfg.intermediate_size = 512;
  cfg.num_layers = 2;
  cfg.num_heads = 4;
  cfg.num_kv_heads = 2;
  cfg.head_dim = 128;
  cfg.vocab_size = 64;
  cfg.max_position_embeddings = 1024;
  cfg.attention_bias = true;  // the v bias is folded too
  auto model = DeviceModel::random(cfg, 5);
  const int64_t d = 128, H = cfg.hidden_size, qd = cfg.q_dim(), kvd = cfg.kv_dim(), nq = qd + 2 * kvd;
  const int64_t groups = per_head ? cfg.num_kv_heads : 1;
  std::vector<float> rot;
  for (int64_t g = 0; g < groups; ++g) {
    const std::vector<float> r = random_orthogonal(d, 17 + static_cast<uint32_t>(g));
    rot.insert(rot.end(), r.begin(), r.end());
  }
  const int64_t layer = 1;
  const DeviceLayerWeights L = model->weights().layers[layer];
  const std::vector<uint16_t> qkv0 = download_bf16(L.qkv, static_cast<size_t>(nq * H));
  const std::vector<uint16_t> o0 = download_bf16(L.o, static_cast<size_t>(H * qd));
  const std::vector<float> bias0 = download_f32(L.qkv_bias, static_cast<size_t>(nq));
  const std::vector<uint16_t> other0 = download_bf16(model->weights().layers[0].qkv, static_cast<size_t>(nq * H));

  model->fold_value_rotation(layer, rot, groups);
  const std::vector<uint16_t> qkv1 = download_bf16(L.qkv, static_cast<size_t>(nq * H));
  const std::vector<uint16_t> o1 = download_bf16(L.o, static_cast<size_t>(H * qd));
  const std::vector<float> bias1 = download_f32(L.qkv_bias, static_cast<size_t>(nq));

  auto R = [&](int64_t g, int64_t i, int64_t j) { return static_cast<double>(rot[(g * d + i) * d + j]); };
  auto w = [](uint16_t b) { return static_cast<double>(fmt::bf16_to_f32(b)); };
  int64_t exact = 0, total = 0;
  int worst = 0;
  // q and k rows untouched, other layers untouched.
  for (int64_t i = 0; i < (qd + kvd) * H; ++i) ASSERT_EQ(qkv1[i], qkv0[i]) << "q/k row element " << i;
  EXPECT_EQ(download_bf16(model->weights().layers[0].qkv, static_cast<size_t>(nq * H)), other0);
  for (int64_t h = 0; h < cfg.num_kv_heads; ++h) {
    const int64_t g = per_head ? h : 0;
    for (int64_t j = 0; j < d; ++j) {
      for (int64_t c = 0; c < H; ++c) {  // v_proj row (h, j) = Σ_i R[i][j] W[(h, i)]
        double s = 0;
        for (int64_t i = 0; i < d; ++i) s += R(g, i, j) * w(qkv0[(qd + kvd + h * d + i) * H + c]);
        const int u = bf16_ulps(qkv1[(qd + kvd + h * d + j) * H + c], s);
        worst = std::max(worst, u);
        exact += u == 0;
        ++total;
      }
      double b = 0;
      for (int64_t i = 0; i < d; ++i) b += static_cast<double>(bias0[qd + kvd + h * d + i]) * R(g, i, j);
      EXPECT_NEAR(bias1[qd + kvd + h * d + j], b, 1e-5 * (1 + std::abs(b)));
    }
  }
  for (int64_t n = 0; n < H; ++n)
    for (int64_t q = 0; q < cfg.num_heads; ++q) {
      const int64_t g = per_head ? q / cfg.group_size() : 0;
      for (int64_t j = 0; j < d; ++j) {  // o_proj column (q, j) = Σ_i W[n][(q, i)] R[i][j]
        double s = 0;
        for (int64_t i = 0; i < d; ++i) s += w(o0[n * qd + q * d + i]) * R(g, i, j);
        const int u = bf16_ulps(o1[n * qd + q * d + j], s);
        worst = std::max(worst, u);
        exact += u == 0;
        ++total;
      }
    }
  std::printf("fold (%s): %lld of %lld bf16 weights round like the fp64 product, worst %d ulp\n",
              per_head ? "per KV head" : "per layer", static_cast<long long>(exact), static_cast<long long>(total),
              worst);
  EXPECT_LE(worst, 1);
  EXPECT_GT(static_cast<double>(exact) / static_cast<double>(total), 0.99);
  EXPECT_NE(qkv1, qkv0);  // the fold did something

  EXPECT_THROW(model->fold_value_rotation(2, rot, groups), Error);                   // no such layer
  EXPECT_THROW(model->fold_value_rotation(0, std::span(rot).first(10), 1), Error);  // wrong size
  EXPECT_THROW(model->fold_value_rotation(0, rot, 3), Error);                       // bad groups
}

INSTANTIATE_TEST_SUITE_P(Groups, FoldValueRotation, ::testing::Values(0, 1),
                         [](const auto& info) { return info.param ? "PerKvHead" : "PerLayer"; });

// ---- fold_v in the engine ----------------------------------------------------------------------------------------

std::vector<int32_t> text_ids(const fs::path& dir, const char* text_file, size_t max_tokens) {
  std::ifstream in(test::fixtures_dir() / "text" / text_file, std::ios::binary);
  std::string text(65536, '\0');
  in.read(text.data(), static_cast<std::streamsize>(text.size()));
  text.resize(static_cast<size_t>(in.gcount()));
  std::vector<int32_t> ids = fmt::Tokenizer::load(dir)->encode(text, true);
  if (ids.size() > max_tokens) ids.resize(max_tokens);
  return ids;
}

std::vector<std::vector<float>> forced_logits(const fs::path& dir, EngineOptions opt, const std::vector<int32_t>& prompt,
                                              const std::vector<int32_t>& forced, bool* folded = nullptr) {
  opt.keep_logits = true;
  opt.cache_budget_bytes = size_t{64} << 20;
  auto e = Engine::load(dir, opt);
  if (folded) *folded = e->cache_format().v_rotation_folded;
  std::vector<std::vector<float>> rows;
  const int64_t s = e->add_sequence(prompt);
  rows.emplace_back(e->last_logits(s).begin(), e->last_logits(s).end());
  for (int32_t t : forced) {
    e->set_next_token(s, t);
    e->step();
    rows.emplace_back(e->last_logits(s).begin(), e->last_logits(s).end());
  }
  return rows;
}

double nmse(const std::vector<std::vector<float>>& got, const std::vector<std::vector<float>>& ref) {
  double num = 0, den = 0;
  for (size_t r = 0; r < ref.size(); ++r)
    for (size_t i = 0; i < ref[r].size(); ++i) {
      const double diff = static_cast<double>(got[r][i]) - ref[r][i];
      num += diff * diff;
      den += static_cast<double>(ref[r][i]) * ref[r][i];
    }
  return num / den;
}

double top1_agreement(const std::vector<std::vector<float>>& a, const std::vector<std::vector<float>>& b) {
  std::mt19937_64 unused;
  int same = 0;
  for (size_t r = 0; r < a.size(); ++r)
    same += model::pick_next_token(a[r], {}, unused) == model::pick_next_token(b[r], {}, unused);
  return static_cast<double>(same) / static_cast<double>(a.size());
}

TEST(EngineFoldV, LogitsCloseToTheUnfoldedEngineAndSharedWeightsRefused) {
  OSCAR_REQUIRE_DEVICE();
  OSCAR_REQUIRE_FIXTURE(kQwen3);
  OSCAR_REQUIRE_FIXTURE("text/tinystories-sample.txt");
  const fs::path dir = test::fixtures_dir() / kQwen3;
  const std::vector<int32_t> ids = text_ids(dir, "tinystories-sample.txt", 64 + 192);
  ASSERT_EQ(ids.size(), 256u);
  const std::vector<int32_t> prompt(ids.begin(), ids.begin() + 64), forced(ids.begin() + 64, ids.end());

  EngineOptions bf16;
  const auto ref = forced_logits(dir, bf16, prompt, forced);
  EngineOptions h;
  h.cache = CacheMode::Hadamard2;
  h.hadamard_seed = 1;
  h.sink_tokens = 8;
  h.recent_tokens = 32;
  bool folded = true;
  const auto plain = forced_logits(dir, h, prompt, forced, &folded);
  EXPECT_FALSE(folded);
  h.fold_v = true;
  const auto fold = forced_logits(dir, h, prompt, forced, &folded);
  EXPECT_TRUE(folded);

  const double nmse_fold = nmse(fold, plain), nmse_quant = nmse(plain, ref);
  const double agree_fold = top1_agreement(fold, plain), agree_quant = top1_agreement(plain, ref);
  std::printf("fold_v (hadamard2, %zu rows): logits NMSE vs unfolded %.3e, top-1 agreement %.4f | unfolded vs bf16 "
              "cache: NMSE %.3e, top-1 %.4f\n",
              fold.size(), nmse_fold, agree_fold, nmse_quant, agree_quant);
  EXPECT_GT(nmse_fold, 0.0);  // bf16 re-rounding of W_v/W_o is not free
  EXPECT_LT(nmse_fold, 0.25 * nmse_quant);
  EXPECT_GE(agree_fold, 0.95);

  // The bf16 and int2 formats have no V rotation: fold_v changes nothing, bit for bit.
  EngineOptions i2;
  i2.cache = CacheMode::Int2;
  i2.sink_tokens = 8;
  i2.recent_tokens = 32;
  const auto int2 = forced_logits(dir, i2, prompt, std::vector<int32_t>(forced.begin(), forced.begin() + 8));
  i2.fold_v = true;
  const auto int2_fold = forced_logits(dir, i2, prompt, std::vector<int32_t>(forced.begin(), forced.begin() + 8),
                                       &folded);
  EXPECT_FALSE(folded);
  EXPECT_EQ(int2, int2_fold);

  std::shared_ptr<DeviceModel> shared = DeviceModel::load(dir);
  try {
    Engine::load(dir, h, nullptr, shared);
    FAIL() << "expected fold_v with a shared DeviceModel to be refused";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("--fold-v"), std::string::npos) << e.what();
  }
}

// ---- hadamard2 through the GPU eval ------------------------------------------------------------------------------

std::vector<eval::ContextSequences> heldout(const fmt::Tokenizer& tok, int64_t context, int64_t num_seqs) {
  data::PackOptions po;
  po.seq_len = context;
  po.num_seqs = num_seqs;
  po.shuffle = true;
  po.seed = 0;
  const std::vector<std::string> files = {(test::fixtures_dir() / "text/python-docs-heldout.txt").string(),
                                          (test::fixtures_dir() / "text/linux-docs-heldout.txt").string()};
  const data::PackedDataset packed = data::pack_dataset(files, &tok, data::SourceOptions{}, po);
  eval::ContextSequences cs{context, {}};
  for (int64_t i = 0; i < packed.num_seqs(); ++i) {
    auto s = packed.sequence(i);
    cs.sequences.emplace_back(s.begin(), s.end());
  }
  return {cs};
}

double relative(double a, double b) { return std::abs(a - b) / std::abs(b); }

TEST(EvalGpuHadamard2, EngineMetricsMatchTheCpuSimulationAlsoFolded) {
  OSCAR_REQUIRE_DEVICE();
  OSCAR_REQUIRE_FIXTURE(kQwen3);
  OSCAR_REQUIRE_FIXTURE("text/python-docs-heldout.txt");
  OSCAR_REQUIRE_FIXTURE("text/linux-docs-heldout.txt");
  const fs::path dir = test::fixtures_dir() / kQwen3;
  auto cpu_model = model::CpuModel::load(dir);
  auto tok = fmt::Tokenizer::load(dir);
  const auto data = heldout(*tok, 768, 2);
  eval::EvalOptions opt;
  opt.modes = eval::parse_cache_modes("bf16,int2,hadamard2", "test");
  opt.mode_options.windows = {16, 64};
  opt.mode_options.seed = 5;
  opt.greedy_prompts = 1;
  opt.greedy_tokens = 16;
  const eval::EvalReport cpu = eval::evaluate(*cpu_model, tok.get(), data, opt);
  GpuEvalOptions gpu;
  gpu.schedule = {2, 1};
  const eval::EvalReport dev = evaluate_on_gpu(dir, tok.get(), data, opt, gpu);
  gpu.fold_v = true;
  const eval::EvalReport folded = evaluate_on_gpu(dir, tok.get(), data, opt, gpu);
  ASSERT_EQ(cpu.results.size(), 3u);
  ASSERT_EQ(dev.results.size(), 3u);
  ASSERT_EQ(folded.results.size(), 3u);
  for (size_t i = 0; i < 3; ++i) {
    const eval::ModeResult &c = cpu.results[i], &g = dev.results[i], &f = folded.results[i];
    std::printf("%-9s cpu: ppl %.4f KL>win %.5f | cuda: ppl %.4f KL>win %.5f | cuda fold-v: ppl %.4f KL>win %.5f\n",
                c.mode.c_str(), c.all.perplexity, c.beyond.kl_mean, g.all.perplexity, g.beyond.kl_mean,
                f.all.perplexity, f.beyond.kl_mean);
    SCOPED_TRACE(c.mode);
    ASSERT_EQ(g.mode, c.mode);
    EXPECT_EQ(g.beyond.positions, c.beyond.positions);
    EXPECT_EQ(g.footprint.bytes_per_token, c.footprint.bytes_per_token);
    EXPECT_LT(relative(g.all.perplexity, c.all.perplexity), 0.01);
    EXPECT_LT(relative(g.beyond.perplexity, c.beyond.perplexity), 0.01);
    EXPECT_LT(relative(f.all.perplexity, g.all.perplexity), 0.005);
    if (c.mode != "bf16") {
      EXPECT_LT(relative(g.beyond.kl_mean, c.beyond.kl_mean), 0.20);
      EXPECT_LT(relative(f.beyond.kl_mean, g.beyond.kl_mean), 0.10);
    }
  }
  // The rotation changes what is stored: hadamard2 and int2 differ on the device as on the CPU.
  EXPECT_NE(dev.results[2].beyond.kl_mean, dev.results[1].beyond.kl_mean);
}

}  // namespace
}  // namespace oscar::rt
