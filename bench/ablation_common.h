#pragma once
// The fit / held-out machinery spectral_ablation_bench and error_feedback_bench share: the fixture texts packed
// into unshuffled sequences, one CPU forward pass collecting every layer's attention samples, and the whole-head
// INT2 layers of a rotation kind built from the fit samples' metrics (so both benches start from the same rotations),
// and the KL of a simulated cache against the BF16 one beyond the windows.
#include <CLI/CLI.hpp>

#include <chrono>
#include <filesystem>
#include <span>
#include <string>
#include <vector>

#include "datasets/pack.h"
#include "formats/tokenizer.h"
#include "lib/calib/calibrator.h"
#include "lib/calib/rotation.h"
#include "lib/calib/rotation_opt.h"
#include "lib/calib/spectral.h"
#include "lib/eval/cache_modes.h"
#include "lib/eval/evaluator.h"
#include "lib/eval/metrics.h"
#include "lib/model/cpu_model.h"

namespace oscar::bench {

// The fit / held-out split both benches take from the command line, with the same defaults.
struct SplitOptions {
  std::filesystem::path model_dir, text_dir;
  int64_t seq_len = 1024, fit_seqs = 2, heldout_seqs = 1, fit_tokens = 2048, test_tokens = 4096;
  bool kl = false;
};

inline void add_split_options(CLI::App& app, SplitOptions& o) {
  app.add_option("--model", o.model_dir, "Hugging Face checkpoint directory")->required();
  app.add_option("--text", o.text_dir, "directory with the fixture texts (PROVENANCE.md)")->required();
  app.add_option("--seq-len", o.seq_len, "tokens per sequence (also the KL context)");
  app.add_option("--fit-seqs", o.fit_seqs, "calibration sequences per training text");
  app.add_option("--heldout-seqs", o.heldout_seqs, "held-out sequences per held-out text");
  app.add_option("--fit-tokens", o.fit_tokens, "samples per KV head used for fitting (strided subsample)");
  app.add_option("--test-tokens", o.test_tokens, "samples per KV head used for the held-out error");
  app.add_flag("--kl", o.kl, "also measure KL to BF16 with lib/eval's simulated cache");
}

// Σ_Q the rotations are built from: the mean over KV heads of each head's effective metric.
inline std::vector<double> mean_metric(const calib::ObjectiveSamples& s) {
  const int64_t d = s.dim;
  std::vector<double> m(static_cast<size_t>(d * d), 0.0);
  for (int64_t h = 0; h < s.heads; ++h) {
    const auto e = calib::effective_metric(s, h);
    for (size_t i = 0; i < m.size(); ++i) m[i] += e[i] / static_cast<double>(s.heads);
  }
  return m;
}

// Σ_V: the token-weighted value covariance over every head's samples.
inline std::vector<double> weighted_covariance(const calib::ObjectiveSamples& s) {
  const int64_t d = s.dim, n = s.tokens;
  std::vector<double> c(static_cast<size_t>(d * d), 0.0);
  double total = 0;
  for (int64_t h = 0; h < s.heads; ++h)
    for (int64_t t = 0; t < n; ++t) {
      const double w = s.token_weight.empty() ? 1.0 : s.token_weight[h * n + t];
      const float* x = s.x.data() + (h * n + t) * d;
      total += w;
      for (int64_t i = 0; i < d; ++i)
        for (int64_t j = 0; j < d; ++j) c[i * d + j] += w * x[i] * x[j];
    }
  for (double& x : c) x /= total;
  return c;
}

inline double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// `per_file` unshuffled sequences of `seq_len` tokens from each file (names under text_dir), files in order.
inline std::vector<std::vector<int32_t>> pack_texts(const std::filesystem::path& text_dir,
                                                    const std::vector<std::string>& files, int64_t per_file,
                                                    int64_t seq_len, const fmt::Tokenizer& tokenizer) {
  std::vector<std::vector<int32_t>> seqs;
  for (const auto& f : files) {
    data::PackOptions po;
    po.seq_len = seq_len;
    po.num_seqs = per_file;
    po.shuffle = false;
    const auto ds = data::pack_dataset({(text_dir / f).string()}, &tokenizer, {}, po);
    for (int64_t i = 0; i < ds.num_seqs(); ++i) {
      const auto s = ds.sequence(i);
      seqs.emplace_back(s.begin(), s.end());
    }
  }
  return seqs;
}

// Every layer's attention samples of `seqs` (query-energy value weighting, the sink excluded), one forward each.
inline auto collect_samples(calib::ForwardRunner& runner, const calib::StatisticsShape& shape, int64_t sink_tokens,
                            const std::vector<std::vector<int32_t>>& seqs, int64_t seq_len) {
  calib::LayerSampleCollector c(shape, calib::ValueWeighting::QueryEnergy, sink_tokens,
                                static_cast<int64_t>(seqs.size()) * seq_len);
  for (size_t i = 0; i < seqs.size(); ++i) {
    c.begin_sequence(static_cast<int64_t>(i));
    runner.run_sequence(seqs[i], c);
  }
  return c.finish();
}

// Whole-head INT2 layers of one rotation kind, built from the fit samples' Σ_Q / Σ_V, clips tuned on `clips`.
inline std::vector<calib::LayerChoice> uniform_layers(calib::RotationKind kind,
                                                      const std::vector<calib::ObjectiveSamples>& keys,
                                                      const std::vector<calib::ObjectiveSamples>& values,
                                                      std::span<const float> clips,
                                                      const calib::CayleyOptions* refine) {
  std::vector<calib::LayerChoice> layers;
  for (size_t l = 0; l < keys.size(); ++l) {
    const int64_t d = keys[l].dim;
    const auto ek = calib::symmetric_eigen(mean_metric(keys[l]), d, "Σ_Q");
    const auto ev = calib::symmetric_eigen(weighted_covariance(values[l]), d, "Σ_V");
    layers.push_back(calib::uniform_layer(keys[l], values[l], calib::build_rotation(kind, ek, d),
                                          calib::build_rotation(kind, ev, d), 2, clips, refine));
  }
  return layers;
}

// KL(BF16 ‖ format), p99 and top-1 over the positions >= first of every sequence (ref[s]: sequence s's logits
// through the BF16 cache, as eval::simulated_logits returns them).
inline eval::MetricSummary summarize_beyond(model::CpuModel& model, const eval::CacheFormat& format,
                                            const std::vector<std::vector<int32_t>>& seqs,
                                            const std::vector<std::vector<float>>& ref, int64_t first) {
  const int64_t V = model.config().vocab_size;
  std::vector<eval::PositionMetrics> all;
  for (size_t s = 0; s < seqs.size(); ++s) {
    const auto& ids = seqs[s];
    const auto logits = eval::simulated_logits(model, format, ids);
    const auto n = static_cast<int64_t>(ids.size());
    const std::vector<int32_t> targets(ids.begin() + first + 1, ids.end());
    const auto pm = eval::compare_positions(std::span<const float>(ref[s]).subspan(first * V, (n - 1 - first) * V),
                                            std::span<const float>(logits).subspan(first * V, (n - 1 - first) * V),
                                            V, targets);
    all.insert(all.end(), pm.begin(), pm.end());
  }
  return eval::summarize(all);
}

}  // namespace oscar::bench
