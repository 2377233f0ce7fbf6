#include "lib/calib/calibrator.h"

#include <fmt/format.h>

#include <algorithm>
#include <fstream>
#include <optional>
#include <sstream>

#include "formats/atomic_file.h"
#include "formats/error.h"
#include "formats/safetensors.h"
#include "lib/calib/error_report.h"
#include "lib/calib/kl_selection.h"
#include "lib/calib/rotation.h"
#include "lib/calib/rotation_opt.h"
#include "lib/calib/spectral.h"
#include "lib/calib/spectral_calibration.h"
#include "lib/model/cpu_model.h"
#include "oscar_version.h"

namespace oscar::calib {

namespace fs = std::filesystem;

void CpuForwardRunner::run_sequence(std::span<const int32_t> ids, model::Observer& observer) {
  model::KvCache cache(model_.config(), static_cast<int64_t>(ids.size()));
  model::ForwardOptions opt;
  opt.observer = &observer;
  opt.last_logits_only = true;  // calibration needs the attention inputs only
  model_.forward(ids, cache, opt);
}

namespace {

constexpr std::string_view kCheckpointMagic = "OSCARCKPT1\n";

std::string read_file_bytes(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path.string(), "cannot open statistics checkpoint");
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::vector<float> to_float(const std::vector<double>& v) { return std::vector<float>(v.begin(), v.end()); }

std::string format_ratio(float r) { return ::fmt::format("{:.6g}", r); }

// What the statistics depend on: the checkpoint is only continued when all of it is unchanged. Options that act
// after the statistics (clip tuning, per-head grouping) are left out on purpose, so they may change on --resume.
std::string checkpoint_key(const fmt::ModelFingerprint& fp, const CalibrationData& data, ValueWeighting weighting) {
  std::string text = ::fmt::format("{}|{}|{}|{}|{}|{}|{}|{}|{}|{}\n", fp.architecture, fp.num_layers, fp.num_heads,
                                   fp.num_kv_heads, fp.head_dim, fp.hidden_size, fp.vocab_size, fp.config_sha256,
                                   fp.attention_sha256, value_weighting_name(weighting));
  for (const auto& seq : data.sequences) {
    text += ::fmt::format("{}:", seq.size());
    text.append(reinterpret_cast<const char*>(seq.data()), seq.size() * sizeof(int32_t));
  }
  return fmt::sha256_hex(std::as_bytes(std::span<const char>(text.data(), text.size())));
}

void save_checkpoint(const fs::path& path, const std::string& key, StatisticsCollector& stats) {
  std::string bytes(kCheckpointMagic);
  bytes += key;
  bytes += '\n';
  bytes += stats.serialize();
  fmt::write_file_atomic(path, bytes);
}

StatisticsCollector load_checkpoint(const fs::path& path, const std::string& key, const StatisticsShape& shape,
                                    ValueWeighting weighting) {
  const std::string bytes = read_file_bytes(path);
  const size_t header = kCheckpointMagic.size() + key.size() + 1;
  if (bytes.size() < header || bytes.compare(0, kCheckpointMagic.size(), kCheckpointMagic) != 0)
    throw Error(path.string(), "not an OSCAR calibration checkpoint (bad magic)");
  if (bytes.compare(kCheckpointMagic.size(), key.size(), key) != 0 || bytes[header - 1] != '\n')
    throw Error(path.string(), "checkpoint was made for another model, value weighting or calibration data "
                               "(delete it or drop --resume)");
  StatisticsCollector stats =
      StatisticsCollector::deserialize(std::string_view(bytes).substr(header), path.string());
  if (!(stats.shape() == shape) || stats.weighting() != weighting)
    throw Error(path.string(), "checkpoint was made for another model shape or value weighting");
  return stats;
}

// Runs every sequence not yet in `stats`, checkpointing as configured.
void run_pass(ForwardRunner& runner, StatisticsCollector& stats, const CalibrationData& data,
              const CalibrationOptions& opt, const std::string& key, std::string_view stage) {
  const int64_t n = static_cast<int64_t>(data.sequences.size());
  int64_t since_checkpoint = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (stats.contains_sequence(i)) continue;
    stats.begin_sequence(i);
    runner.run_sequence(data.sequences[i], stats);
    stats.finish_sequence();
    if (opt.progress) opt.progress(stage, stats.num_sequences(), n);
    if (!opt.checkpoint.empty() && opt.checkpoint_every > 0 && ++since_checkpoint == opt.checkpoint_every) {
      save_checkpoint(opt.checkpoint, key, stats);
      since_checkpoint = 0;
    }
  }
  if (!opt.checkpoint.empty()) save_checkpoint(opt.checkpoint, key, stats);
}

void check_sequences(const std::vector<std::vector<int32_t>>& seqs, const fmt::ModelConfig& cfg,
                     const std::string& what) {
  for (size_t i = 0; i < seqs.size(); ++i) {
    const std::string where = ::fmt::format("{} sequence {}", what, i);
    if (seqs[i].empty()) throw Error(where, "is empty");
    if (cfg.max_position_embeddings > 0 && static_cast<int64_t>(seqs[i].size()) > cfg.max_position_embeddings)
      throw Error(where, ::fmt::format("has {} tokens, more than max_position_embeddings {}", seqs[i].size(),
                                       cfg.max_position_embeddings));
  }
}

// Hands every attention input to two observers (the second may be null).
struct TeeObserver : model::Observer {
  TeeObserver(model::Observer* a, model::Observer* b) : first(a), second(b) {}
  void on_attention_inputs(const model::AttentionInputs& in) override {
    first->on_attention_inputs(in);
    if (second) second->on_attention_inputs(in);
  }
  model::Observer* first;
  model::Observer* second;
};

// The whole-head INT2 layers the spectral stage may store instead of its layout (LayerCandidate).
struct WholeHeadCandidates {
  std::vector<fmt::LayerCalibration> published;  // the published stage's layers (rotation, clip, eigenvalues)
  std::vector<fmt::LayerCalibration> hadamard;    // empty when not asked for or head_dim is not 2^k
};

// --method spectral after the published report: fit + select (lib/calib/spectral_calibration.h), per layer the
// least-proxy candidate among the spectral layout and the whole-head ones (--candidates), score every candidate on
// all held-out samples (report rows "spectral" = what is stored, "spectral(k_weight=W)"), replace the bundle's
// layers by the chosen ones (keeping the calibration eigenvalues), and return the report section.
std::string spectral_stage(fmt::Bundle& b, const std::vector<HeldoutLayer>& heldout, std::vector<HeldoutLayer> fit,
                           std::vector<std::vector<AttentionSequence>> select, const fmt::ModelConfig& cfg,
                           int64_t groups, const CalibrationOptions& opt, const std::string& published_row,
                           const std::vector<std::vector<AttentionSequence>>& clip_sequences,
                           const WholeHeadCandidates& whole,
                           const std::vector<std::vector<int32_t>>& select_ids,
                           std::vector<std::pair<std::string, std::string>>& provenance) {
  const int64_t L = cfg.num_layers, d = cfg.head_dim;
  SpectralCalibrationOptions so = opt.spectral;
  so.spectral.align = spectral_align(d);
  so.tune_clip = opt.tune_clip;
  so.clip_objective = opt.clip_objective;
  so.clip_grid = opt.clip_grid;
  so.k_reference = opt.quant.k.clip_ratio;
  so.v_reference = opt.quant.v.clip_ratio;
  so.clip_queries = opt.clip_queries;
  const SpectralCalibration sc = spectral_calibration(fit, select, cfg.num_heads, opt.quant, so, clip_sequences);

  // The published bundle's proxy on the same selection sequences: the number the choice is compared with.
  double published_proxy = 0;
  std::vector<double> published_layer_proxy(static_cast<size_t>(L));
  for (int64_t l = 0; l < L; ++l) {
    published_layer_proxy[l] = attention_output_error(select[l], cfg.num_heads, cfg.num_kv_heads, d,
                                                      layer_quantization(b.layers[l], b.quant, groups),
                                                      opt.quant.sink_tokens, opt.quant.recent_tokens, so.proxy_queries)
                                   .relative();
    published_proxy += published_layer_proxy[l] / static_cast<double>(L);
  }

  // Per-layer candidates (only when asked for: with {spectral} alone the bundle is what it was before).
  const SpectralCandidate& best = sc.best();
  const bool per_layer = so.layer_candidates.size() > 1;
  std::vector<std::vector<fmt::LayerCalibration>> cand_layers;
  std::vector<std::vector<double>> cand_proxy;
  std::vector<LayerCandidate> cand_kinds;
  std::vector<std::string> skipped;
  const double whole_head_bits = 0.5 * (opt.quant.k.bits_per_element(d) + opt.quant.v.bits_per_element(d));
  for (LayerCandidate c : per_layer ? so.layer_candidates : std::vector<LayerCandidate>{}) {
    if (c == LayerCandidate::Spectral) {
      cand_kinds.push_back(c);
      cand_layers.emplace_back();
      for (int64_t l = 0; l < L; ++l) cand_layers.back().push_back(to_layer_calibration(best.layers[l], b.quant));
      cand_proxy.push_back(best.proxy);
      continue;
    }
    if (whole_head_bits > so.spectral.budget_bits_per_element + 1e-12) {
      skipped.push_back(::fmt::format("{} (whole-head INT2 costs {:.4g} bits/element, above --budget-bits {:.6g})",
                                      layer_candidate_name(c), whole_head_bits, so.spectral.budget_bits_per_element));
      continue;
    }
    if (c == LayerCandidate::Hadamard && whole.hadamard.empty()) {
      skipped.push_back(::fmt::format("hadamard (head_dim {} is not a power of two)", d));
      continue;
    }
    cand_kinds.push_back(c);
    cand_layers.push_back(c == LayerCandidate::Published ? whole.published : whole.hadamard);
    cand_proxy.push_back(c == LayerCandidate::Published ? published_layer_proxy : std::vector<double>{});
  }
  std::optional<LayerSelection> layer_sel;
  if (per_layer)
    layer_sel = select_layer_candidates(cand_kinds, cand_layers, cand_proxy, select, cfg.num_heads, b.quant,
                                        so.proxy_queries, so.whole_head_tolerance);
  // --candidate-metric kl: the proxy's choice is the start of one KL coordinate pass (kl_selection.h).
  std::optional<BeyondWindowKl> kl_scorer;
  if (per_layer && so.candidate_metric == CandidateMetric::Kl) {
    std::vector<std::vector<int32_t>> seqs;
    for (const auto& ids : select_ids) {
      if (so.kl_seqs > 0 && static_cast<int64_t>(seqs.size()) == so.kl_seqs) break;
      const size_t n = so.kl_tokens > 0 ? std::min(ids.size(), static_cast<size_t>(so.kl_tokens)) : ids.size();
      seqs.emplace_back(ids.begin(), ids.begin() + static_cast<ptrdiff_t>(n));
    }
    kl_scorer.emplace(*so.kl_model, std::move(seqs), opt.quant.sink_tokens, opt.quant.recent_tokens,
                      so.kl_tokens > 0 ? "--kl-tokens" : "--candidate-metric kl");
    choose_layers_by_kl(*layer_sel, cand_layers, b, *kl_scorer, so.whole_head_tolerance);
  }
  auto stored_kind = [&](int64_t l) {
    return layer_sel ? layer_sel->chosen_kind(static_cast<size_t>(l)) : LayerCandidate::Spectral;
  };

  // Held-out J_K / J_V of every candidate (same samples and held-out Σ_Q as the published rows).
  const size_t C = sc.candidates.size();
  std::vector<std::vector<double>> jk(C, std::vector<double>(L)), jv(C, std::vector<double>(L));
  for (int64_t l = 0; l < L; ++l) {
    LayerSamples ls;
    ls.base = heldout[l];
    const ObjectiveSamples keys = key_objective_samples(ls, false, {}, 0);
    const ObjectiveSamples values = value_objective_samples(ls, 0);
    for (size_t c = 0; c < C; ++c) {
      const LayerChoice& lc = sc.candidates[c].layers[l];
      jk[c][l] = quantization_objective(keys, lc.k.rotation, lc.k.spec, lc.k.spec.clip_ratio);
      jv[c][l] = quantization_objective(values, lc.v.rotation, lc.v.spec, lc.v.spec.clip_ratio);
    }
  }
  auto add_row = [&](const std::string& name, const std::vector<double>& k, const std::vector<double>& v) {
    b.errors.rows.push_back(name);
    b.errors.k_relative_error.insert(b.errors.k_relative_error.end(), k.begin(), k.end());
    b.errors.v_relative_error.insert(b.errors.v_relative_error.end(), v.begin(), v.end());
  };
  // What is stored: the chosen layout, or a whole-head layer scored by the published rows' metric.
  std::vector<double> stored_k = jk[sc.chosen], stored_v = jv[sc.chosen];
  std::vector<fmt::LayerCalibration> stored(static_cast<size_t>(L));
  for (int64_t l = 0; l < L; ++l) {
    const LayerCandidate kind = stored_kind(l);
    if (kind == LayerCandidate::Spectral) {
      stored[l] = to_layer_calibration(best.layers[l], b.quant);
      stored[l].k_eigenvalues = b.layers[l].k_eigenvalues;
      stored[l].v_eigenvalues = b.layers[l].v_eigenvalues;
      continue;
    }
    stored[l] = kind == LayerCandidate::Published ? whole.published[l] : whole.hadamard[l];
    const RotatedHeldout rotated(heldout[l], stored[l].k_rotation, stored[l].v_rotation, 1, b.quant);
    stored_k[l] = rotated.key_error(stored[l].k_clip_ratio);
    stored_v[l] = rotated.value_error(stored[l].v_clip_ratio);
  }
  add_row("spectral", stored_k, stored_v);
  if (C > 1)
    for (size_t c = 0; c < C; ++c)
      add_row(::fmt::format("spectral(k_weight={:.6g})", sc.candidates[c].k_weight), jk[c], jv[c]);
  else if (stored_k != jk[sc.chosen] || stored_v != jv[sc.chosen])
    add_row(::fmt::format("spectral(k_weight={:.6g})", best.k_weight), jk[sc.chosen], jv[sc.chosen]);

  for (int64_t l = 0; l < L; ++l) b.layers[l] = std::move(stored[l]);
  b.rotation_composition = "spectral";

  std::string selection;
  for (const auto& c : sc.candidates) selection += ::fmt::format("{}{:.6g}:{:.6g}", selection.empty() ? "" : ",", c.k_weight, c.proxy_mean);
  provenance.emplace_back("k_weight", ::fmt::format("{:.6g}", best.k_weight));
  provenance.emplace_back("k_weight_proxy", selection + ::fmt::format(",{}:{:.6g}", published_row, published_proxy));
  if (per_layer) {
    provenance.emplace_back("layer_choice", layer_choice_text(*layer_sel));
    provenance.emplace_back("layer_proxy", layer_proxy_text(*layer_sel));
    if (kl_scorer) {
      provenance.emplace_back("layer_kl", layer_kl_text(*layer_sel));
      provenance.emplace_back("kl_positions", std::to_string(kl_scorer->positions()));
    }
  }

  const int64_t n_select = select.empty() ? 0 : static_cast<int64_t>(select[0].size());
  std::string out = ::fmt::format(
      "\nSpectral allocation (budget {:.6g} bits/element incl. scale/zero, widths {}): K/V weight chosen on {} held-out "
      "calibration sequence(s) not used for fitting, by the relative attention-output error (mean over layers)\n\n"
      "| k_weight | bits/elem K | bits/elem V | attention-output error (selection) | K rel. logit MSE | V rel. output "
      "MSE |\n|---|---|---|---|---|---|\n",
      so.spectral.budget_bits_per_element, join_numbers(std::span<const int32_t>(so.spectral.widths)), n_select);
  for (size_t c = 0; c < C; ++c) {
    double kb = 0, vb = 0, k = 0, v = 0;
    for (int64_t l = 0; l < L; ++l) {
      kb += sc.candidates[c].layers[l].k.spec.bits_per_element(d) / static_cast<double>(L);
      vb += sc.candidates[c].layers[l].v.spec.bits_per_element(d) / static_cast<double>(L);
      k += jk[c][l] / static_cast<double>(L);
      v += jv[c][l] / static_cast<double>(L);
    }
    out += ::fmt::format("| {:.6g}{} | {:.3f} | {:.3f} | {:.5f} | {:.4f} | {:.4f} |\n", sc.candidates[c].k_weight,
                         c == sc.chosen ? " (chosen)" : "", kb, vb, sc.candidates[c].proxy_mean, k, v);
  }
  out += ::fmt::format("| published ({}) | {:.3f} | {:.3f} | {:.5f} | | |\n", published_row,
                       opt.quant.k.bits_per_element(d), opt.quant.v.bits_per_element(d), published_proxy);
  if (per_layer) {
    const LayerSelection& ls = *layer_sel;
    out += ::fmt::format(
        "\nPer-layer candidates: attention-output error on the selection sequences; the least wins, a whole-head "
        "INT2 one when within {:.6g}% of it (--whole-head-tolerance)\n\n| layer |",
        100.0 * so.whole_head_tolerance);
    for (LayerCandidate c : ls.candidates) out += ::fmt::format(" {} |", layer_candidate_name(c));
    out += " stored |\n|---|";
    for (size_t c = 0; c < ls.candidates.size(); ++c) out += "---|";
    out += "---|\n";
    std::vector<double> mean(ls.candidates.size(), 0.0);
    double stored_mean = 0;
    for (int64_t l = 0; l < L; ++l) {
      out += ::fmt::format("| {} |", l);
      for (size_t c = 0; c < ls.candidates.size(); ++c) {
        out += ::fmt::format(" {:.4g}{} |", ls.proxy[c][l], ls.whole_head[c][l] ? "" : " (seg)");
        mean[c] += ls.proxy[c][l] / static_cast<double>(L);
      }
      stored_mean += ls.proxy[ls.chosen[l]][l] / static_cast<double>(L);
      out += ::fmt::format(" {} |\n", layer_candidate_name(ls.chosen_kind(l)));
    }
    out += "| mean |";
    for (double m : mean) out += ::fmt::format(" {:.4g} |", m);
    out += ::fmt::format(" {:.4g} |\n", stored_mean);
    for (const std::string& sk : skipped) out += "Not a candidate: " + sk + "\n";
    out += "(seg) = segmented layout, not whole-head INT2.\n";
    if (kl_scorer) {
      out += ::fmt::format(
          "\nPer-layer candidates by KL (--candidate-metric kl): KL(bf16 || cache) beyond the windows on {} selection "
          "sequence(s), {} positions; layers visited 0..{} from the proxy's choice, each candidate scored with every "
          "other layer at its current choice\n\n| layer |",
          kl_scorer->sequences(), kl_scorer->positions(), L - 1);
      for (LayerCandidate c : ls.candidates) out += ::fmt::format(" {} |", layer_candidate_name(c));
      out += " stored |\n|---|";
      for (size_t c = 0; c < ls.candidates.size(); ++c) out += "---|";
      out += "---|\n";
      for (int64_t l = 0; l < L; ++l) {
        out += ::fmt::format("| {} |", l);
        for (size_t c = 0; c < ls.candidates.size(); ++c) out += ::fmt::format(" {:.4e} |", ls.kl[c][l]);
        out += ::fmt::format(" {} |\n", layer_candidate_name(ls.chosen_kind(l)));
      }
      out += ::fmt::format("KL of the proxy's choice {:.4e}, of the stored choice {:.4e}.\n", ls.kl_start, ls.kl_final);
    }
  }
  out += "\nPer-layer layouts (K | V, clip K/V):\n";
  for (int64_t l = 0; l < L; ++l) {
    const LayerCandidate kind = stored_kind(l);
    if (kind == LayerCandidate::Spectral)
      out += ::fmt::format("  layer {}: {} | {}  (clip {:.2f}/{:.2f})\n", l, best.layers[l].k.note,
                           best.layers[l].v.note, best.layers[l].k.spec.clip_ratio, best.layers[l].v.spec.clip_ratio);
    else
      out += ::fmt::format("  layer {}: whole-head INT2, {} rotation  (clip {:.2f}/{:.2f})\n", l,
                           kind == LayerCandidate::Published ? published_row.substr(0, published_row.find('+'))
                                                             : std::string("hadamard"),
                           b.layers[l].k_clip_ratio, b.layers[l].v_clip_ratio);
  }
  return out;
}

}  // namespace

std::string_view method_name(Method m) { return m == Method::Spectral ? "spectral" : "published"; }

Method parse_method(std::string_view name, const std::string& where) {
  if (name == "published") return Method::Published;
  if (name == "spectral") return Method::Spectral;
  throw Error(where, ::fmt::format("unknown method \"{}\" (spectral, published)", name));
}

RotationKind parse_rotation_kind(std::string_view name, const std::string& where) {
  for (RotationKind k : {RotationKind::EigenHadamard, RotationKind::Hadamard, RotationKind::Eigen, RotationKind::None})
    if (name == rotation_kind_name(k)) return k;
  throw Error(where, ::fmt::format("unknown rotation \"{}\" (oscar, hadamard, eigen, none)", name));
}

std::string rotation_composition_name(RotationKind kind, int64_t d) {
  switch (kind) {
    case RotationKind::EigenHadamard: return oscar_composition_name(d);
    case RotationKind::Hadamard: return "hadamard";
    case RotationKind::Eigen: return "eigen";
    case RotationKind::None: return "none";
  }
  return "none";
}

// The spectral options with the alignment head_dim allows (16-dim segments, or one whole-head segment).
static SpectralCalibrationOptions aligned_spectral(const SpectralCalibrationOptions& o, int64_t d) {
  SpectralCalibrationOptions a = o;
  a.spectral.align = spectral_align(d);
  return a;
}

std::vector<std::pair<std::string, std::string>> options_as_text(const CalibrationOptions& o) {
  std::vector<std::pair<std::string, std::string>> kv = {
      {"value_weighting", std::string(value_weighting_name(o.value_weighting))},
      {"per_head", o.per_head ? "true" : "false"},
      {"tune_clip", o.tune_clip ? "true" : "false"},
      {"clip_min", format_ratio(o.clip_grid.min_ratio)},
      {"clip_max", format_ratio(o.clip_grid.max_ratio)},
      {"clip_step", format_ratio(o.clip_grid.step)},
      {"heldout_max_tokens", std::to_string(o.heldout_max_tokens)},
      {"seed", std::to_string(o.seed)},
  };
  if (o.tune_clip) {
    kv.emplace_back("clip_objective", std::string(clip_objective_name(o.clip_objective)));
    if (o.clip_objective == ClipObjective::Attention) kv.emplace_back("clip_queries", std::to_string(o.clip_queries));
  }
  if (o.method == Method::Published && o.rotation != RotationKind::EigenHadamard)
    kv.emplace_back("rotation", std::string(rotation_kind_name(o.rotation)));
  if (o.method == Method::Spectral) {
    const SpectralCalibrationOptions& s = o.spectral;
    kv.emplace_back("method", "spectral");
    // Recorded only when the per-layer choice is on, so spectral-only bundles keep their earlier bytes.
    if (s.layer_candidates.size() > 1) {
      kv.emplace_back("candidates", join_layer_candidates(s.layer_candidates));
      kv.emplace_back("whole_head_tolerance", ::fmt::format("{:.6g}", s.whole_head_tolerance));
      // Only kl is recorded: a bundle without the key was chosen by the proxy, as every bundle before the option.
      if (s.candidate_metric == CandidateMetric::Kl) {
        kv.emplace_back("candidate_metric", std::string(candidate_metric_name(s.candidate_metric)));
        kv.emplace_back("kl_seqs", std::to_string(s.kl_seqs));
        kv.emplace_back("kl_tokens", std::to_string(s.kl_tokens));
      }
    }
    kv.emplace_back("budget_bits", ::fmt::format("{:.6g}", s.spectral.budget_bits_per_element));
    kv.emplace_back("widths", join_numbers(std::span<const int32_t>(s.spectral.widths)));
    kv.emplace_back("cayley", s.spectral.optimize_rotation ? "true" : "false");
    kv.emplace_back("spectral_fit_tokens", std::to_string(s.fit_tokens));
    kv.emplace_back("proxy_queries", std::to_string(s.proxy_queries));
    if (s.k_weight > 0) {
      kv.emplace_back("k_weight_mode", "fixed");
    } else {
      kv.emplace_back("k_weight_mode", "auto");
      kv.emplace_back("k_weight_grid", join_numbers(std::span<const double>(s.k_weight_grid)));
    }
  }
  // Only when on: bundles without tables keep their earlier bytes.
  if (o.error_feedback.mode != ErrorFeedbackMode::Off) {
    kv.emplace_back("error_feedback", std::string(error_feedback_mode_name(o.error_feedback.mode)));
    kv.emplace_back("ef_damp", ::fmt::format("{:.6g}", o.error_feedback.damp));
    kv.emplace_back("ef_clip_feedback", o.error_feedback.clip_feedback ? "on" : "off");
    if (o.error_feedback.context > 0) kv.emplace_back("ef_context", std::to_string(o.error_feedback.context));
    if (!o.error_feedback.store_key_metric) kv.emplace_back("ef_store_key_metric", "off");
  }
  // Only when on: bundles without transforms keep their earlier bytes (and format 1.x).
  if (o.transform.enabled) {
    kv.emplace_back("transform", "whiten");
    kv.emplace_back("transform_alpha", o.transform.alpha_text());
  }
  std::sort(kv.begin(), kv.end());
  return kv;
}

void validate_inputs(const fmt::ModelConfig& cfg, const CalibrationData& data, const CalibrationOptions& opt) {
  opt.quant.validate("--kv-format");
  if (opt.quant.head_dim != cfg.head_dim)
    throw Error("--kv-format", ::fmt::format("head_dim {} but the model's is {}", opt.quant.head_dim, cfg.head_dim));
  if (data.sequences.empty()) throw Error("calibration data", "no calibration sequences");
  check_sequences(data.sequences, cfg, "calibration");
  check_sequences(data.heldout, cfg, "held-out");
  if (opt.tune_clip) (void)opt.clip_grid.ratios();  // validates the grid before hours of forward passes
  if (opt.clip_queries < 1) throw Error("--clip-queries", "must be >= 1");
  if (opt.checkpoint_every < 0) throw Error("--checkpoint-every", "must be >= 0");
  if (opt.method == Method::Published && opt.rotation == RotationKind::Hadamard && !is_power_of_two(cfg.head_dim))
    throw Error("--rotation hadamard", ::fmt::format("needs a power-of-two head_dim, the model's is {}", cfg.head_dim));
  if (opt.method == Method::Spectral) {
    if (opt.per_head) throw Error("--per-head", "is not supported with --method spectral (one layout per layer)");
    if (data.heldout.size() < 2)
      throw Error("--heldout-seqs", ::fmt::format("--method spectral fits on held-out sequences and chooses --k-weight "
                                                  "on others: needs at least 2, got {}",
                                                  data.heldout.size()));
    validate_spectral_options(aligned_spectral(opt.spectral, cfg.head_dim), cfg.head_dim);
  }
  if (opt.transform.enabled) {
    opt.transform.check_alphas();
    if (data.heldout.empty())
      throw Error("--transform", "fits each KV head's transform on the held-out sequences: needs --heldout-seqs >= 1");
    // Plain rounding gains nothing from the transform (its error in y is isotropic and A⁻¹ stretches it along the
    // covariance's small directions; docs/method.md): the transform is made for the error-feedback tables.
    if (opt.error_feedback.mode == ErrorFeedbackMode::Off)
      throw Error("--transform", "needs error-feedback tables (--error-feedback k or kv): with round-to-nearest the "
                                 "whitening transform does not lower the error");
  }
}

StatisticsCollector collect_statistics(ForwardRunner& runner, const fmt::ModelFingerprint& fingerprint,
                                       const CalibrationData& data, const CalibrationOptions& opt) {
  const StatisticsShape shape = StatisticsShape::from_config(runner.config());
  const std::string key = checkpoint_key(fingerprint, data, opt.value_weighting);
  StatisticsCollector stats(shape, opt.value_weighting);
  if (opt.resume && !opt.checkpoint.empty() && fs::exists(opt.checkpoint))
    stats = load_checkpoint(opt.checkpoint, key, shape, opt.value_weighting);
  if (stats.pass() == StatisticsCollector::Pass::Queries) {
    run_pass(runner, stats, data, opt, key, "queries");
    if (stats.needs_value_pass()) stats.start_value_pass();
  }
  if (stats.pass() == StatisticsCollector::Pass::Values) run_pass(runner, stats, data, opt, key, "values");
  if (stats.num_sequences() != static_cast<int64_t>(data.sequences.size()))
    throw Error(opt.checkpoint.string(), ::fmt::format("checkpoint holds {} sequences but the data has {}",
                                                       stats.num_sequences(), data.sequences.size()));
  return stats;
}

CalibrationMoments group_moments(StatisticsCollector& stats, bool per_head) {
  const StatisticsShape& shape = stats.shape();
  CalibrationMoments m;
  m.num_layers = shape.num_layers;
  m.groups = per_head ? shape.num_kv_heads : 1;
  m.head_dim = shape.head_dim;
  for (int64_t l = 0; l < m.num_layers; ++l)
    for (int64_t g = 0; g < m.groups; ++g) m.moments.push_back(per_head ? stats.head_moments(l, g) : stats.layer_moments(l));
  return m;
}

std::vector<std::vector<double>> head_sigma_q(const StatisticsShape& s,
                                              const std::function<HeadMoments(int64_t, int64_t)>& moments) {
  std::vector<std::vector<double>> out(static_cast<size_t>(s.num_layers));
  for (int64_t l = 0; l < s.num_layers; ++l)
    for (int64_t h = 0; h < s.num_kv_heads; ++h) {
      const HeadMoments m = moments(l, h);
      out[static_cast<size_t>(l)].insert(out[static_cast<size_t>(l)].end(), m.sigma_q.begin(), m.sigma_q.end());
    }
  return out;
}

std::vector<std::vector<double>> head_sigma_q(StatisticsCollector& stats) {
  return head_sigma_q(stats.shape(), [&](int64_t l, int64_t h) { return stats.head_moments(l, h); });
}

CalibrationSpectra solve_spectra(const CalibrationMoments& moments) {
  CalibrationSpectra s;
  s.num_layers = moments.num_layers;
  s.groups = moments.groups;
  s.head_dim = moments.head_dim;
  s.spectra.resize(moments.moments.size());
  for (int64_t l = 0; l < moments.num_layers; ++l)
    for (int64_t g = 0; g < moments.groups; ++g) {
      const HeadMoments& m = moments.at(l, g);
      const std::string where = ::fmt::format("layer {} group {}", l, g);
      s.spectra[l * s.groups + g] = {symmetric_eigen(m.sigma_q, s.head_dim, where + " (Σ_Q)"),
                                     symmetric_eigen(m.sigma_v, s.head_dim, where + " (Σ_V)")};
    }
  return s;
}

CalibrationResult assemble_bundle(const CalibrationSpectra& spectra, ForwardRunner& heldout_runner,
                                  const fmt::ModelFingerprint& fingerprint, const CalibrationData& data,
                                  const CalibrationOptions& opt) {
  const fmt::ModelConfig& cfg = heldout_runner.config();
  const int64_t d = cfg.head_dim, L = cfg.num_layers, Hkv = cfg.num_kv_heads;
  const int64_t groups = opt.per_head ? Hkv : 1;
  if (spectra.num_layers != L || spectra.head_dim != d || spectra.groups != groups ||
      static_cast<int64_t>(spectra.spectra.size()) != L * groups)
    throw Error("assemble_bundle", ::fmt::format("spectra of {} layers x {} groups (head_dim {}) for a model of {} "
                                                 "layers x {} groups (head_dim {})",
                                                 spectra.num_layers, spectra.groups, spectra.head_dim, L, groups, d));
  const StatisticsShape shape = StatisticsShape::from_config(cfg);

  // ---- rotations
  fmt::Bundle b;
  b.producer = std::string("oscar ") + OSCAR_VERSION_STRING;
  b.model = fingerprint;
  b.quant = opt.quant;
  b.rotation_groups = groups;
  b.rotation_composition = rotation_composition_name(opt.rotation, d);
  std::vector<CandidateRotations> candidates;
  std::vector<RotationKind> kinds;
  for (RotationKind kind : {RotationKind::None, RotationKind::Hadamard, RotationKind::Eigen, RotationKind::EigenHadamard}) {
    if (kind == RotationKind::Hadamard && !is_power_of_two(d)) continue;
    CandidateRotations c;
    c.name = std::string(rotation_kind_name(kind));
    c.groups = groups;
    c.k.resize(L);
    c.v.resize(L);
    candidates.push_back(std::move(c));
    kinds.push_back(kind);
  }
  if (opt.rotation == RotationKind::Hadamard && !is_power_of_two(d))
    throw Error("--rotation hadamard", ::fmt::format("needs a power-of-two head_dim, the model's is {}", d));
  const size_t stored =
      static_cast<size_t>(std::find(kinds.begin(), kinds.end(), opt.rotation) - kinds.begin());
  const CandidateRotations& stored_rot = candidates[stored];
  for (int64_t l = 0; l < L; ++l) {
    fmt::LayerCalibration layer;
    for (int64_t g = 0; g < groups; ++g) {
      const SymmetricEigen& ek = spectra.at(l, g).k;
      const SymmetricEigen& ev = spectra.at(l, g).v;
      layer.k_eigenvalues.insert(layer.k_eigenvalues.end(), ek.values.begin(), ek.values.end());
      layer.v_eigenvalues.insert(layer.v_eigenvalues.end(), ev.values.begin(), ev.values.end());
      for (size_t c = 0; c < candidates.size(); ++c) {
        const auto rk = to_float(build_rotation(kinds[c], ek, d));
        const auto rv = to_float(build_rotation(kinds[c], ev, d));
        candidates[c].k[l].insert(candidates[c].k[l].end(), rk.begin(), rk.end());
        candidates[c].v[l].insert(candidates[c].v[l].end(), rv.begin(), rv.end());
      }
    }
    layer.k_rotation = stored_rot.k[l];
    layer.v_rotation = stored_rot.v[l];
    layer.k_clip_ratio = opt.quant.k.clip_ratio;
    layer.v_clip_ratio = opt.quant.v.clip_ratio;
    b.layers.push_back(std::move(layer));
  }

  // ---- held-out error report and clip tuning
  std::string report;
  std::vector<std::pair<std::string, std::string>> result_provenance;
  const bool spectral = opt.method == Method::Spectral;
  if (spectral && data.heldout.size() < 2)
    throw Error("--heldout-seqs", "--method spectral needs at least 2 held-out sequences");
  std::vector<HeldoutLayer> heldout_layers;  // kept for error feedback: its key-metric fallback and held-out score
  if (!data.heldout.empty()) {
    HeldoutCollector heldout(shape, opt.value_weighting, opt.quant.sink_tokens, opt.heldout_max_tokens);
    const int64_t n = static_cast<int64_t>(data.heldout.size());
    // Spectral: the first n − n/4 held-out sequences fit the layouts, the rest choose the K/V weight, so the
    // choice is scored on sequences the layouts were not fitted on. Every sequence also feeds the report.
    const int64_t n_select = spectral ? std::max<int64_t>(1, n / 4) : 0, n_fit = n - n_select;
    std::optional<HeldoutCollector> fit_collector;
    std::optional<AttentionSequenceCollector> select_collector;
    if (spectral) {
      fit_collector.emplace(shape, opt.value_weighting, opt.quant.sink_tokens, opt.heldout_max_tokens);
      select_collector.emplace(shape);
    }
    // The attention clip objective reads whole held-out sequences; only the q rows it scores are kept.
    const bool attention_clip = opt.tune_clip && opt.clip_objective == ClipObjective::Attention;
    std::optional<AttentionSequenceCollector> clip_collector;
    if (attention_clip) clip_collector.emplace(shape);
    for (int64_t i = 0; i < n; ++i) {
      heldout.begin_sequence(i);
      TeeObserver tee{&heldout, nullptr};
      if (spectral && i < n_fit) {
        fit_collector->begin_sequence(i);
        tee.second = &*fit_collector;
      } else if (spectral) {
        select_collector->begin_sequence();
        tee.second = &*select_collector;
      }
      TeeObserver outer{&tee, nullptr};
      if (attention_clip) {
        clip_collector->begin_sequence(scored_query_positions(static_cast<int64_t>(data.heldout[i].size()),
                                                              opt.quant.sink_tokens, opt.quant.recent_tokens,
                                                              opt.clip_queries));
        outer.second = &*clip_collector;
      }
      heldout_runner.run_sequence(data.heldout[i], outer);
      if (opt.progress) opt.progress("heldout", i + 1, n);
    }
    heldout_layers = heldout.finish();
    const std::vector<HeldoutLayer>& layers = heldout_layers;
    const std::vector<std::vector<AttentionSequence>> clip_sequences =
        attention_clip ? clip_collector->finish() : std::vector<std::vector<AttentionSequence>>{};
    b.errors = build_error_report(layers, candidates, opt.quant);
    // One layer's clip choice for a whole-head rotation, by the run's objective (also used for the spectral
    // method's hadamard candidate, so it is tuned exactly as the stored rotation is).
    auto tune_layer = [&](int64_t l, const CandidateRotations& rot, const RotatedHeldout& rotated) {
      if (attention_clip) {
        const AttentionClipScorer scorer(clip_sequences[l], cfg.num_heads, cfg.num_kv_heads, d, rot.k[l], rot.v[l],
                                         groups, opt.quant.k, opt.quant.v, opt.quant.sink_tokens,
                                         opt.quant.recent_tokens, opt.clip_queries);
        return tune_clip(scorer, opt.clip_grid, opt.quant.k.clip_ratio, opt.quant.v.clip_ratio);
      }
      return tune_clip(rotated, opt.clip_grid, opt.quant.k.clip_ratio, opt.quant.v.clip_ratio);
    };
    if (opt.tune_clip) {
      std::vector<double> k_tuned(L), v_tuned(L);
      double k_gain = 0, v_gain = 0;
      for (int64_t l = 0; l < L; ++l) {
        RotatedHeldout rotated(layers[l], stored_rot.k[l], stored_rot.v[l], groups, opt.quant);
        const ClipChoice c = tune_layer(l, stored_rot, rotated);
        b.layers[l].k_clip_ratio = c.k_ratio;
        b.layers[l].v_clip_ratio = c.v_ratio;
        // The report row stays in the error report's units whatever the objective.
        k_tuned[l] = attention_clip ? rotated.key_error(c.k_ratio) : c.k_error;
        v_tuned[l] = attention_clip ? rotated.value_error(c.v_ratio) : c.v_error;
        k_gain += c.k_error_reference > 0 ? 1.0 - c.k_error / c.k_error_reference : 0.0;
        v_gain += c.v_error_reference > 0 ? 1.0 - c.v_error / c.v_error_reference : 0.0;
      }
      b.errors.rows.push_back(stored_rot.name + "+tuned_clip");
      b.errors.k_relative_error.insert(b.errors.k_relative_error.end(), k_tuned.begin(), k_tuned.end());
      b.errors.v_relative_error.insert(b.errors.v_relative_error.end(), v_tuned.begin(), v_tuned.end());
      report = format_error_report(b.errors);
      report += ::fmt::format(
          "\nPer-layer clip tuning ({} objective) vs the reference ratios K {} / V {}: {} lower by {:.2f}% (K) and "
          "{:.2f}% (V), mean over layers.\n",
          clip_objective_name(opt.clip_objective), format_ratio(opt.quant.k.clip_ratio),
          format_ratio(opt.quant.v.clip_ratio),
          attention_clip ? "relative attention-output error" : "relative error", 100.0 * k_gain / L,
          100.0 * v_gain / L);
      std::string ratios;
      for (int64_t l = 0; l < L; ++l)
        ratios += ::fmt::format("{}{:.2f}/{:.2f}", l == 0 ? "" : " ", b.layers[l].k_clip_ratio, b.layers[l].v_clip_ratio);
      report += "Tuned clip ratios K/V per layer: " + ratios + "\n";
    } else {
      report = format_error_report(b.errors);
    }
    if (spectral) {
      // The whole-head candidates of the per-layer choice (spectral_calibration.h, LayerCandidate): the published
      // layers as they stand, and the Hadamard rotation at the same clip rule.
      WholeHeadCandidates whole;
      whole.published = b.layers;
      const auto& lc = opt.spectral.layer_candidates;
      if (std::find(lc.begin(), lc.end(), LayerCandidate::Hadamard) != lc.end() && is_power_of_two(d)) {
        const CandidateRotations& h =
            candidates[std::find(kinds.begin(), kinds.end(), RotationKind::Hadamard) - kinds.begin()];
        for (int64_t l = 0; l < L; ++l) {
          fmt::LayerCalibration layer;
          layer.k_rotation = h.k[l];
          layer.v_rotation = h.v[l];
          layer.k_eigenvalues = b.layers[l].k_eigenvalues;
          layer.v_eigenvalues = b.layers[l].v_eigenvalues;
          layer.k_clip_ratio = opt.quant.k.clip_ratio;
          layer.v_clip_ratio = opt.quant.v.clip_ratio;
          if (opt.tune_clip) {
            const ClipChoice c = tune_layer(l, h, RotatedHeldout(layers[l], h.k[l], h.v[l], groups, opt.quant));
            layer.k_clip_ratio = c.k_ratio;
            layer.v_clip_ratio = c.v_ratio;
          }
          whole.hadamard.push_back(std::move(layer));
        }
      }
      report += spectral_stage(b, layers, fit_collector->finish(), select_collector->finish(), cfg, groups, opt,
                               stored_rot.name + (opt.tune_clip ? "+tuned_clip" : "+clip"), clip_sequences, whole,
                               std::vector<std::vector<int32_t>>(data.heldout.begin() + n_fit, data.heldout.end()),
                               result_provenance);
    }
  } else {
    b.errors.num_layers = L;
  }

  // ---- storage transforms (format 2.0), on the final rotations and layouts; before the tables, which are made in
  // their basis.
  if (opt.transform.enabled) {
    if (heldout_layers.empty()) throw Error("--transform", "needs held-out sequences (--heldout-seqs >= 1)");
    const int64_t n = add_storage_transforms(b, heldout_layers, opt.transform);
    result_provenance.emplace_back("transform_tensors", std::to_string(n));
    report += ::fmt::format("\nStorage transforms (whiten, α {}; keys centered): {} of {} layer tensors "
                            "(whole-head INT2 only), per KV head, fitted on the held-out K/V\n",
                            opt.transform.alpha_text(), n, 2 * L);
  }

  // ---- error-feedback tables (format 1.2), on the final layouts: every whole-head INT2 tensor gets one, segmented
  // tensors keep RTN (the engine writes whole-head INT2 tensors with its INT2 writer also in segmented pages).
  if (opt.error_feedback.mode != ErrorFeedbackMode::Off) {
    const bool calibration_sigma = !spectra.head_sigma_q.empty();
    if (!calibration_sigma && heldout_layers.empty())
      throw Error("--error-feedback", "needs the per-KV-head query moments: this device's statistics do not provide "
                                      "them, and there are no held-out sequences to take them from");
    std::vector<std::vector<double>> heldout_sigma_q;  // the key metric's fallback: the held-out queries' Σ_Q
    if (!calibration_sigma)
      for (const HeldoutLayer& hl : heldout_layers) heldout_sigma_q.push_back(hl.sigma_q);
    std::vector<std::vector<double>> collected = calibration_sigma ? spectra.head_sigma_q : heldout_sigma_q;
    for (std::vector<double>& m : collected) symmetrize_metric(m, cfg.head_dim);
    const int64_t ef_context = opt.error_feedback.context > 0 ? opt.error_feedback.context : data.seq_len;
    const int64_t tables = add_error_feedback_tables(
        b,
        ef_context == data.seq_len
            ? collected
            : key_metrics_for_context(collected, model::rope_inv_freq(cfg), cfg.head_dim, data.seq_len, ef_context),
        opt.error_feedback);
    // Format 1.3: the collected metric beside the key tables, so a reader can rebuild them for its own context.
    if (opt.error_feedback.store_key_metric)
      store_key_metrics(b, collected, data.seq_len, ef_context, opt.error_feedback.damp);
    std::string heldout_line;
    result_provenance.emplace_back("ef_key_metric", calibration_sigma ? "sigma_q" : "heldout_sigma_q");
    result_provenance.emplace_back("ef_tables", std::to_string(tables));
    // What they buy on the held-out sequences, in their own metrics (the error report above is RTN's).
    if (tables > 0 && !heldout_layers.empty()) {
      const ErrorFeedbackHeldout h = error_feedback_heldout_error(b, heldout_layers, opt.error_feedback.value_metrics);
      std::string line;
      if (h.k_layers > 0) {
        result_provenance.emplace_back("ef_heldout_k", ::fmt::format("{:.6g}/{:.6g}", h.k_rtn, h.k_ef));
        line += ::fmt::format("K relative logit MSE (Σ_Q) RTN {:.4g} -> EF {:.4g} ({:.2f}x)", h.k_rtn, h.k_ef,
                              h.k_rtn > 0 ? h.k_ef / h.k_rtn : 0.0);
      }
      if (h.v_layers > 0) {
        result_provenance.emplace_back("ef_heldout_v", ::fmt::format("{:.6g}/{:.6g}", h.v_rtn, h.v_ef));
        line += ::fmt::format("{}V relative output MSE (Σ W_oᵀW_o) RTN {:.4g} -> EF {:.4g} ({:.2f}x)",
                              line.empty() ? "" : "; ", h.v_rtn, h.v_ef, h.v_rtn > 0 ? h.v_ef / h.v_rtn : 0.0);
      }
      if (!line.empty()) heldout_line = "Held-out, mean over the tabled layers: " + line + "\n";
      if (!line.empty() && ef_context != data.seq_len)
        heldout_line += ::fmt::format("  (scored with the held-out queries of positions 0..{}, not the key tables' "
                                      "0..{})\n", data.seq_len - 1, ef_context - 1);
    }
    report += ::fmt::format("\nError-feedback rounding ({}, damp {:.6g}, clip feedback {}): tables for {} of {} "
                            "layer tensors (whole-head INT2 only)\n",
                            error_feedback_mode_name(opt.error_feedback.mode), opt.error_feedback.damp,
                            opt.error_feedback.clip_feedback ? "on" : "off", tables,
                            opt.error_feedback.mode == ErrorFeedbackMode::KV ? 2 * L : L);
    report += ::fmt::format("Key tables made for positions 0..{}{} (they serve that context best: --ef-context)\n",
                            ef_context - 1, ef_context == data.seq_len ? ", the calibration length" : "");
    report += heldout_line;
  }

  // ---- provenance
  auto& p = b.calibration;
  p.data_files = data.data_files;
  p.num_sequences = static_cast<int64_t>(data.sequences.size());
  for (const auto& s : data.sequences) p.num_tokens += static_cast<int64_t>(s.size());
  p.seq_len = data.seq_len;
  p.num_heldout_sequences = static_cast<int64_t>(data.heldout.size());
  p.seed = opt.seed;
  p.options = options_as_text(opt);
  for (const auto& kv : result_provenance) p.options.push_back(kv);
  for (const auto& [key, value] : opt.extra_provenance) {
    for (const auto& [known, unused] : p.options)
      if (known == key) throw Error("provenance", ::fmt::format("option \"{}\" is recorded twice", key));
    p.options.emplace_back(key, value);
  }
  std::sort(p.options.begin(), p.options.end());
  fmt::validate_bundle(b, "calibrated bundle");
  return {std::move(b), std::move(report)};
}

CalibrationResult calibrate(ForwardRunner& runner, const fmt::ModelFingerprint& fingerprint,
                            const CalibrationData& data, const CalibrationOptions& opt) {
  validate_inputs(runner.config(), data, opt);
  StatisticsCollector stats = collect_statistics(runner, fingerprint, data, opt);
  CalibrationSpectra spectra = solve_spectra(group_moments(stats, opt.per_head));
  if (opt.error_feedback.mode != ErrorFeedbackMode::Off) spectra.head_sigma_q = head_sigma_q(stats);
  return assemble_bundle(spectra, runner, fingerprint, data, opt);
}

fmt::ModelFingerprint model_fingerprint(const fs::path& model_dir) {
  const fmt::ModelConfig cfg = fmt::ModelConfig::from_dir(model_dir);
  const fmt::TensorStore store = fmt::TensorStore::open(model_dir);
  fmt::ModelFingerprint f;
  f.architecture = std::string(fmt::arch_name(cfg.arch));
  f.num_layers = cfg.num_layers;
  f.num_heads = cfg.num_heads;
  f.num_kv_heads = cfg.num_kv_heads;
  f.head_dim = cfg.head_dim;
  f.hidden_size = cfg.hidden_size;
  f.vocab_size = cfg.vocab_size;
  f.config_sha256 = fmt::sha256_file(model_dir / "config.json");
  std::vector<std::string> names;
  for (int64_t l = 0; l < cfg.num_layers; ++l) {
    const std::string prefix = ::fmt::format("model.layers.{}.self_attn.", l);
    for (const char* t : {"q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"}) names.push_back(prefix + t);
    for (const char* t : {"q_proj.bias", "k_proj.bias", "v_proj.bias", "q_norm.weight", "k_norm.weight"})
      if (store.contains(prefix + t)) names.push_back(prefix + t);
  }
  f.attention_sha256 = fmt::sha256_tensors(store, names);
  return f;
}

}  // namespace oscar::calib
