// Which clip objective tracks KL? (docs/results.md, "Clip objective vs KL (cliptune)")
//
// For one bundle: every layer at fixed clip ratios (--base-k/--base-v, the published 0.96 / 0.92), then per layer
// the K clip (values fixed) and the V clip (keys fixed) swept over --ratios. For each point:
//   KL      mean KL(BF16 ‖ oscar) beyond the bf16 window on --eval-data (lib/eval's decode-cache simulation)
//   mse     the logit_mse objective (relative Σ_Q logit MSE / weighted value MSE) on held-out calibration samples
//   att     the attention objective (AttentionClipScorer) on the same held-out calibration sequences
//   att@ev  the attention objective on the evaluation sequences themselves (separates "wrong objective" from
//           "calibration text differs from evaluation text")
// and finally the KL of whole bundles whose every layer takes each objective's argmin.
// Held-out calibration sequences are the ones `oscar calibrate` would hold out for the same --calib-* flags.
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <iostream>

#include "datasets/pack.h"
#include "formats/bundle.h"
#include "formats/error.h"
#include "formats/tokenizer.h"
#include "lib/calib/calibrator.h"
#include "lib/calib/clip_tuner.h"
#include "lib/calib/error_report.h"
#include "lib/calib/spectral_calibration.h"
#include "lib/eval/cache_modes.h"
#include "lib/eval/evaluator.h"
#include "lib/eval/metrics.h"
#include "lib/model/cpu_model.h"

namespace oscar {
namespace {

struct Tee : model::Observer {
  std::vector<model::Observer*> obs;
  void on_attention_inputs(const model::AttentionInputs& in) override {
    for (auto* o : obs) o->on_attention_inputs(in);
  }
};

std::vector<std::vector<int32_t>> pack(const std::vector<std::string>& files, const fmt::Tokenizer& tok,
                                       int64_t len, int64_t count, uint64_t seed) {
  data::PackOptions po;
  po.seq_len = len;
  po.num_seqs = count;
  po.shuffle = true;
  po.seed = seed;
  const auto packed = data::pack_dataset(files, &tok, data::SourceOptions{}, po);
  std::vector<std::vector<int32_t>> out;
  for (int64_t i = 0; i < packed.num_seqs(); ++i) {
    const auto s = packed.sequence(i);
    out.emplace_back(s.begin(), s.end());
  }
  return out;
}

}  // namespace

int run(int argc, char** argv) {
  CLI::App app{"clip objective vs KL"};
  std::string model_dir, bundle_path;
  std::vector<std::string> calib_data, eval_data;
  int64_t calib_num = 24, calib_heldout = 8, calib_len = 1024, eval_seqs = 2, context = 1024, queries = 256;
  float base_k = 0.96f, base_v = 0.92f;
  std::vector<float> ratios = {0.86f, 0.90f, 0.92f, 0.94f, 0.96f, 0.98f, 1.0f};
  bool sweep = true;
  app.add_option("--model", model_dir)->required();
  app.add_option("--bundle", bundle_path)->required();
  app.add_option("--calib-data", calib_data)->required()->expected(1, -1);
  app.add_option("--calib-num", calib_num);
  app.add_option("--calib-heldout", calib_heldout);
  app.add_option("--calib-len", calib_len);
  app.add_option("--eval-data", eval_data)->required()->expected(1, -1);
  app.add_option("--eval-seqs", eval_seqs);
  app.add_option("--context", context);
  app.add_option("--queries", queries);
  app.add_option("--base-k", base_k);
  app.add_option("--base-v", base_v);
  app.add_option("--ratios", ratios)->delimiter(',');
  app.add_flag("!--no-sweep", sweep, "only the whole-bundle rows");
  CLI11_PARSE(app, argc, argv);
  try {
    const auto t0 = std::chrono::steady_clock::now();
    auto model = model::CpuModel::load(model_dir);
    auto tok = fmt::Tokenizer::load(model_dir);
    const fmt::ModelConfig& cfg = model->config();
    const fmt::Bundle tuned = fmt::read_bundle(bundle_path);
    const int64_t L = cfg.num_layers, d = cfg.head_dim, sink = tuned.quant.sink_tokens, recent = tuned.quant.recent_tokens;
    fmt::Bundle base = tuned;
    for (auto& l : base.layers) {
      l.k_clip_ratio = base_k;
      l.v_clip_ratio = base_v;
    }

    // ---- evaluation sequences, bf16 reference logits, and their attention inputs
    const auto evals = pack(eval_data, *tok, context, eval_seqs, 0);
    eval::ModeOptions mo;
    mo.windows = {sink, recent};
    const auto bf16 = eval::CacheFormat::create(eval::CacheMode::BF16, cfg, mo);
    std::vector<std::vector<float>> ref;
    for (const auto& s : evals) ref.push_back(eval::simulated_logits(*model, *bf16, s));
    auto kl_of = [&](const fmt::Bundle& b) {
      eval::ModeOptions m = mo;
      m.bundle = &b;
      const auto f = eval::CacheFormat::create(eval::CacheMode::Oscar, cfg, m);
      std::vector<eval::PositionMetrics> beyond;
      for (size_t i = 0; i < evals.size(); ++i) {
        const auto logits = eval::simulated_logits(*model, *f, evals[i]);
        const std::span<const int32_t> targets(evals[i].data() + 1, evals[i].size() - 1);
        const auto pm = eval::compare_positions(std::span<const float>(ref[i]).first(targets.size() * cfg.vocab_size),
                                                std::span<const float>(logits).first(targets.size() * cfg.vocab_size),
                                                cfg.vocab_size, targets);
        for (size_t t = static_cast<size_t>(sink + recent); t < pm.size(); ++t) beyond.push_back(pm[t]);
      }
      return eval::summarize(beyond);
    };

    // ---- held-out calibration sequences (as `oscar calibrate` holds them out)
    const auto calib = pack(calib_data, *tok, calib_len, calib_num + calib_heldout, 0);
    std::vector<std::vector<int32_t>> held(calib.end() - std::min<int64_t>(calib_heldout, calib.size()), calib.end());
    const calib::StatisticsShape shape = calib::StatisticsShape::from_config(cfg);
    calib::HeldoutCollector hc(shape, calib::ValueWeighting::QueryEnergy, sink, 16384);
    calib::AttentionSequenceCollector ac(shape), ec(shape);
    calib::CpuForwardRunner runner(*model);
    for (size_t i = 0; i < held.size(); ++i) {
      hc.begin_sequence(static_cast<int64_t>(i));
      ac.begin_sequence();
      Tee tee;
      tee.obs = {&hc, &ac};
      runner.run_sequence(held[i], tee);
    }
    for (const auto& s : evals) {
      ec.begin_sequence();
      runner.run_sequence(s, ec);
    }
    const auto hl = hc.finish();
    const auto aseq = ac.finish();
    const auto eseq = ec.finish();

    const auto base_kl = kl_of(base);
    const auto tuned_kl = kl_of(tuned);
    std::cout << ::fmt::format("base (K {} / V {}): KL>win {:.5e} top1 {:.4f} ppl {:.3f}\n", base_k, base_v,
                               base_kl.kl_mean, base_kl.top1_agreement, base_kl.perplexity);
    std::cout << ::fmt::format("bundle's own clips: KL>win {:.5e} top1 {:.4f} ppl {:.3f}\n", tuned_kl.kl_mean,
                               tuned_kl.top1_agreement, tuned_kl.perplexity);

    std::vector<float> grid = ratios;
    std::sort(grid.begin(), grid.end());
    // argmins per layer: [objective][layer] {k, v}; objectives: kl, mse, att, att@ev
    const char* names[] = {"KL", "mse", "att", "att@ev"};
    std::vector<std::vector<std::pair<float, float>>> best(4, std::vector<std::pair<float, float>>(L));
    for (int64_t l = 0; l < L; ++l) {
      const auto& lq = base.layers[l];
      calib::RotatedHeldout rh(hl[l], lq.k_rotation, lq.v_rotation, base.rotation_groups, base.quant);
      const auto spec = calib::layer_quantization(lq, base.quant, base.rotation_groups);
      calib::AttentionClipScorer sc(aseq[l], cfg.num_heads, cfg.num_kv_heads, d, lq.k_rotation, lq.v_rotation,
                                    base.rotation_groups, spec.k, spec.v, sink, recent, queries);
      calib::AttentionClipScorer se(eseq[l], cfg.num_heads, cfg.num_kv_heads, d, lq.k_rotation, lq.v_rotation,
                                    base.rotation_groups, spec.k, spec.v, sink, recent, queries);
      for (int kv = 0; kv < 2; ++kv) {
        std::cout << ::fmt::format("\nlayer {} {} clip (tuned bundle: {:.2f})\n| ratio | KL>win | mse | att | att@ev |\n|---|---|---|---|---|\n",
                                   l, kv == 0 ? "K" : "V", kv == 0 ? tuned.layers[l].k_clip_ratio : tuned.layers[l].v_clip_ratio);
        std::vector<double> mins(4, INFINITY);
        // descending so ties go to less clipping
        for (auto it = grid.rbegin(); it != grid.rend(); ++it) {
          const float r = *it;
          double vals[4];
          if (sweep) {
            fmt::Bundle b = base;
            (kv == 0 ? b.layers[l].k_clip_ratio : b.layers[l].v_clip_ratio) = r;
            vals[0] = kl_of(b).kl_mean;
          } else {
            vals[0] = 0;
          }
          vals[1] = kv == 0 ? rh.key_error(r) : rh.value_error(r);
          vals[2] = kv == 0 ? sc.key_error(r) : sc.value_error(r);
          vals[3] = kv == 0 ? se.key_error(r) : se.value_error(r);
          std::cout << ::fmt::format("| {:.2f} | {:.5e} | {:.5f} | {:.5e} | {:.5e} |\n", r, vals[0], vals[1], vals[2], vals[3]);
          for (int o = 0; o < 4; ++o)
            if (vals[o] < mins[o]) {
              mins[o] = vals[o];
              (kv == 0 ? best[o][l].first : best[o][l].second) = r;
            }
        }
        std::cout << "argmin:";
        for (int o = 0; o < 4; ++o)
          std::cout << ::fmt::format(" {}={:.2f}", names[o], kv == 0 ? best[o][l].first : best[o][l].second);
        std::cout << std::endl;
      }
    }
    std::cout << "\n| clips from | KL>win | top-1 | PPL | per-layer K/V |\n|---|---|---|---|---|\n";
    std::cout << ::fmt::format("| fixed {}/{} | {:.5e} | {:.4f} | {:.3f} | |\n", base_k, base_v, base_kl.kl_mean,
                               base_kl.top1_agreement, base_kl.perplexity);
    for (int o = sweep ? 0 : 1; o < 4; ++o) {
      fmt::Bundle b = base;
      std::string txt;
      for (int64_t l = 0; l < L; ++l) {
        b.layers[l].k_clip_ratio = best[o][l].first;
        b.layers[l].v_clip_ratio = best[o][l].second;
        txt += ::fmt::format("{:.2f}/{:.2f} ", best[o][l].first, best[o][l].second);
      }
      const auto s = kl_of(b);
      std::cout << ::fmt::format("| argmin {} | {:.5e} | {:.4f} | {:.3f} | {}|\n", names[o], s.kl_mean,
                                 s.top1_agreement, s.perplexity, txt);
    }
    std::cout << ::fmt::format("\n{:.0f} s\n",
                               std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  } catch (const std::exception& e) {
    std::cerr << "clip_objective_bench: " << e.what() << "\n";
    return 1;
  }
  return 0;
}

}  // namespace oscar

int main(int argc, char** argv) { return oscar::run(argc, argv); }
