// error_feedback_bench — issue #10: does error-feedback (GPTQ-style) rounding of each K/V token in the attention
// metric beat round-to-nearest at the same INT2 format? (lib/calib/error_feedback.h; docs/results.md "Error-feedback
// rounding in the attention metric"). For each whole-head rotation (Hadamard, OSCAR eigen·H·bitrev, eigen), each with
// per-layer clips tuned for RTN on the fit text (spectral_ablation_bench's fit/held-out split), it scores RTN against
// EF on keys (metric Σ_Q of the KV group's queries) and on values (o_proj metrics), on held-out text: relative key
// logit MSE, relative value output MSE (identity metric = the ablation's, and the o_proj metric), and optionally the
// KL to the BF16 cache beyond the bf16 windows through lib/eval's simulated cache with EF rounding hooked in.
//
//   error_feedback_bench --model ../shared/fixtures/models/qwen3-tiny-trained --text ../shared/fixtures/text --kl
#include <CLI/CLI.hpp>
#include <Eigen/Dense>
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <iostream>
#include <map>
#include <tuple>
#include <optional>

#include "formats/bundle.h"
#include "formats/error.h"
#include "formats/tokenizer.h"
#include "lib/calib/calibrator.h"
#include "lib/calib/ef_calibration.h"
#include "lib/calib/error_feedback.h"
#include "lib/calib/kv_transform.h"
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

using RowMatD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

enum class VMetric { None, WoSum, WoCoherent };
const char* vmetric_name(VMetric m) {
  switch (m) {
    case VMetric::None: return "RTN";
    case VMetric::WoSum: return "Σ_g W_gᵀW_g";
    case VMetric::WoCoherent: return "(Σ_g W_g)ᵀ(Σ_g W_g)";
  }
  return "?";
}

// The key metric weighted by what a key error costs in KL: to second order a query's KL from logit errors δ_t is
// ½ Var_p(δ), so independent key errors e_t cost ≈ ½ Σ_t p_t (q·e_t)², i.e. the metric of the keys a cache
// quantizes is Σ_q m_q q qᵀ with m_q the softmax mass query q puts on them — not Σ_Q, which also counts queries that
// attend only to the bf16 sink and recent window. Per layer and KV head [Hkv, d, d], over the group's query heads,
// normalized by Σ m_q (EF tables are scale invariant). Each sequence must reach it in one call from position 0.
class QuantizedMassMetric : public model::Observer {
 public:
  QuantizedMassMetric(int64_t layers, int64_t kv_heads, int64_t d, int64_t sink, int64_t recent)
      : d_(d), sink_(sink), recent_(recent), acc_(layers), mass_(layers, 0.0) {
    for (auto& a : acc_) a.assign(static_cast<size_t>(kv_heads * d * d), 0.0);
  }
  void on_attention_inputs(const model::AttentionInputs& in) override {
    if (in.pos0 != 0) throw Error("QuantizedMassMetric", "needs whole sequences from position 0");
    const int64_t T = in.num_tokens, d = d_, G = in.num_heads / in.num_kv_heads;
    using RowMatF = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
    for (int64_t h = 0; h < in.num_heads; ++h) {
      const int64_t kvh = h / G;
      const Eigen::Map<const RowMatF> q(in.q + h * T * d, T, d), k(in.k + kvh * T * d, T, d);
      const RowMatF s = (q * k.transpose()) / std::sqrt(static_cast<float>(d));
      RowMatD weighted(T, d);
      int64_t rows = 0;
      for (int64_t i = 0; i < T; ++i) {
        const int64_t end = i + 1 - recent_;  // keys [sink, end) are quantized for this query
        if (end <= sink_) continue;
        double mx = -1e300, total = 0, quant = 0;
        for (int64_t t = 0; t <= i; ++t) mx = std::max(mx, static_cast<double>(s(i, t)));
        for (int64_t t = 0; t <= i; ++t) {
          const double e = std::exp(static_cast<double>(s(i, t)) - mx);
          total += e;
          if (t >= sink_ && t < end) quant += e;
        }
        const double m = quant / total;
        weighted.row(rows++) = std::sqrt(m) * q.row(i).cast<double>();
        mass_[in.layer] += m;
      }
      const RowMatD c = weighted.topRows(rows).transpose() * weighted.topRows(rows);
      double* a = acc_[in.layer].data() + kvh * d * d;
      for (int64_t i = 0; i < d * d; ++i) a[i] += c.data()[i];
    }
  }
  // [Hkv, d, d] of layer l, normalized.
  std::vector<double> metric(int64_t l) const {
    std::vector<double> m = acc_[l];
    for (double& x : m) x /= mass_[l];
    return m;
  }

 private:
  int64_t d_, sink_, recent_;
  std::vector<std::vector<double>> acc_;
  std::vector<double> mass_;
};

// Per layer, per KV head: an EF table, or none (RTN).
using Tables = std::vector<std::vector<std::optional<calib::ErrorFeedbackTable>>>;

// Quantize-dequantize `n` head vectors x (original basis) as a cache writer with this table would: error-feedback
// rounding, or the reference quantizer's whole-head INT2 (round to nearest) where there is no table.
void fake_quantize(const calib::ErrorFeedbackTable* table, std::span<const float> x, int64_t n,
                   std::span<const float> rotation, float clip, std::span<float> out, int32_t bits = 2) {
  const int64_t d = static_cast<int64_t>(x.size()) / n;
  if (table) {
    calib::error_feedback_fake_quantize(x, n, rotation, clip, bits, *table, out);
    return;
  }
  const calib::HeadQuantizer hq(oscar::fmt::KvQuantSpec::uniform(d, bits).k, d, "error_feedback_bench");
  hq.fake_quantize(x, n, rotation, clip, calib::Basis::Original, out);
}

// Relative error Σ_h Σ_t w_t εMε / Σ_h Σ_t w_t xMx with M = metric[h] (original basis; empty = identity), the
// samples quantized with `rotation` (float, as the bundle stores it), clip, and EF tables (none = RTN: identical to
// the reference quantizer's whole-head INT2).
double relative_error(const calib::ObjectiveSamples& s, const std::vector<std::vector<double>>& metric,
                      std::span<const float> rotation, float clip,
                      const std::vector<std::optional<calib::ErrorFeedbackTable>>* tables, int32_t bits = 2) {
  const int64_t d = s.dim, n = s.tokens;
  double err = 0, energy = 0;
  std::vector<float> xhat(static_cast<size_t>(n * d));
  for (int64_t h = 0; h < s.heads; ++h) {
    std::span<const float> x(s.x.data() + h * n * d, n * d);
    fake_quantize(tables && (*tables)[h] ? &*(*tables)[h] : nullptr, x, n, rotation, clip, xhat, bits);
    const bool ident = metric.empty();
    const Eigen::Map<const RowMatD> m(ident ? nullptr : metric[h].data(), d, d);
    Eigen::VectorXd e(d), xv(d);
    for (int64_t t = 0; t < n; ++t) {
      const double w = s.token_weight.empty() ? 1.0 : s.token_weight[h * n + t];
      for (int64_t i = 0; i < d; ++i) {
        xv(i) = x[t * d + i];
        e(i) = static_cast<double>(xhat[t * d + i]) - xv(i);
      }
      err += w * (ident ? e.squaredNorm() : e.dot(m * e));
      energy += w * (ident ? xv.squaredNorm() : xv.dot(m * xv));
    }
  }
  return err / energy;
}

// --transform-study (lib/calib/kv_transform.h): one KV head's (or, shared, the layer's pooled) fit samples give μ
// and Σ, the transform A = W·R, and the EF table (if the row has one) for the metric in A's basis.
struct Transform {
  calib::HeadTransform head;
  std::optional<calib::ErrorFeedbackTable> table;
};

Transform make_transform(const calib::ObjectiveSamples& s, int64_t head, double alpha, bool center, bool shared,
                         std::span<const float> rotation, std::span<const double> metric,
                         const std::optional<calib::ErrorFeedbackOptions>& ef) {
  const int64_t d = s.dim, n = s.tokens;
  const int64_t h0 = shared ? 0 : head, h1 = shared ? s.heads : head + 1;
  calib::MomentAccumulator acc(d);
  for (int64_t h = h0; h < h1; ++h)
    for (int64_t t = 0; t < n; ++t)
      acc.add(std::span<const float>(s.x.data() + (h * n + t) * d, static_cast<size_t>(d)),
              s.token_weight.empty() ? 1.0 : s.token_weight[h * n + t]);
  const std::vector<double> mu = center ? acc.mean() : std::vector<double>(static_cast<size_t>(d), 0.0);
  const std::vector<double> r(rotation.begin(), rotation.end());
  Transform tf{calib::whitening_transform(mu, acc.covariance(center), d, alpha, r, "transform study"), {}};
  if (ef)
    tf.table = calib::error_feedback_table(calib::metric_in_transform_basis(metric, tf.head), d, *ef,
                                           "transform study");
  return tf;
}

void transform_fake_quantize(const Transform& tf, std::span<const float> x, int64_t n, float clip, int32_t bits,
                             std::span<float> out) {
  calib::transform_fake_quantize(
      tf.head, x, n,
      [&](std::span<const float> y, int64_t rows, std::span<float> y_hat) {
        fake_quantize(tf.table ? &*tf.table : nullptr, y, rows, {}, clip, y_hat, bits);
      },
      out);
}

std::vector<std::vector<double>> per_head(const std::vector<double>& flat, int64_t heads, int64_t d) {
  std::vector<std::vector<double>> out;
  for (int64_t h = 0; h < heads; ++h)
    out.emplace_back(flat.begin() + h * d * d, flat.begin() + (h + 1) * d * d);
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Error-feedback vs round-to-nearest INT2 rounding of K/V tokens on a real checkpoint (CPU)"};
  bench::SplitOptions split;
  bench::add_split_options(app, split);
  const auto& [model_dir, text_dir, seq_len, fit_seqs, heldout_seqs, fit_tokens, test_tokens, kl] = split;
  bool quick = false, clip_feedback = false, clip_study = false;
  int refit_study = 0;
  std::vector<float> study_clips = {0.96f, 0.92f};
  bool bias_study = false;
  std::vector<float> token_clip_study;
  bool key_metric_study = false;
  std::vector<double> damps = {0.01, 0.1};
  std::vector<std::string> rotations = {"hadamard", "oscar", "eigen"};
  std::vector<float> ef_clip_grid = {0.88f, 0.92f, 0.94f, 0.96f, 0.98f, 1.0f};
  std::vector<std::string> heldout_files = {"python-docs-heldout.txt", "linux-docs-heldout.txt", "wikitext-2-raw-test.txt"};
  app.add_option("--damps", damps, "EF dampings (relative to mean diag of the metric); the first is used for V")->delimiter(',');
  app.add_option("--rotations", rotations, "whole-head rotations: hadamard, oscar, eigen")->delimiter(',');
  app.add_option("--ef-clip-grid", ef_clip_grid, "clip ratios tried for keys under EF (fit text)")->delimiter(',');
  app.add_option("--heldout-files", heldout_files, "held-out texts (file names under --text)")->delimiter(',');
  app.add_flag("--clip-feedback", clip_feedback, "feed the clipping error back too (target = unclipped vector)");
  app.add_flag("--clip-study", clip_study, "rows that separate the clip from the rounding (RTN at EF's clip, fixed 0.96/0.92)");
  app.add_option("--refit-study", refit_study,
                 "only the fixed-clip (0.96 / 0.92) rows: RTN, EF K+V, EF K+V with up to N (scale, zero) refits in H");
  app.add_option("--study-clips", study_clips, "K,V clip ratios of the --refit-study rows (the yardstick's 0.96,0.92)")
      ->delimiter(',')
      ->expected(2);
  app.add_flag("--bias-study", bias_study,
               "KL rows per configuration: as is, with the mean quantization error of the fit text subtracted per "
               "(layer, KV head, tensor), and with exact keys / exact values (where the KL comes from)");
  app.add_option("--token-clip-study", token_clip_study,
                 "fixed-clip (--study-clips) rows: RTN, EF K+V, and EF K+V where each token also tries these clip "
                 "ratios and keeps the least error in H (K only, then K and V)")
      ->delimiter(',');
  app.add_flag("--key-metric-study", key_metric_study,
               "fixed-clip (--study-clips) rows: RTN, EF K+V with key metric Σ_Q, and with Σ_q m_q q qᵀ (m_q = the "
               "query's softmax mass on the quantized keys)");
  std::vector<int32_t> split_study;
  std::vector<float> split_clips = {0.96f, 0.92f};
  app.add_option("--split-study", split_study,
                 "K,V whole-head bit widths (e.g. 3,1: the same 2.25 bits/element as INT2, spent on the keys): rows "
                 "RTN and EF K+V at 2,2 with --study-clips, then RTN and EF K+V at these widths with --split-clips")
      ->delimiter(',')
      ->expected(2);
  app.add_option("--split-clips", split_clips, "K,V clip ratios of the --split-study rows at the new widths")
      ->delimiter(',')
      ->expected(2);
  std::vector<double> outlier_study;
  app.add_option("--outlier-study", outlier_study,
                 "KL rows per configuration where this fraction of each call's tokens (per layer, KV head, tensor), "
                 "those with the largest error in the fit text's metric (Σ_Q for keys, Σ_g W_gᵀW_g for values), "
                 "are kept exact: what a sparse bf16 side list of that many tokens would buy")
      ->delimiter(',');
  int64_t eval_seq_len = 0;
  app.add_option("--eval-seq-len", eval_seq_len,
                 "held-out sequence length (KL context) when it differs from --seq-len (the fit text's); 0 = the same");
  std::vector<double> transform_study;
  bool transform_keys_only = false;
  app.add_option("--transform-study", transform_study,
                 "KL rows per configuration where each KV head's vectors are centered by their fit-text mean μ and "
                 "multiplied by W = (Σ + εI)^(-α/2) (Σ: the centered fit-text covariance) before the row's rotation, "
                 "the EF table built for the metric in that basis, and x̂ = ŷ (WR)⁻¹ + μ: one row per α (0 = "
                 "centering only; 1 = whitening)")
      ->delimiter(',');
  app.add_flag("--transform-keys-only", transform_keys_only, "--transform-study: values stay as the row stores them");
  double transform_v_alpha = -1;
  app.add_option("--transform-v-alpha", transform_v_alpha,
                 "--transform-study: the values' α (default: each row's α for both tensors)");
  bool transform_shared = false;
  app.add_flag("--transform-shared", transform_shared,
               "--transform-study: one μ and W per layer and tensor, pooled over the KV heads (the tables stay per head)");
  std::string transform_center = "kv";
  app.add_option("--transform-center", transform_center,
                 "--transform-study: which tensors are centered (kv, k, v, none); an uncentered one has μ = 0 and Σ = "
                 "its second moment (no bias vector in the writer or reader)");
  app.add_flag("--quick", quick, "K-only EF rows at the first damping, no V metrics, no clip retune");
  CLI11_PARSE(app, argc, argv);

  try {
    const auto t0 = std::chrono::steady_clock::now();
    auto model = model::CpuModel::load(model_dir);
    auto tokenizer = oscar::fmt::Tokenizer::load(model_dir);
    const oscar::fmt::ModelConfig& cfg = model->config();
    const int64_t d = cfg.head_dim, L = cfg.num_layers, Hkv = cfg.num_kv_heads, G = cfg.num_heads / Hkv;
    const calib::StatisticsShape shape = calib::StatisticsShape::from_config(cfg);
    const std::vector<float> inv_freq = model::rope_inv_freq(cfg);
    const oscar::fmt::KvQuantSpec windows = oscar::fmt::KvQuantSpec::int2_default(d);
    std::cout << ::fmt::format("options: seq_len {} fit_seqs {} heldout_seqs {} fit_tokens {} test_tokens {} damps {} "
                               "rotations {} ef_clip_grid {} clip_feedback {} quick {} clip_study {} refit_study {} study_clips {} token_clip_study {} kl {} heldout {}\n",
                               seq_len, fit_seqs, heldout_seqs, fit_tokens, test_tokens, ::fmt::join(damps, ","),
                               ::fmt::join(rotations, ","), ::fmt::join(ef_clip_grid, ","), clip_feedback, quick, clip_study, refit_study, ::fmt::join(study_clips, ","), ::fmt::join(token_clip_study, ","), kl, ::fmt::join(heldout_files, ","));

    auto pack = [&](const std::vector<std::string>& files, int64_t per_file) {
      return bench::pack_texts(text_dir, files, per_file, seq_len, *tokenizer);
    };
    const auto fit_ids = pack({"war-and-peace.txt", "tiny-shakespeare.txt", "code-llamacpp-mit.txt"}, fit_seqs);
    // --eval-seq-len: the held-out sequences (the KL and the held-out errors) at another length than the fit text.
    const int64_t test_len = eval_seq_len > 0 ? eval_seq_len : seq_len;
    const auto test_ids = bench::pack_texts(text_dir, heldout_files, heldout_seqs, test_len, *tokenizer);
    calib::CpuForwardRunner runner(*model);
    auto collect = [&](const std::vector<std::vector<int32_t>>& seqs) {
      return bench::collect_samples(runner, shape, windows.sink_tokens, seqs, seq_len);
    };
    const auto fit = collect(fit_ids);
    const auto test = bench::collect_samples(runner, shape, windows.sink_tokens, test_ids, test_len);
    std::vector<calib::ObjectiveSamples> fk(L), fv(L), tk(L), tv(L);
    for (int64_t l = 0; l < L; ++l) {
      fk[l] = calib::key_objective_samples(fit[l], false, inv_freq, fit_tokens);
      fv[l] = calib::value_objective_samples(fit[l], fit_tokens);
      tk[l] = calib::key_objective_samples(test[l], false, inv_freq, test_tokens);
      tv[l] = calib::value_objective_samples(test[l], test_tokens);
    }
    std::optional<QuantizedMassMetric> mass_metric;
    if (key_metric_study) {
      mass_metric.emplace(L, Hkv, d, windows.sink_tokens, windows.recent_tokens);
      for (const auto& ids : fit_ids) runner.run_sequence(ids, *mass_metric);
    }
    std::cerr << ::fmt::format("forward passes: {:.1f} s\n", bench::seconds_since(t0));

    // o_proj metrics of each KV group (original value basis): the layer output error of a value error e read by
    // query head g with probability p is p·W_g e, W_g = o_proj columns of head g. WoSum assumes the group's heads
    // read a token independently (cross terms averaged out), WoCoherent that they read it with equal probability.
    std::vector<std::vector<double>> wo_sum(L), wo_coh(L);  // [L][Hkv*d*d]
    const oscar::fmt::TensorStore* store = model->weights();
    if (!store) throw Error("error_feedback_bench", "the model has no checkpoint weights (o_proj needed)");
    for (int64_t l = 0; l < L; ++l) {
      const std::string name = ::fmt::format("model.layers.{}.self_attn.o_proj.weight", l);
      const std::vector<float> w = oscar::fmt::to_f32(store->get(name));
      const int64_t hidden = cfg.hidden_size, cols = cfg.num_heads * d;
      if (static_cast<int64_t>(w.size()) != hidden * cols)
        throw Error(name, ::fmt::format("has {} values, expected {}x{}", w.size(), hidden, cols));
      const Eigen::Map<const Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>> wm(w.data(), hidden,
                                                                                                        cols);
      // Σ W_gᵀW_g is what `oscar calibrate --error-feedback kv` stores (lib/calib/ef_calibration.h).
      wo_sum[l] = calib::value_output_metric(w, hidden, cfg.num_heads, Hkv, d, name);
      for (int64_t h = 0; h < Hkv; ++h) {
        Eigen::MatrixXd sum = Eigen::MatrixXd::Zero(hidden, d);
        for (int64_t g = h * G; g < (h + 1) * G; ++g) sum += wm.block(0, g * d, hidden, d).cast<double>();
        const RowMatD c = sum.transpose() * sum;
        wo_coh[l].insert(wo_coh[l].end(), c.data(), c.data() + d * d);
      }
    }

    const std::vector<float> rtn_grid = {0.80f, 0.84f, 0.88f, 0.90f, 0.92f, 0.94f, 0.96f, 0.98f, 1.0f};
    struct Variant {
      std::string name;
      double k_damp = -1;  // < 0: RTN keys
      VMetric v = VMetric::None;
      double v_damp = 0.01;
      bool retune_k_clip = false;
      bool drop_k_tables = false;  // RTN keys at the clip the EF retune picked: separates the clip from the rounding
      float fixed_k_clip = 0, fixed_v_clip = 0;  // > 0: override the RTN-tuned clips (the yardstick's 0.96 / 0.92)
      int refit_iters = 0;                       // ErrorFeedbackOptions::refit_iters of every table
      bool refit_reround = true;                 // ErrorFeedbackOptions::refit_reround
      int refit_tensors = 3;                     // which tables refit: 1 keys, 2 values, 3 both
      std::vector<float> token_clips = {};       // ErrorFeedbackOptions::token_clips
      int token_clip_tensors = 0;                // which tables search per-token clips: 1 keys, 2 values, 3 both
      bool mass_key_metric = false;              // key tables from QuantizedMassMetric instead of Σ_Q
      int32_t k_bits = 2, v_bits = 2;            // whole-head widths (--split-study)
    };
    std::vector<Variant> variants = {{"RTN"}};
    const double d0 = damps[0];
    if (split_study.empty() && (!transform_study.empty() || !outlier_study.empty())) {
      // Only the yardstick and the default's rounding; the treatments add their rows to each.
      const float kc = study_clips[0], vc = study_clips[1];
      variants = {{::fmt::format("RTN, clip {} / {}", kc, vc), -1, VMetric::None, d0, false, false, kc, vc}};
      variants.push_back({::fmt::format("EF K+V (damp {}), clip {} / {}", d0, kc, vc), d0, VMetric::WoSum, d0, false,
                          false, kc, vc});
    } else if (!split_study.empty()) {
      const float kc = study_clips[0], vc = study_clips[1];
      const float skc = split_clips[0], svc = split_clips[1];
      const int32_t kb = split_study[0], vb = split_study[1];
      for (int32_t b : {kb, vb})
        if (b < 1 || b > 4) throw Error("--split-study", ::fmt::format("width {} is not 1..4", b));
      variants = {{::fmt::format("RTN 2/2 bits, clip {} / {}", kc, vc), -1, VMetric::None, d0, false, false, kc, vc}};
      variants.push_back({::fmt::format("EF K+V 2/2 bits (damp {}), clip {} / {}", d0, kc, vc), d0, VMetric::WoSum,
                          d0, false, false, kc, vc});
      Variant r{::fmt::format("RTN {}/{} bits, clip {} / {}", kb, vb, skc, svc), -1, VMetric::None, d0, false, false,
                skc, svc};
      r.k_bits = kb, r.v_bits = vb;
      variants.push_back(r);
      Variant e{::fmt::format("EF K+V {}/{} bits (damp {}), clip {} / {}", kb, vb, d0, skc, svc), d0, VMetric::WoSum,
                d0, false, false, skc, svc};
      e.k_bits = kb, e.v_bits = vb;
      variants.push_back(e);
    } else if (key_metric_study) {
      const float kc = study_clips[0], vc = study_clips[1];
      variants = {{::fmt::format("RTN, clip {} / {}", kc, vc), -1, VMetric::None, d0, false, false, kc, vc}};
      for (bool mass : {false, true}) {
        Variant v{::fmt::format("EF K+V (damp {}, V Σ_g W_gᵀW_g), clip {} / {}, key metric {}", d0, kc, vc,
                                mass ? "Σ_q m_q q qᵀ" : "Σ_Q"),
                  d0, VMetric::WoSum, d0, false, false, kc, vc};
        v.mass_key_metric = mass;
        variants.push_back(v);
      }
    } else if (!token_clip_study.empty()) {
      const float kc = study_clips[0], vc = study_clips[1];
      variants = {{::fmt::format("RTN, clip {} / {}", kc, vc), -1, VMetric::None, d0, false, false, kc, vc}};
      for (int tensors : {0, 1, 3})
        variants.push_back({::fmt::format("EF K+V (damp {}, V Σ_g W_gᵀW_g), clip {} / {}, per-token clips {{{}}} on {}",
                                          d0, kc, vc, ::fmt::join(token_clip_study, ","),
                                          tensors == 0 ? "none" : tensors == 1 ? "K" : "K and V"),
                            d0, VMetric::WoSum, d0, false, false, kc, vc, 0, true, 3, token_clip_study, tensors});
    } else if (refit_study > 0) {
      const float kc = study_clips[0], vc = study_clips[1];
      variants = {{::fmt::format("RTN, clip {} / {}", kc, vc), -1, VMetric::None, d0, false, false, kc, vc}};
      for (int r : {0, refit_study})
        variants.push_back({::fmt::format("EF K+V (damp {}, V Σ_g W_gᵀW_g), clip {} / {}, refit {}", d0, kc, vc, r),
                            d0, VMetric::WoSum, d0, false, false, kc, vc, r});
      variants.push_back({::fmt::format("EF K+V (damp {}, V Σ_g W_gᵀW_g), clip {} / {}, params refit, codes kept", d0,
                                        kc, vc),
                          d0, VMetric::WoSum, d0, false, false, kc, vc, 1, false});
      for (int tensors : {1, 2})
        variants.push_back({::fmt::format("EF K+V (damp {}, V Σ_g W_gᵀW_g), clip {} / {}, refit {} on {} only", d0, kc,
                                          vc, refit_study, tensors == 1 ? "K" : "V"),
                            d0, VMetric::WoSum, d0, false, false, kc, vc, refit_study, true, tensors});
    } else if (clip_study) {
      variants.push_back({::fmt::format("EF K (damp {})", d0), d0});
      variants.push_back({::fmt::format("EF K (damp {}), K clip retuned under EF", d0), d0, VMetric::None, d0, true});
      variants.push_back({"RTN, K clip = the EF retune's", d0, VMetric::None, d0, true, true});
      variants.push_back({"RTN, clip 0.96 / 0.92", -1, VMetric::None, d0, false, false, 0.96f, 0.92f});
      variants.push_back({::fmt::format("EF K (damp {}), clip 0.96 / 0.92", d0), d0, VMetric::None, d0, false, false,
                          0.96f, 0.92f});
      variants.push_back({::fmt::format("EF K+V (damp {}, V Σ_g W_gᵀW_g), clip 0.96 / 0.92", d0), d0, VMetric::WoSum,
                          d0, false, false, 0.96f, 0.92f});
    }
    const bool study =
        clip_study || refit_study || !token_clip_study.empty() || key_metric_study || !split_study.empty() ||
        !transform_study.empty() || !outlier_study.empty();
    for (size_t i = 0; i < (quick || study ? 0 : damps.size()); ++i)
      variants.push_back({::fmt::format("EF K (damp {})", damps[i]), damps[i]});
    if (quick) variants.push_back({::fmt::format("EF K (damp {})", d0), d0});
    if (!quick && !study) {
      for (VMetric vm : {VMetric::WoSum, VMetric::WoCoherent})
        variants.push_back({::fmt::format("EF K+V (damp {}, V metric {})", damps[0], vmetric_name(vm)), damps[0], vm,
                            damps[0]});
      variants.push_back({::fmt::format("EF K (damp {}), K clip retuned under EF", damps[0]), damps[0], VMetric::None,
                          damps[0], true});
    }

    std::cout << ::fmt::format("\n{} layers, head_dim {}, {} KV heads x {} query heads; whole-head INT2 (2.25 "
                               "bits/element) in every row; errors on held-out text, mean over layers\n\n",
                               L, d, Hkv, G);
    std::cout << "| rotation | rounding | K rel. logit MSE | V rel. output MSE (I) | V rel. o_proj MSE (Σ W_gᵀW_g) | "
                 "K clips |\n|---|---|---|---|---|---|\n";

    struct Row {
      std::string name;
      oscar::fmt::Bundle bundle;
      Tables k_tables, v_tables;
      int32_t k_bits = 2, v_bits = 2;
    };
    std::vector<Row> rows;
    for (const std::string& rot_name : rotations) {
      const auto t = std::chrono::steady_clock::now();
      calib::RotationKind kind = rot_name == "hadamard" ? calib::RotationKind::Hadamard
                                 : rot_name == "oscar"  ? calib::RotationKind::EigenHadamard
                                 : rot_name == "eigen"  ? calib::RotationKind::Eigen
                                                        : throw Error("--rotations", "unknown rotation " + rot_name);
      // The same rotations as spectral_ablation_bench's rows, from the same fit statistics.
      const std::vector<calib::LayerChoice> base = bench::uniform_layers(kind, fk, fv, rtn_grid, nullptr);
      for (const Variant& var : variants) {
        Row row{::fmt::format("{} + tuned clip, {}", rot_name, var.name), {}, Tables(L), Tables(L), var.k_bits,
                var.v_bits};
        std::vector<calib::LayerChoice> layers = base;
        double ke = 0, ve = 0, vwo = 0;
        std::string clips;
        for (int64_t l = 0; l < L; ++l) {
          calib::LayerChoice& lc = layers[l];
          const std::vector<float> rk(lc.k.rotation.begin(), lc.k.rotation.end());
          const std::vector<float> rv(lc.v.rotation.begin(), lc.v.rotation.end());
          auto& kt = row.k_tables[l];
          auto& vt = row.v_tables[l];
          kt.resize(Hkv);
          vt.resize(Hkv);
          calib::ErrorFeedbackOptions ko;
          ko.feedback_clip_error = clip_feedback;
          ko.damp = var.k_damp;
          ko.refit_iters = var.refit_tensors & 1 ? var.refit_iters : 0;
          ko.refit_reround = var.refit_reround;
          if (var.token_clip_tensors & 1) ko.token_clips = var.token_clips;
          // Tables come from the FIT text's Σ_Q (what a bundle would store), scored on held-out Σ_Q.
          if (var.k_damp >= 0) {
            const std::vector<double> mass = var.mass_key_metric ? mass_metric->metric(l) : std::vector<double>{};
            for (int64_t h = 0; h < Hkv; ++h) {
              const std::vector<double> m =
                  var.mass_key_metric ? std::vector<double>(mass.begin() + h * d * d, mass.begin() + (h + 1) * d * d)
                                      : calib::effective_metric(fk[l], h);
              kt[h] = calib::error_feedback_table(calib::metric_in_basis(m, lc.k.rotation, d), d, ko,
                                                  ::fmt::format("layer {} K head {}", l, h));
            }
          }
          if (var.v != VMetric::None) {
            calib::ErrorFeedbackOptions vo = ko;
            vo.damp = var.v_damp;
            vo.refit_iters = var.refit_tensors & 2 ? var.refit_iters : 0;
            vo.token_clips = var.token_clip_tensors & 2 ? var.token_clips : std::vector<float>{};
            const auto& src = var.v == VMetric::WoSum ? wo_sum[l] : wo_coh[l];
            for (int64_t h = 0; h < Hkv; ++h)
              vt[h] = calib::error_feedback_table(
                  calib::metric_in_basis(std::span<const double>(src).subspan(h * d * d, d * d), lc.v.rotation, d), d,
                  vo, ::fmt::format("layer {} V head {}", l, h));
          }
          if (var.retune_k_clip) {
            double best = 1e300;
            float best_clip = lc.k.spec.clip_ratio;
            const auto fm = per_head(fk[l].metric, Hkv, d);
            for (float c : ef_clip_grid) {
              const double j = relative_error(fk[l], fm, rk, c, &kt);
              if (j < best || (j == best && c > best_clip)) best = j, best_clip = c;
            }
            lc.k.spec.clip_ratio = best_clip;
            if (var.drop_k_tables)
              for (auto& t : kt) t.reset();
          }
          if (var.fixed_k_clip > 0) lc.k.spec.clip_ratio = var.fixed_k_clip;
          if (var.fixed_v_clip > 0) lc.v.spec.clip_ratio = var.fixed_v_clip;
          clips += ::fmt::format("{}{:.2f}", l ? "," : "", lc.k.spec.clip_ratio);
          ke += relative_error(tk[l], per_head(tk[l].metric, Hkv, d), rk, lc.k.spec.clip_ratio, &kt, var.k_bits) / L;
          ve += relative_error(tv[l], {}, rv, lc.v.spec.clip_ratio, &vt, var.v_bits) / L;
          vwo += relative_error(tv[l], per_head(wo_sum[l], Hkv, d), rv, lc.v.spec.clip_ratio, &vt, var.v_bits) / L;
          if (var.k_damp < 0 && var.v == VMetric::None && l == 0) {
            // RTN through relative_error must be the ablation's objective: a check on this bench's scoring.
            const double ref = calib::quantization_objective(tk[l], lc.k.rotation, lc.k.spec, lc.k.spec.clip_ratio);
            std::cerr << ::fmt::format("check: layer 0 K RTN objective {:.6f} (bench) vs {:.6f} (calib)\n",
                                       relative_error(tk[l], per_head(tk[l].metric, Hkv, d), rk,
                                                      lc.k.spec.clip_ratio, nullptr),
                                       ref);
          }
        }
        std::cout << ::fmt::format("| {} | {} | {:.5f} | {:.5f} | {:.5f} | {} |\n", rot_name, var.name, ke, ve, vwo,
                                   clips);
        std::cout.flush();
        row.bundle.producer = "error_feedback_bench";
        row.bundle.model = {"error-feedback", L, cfg.num_heads, cfg.num_kv_heads, d,
                            cfg.hidden_size, cfg.vocab_size, std::string(64, '0'), std::string(64, '0')};
        row.bundle.quant = oscar::fmt::KvQuantSpec::int2_default(d);
        row.bundle.rotation_composition = "spectral";
        for (const auto& lc : layers) row.bundle.layers.push_back(calib::to_layer_calibration(lc, row.bundle.quant));
        rows.push_back(std::move(row));
      }
      std::cerr << ::fmt::format("{}: {:.1f} s\n", rot_name, bench::seconds_since(t));
    }

    if (kl) {
      eval::ModeOptions mo;
      mo.windows = {windows.sink_tokens, windows.recent_tokens};
      const int64_t first = eval::first_query_reading_quantized(mo.windows);
      auto bf16 = eval::CacheFormat::create(eval::CacheMode::BF16, cfg, mo);
      std::vector<std::vector<float>> ref;
      for (const auto& ids : test_ids) ref.push_back(eval::simulated_logits(*model, *bf16, ids));
      std::cout << ::fmt::format("\nKL(BF16 ‖ mode) at positions >= {} (context {}, {} held-out sequences, sink {} + "
                                 "recent {} bf16 for every row)\n\n| configuration | mean KL | p99 KL | top-1 "
                                 "agreement |\n|---|---|---|---|\n",
                                 first, test_len, test_ids.size(), mo.windows.sink, mo.windows.recent);
      enum class Treat { AsIs, BiasCorrected, ExactKeys, ExactValues, Outliers, Transform };
      struct TreatRow {
        Treat treat;
        std::string name;
        double param = 0;  // Treat::Outliers: the fraction of tokens kept exact; Treat::Transform: α
      };
      std::vector<TreatRow> treats = {{Treat::AsIs, ""}};
      if (bias_study) {
        treats.push_back({Treat::BiasCorrected, ", fit-text bias subtracted"});
        treats.push_back({Treat::ExactKeys, ", keys exact"});
        treats.push_back({Treat::ExactValues, ", values exact"});
      }
      for (double f : outlier_study) {
        if (!(f > 0 && f < 1)) throw Error("--outlier-study", ::fmt::format("fraction {} is not in (0, 1)", f));
        treats.push_back({Treat::Outliers, ::fmt::format(", top {}% tokens by error in M exact", 100 * f), f});
      }
      for (double a : transform_study) {
        if (!(a >= 0 && a <= 1)) throw Error("--transform-study", ::fmt::format("α {} is not in [0, 1]", a));
        const std::string centered = transform_center == "kv"     ? "centered, "
                                     : transform_center == "none" ? ""
                                                                  : transform_center + " centered, ";
        treats.push_back({Treat::Transform,
                          ::fmt::format(", {} {}{}× Σ^(-{}/2){}", transform_keys_only ? "K" : "K, V",
                                        transform_shared ? "(shared) " : "", centered, a,
                                        transform_v_alpha >= 0 ? ::fmt::format(" (V: α {})", transform_v_alpha) : ""),
                          a});
      }
      calib::ErrorFeedbackOptions ef_opts;  // --transform-study's tables: the rows' damping and clip feedback
      ef_opts.feedback_clip_error = clip_feedback;
      ef_opts.damp = damps[0];
      // The metric each tensor's error is ranked in: the fit text's, original basis, [Hkv][d*d] per layer.
      std::vector<std::vector<double>> key_metric(L);
      if (!outlier_study.empty() || !transform_study.empty())
        for (int64_t l = 0; l < L; ++l)
          for (int64_t h = 0; h < Hkv; ++h) {
            const auto m = calib::effective_metric(fk[l], h);
            key_metric[l].insert(key_metric[l].end(), m.begin(), m.end());
          }
      for (const Row& row : rows)
        for (const auto& [treat, treat_name, param] : treats) {
        const auto t = std::chrono::steady_clock::now();
        mo.bundle = &row.bundle;
        // Mean error x̂ - x over the fit samples, per (keys, layer, KV head): computed on first use with the rotation
        // and clip the cache hands the hook (the cache below lives only in this iteration).
        std::map<std::tuple<bool, int64_t, int64_t>, std::vector<double>> bias;
        std::map<std::tuple<double, bool, int64_t, int64_t>, Transform> transforms;
        mo.rounding_hook = [&, treat = treat, param = param](bool keys, int64_t layer, int64_t kv_head, std::span<const float> x,
                                              int64_t tokens, std::span<const float> rotation, float clip,
                                              std::span<float> out) {
          if ((treat == Treat::ExactKeys && keys) || (treat == Treat::ExactValues && !keys)) {
            std::copy(x.begin(), x.end(), out.begin());
            return true;
          }
          const auto& tab = (keys ? row.k_tables : row.v_tables)[layer][kv_head];
          const int32_t bits = keys ? row.k_bits : row.v_bits;
          if (treat == Treat::Transform && (keys || !transform_keys_only)) {
            auto& tf = transforms[{param, keys, layer, kv_head}];
            if (tf.head.dim == 0) {
              const auto& metric = keys ? key_metric[layer] : wo_sum[layer];
              const double alpha = !keys && transform_v_alpha >= 0 ? transform_v_alpha : param;
              tf = make_transform((keys ? fk : fv)[layer], kv_head, alpha, transform_center.find(keys ? 'k' : 'v') != std::string::npos,
                                  transform_shared, rotation,
                                  std::span<const double>(metric).subspan(kv_head * d * d, d * d),
                                  tab ? std::optional<calib::ErrorFeedbackOptions>(ef_opts) : std::nullopt);
            }
            transform_fake_quantize(tf, x, tokens, clip, bits, out);
            return true;
          }
          if (treat == Treat::AsIs && !tab && bits == 2) return false;
          const calib::ErrorFeedbackTable* table = tab ? &*tab : nullptr;
          fake_quantize(table, x, tokens, rotation, clip, out, bits);
          if (treat == Treat::Outliers) {
            const auto& metric = keys ? key_metric[layer] : wo_sum[layer];
            const Eigen::Map<const RowMatD> m(metric.data() + kv_head * d * d, d, d);
            std::vector<std::pair<double, int64_t>> err(static_cast<size_t>(tokens));
            Eigen::VectorXd e(d);
            for (int64_t r = 0; r < tokens; ++r) {
              for (int64_t i = 0; i < d; ++i) e(i) = static_cast<double>(out[r * d + i]) - x[r * d + i];
              err[r] = {e.dot(m * e), r};
            }
            const auto keep = static_cast<size_t>(std::llround(param * static_cast<double>(tokens)));
            std::partial_sort(err.begin(), err.begin() + keep, err.end(), std::greater<>());
            for (size_t q = 0; q < keep; ++q) {
              const int64_t r = err[q].second;
              std::copy(x.begin() + r * d, x.begin() + (r + 1) * d, out.begin() + r * d);
            }
            return true;
          }
          if (treat != Treat::BiasCorrected) return true;
          auto& b = bias[{keys, layer, kv_head}];
          if (b.empty()) {
            const calib::ObjectiveSamples& fs = (keys ? fk : fv)[layer];
            const int64_t n = fs.tokens;
            std::span<const float> fx(fs.x.data() + kv_head * n * d, n * d);
            std::vector<float> fq(fx.size());
            fake_quantize(table, fx, n, rotation, clip, fq, bits);
            b.assign(d, 0.0);
            for (int64_t r = 0; r < n; ++r)
              for (int64_t i = 0; i < d; ++i) b[i] += (static_cast<double>(fq[r * d + i]) - fx[r * d + i]) / n;
          }
          for (int64_t r = 0; r < tokens; ++r)
            for (int64_t i = 0; i < d; ++i) out[r * d + i] = static_cast<float>(out[r * d + i] - b[i]);
          return true;
        };
        const auto f = eval::CacheFormat::create(eval::CacheMode::Oscar, cfg, mo);
        const auto sum = bench::summarize_beyond(*model, *f, test_ids, ref, first);
        std::cout << ::fmt::format("| {}{} | {:.5f} | {:.4f} | {:.4f} |\n", row.name, treat_name, sum.kl_mean,
                                   sum.kl_p99, sum.top1_agreement);
        std::cout.flush();
        std::cerr << ::fmt::format("KL {}{}: {:.1f} s\n", row.name, treat_name, bench::seconds_since(t));
      }
    }
    std::cerr << ::fmt::format("total {:.1f} s\n", bench::seconds_since(t0));
  } catch (const Error& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
