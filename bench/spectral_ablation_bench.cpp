// spectral_ablation_bench — the ablation behind docs/results.md "Beyond the published method": uniform INT2 with
// each rotation (none / Hadamard / eigen / OSCAR / Cayley-optimized), each with per-layer clip ratios tuned on the
// calibration text, against the spectral bit allocation (formula vs measured segments, ± Cayley, pre-RoPE keys),
// scored with the attention-aware relative errors on held-out text, and optionally the KL to the BF16 cache at
// positions that read the quantized cache (lib/eval's simulated cache, same windows for every format).
//
//   spectral_ablation_bench --model ../shared/fixtures/models/qwen3-tiny-trained --text ../shared/fixtures/text --kl
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <iostream>
#include <numeric>

#include "formats/bundle.h"
#include "formats/error.h"
#include "formats/tokenizer.h"
#include "lib/calib/bit_allocation.h"
#include "lib/calib/calibrator.h"
#include "lib/calib/rotation.h"
#include "lib/calib/rotation_opt.h"
#include "lib/calib/spectral.h"
#include "lib/eval/cache_modes.h"
#include "lib/eval/evaluator.h"
#include "lib/eval/metrics.h"
#include "lib/model/cpu_model.h"

#include "bench/ablation_common.h"

using namespace oscar;
namespace fs = std::filesystem;

namespace {

struct Config {
  std::string name;
  std::vector<calib::LayerChoice> layers;
  bool pre_rope_keys = false;
};

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Spectral bit allocation / rotation ablation on a real checkpoint (CPU)"};
  bench::SplitOptions split;
  bench::add_split_options(app, split);
  const auto& [model_dir, text_dir, seq_len, fit_seqs, heldout_seqs, fit_tokens, test_tokens, kl] = split;
  int64_t cayley_iters = 20;
  double budget = 2.28;
  bool skip_cayley = false, quick = false;
  double k_weight = calib::SpectralOptions{}.k_weight;
  std::string bundle_out;
  app.add_option("--budget", budget, "bits/element, K and V mean, metadata included");
  app.add_option("--cayley-iters", cayley_iters, "Cayley descent iterations");
  app.add_flag("--no-cayley", skip_cayley, "skip the Cayley-refined rows");
  app.add_option("--k-weight", k_weight, "weight of the relative K error in the K/V split objective (V weight 1)");
  app.add_flag("--quick", quick, "only the hadamard + tuned clip baseline and the measured spectral rows");
  app.add_option("--bundle-out", bundle_out, "write the spectral bundle (format 1.1) here");
  CLI11_PARSE(app, argc, argv);

  try {
    const auto t0 = std::chrono::steady_clock::now();
    auto model = model::CpuModel::load(model_dir);
    auto tokenizer = oscar::fmt::Tokenizer::load(model_dir);
    const oscar::fmt::ModelConfig& cfg = model->config();
    const int64_t d = cfg.head_dim, L = cfg.num_layers;
    const calib::StatisticsShape shape = calib::StatisticsShape::from_config(cfg);
    const std::vector<float> inv_freq = model::rope_inv_freq(cfg);
    const oscar::fmt::KvQuantSpec windows = oscar::fmt::KvQuantSpec::int2_default(d);  // sink 64, recent 256

    auto pack = [&](const std::vector<std::string>& files, int64_t per_file) {
      return bench::pack_texts(text_dir, files, per_file, seq_len, *tokenizer);
    };
    const auto fit_seqs_ids = pack({"war-and-peace.txt", "tiny-shakespeare.txt", "code-llamacpp-mit.txt"}, fit_seqs);
    const auto test_seqs_ids =
        pack({"python-docs-heldout.txt", "linux-docs-heldout.txt", "wikitext-2-raw-test.txt"}, heldout_seqs);

    calib::CpuForwardRunner runner(*model);
    auto collect = [&](const std::vector<std::vector<int32_t>>& seqs) {
      return bench::collect_samples(runner, shape, windows.sink_tokens, seqs, seq_len);
    };
    const auto fit = collect(fit_seqs_ids);
    const auto test = collect(test_seqs_ids);
    std::cerr << ::fmt::format("forward passes: {} fit + {} held-out sequences of {} tokens, {:.1f} s\n",
                               fit_seqs_ids.size(), test_seqs_ids.size(), seq_len, bench::seconds_since(t0));

    std::vector<calib::ObjectiveSamples> fk(L), fkp(L), fv(L), tk(L), tkp(L), tv(L);
    for (int64_t l = 0; l < L; ++l) {
      fk[l] = calib::key_objective_samples(fit[l], false, inv_freq, fit_tokens);
      fkp[l] = calib::key_objective_samples(fit[l], true, inv_freq, fit_tokens);
      fv[l] = calib::value_objective_samples(fit[l], fit_tokens);
      tk[l] = calib::key_objective_samples(test[l], false, inv_freq, test_tokens);
      tkp[l] = calib::key_objective_samples(test[l], true, inv_freq, test_tokens);
      tv[l] = calib::value_objective_samples(test[l], test_tokens);
    }
    // RoPE(k_pre) must reproduce the post-RoPE keys the cache stores: the pre-RoPE rows rest on it.
    std::cerr << ::fmt::format("check: layer 0 key energy via RoPE(k_pre) / via k = {:.6f} (1 expected)\n",
                               fkp[0].energy / fk[0].energy);

    const std::vector<float> grid = {0.80f, 0.84f, 0.88f, 0.90f, 0.92f, 0.94f, 0.96f, 0.98f, 1.0f};
    const std::vector<float> no_clip = {1.0f};
    calib::CayleyOptions cay;
    cay.max_iterations = cayley_iters;

    std::vector<Config> configs;
    auto uniform = [&](const std::string& name, calib::RotationKind kind, std::span<const float> clips,
                       const calib::CayleyOptions* refine) {
      const auto t = std::chrono::steady_clock::now();
      configs.push_back(Config{name, bench::uniform_layers(kind, fk, fv, clips, refine), false});
      std::cerr << ::fmt::format("{}: {:.1f} s\n", name, bench::seconds_since(t));
    };
    if (!quick) uniform("int2 (no rotation, no clip)", calib::RotationKind::None, no_clip, nullptr);
    uniform("int2 + hadamard + tuned clip", calib::RotationKind::Hadamard, grid, nullptr);
    if (!quick) uniform("int2 + eigen + tuned clip", calib::RotationKind::Eigen, grid, nullptr);
    if (!quick) uniform("int2 + oscar (eigen·H·bitrev) + tuned clip", calib::RotationKind::EigenHadamard, grid, nullptr);
    if (!skip_cayley && !quick) uniform("int2 + cayley(from hadamard) + tuned clip", calib::RotationKind::Hadamard, grid, &cay);

    auto spectral = [&](const std::string& name, calib::SpectralOptions opt) {
      const auto t = std::chrono::steady_clock::now();
      opt.budget_bits_per_element = budget;
      opt.k_weight = k_weight;
      opt.cayley = cay;
      Config c{name, {}, opt.pre_rope_keys};
      for (int64_t l = 0; l < L; ++l)
        c.layers.push_back(calib::spectral_layer(opt.pre_rope_keys ? fkp[l] : fk[l], fv[l], opt));
      configs.push_back(std::move(c));
      std::cerr << ::fmt::format("{}: {:.1f} s\n", name, bench::seconds_since(t));
    };
    calib::SpectralOptions formula;
    formula.modeled_costs = true;
    if (!quick) spectral("spectral, formula segments", formula);
    calib::SpectralOptions no_mix;
    no_mix.segment_mix = false;
    if (!quick) spectral("spectral, measured segments, no mix", no_mix);
    spectral("spectral, measured segments", {});
    calib::SpectralOptions pre;
    pre.pre_rope_keys = true;
    if (!quick) spectral("spectral, measured, keys pre-RoPE", pre);
    if (!skip_cayley && !quick) {
      calib::SpectralOptions ref;
      ref.optimize_rotation = true;
      spectral("spectral, measured + cayley", ref);
    }

    std::cout << ::fmt::format("\nqwen-style ablation: {} layers, head_dim {}, budget {:.2f} bits/element (K,V mean, "
                               "scale/zero included); errors on held-out text, mean over layers\n\n",
                               L, d, budget);
    std::cout << "| configuration | bits/elem K | bits/elem V | K rel. logit MSE | V rel. output MSE | K + V |\n";
    std::cout << "|---|---|---|---|---|---|\n";
    for (const auto& c : configs) {
      double kb = 0, vb = 0, ke = 0, ve = 0;
      for (int64_t l = 0; l < L; ++l) {
        const auto& lc = c.layers[l];
        kb += lc.k.spec.bits_per_element(d) / L;
        vb += lc.v.spec.bits_per_element(d) / L;
        ke += calib::quantization_objective(c.pre_rope_keys ? tkp[l] : tk[l], lc.k.rotation, lc.k.spec,
                                            lc.k.spec.clip_ratio) / L;
        ve += calib::quantization_objective(tv[l], lc.v.rotation, lc.v.spec, lc.v.spec.clip_ratio) / L;
      }
      std::cout << ::fmt::format("| {} | {:.3f} | {:.3f} | {:.5f} | {:.5f} | {:.5f} |\n", c.name, kb, vb, ke, ve,
                                 ke + ve);
    }
    std::cout << "\nper-layer layouts of \"spectral, measured segments\" (K | V, clip K/V):\n";
    for (const auto& c : configs) {
      if (c.name != "spectral, measured segments") continue;
      for (int64_t l = 0; l < L; ++l)
        std::cout << ::fmt::format("  layer {}: {} | {}  (clip {:.2f}/{:.2f})\n", l, c.layers[l].k.note,
                                   c.layers[l].v.note, c.layers[l].k.spec.clip_ratio, c.layers[l].v.spec.clip_ratio);
    }

    if (kl || !bundle_out.empty()) {
      auto bundle_of = [&](const Config& c) {
        oscar::fmt::Bundle b;
        b.producer = "spectral_ablation_bench";
        b.model = {"spectral-ablation", L, cfg.num_heads, cfg.num_kv_heads, d,
                   cfg.hidden_size, cfg.vocab_size, std::string(64, '0'), std::string(64, '0')};
        b.quant = oscar::fmt::KvQuantSpec::int2_default(d);
        b.rotation_composition = "spectral";
        for (const auto& lc : c.layers) b.layers.push_back(calib::to_layer_calibration(lc, b.quant));
        return b;
      };
      if (!bundle_out.empty()) {
        for (const auto& c : configs)
          if (c.name == "spectral, measured segments") oscar::fmt::write_bundle(bundle_out, bundle_of(c));
        std::cerr << "wrote " << bundle_out << "\n";
      }
      if (kl) {
        eval::ModeOptions mo;
        mo.windows = {windows.sink_tokens, windows.recent_tokens};
        const int64_t first = eval::first_query_reading_quantized(mo.windows);
        auto bf16 = eval::CacheFormat::create(eval::CacheMode::BF16, cfg, mo);
        std::vector<std::vector<float>> ref;
        for (const auto& ids : test_seqs_ids) ref.push_back(eval::simulated_logits(*model, *bf16, ids));
        std::cout << ::fmt::format("\nKL(BF16 ‖ mode) at positions >= {} (context {}, {} held-out sequences, sink {} "
                                   "+ recent {} bf16 for every mode)\n\n| format | bits/elem (K,V mean) | mean KL | "
                                   "p99 KL | top-1 agreement |\n|---|---|---|---|---|\n",
                                   first, seq_len, test_seqs_ids.size(), mo.windows.sink, mo.windows.recent);
        auto run = [&](const std::string& name, const eval::CacheFormat& f) {
          const auto sum = bench::summarize_beyond(*model, f, test_seqs_ids, ref, first);
          const auto cost = f.element_cost();
          std::cout << ::fmt::format("| {} | {:.3f} | {:.5f} | {:.4f} | {:.4f} |\n", name,
                                     0.5 * (cost.key_bits + cost.value_bits), sum.kl_mean, sum.kl_p99,
                                     sum.top1_agreement);
        };
        run("hadamard2 (eval mode: random-sign H, no clip)", *eval::CacheFormat::create(eval::CacheMode::Hadamard2, cfg, mo));
        for (const auto& c : configs) {
          if (c.pre_rope_keys) continue;  // the simulated cache quantizes post-RoPE keys
          const oscar::fmt::Bundle b = bundle_of(c);
          mo.bundle = &b;
          run(c.name, *eval::CacheFormat::create(eval::CacheMode::Oscar, cfg, mo));
          mo.bundle = nullptr;
        }
      }
    }
    std::cerr << ::fmt::format("total {:.1f} s\n", bench::seconds_since(t0));
  } catch (const Error& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
