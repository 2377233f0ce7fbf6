// DeviceModel end to end: against the CPU reference forward (lib/model/cpu_model.h) on the shared fixtures, against
// transformers' golden logits/K/V, and self-consistency (packing, logits rows, determinism of random weights).
//
// The CPU model is given the same bf16-rounded weights the device holds (a bf16 copy of the checkpoint written to
// a temp dir), so the comparison measures the GPU pipeline's arithmetic (bf16 activations into the GEMMs and
// attention), not the weight rounding.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <numeric>
#include <random>
#include <span>
#include <sstream>
#include <vector>

#include "formats/dtype.h"
#include "formats/error.h"
#include "formats/safetensors.h"
#include "formats/tokenizer.h"
#include "lib/model/cpu_model.h"
#include "runtime/device_buffer.h"
#include "runtime/device_model.h"
#include "test_fwd_gpu_support.h"
#include "test_support.h"

namespace oscar::rt {
namespace {

namespace fs = std::filesystem;
using test::fwd::nmse;

// ---- helpers -----------------------------------------------------------------------------------------------

fs::path bf16_copy(const fs::path& src, const fs::path& dst) {
  fs::create_directories(dst);
  const fmt::TensorStore store = fmt::TensorStore::open(src);
  std::vector<std::vector<uint16_t>> keep;
  std::vector<fmt::TensorToWrite> tensors;
  const std::vector<std::string> names = store.names();
  keep.reserve(names.size());
  for (const std::string& name : names) {
    const fmt::TensorView& t = store.get(name);
    keep.push_back(fmt::to_bf16(t));
    tensors.push_back({name, fmt::DType::BF16, t.shape, std::as_bytes(std::span<const uint16_t>(keep.back()))});
  }
  fmt::write_safetensors(dst / "model.safetensors", tensors);
  fs::copy_file(src / "config.json", dst / "config.json", fs::copy_options::overwrite_existing);
  return dst;
}

std::vector<int32_t> text_ids(const fs::path& model_dir, const fs::path& text_file, size_t max_tokens) {
  std::ifstream in(text_file, std::ios::binary);
  if (!in) throw oscar::Error(text_file.string(), "cannot open test text");
  std::string text(16384, '\0');
  in.read(text.data(), static_cast<std::streamsize>(text.size()));
  text.resize(static_cast<size_t>(in.gcount()));
  std::vector<int32_t> ids = fmt::Tokenizer::load(model_dir)->encode(text, true);
  if (ids.size() > max_tokens) ids.resize(max_tokens);
  return ids;
}

std::vector<int32_t> random_ids(size_t n, int64_t vocab, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int32_t> dist(0, static_cast<int32_t>(vocab - 1));
  std::vector<int32_t> ids(n);
  for (int32_t& id : ids) id = dist(rng);
  return ids;
}

// K/V per layer, [kv_heads, T, d] like the CPU observer's.
struct LayerKv {
  std::vector<std::vector<float>> k, v;
};

class CpuKvCapture : public model::Observer {
 public:
  LayerKv kv;
  void on_attention_inputs(const model::AttentionInputs& in) override {
    const size_t n = static_cast<size_t>(in.num_kv_heads * in.num_tokens * in.head_dim);
    kv.k.emplace_back(in.k, in.k + n);
    kv.v.emplace_back(in.v, in.v + n);
  }
};

// Token-major device K/V of the whole packed batch, re-laid out per sequence as [kv_heads, len, d]: the fp32 K/V,
// or (fp32 = false: an observer that asks for none) the bf16 K/V attention reads, widened.
class DeviceKvCapture : public DeviceObserver {
 public:
  std::vector<int32_t> cu;
  std::vector<LayerKv> per_sequence;  // [sequence]
  bool fp32 = true;
  bool wants_fp32() const override { return fp32; }
  void on_attention_inputs(const DeviceAttentionInputs& in) override {
    ASSERT_EQ(cudaStreamSynchronize(reinterpret_cast<cudaStream_t>(in.stream)), cudaSuccess);
    const int64_t h = in.num_kv_heads, d = in.head_dim;
    const size_t n = static_cast<size_t>(in.num_tokens * h * d);
    auto widen = [](const std::vector<uint16_t>& bits) {
      std::vector<float> out(bits.size());
      for (size_t i = 0; i < bits.size(); ++i) out[i] = fmt::bf16_to_f32(bits[i]);
      return out;
    };
    const std::vector<float> k = fp32 ? to_host(in.k, n) : widen(to_host(in.k_bf16, n));
    const std::vector<float> v = fp32 ? to_host(in.v, n) : widen(to_host(in.v_bf16, n));
    per_sequence.resize(cu.size() - 1);
    for (size_t s = 0; s + 1 < cu.size(); ++s) {
      const int64_t begin = cu[s], len = cu[s + 1] - cu[s];
      std::vector<float> ks(h * len * d), vs(ks.size());
      for (int64_t t = 0; t < len; ++t)
        for (int64_t g = 0; g < h; ++g)
          for (int64_t i = 0; i < d; ++i) {
            ks[(g * len + t) * d + i] = k[((begin + t) * h + g) * d + i];
            vs[(g * len + t) * d + i] = v[((begin + t) * h + g) * d + i];
          }
      per_sequence[s].k.push_back(std::move(ks));
      per_sequence[s].v.push_back(std::move(vs));
    }
  }
};

struct Agreement {
  int64_t tokens = 0, top1_same = 0;
  double abs_diff_sum = 0;
  void add(std::span<const float> got, std::span<const float> ref, int64_t vocab) {
    for (size_t r = 0; r < ref.size() / vocab; ++r) {
      const auto g = got.subspan(r * vocab, vocab), e = ref.subspan(r * vocab, vocab);
      top1_same += std::max_element(g.begin(), g.end()) - g.begin() == std::max_element(e.begin(), e.end()) - e.begin();
      for (int64_t i = 0; i < vocab; ++i) abs_diff_sum += std::abs(double{g[i]} - e[i]);
      ++tokens;
    }
  }
  double top1() const { return static_cast<double>(top1_same) / tokens; }
  double mean_abs(int64_t vocab) const { return abs_diff_sum / (static_cast<double>(tokens) * vocab); }
};

struct Limits {
  double min_top1 = 0.99;
  double max_mean_abs_logit_diff = 0.02;
  double max_logit_nmse = 1.0;
  double max_kv_nmse = 1e-4;
};

// Runs the packed batch on the device and every sequence on the CPU; compares logits and per-layer K/V.
// qkv_bf16: the forward's QKV projection in bf16 (DeviceForwardOptions::qkv_bf16); K/V are then compared as the
// bf16 values attention reads (an fp32 observer would turn the option off).
void compare_with_cpu(const fs::path& model_dir, const std::vector<std::vector<int32_t>>& sequences,
                      const Limits& limits = {}, bool qkv_bf16 = false) {
  const fs::path bf16_dir = bf16_copy(model_dir, test::temp_dir_for_test() / model_dir.filename());
  auto cpu = model::CpuModel::load(bf16_dir);
  auto gpu = DeviceModel::load(model_dir);
  const int64_t vocab = gpu->config().vocab_size;

  const PackedBatch batch = PackedBatch::from_sequences(sequences);
  DeviceKvCapture dev_kv;
  dev_kv.cu = batch.cu_seqlens;
  dev_kv.fp32 = !qkv_bf16;
  DeviceForwardOptions opt;
  opt.observer = &dev_kv;
  opt.qkv_bf16 = qkv_bf16;
  const std::vector<float> gpu_logits = gpu->forward(batch, opt).to_host();
  ASSERT_EQ(gpu_logits.size(), static_cast<size_t>(batch.num_tokens() * vocab));

  Agreement agree;
  double worst_kv = 0, worst_logits = 0;
  for (size_t s = 0; s < sequences.size(); ++s) {
    model::KvCache cache(cpu->config(), static_cast<int64_t>(sequences[s].size()));
    CpuKvCapture cpu_kv;
    model::ForwardOptions copt;
    copt.observer = &cpu_kv;
    const std::vector<float> cpu_logits = cpu->forward(sequences[s], cache, copt);
    agree.add(std::span<const float>(gpu_logits).subspan(batch.cu_seqlens[s] * vocab, sequences[s].size() * vocab),
              cpu_logits, vocab);
    const std::vector<float> gpu_seq(gpu_logits.begin() + batch.cu_seqlens[s] * vocab,
                                     gpu_logits.begin() + batch.cu_seqlens[s + 1] * vocab);
    worst_logits = std::max(worst_logits, nmse(gpu_seq, cpu_logits));
    ASSERT_EQ(cpu_kv.kv.k.size(), static_cast<size_t>(gpu->config().num_layers));
    for (size_t l = 0; l < cpu_kv.kv.k.size(); ++l) {
      const double k_err = nmse(dev_kv.per_sequence[s].k[l], cpu_kv.kv.k[l]);
      const double v_err = nmse(dev_kv.per_sequence[s].v[l], cpu_kv.kv.v[l]);
      EXPECT_LE(k_err, limits.max_kv_nmse) << "sequence " << s << " layer " << l << " K";
      EXPECT_LE(v_err, limits.max_kv_nmse) << "sequence " << s << " layer " << l << " V";
      worst_kv = std::max({worst_kv, k_err, v_err});
    }
  }
  std::cout << model_dir.filename().string() << ": " << agree.tokens << " tokens, top-1 agreement " << agree.top1()
            << ", mean |dlogit| " << agree.mean_abs(vocab) << ", worst logits NMSE " << worst_logits
            << ", worst K/V NMSE " << worst_kv << "\n";
  EXPECT_GE(agree.top1(), limits.min_top1);
  EXPECT_LE(agree.mean_abs(vocab), limits.max_mean_abs_logit_diff);
  EXPECT_LE(worst_logits, limits.max_logit_nmse);
}

std::vector<int32_t> golden_input_ids(const fmt::TensorStore& golden) {
  const fmt::TensorView& view = golden.get("input_ids");
  std::vector<int64_t> ids64(static_cast<size_t>(view.numel()));
  std::memcpy(ids64.data(), view.data, view.nbytes);
  return std::vector<int32_t>(ids64.begin(), ids64.end());
}

// ---- vs the CPU reference ------------------------------------------------------------------------------------

TEST(FwdGpuModel, TinyStoriesLlamaMatchesCpuModel) {
  OSCAR_REQUIRE_GPU();
  OSCAR_REQUIRE_FIXTURE("models/tinystories-llama2c-280k-hf");
  OSCAR_REQUIRE_FIXTURE("text/tinystories-sample.txt");
  const fs::path dir = test::fixtures_dir() / "models/tinystories-llama2c-280k-hf";
  const auto story = text_ids(dir, test::fixtures_dir() / "text/tinystories-sample.txt", 256);  // max positions
  ASSERT_EQ(story.size(), 256u);
  // head_dim 8 puts this model's bf16 noise floor above the bounds: scripts/golden/bf16_rounding_probe.cpp
  // (CPU emulation, story ids) gives mean |dlogit| 0.032 / top-1 0.992 for exactly our rounding points (0.022 from
  // the bf16 q/k alone) and 0.043 / 0.981 for transformers' bf16 points. These limits hold the GPU to that floor
  // (+10%); TinyStoriesLlamaWithinBf16NoiseFloor compares with transformers bf16 itself.
  Limits limits;
  limits.min_top1 = 0.985;
  limits.max_mean_abs_logit_diff = 0.038;
  limits.max_kv_nmse = 3e-4;
  compare_with_cpu(dir, {story, random_ids(100, 512, 1), std::vector<int32_t>(story.begin(), story.begin() + 7)},
                   limits);
}

// The accuracy bound is GPU bf16 vs transformers bf16. On this head_dim-8 model two bf16 forwards with
// different rounding points differ by more than 0.02 mean |dlogit| (emulated: 0.05), so the check is that the GPU
// is no further from the fp32 forward (same bf16 weights) than transformers bf16 (sdpa, CUDA) is: golden from
// scripts/golden/make_tinystories_bf16_golden.py.
TEST(FwdGpuModel, TinyStoriesLlamaWithinBf16NoiseFloor) {
  OSCAR_REQUIRE_GPU();
  OSCAR_REQUIRE_FIXTURE("models/tinystories-llama2c-280k-hf");
  const fs::path golden_file = test::test_data_dir() / "golden-bf16/tinystories-llama2c-280k-hf.safetensors";
  if (!fs::exists(golden_file)) GTEST_SKIP() << "no " << golden_file << " (scripts/golden/make_tinystories_bf16_golden.py)";
  const fs::path dir = test::fixtures_dir() / "models/tinystories-llama2c-280k-hf";
  const fmt::TensorStore golden = fmt::TensorStore::open(golden_file);
  const std::vector<int32_t> ids = golden_input_ids(golden);
  const std::vector<float> hf = fmt::to_f32(golden.get("logits_bf16"));
  auto cpu = model::CpuModel::load(bf16_copy(dir, test::temp_dir_for_test() / dir.filename()));
  auto gpu = DeviceModel::load(dir);
  const int64_t vocab = gpu->config().vocab_size;
  model::KvCache cache(cpu->config(), static_cast<int64_t>(ids.size()));
  const std::vector<float> ref = cpu->forward(ids, cache);
  PackedBatch batch;
  batch.add_sequence(ids);
  const std::vector<float> got = gpu->forward(batch).to_host();
  ASSERT_EQ(hf.size(), ref.size());
  Agreement gpu_ref, hf_ref, gpu_hf;
  gpu_ref.add(got, ref, vocab);
  hf_ref.add(hf, ref, vocab);
  gpu_hf.add(got, hf, vocab);
  std::cout << ids.size() << " tokens vs fp32: GPU top-1 " << gpu_ref.top1() << " mean |dlogit| "
            << gpu_ref.mean_abs(vocab) << "; transformers bf16 top-1 " << hf_ref.top1() << " mean |dlogit| "
            << hf_ref.mean_abs(vocab) << "; GPU vs transformers bf16: top-1 " << gpu_hf.top1() << " mean |dlogit| "
            << gpu_hf.mean_abs(vocab) << "\n";
  EXPECT_LE(gpu_ref.mean_abs(vocab), std::max(0.02, 1.1 * hf_ref.mean_abs(vocab)));
  EXPECT_GE(gpu_ref.top1(), std::min(0.99, hf_ref.top1() - 0.005));
}

TEST(FwdGpuModel, Qwen3TinyMatchesCpuModel) {
  OSCAR_REQUIRE_GPU();
  OSCAR_REQUIRE_FIXTURE("models/qwen3-tiny-trained");
  OSCAR_REQUIRE_FIXTURE("text/python-docs-heldout.txt");
  OSCAR_REQUIRE_FIXTURE("text/linux-docs-heldout.txt");
  const fs::path dir = test::fixtures_dir() / "models/qwen3-tiny-trained";
  compare_with_cpu(dir, {text_ids(dir, test::fixtures_dir() / "text/python-docs-heldout.txt", 1100),
                         text_ids(dir, test::fixtures_dir() / "text/linux-docs-heldout.txt", 300),
                         random_ids(65, 4096, 2)});
}

// The same bounds with the QKV projection handed on in bf16 (DeviceForwardOptions::qkv_bf16, transformers' rounding
// point): one more bf16 rounding of q, k and v before the norm and RoPE.
TEST(FwdGpuModel, Qwen3TinyWithBf16QkvMatchesCpuModel) {
  OSCAR_REQUIRE_GPU();
  OSCAR_REQUIRE_FIXTURE("models/qwen3-tiny-trained");
  OSCAR_REQUIRE_FIXTURE("text/python-docs-heldout.txt");
  OSCAR_REQUIRE_FIXTURE("text/linux-docs-heldout.txt");
  const fs::path dir = test::fixtures_dir() / "models/qwen3-tiny-trained";
  compare_with_cpu(dir,
                   {text_ids(dir, test::fixtures_dir() / "text/python-docs-heldout.txt", 1100),
                    text_ids(dir, test::fixtures_dir() / "text/linux-docs-heldout.txt", 300), random_ids(65, 4096, 2)},
                   Limits{}, /*qkv_bf16=*/true);
}

// Every architecture golden of tests/data/golden (Qwen2 biases, Qwen3 head_dim != hidden/heads, llama3 and linear
// RoPE, Mistral GQA 3, MQA, sharded checkpoints, fp16/fp32/bf16 storage) on its 300 golden ids. These are random
// weights with wide logits, where bf16 activations flip near-tied argmaxes more often than on trained models, so
// the logits are held to a relative error instead of the fixture thresholds.
TEST(FwdGpuModel, ArchitectureGoldensMatchCpuModel) {
  OSCAR_REQUIRE_GPU();
  const fs::path root = test::test_data_dir() / "golden";
  if (!fs::exists(root)) GTEST_SKIP() << "no " << root;
  int models = 0;
  for (const auto& entry : fs::directory_iterator(root)) {
    if (!fs::exists(entry.path() / "golden.safetensors")) continue;
    SCOPED_TRACE(entry.path().filename().string());
    const std::vector<int32_t> ids = golden_input_ids(fmt::TensorStore::open(entry.path() / "golden.safetensors"));
    Limits limits;
    limits.min_top1 = 0.95;
    limits.max_mean_abs_logit_diff = INFINITY;
    limits.max_logit_nmse = 1e-3;
    compare_with_cpu(entry.path(), {ids, std::vector<int32_t>(ids.begin(), ids.begin() + 77)}, limits);
    ++models;
  }
  if (models == 0) GTEST_SKIP() << "no golden folders in " << root;
}

// ---- vs transformers' golden outputs (fp32 weights there, bf16 here: looser, but independent of lib/model) ----

TEST(FwdGpuModel, TinyStoriesLlamaTracksTransformersGolden) {
  OSCAR_REQUIRE_GPU();
  OSCAR_REQUIRE_FIXTURE("golden/tinystories-llama2c-280k-hf-kv.safetensors");
  const fs::path dir = test::fixtures_dir() / "models/tinystories-llama2c-280k-hf";
  const fmt::TensorStore golden =
      fmt::TensorStore::open(test::fixtures_dir() / "golden/tinystories-llama2c-280k-hf-kv.safetensors");
  const std::vector<int32_t> ids = golden_input_ids(golden);

  auto gpu = DeviceModel::load(dir);
  DeviceKvCapture kv;
  PackedBatch batch;
  batch.add_sequence(ids);
  kv.cu = batch.cu_seqlens;
  DeviceForwardOptions opt;
  opt.observer = &kv;
  const std::vector<float> logits = gpu->forward(batch, opt).to_host();
  const std::vector<float> ref = fmt::to_f32(golden.get("logits"));
  Agreement agree;
  agree.add(logits, ref, gpu->config().vocab_size);
  // bf16 weights move logits by ~1e-2 relative; a wrong rope/norm/layout moves them by O(1).
  EXPECT_LE(nmse(logits, ref), 1e-3);
  EXPECT_GE(agree.top1(), 0.9);
  for (int64_t l = 0; l < gpu->config().num_layers; ++l) {
    const std::string p = "layers." + std::to_string(l);
    EXPECT_LE(nmse(kv.per_sequence[0].k[l], fmt::to_f32(golden.get(p + ".key"))), 1e-3) << p;
    EXPECT_LE(nmse(kv.per_sequence[0].v[l], fmt::to_f32(golden.get(p + ".value"))), 1e-3) << p;
  }
}

// ---- self-consistency with random weights ------------------------------------------------------------------

fmt::ModelConfig small_qwen3_like() {
  fmt::ModelConfig c;
  c.arch = fmt::Arch::Qwen3;
  c.hidden_size = 256;
  c.num_layers = 3;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.head_dim = 64;
  c.intermediate_size = 512;
  c.vocab_size = 1000;
  c.max_position_embeddings = 4096;
  c.qk_norm = true;
  c.attention_bias = true;
  c.rope.theta = 1e6;
  return c;
}

TEST(FwdGpuModel, RandomWeightsAreDeterministicAndSeeded) {
  OSCAR_REQUIRE_GPU();
  const PackedBatch batch = PackedBatch::from_sequences(std::vector<std::vector<int32_t>>{random_ids(70, 1000, 3)});
  const std::vector<float> a = DeviceModel::random(small_qwen3_like(), 42)->forward(batch).to_host();
  const std::vector<float> b = DeviceModel::random(small_qwen3_like(), 42)->forward(batch).to_host();
  const std::vector<float> c = DeviceModel::random(small_qwen3_like(), 43)->forward(batch).to_host();
  ASSERT_EQ(a.size(), b.size());
  EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * 4), 0) << "same seed, same bits";
  EXPECT_GT(nmse(c, a), 0.1) << "another seed, other weights";
  for (float x : a) ASSERT_TRUE(std::isfinite(x));
}

// o_proj / down_proj adding into the residual in their GEMM epilogue (the default) against the separate add +
// RMSNorm kernel: the same fp32 add of the same product, but cuBLASLt may choose another algorithm for beta = 1,
// so the bits can differ by the GEMM's summation order. And the default is deterministic run to run.
TEST(FwdGpuModel, ResidualAddInTheGemmEqualsTheNormsAdd) {
  OSCAR_REQUIRE_GPU();
  auto m = DeviceModel::random(small_qwen3_like(), 11);
  const PackedBatch batch =
      PackedBatch::from_sequences(std::vector<std::vector<int32_t>>{random_ids(300, 1000, 8), random_ids(45, 1000, 9)});
  DeviceForwardOptions in_gemm, in_norm;
  in_norm.residual_in_gemm = false;
  const std::vector<float> a = m->forward(batch, in_gemm).to_host();
  const std::vector<float> b = m->forward(batch, in_norm).to_host();
  const std::vector<float> a2 = m->forward(batch, in_gemm).to_host();
  ASSERT_EQ(a.size(), b.size());
  const double err = nmse(a, b);
  std::printf("  residual add in the GEMM vs in the norm kernel: logits nmse %.3g\n", err);
  EXPECT_LE(err, 1e-4);
  EXPECT_EQ(std::memcmp(a.data(), a2.data(), a.size() * 4), 0) << "rerun, same bits";
  for (float x : a) ASSERT_TRUE(std::isfinite(x));
}

// DeviceForwardOptions::qkv_bf16 changes only where q, k and v are rounded: the logits move (the option is in
// effect) by bf16 noise, and stay deterministic.
TEST(FwdGpuModel, Bf16QkvOutputMovesTheLogitsByRoundingOnly) {
  OSCAR_REQUIRE_GPU();
  fmt::ModelConfig c = small_qwen3_like();
  c.head_dim = 128;
  auto m = DeviceModel::random(c, 13);
  const PackedBatch batch =
      PackedBatch::from_sequences(std::vector<std::vector<int32_t>>{random_ids(300, 1000, 14), random_ids(45, 1000, 15)});
  DeviceForwardOptions f32, bf16;
  bf16.qkv_bf16 = true;
  const std::vector<float> a = m->forward(batch, f32).to_host();
  const std::vector<float> b = m->forward(batch, bf16).to_host();
  const std::vector<float> b2 = m->forward(batch, bf16).to_host();
  ASSERT_EQ(a.size(), b.size());
  const double err = nmse(b, a);
  std::printf("  bf16 QKV output vs fp32: logits nmse %.3g\n", err);
  EXPECT_GT(err, 0.0) << "the option changed nothing";
  EXPECT_LE(err, 1e-3);
  EXPECT_EQ(std::memcmp(b.data(), b2.data(), b.size() * 4), 0) << "rerun, same bits";
}

// Auto picks a wgmma attention kernel at head_dim 128 on sm_90 (v2 elsewhere): the forward with Auto is the forward
// with the kernel attention_prefill_auto_kernel names, bit for bit, stays within bf16 noise of v2's, and is
// deterministic.
TEST(FwdGpuModel, AutoAttentionKernelTracksV2) {
  OSCAR_REQUIRE_GPU();
  fmt::ModelConfig c = small_qwen3_like();
  c.num_heads = 8;
  c.head_dim = 128;
  auto m = DeviceModel::random(c, 12);
  const PackedBatch batch = PackedBatch::from_sequences(
      std::vector<std::vector<int32_t>>{random_ids(700, 1000, 10), random_ids(1, 1000, 11), random_ids(130, 1000, 12)});
  DeviceForwardOptions autok, named, v2;
  named.attention_kernel = kern::attention_prefill_auto_kernel(128);
  v2.attention_kernel = kern::PrefillKernel::V2;
  const std::vector<float> a = m->forward(batch, autok).to_host();
  const std::vector<float> a2 = m->forward(batch, autok).to_host();
  const std::vector<float> n = m->forward(batch, named).to_host();
  const std::vector<float> b = m->forward(batch, v2).to_host();
  const double err = nmse(a, b);
  std::printf("  auto runs %s; logits nmse vs v2 %.3g\n", kern::prefill_kernel_name(named.attention_kernel), err);
  EXPECT_LE(err, 1e-4);
  EXPECT_EQ(std::memcmp(a.data(), n.data(), a.size() * 4), 0) << "Auto is the kernel it names";
  EXPECT_EQ(std::memcmp(a.data(), a2.data(), a.size() * 4), 0) << "rerun, same bits";
}

// What a prefill observer sees (issue #6's write path): the forward's bf16 K/V are its fp32 K/V rounded to
// nearest even, bit for bit, so a cache writer may stage either; an observer that wants no fp32 gets none (null
// pointers, nothing written) and the same bf16 K/V, and the forward's logits do not change.
class KvBitsCapture : public DeviceObserver {
 public:
  explicit KvBitsCapture(bool fp32) : fp32_(fp32) {}
  bool wants_fp32() const override { return fp32_; }
  void on_attention_inputs(const DeviceAttentionInputs& in) override {
    ASSERT_EQ(cudaStreamSynchronize(reinterpret_cast<cudaStream_t>(in.stream)), cudaSuccess);
    const size_t n = static_cast<size_t>(in.num_tokens * in.num_kv_heads * in.head_dim);
    ASSERT_NE(in.k_bf16, nullptr);
    ASSERT_NE(in.v_bf16, nullptr);
    k_bf16.push_back(to_host(in.k_bf16, n));
    v_bf16.push_back(to_host(in.v_bf16, n));
    if (fp32_) {
      ASSERT_NE(in.k, nullptr);
      ASSERT_NE(in.q, nullptr);
      k_f32.push_back(to_host(in.k, n));
      v_f32.push_back(to_host(in.v, n));
    } else {
      EXPECT_EQ(in.q, nullptr);
      EXPECT_EQ(in.k_pre_rope, nullptr);
      EXPECT_EQ(in.k, nullptr);
      EXPECT_EQ(in.v, nullptr);
    }
  }
  std::vector<std::vector<uint16_t>> k_bf16, v_bf16;
  std::vector<std::vector<float>> k_f32, v_f32;

 private:
  bool fp32_;
};

TEST(FwdGpuModel, ObserverBf16KvAreTheFp32KvRoundedAndNeedNoFp32Copies) {
  OSCAR_REQUIRE_GPU();
  fmt::ModelConfig c = small_qwen3_like();
  c.head_dim = 128;
  auto m = DeviceModel::random(c, 21);
  const PackedBatch batch = PackedBatch::from_sequences(
      std::vector<std::vector<int32_t>>{random_ids(300, 1000, 22), random_ids(45, 1000, 23)});
  KvBitsCapture with(true), without(false);
  DeviceForwardOptions a, b;
  a.observer = &with;
  b.observer = &without;
  const std::vector<float> la = m->forward(batch, a).to_host();
  const std::vector<float> lb = m->forward(batch, b).to_host();
  EXPECT_EQ(std::memcmp(la.data(), lb.data(), la.size() * 4), 0) << "the observer's wishes change the logits";
  ASSERT_EQ(with.k_bf16.size(), static_cast<size_t>(c.num_layers));
  ASSERT_EQ(without.k_bf16.size(), with.k_bf16.size());
  for (size_t l = 0; l < with.k_bf16.size(); ++l) {
    SCOPED_TRACE("layer " + std::to_string(l));
    EXPECT_EQ(with.k_bf16[l], without.k_bf16[l]);
    EXPECT_EQ(with.v_bf16[l], without.v_bf16[l]);
    size_t k_off = 0, v_off = 0;
    for (size_t i = 0; i < with.k_f32[l].size(); ++i) {
      k_off += fmt::f32_to_bf16(with.k_f32[l][i]) != with.k_bf16[l][i];
      v_off += fmt::f32_to_bf16(with.v_f32[l][i]) != with.v_bf16[l][i];
    }
    EXPECT_EQ(k_off, 0u) << "bf16 K elements that are not their fp32 K rounded";
    EXPECT_EQ(v_off, 0u) << "bf16 V elements that are not their fp32 V rounded";
  }
}

TEST(FwdGpuModel, PackedBatchEqualsSequencesRunAlone) {
  OSCAR_REQUIRE_GPU();
  auto m = DeviceModel::random(small_qwen3_like(), 7);
  const std::vector<std::vector<int32_t>> seqs = {random_ids(200, 1000, 4), random_ids(1, 1000, 5),
                                                  random_ids(64, 1000, 6), random_ids(129, 1000, 7)};
  const PackedBatch packed = PackedBatch::from_sequences(seqs);
  const std::vector<float> all = m->forward(packed).to_host();
  DeviceForwardOptions last;
  last.rows = LogitsRows::LastPerSequence;
  const std::vector<float> last_rows = m->forward(packed, last).to_host();
  const int64_t V = 1000;
  ASSERT_EQ(last_rows.size(), seqs.size() * V);
  for (size_t s = 0; s < seqs.size(); ++s) {
    const std::vector<float> alone = m->forward(PackedBatch::from_sequences(std::span(&seqs[s], 1))).to_host();
    const std::vector<float> in_batch(all.begin() + packed.cu_seqlens[s] * V, all.begin() + packed.cu_seqlens[s + 1] * V);
    // Different token counts may pick different GEMM kernels, so bf16 intermediates can round differently.
    EXPECT_LE(nmse(in_batch, alone), 1e-4) << "sequence " << s;
    const std::vector<float> last_of_all(in_batch.end() - V, in_batch.end());
    const std::vector<float> last_only(last_rows.begin() + s * V, last_rows.begin() + (s + 1) * V);
    EXPECT_LE(nmse(last_only, last_of_all), 1e-6) << "sequence " << s;
  }
}

TEST(FwdGpuModel, RefusesIdsOutsideTheVocabulary) {
  OSCAR_REQUIRE_GPU();
  auto m = DeviceModel::random(small_qwen3_like(), 1);
  PackedBatch batch;
  batch.add_sequence(std::vector<int32_t>{1, 2, 1000});
  EXPECT_THROW(m->forward(batch), oscar::Error);
}

}  // namespace
}  // namespace oscar::rt
