#include "lib/calib/kl_selection.h"

#include <fmt/format.h>

#include "formats/error.h"
#include "lib/eval/cache_modes.h"
#include "lib/eval/evaluator.h"
#include "lib/eval/metrics.h"

namespace oscar::calib {

BeyondWindowKl::BeyondWindowKl(model::CpuModel& model, std::vector<std::vector<int32_t>> sequences, int64_t sink,
                               int64_t recent, const std::string& where)
    : model_(&model), sequences_(std::move(sequences)), sink_(sink), recent_(recent), from_(sink + recent) {
  if (sequences_.empty()) throw Error(where, "no selection sequence to score");
  const fmt::ModelConfig& cfg = model.config();
  eval::ModeOptions mo;
  mo.windows = {sink_, recent_};
  const auto bf16 = eval::CacheFormat::create(eval::CacheMode::BF16, cfg, mo, where);
  const size_t vocab = static_cast<size_t>(cfg.vocab_size);
  for (size_t s = 0; s < sequences_.size(); ++s) {
    const int64_t T = static_cast<int64_t>(sequences_[s].size());
    if (T - 1 <= from_)
      throw Error(where, ::fmt::format("selection sequence {} has {} tokens: no prediction beyond the bf16 windows "
                                       "(sink {} + recent {}) to score",
                                       s, T, sink_, recent_));
    std::vector<float> logits = eval::simulated_logits(model, *bf16, sequences_[s]);
    // Only the scored rows are kept: at a 150K vocabulary a whole 1K sequence's logits are 600 MB.
    reference_.emplace_back(logits.begin() + static_cast<ptrdiff_t>(from_ * vocab),
                            logits.begin() + static_cast<ptrdiff_t>((T - 1) * vocab));
    positions_ += T - 1 - from_;
  }
}

double BeyondWindowKl::operator()(const fmt::Bundle& bundle) const {
  if (bundle.quant.sink_tokens != sink_ || bundle.quant.recent_tokens != recent_)
    throw Error("BeyondWindowKl", ::fmt::format("bundle windows {}+{} differ from the scorer's {}+{}",
                                                bundle.quant.sink_tokens, bundle.quant.recent_tokens, sink_, recent_));
  const fmt::ModelConfig& cfg = model_->config();
  eval::ModeOptions mo;
  mo.windows = {sink_, recent_};
  mo.bundle = &bundle;
  const auto format = eval::CacheFormat::create(eval::CacheMode::Oscar, cfg, mo, "--candidate-metric kl");
  const size_t vocab = static_cast<size_t>(cfg.vocab_size);
  double sum = 0;  // in sequence, then position order: deterministic
  for (size_t s = 0; s < sequences_.size(); ++s) {
    const auto& ids = sequences_[s];
    const std::vector<float> logits = eval::simulated_logits(*model_, *format, ids);
    const size_t T = ids.size(), from = static_cast<size_t>(from_);
    const std::span<const float> rows(logits.data() + from * vocab, (T - 1 - from) * vocab);
    const std::span<const int32_t> targets(ids.data() + from + 1, T - 1 - from);
    for (const eval::PositionMetrics& p : eval::compare_positions(reference_[s], rows, cfg.vocab_size, targets))
      sum += p.kl;
  }
  return sum / static_cast<double>(positions_);
}

void choose_layers_by_kl(LayerSelection& sel, const std::vector<std::vector<fmt::LayerCalibration>>& layers,
                         const fmt::Bundle& base, const BeyondWindowKl& kl, double tolerance) {
  const size_t C = sel.candidates.size(), L = sel.chosen.size();
  if (layers.size() != C || C == 0)
    throw Error("choose_layers_by_kl", ::fmt::format("{} candidates but {} layer sets", C, layers.size()));
  fmt::Bundle b = base;
  b.rotation_groups = 1;
  b.layers.resize(L);
  for (size_t l = 0; l < L; ++l) {
    if (layers[sel.chosen[l]].size() != L) throw Error("choose_layers_by_kl", "a candidate does not cover every layer");
    b.layers[l] = layers[sel.chosen[l]][l];
  }
  sel.metric = CandidateMetric::Kl;
  sel.kl.assign(C, std::vector<double>(L, 0.0));
  double current = kl(b);
  sel.kl_start = current;
  for (size_t l = 0; l < L; ++l) {
    std::vector<double> k(C);
    std::vector<char> wh(C);
    for (size_t c = 0; c < C; ++c) {
      wh[c] = sel.whole_head[c][l];
      if (c == sel.chosen[l]) {
        k[c] = current;
        continue;
      }
      b.layers[l] = layers[c][l];
      k[c] = kl(b);
    }
    sel.chosen[l] = choose_layer_candidate(k, wh, tolerance);
    b.layers[l] = layers[sel.chosen[l]][l];
    current = k[sel.chosen[l]];
    for (size_t c = 0; c < C; ++c) sel.kl[c][l] = k[c];
  }
  sel.kl_final = current;
}

}  // namespace oscar::calib
