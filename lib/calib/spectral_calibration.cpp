#include "lib/calib/spectral_calibration.h"

#include <fmt/format.h>
#include <tbb/parallel_for.h>

#include <algorithm>
#include <cmath>
#include <set>

#include "formats/error.h"
#include "lib/calib/quantizer_ref.h"

namespace oscar::calib {

AttentionSequenceCollector::AttentionSequenceCollector(const StatisticsShape& shape)
    : shape_(shape), layers_(static_cast<size_t>(shape.num_layers)) {}

std::vector<int64_t> scored_query_positions(int64_t tokens, int64_t sink, int64_t recent, int64_t max_queries) {
  std::vector<int64_t> out;
  const int64_t first = sink + recent;
  if (tokens <= first) return out;
  const int64_t readers = tokens - first;
  const int64_t stride = max_queries > 0 ? std::max<int64_t>(1, (readers + max_queries - 1) / max_queries) : 1;
  for (int64_t t = first; t < tokens; t += stride) out.push_back(t);
  return out;
}

void AttentionSequenceCollector::begin_sequence() {
  for (auto& l : layers_) l.emplace_back();
}

void AttentionSequenceCollector::begin_sequence(std::vector<int64_t> query_positions) {
  if (!std::is_sorted(query_positions.begin(), query_positions.end()))
    throw Error("AttentionSequenceCollector", "query positions must be ascending");
  for (auto& l : layers_) {
    l.emplace_back();
    l.back().query_positions = query_positions;
  }
}

void AttentionSequenceCollector::on_attention_inputs(const model::AttentionInputs& in) {
  if (in.layer < 0 || in.layer >= shape_.num_layers || in.num_heads != shape_.num_heads ||
      in.num_kv_heads != shape_.num_kv_heads || in.head_dim != shape_.head_dim)
    throw Error("AttentionSequenceCollector", ::fmt::format("attention inputs of layer {} do not match the model shape",
                                                            in.layer));
  auto& seqs = layers_[in.layer];
  if (seqs.empty()) throw Error("AttentionSequenceCollector", "begin_sequence() was not called");
  AttentionSequence& s = seqs.back();
  if (in.pos0 != s.tokens)
    throw Error("AttentionSequenceCollector",
                ::fmt::format("layer {}: call at position {} but {} tokens were seen", in.layer, in.pos0, s.tokens));
  const int64_t T = in.num_tokens, d = shape_.head_dim, n = s.tokens + T;
  // Head-major storage: appending a call regroups what is there (sequences are delivered in one call normally).
  auto append = [&](std::vector<float>& dst, const float* src, int64_t heads) {
    std::vector<float> out(static_cast<size_t>(heads * n * d));
    for (int64_t h = 0; h < heads; ++h) {
      std::copy_n(dst.begin() + h * s.tokens * d, s.tokens * d, out.begin() + h * n * d);
      std::copy_n(src + h * T * d, T * d, out.begin() + h * n * d + s.tokens * d);
    }
    dst = std::move(out);
  };
  if (s.query_positions.empty()) {
    append(s.q, in.q, shape_.num_heads);
  } else {
    // Rows of this call among the kept positions; q stays head-major over the kept rows.
    const auto lo = std::lower_bound(s.query_positions.begin(), s.query_positions.end(), in.pos0);
    const auto hi = std::lower_bound(s.query_positions.begin(), s.query_positions.end(), in.pos0 + T);
    const int64_t before = lo - s.query_positions.begin(), add = hi - lo, total = static_cast<int64_t>(s.query_positions.size());
    if (s.q.empty()) s.q.assign(static_cast<size_t>(shape_.num_heads * total * d), 0.0f);
    for (int64_t h = 0; h < shape_.num_heads; ++h)
      for (int64_t r = 0; r < add; ++r)
        std::copy_n(in.q + (h * T + (lo[r] - in.pos0)) * d, d, s.q.begin() + (h * total + before + r) * d);
  }
  append(s.k, in.k, shape_.num_kv_heads);
  append(s.v, in.v, shape_.num_kv_heads);
  s.tokens = n;
}

std::vector<std::vector<AttentionSequence>> AttentionSequenceCollector::finish() { return std::move(layers_); }

LayerQuantization layer_quantization(const fmt::LayerCalibration& layer, const fmt::KvQuantSpec& global,
                                     int64_t groups) {
  LayerQuantization q;
  q.k = global.k;
  q.v = global.v;
  if (!layer.k_segments.empty()) q.k.segments = layer.k_segments;
  if (!layer.v_segments.empty()) q.v.segments = layer.v_segments;
  q.k.clip_ratio = layer.k_clip_ratio;
  q.v.clip_ratio = layer.v_clip_ratio;
  q.k_rotation = layer.k_rotation;
  q.v_rotation = layer.v_rotation;
  q.groups = groups;
  return q;
}

AttentionError attention_output_error(const std::vector<AttentionSequence>& sequences, int64_t num_heads,
                                      int64_t num_kv_heads, int64_t d, const LayerQuantization& quant, int64_t sink,
                                      int64_t recent, int64_t max_queries) {
  if (num_kv_heads <= 0 || num_heads % num_kv_heads != 0)
    throw Error("attention_output_error", ::fmt::format("{} heads over {} KV heads", num_heads, num_kv_heads));
  const int64_t g = num_heads / num_kv_heads;
  const HeadQuantizer kq(quant.k, d, "attention proxy (k)"), vq(quant.v, d, "attention proxy (v)");
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  AttentionError total;
  for (const AttentionSequence& s : sequences) {
    const int64_t T = s.tokens, first = sink + recent;
    if (!s.query_positions.empty())
      throw Error("attention_output_error", "needs sequences with every query kept (begin_sequence())");
    if (T <= first) continue;
    const int64_t readers = T - first;
    const int64_t stride = max_queries > 0 ? std::max<int64_t>(1, (readers + max_queries - 1) / max_queries) : 1;
    std::vector<int64_t> queries;
    for (int64_t t = first; t < T; t += stride) queries.push_back(t);
    // Per query head: error and energy, summed afterwards in head order (deterministic under parallelism).
    std::vector<AttentionError> per_head(static_cast<size_t>(num_heads));
    std::vector<float> kh(static_cast<size_t>(num_kv_heads * T * d)), vh(kh.size());
    for (int64_t h = 0; h < num_kv_heads; ++h) {
      const int64_t grp = quant.groups == 1 ? 0 : h;
      const auto kr = std::span<const float>(quant.k_rotation).subspan(grp * d * d, d * d);
      const auto vr = std::span<const float>(quant.v_rotation).subspan(grp * d * d, d * d);
      kq.fake_quantize(std::span<const float>(s.k).subspan(h * T * d, T * d), T, kr, quant.k.clip_ratio,
                       Basis::Original, std::span<float>(kh).subspan(h * T * d, T * d));
      vq.fake_quantize(std::span<const float>(s.v).subspan(h * T * d, T * d), T, vr, quant.v.clip_ratio,
                       Basis::Original, std::span<float>(vh).subspan(h * T * d, T * d));
    }
    tbb::parallel_for(int64_t{0}, num_heads, [&](int64_t i) {
      const int64_t h = i / g;
      const float* K = s.k.data() + h * T * d;
      const float* V = s.v.data() + h * T * d;
      const float* Kq = kh.data() + h * T * d;
      const float* Vq = vh.data() + h * T * d;
      std::vector<double> l(static_cast<size_t>(T)), lq(l.size()), o(static_cast<size_t>(d)), oq(o.size());
      AttentionError acc;
      for (int64_t sq : queries) {
        const float* q = s.q.data() + (i * T + sq) * d;
        const int64_t last_quantized = sq - recent;  // keys [sink, last_quantized] are read quantized
        double m = -INFINITY, mq = -INFINITY;
        for (int64_t t = 0; t <= sq; ++t) {
          double a = 0, b = 0;
          for (int64_t j = 0; j < d; ++j) a += static_cast<double>(q[j]) * K[t * d + j];
          if (t >= sink && t <= last_quantized) {
            for (int64_t j = 0; j < d; ++j) b += static_cast<double>(q[j]) * Kq[t * d + j];
          } else {
            b = a;
          }
          l[t] = a * scale;
          lq[t] = b * scale;
          m = std::max(m, l[t]);
          mq = std::max(mq, lq[t]);
        }
        double z = 0, zq = 0;
        for (int64_t t = 0; t <= sq; ++t) {
          l[t] = std::exp(l[t] - m);
          lq[t] = std::exp(lq[t] - mq);
          z += l[t];
          zq += lq[t];
        }
        std::fill(o.begin(), o.end(), 0.0);
        std::fill(oq.begin(), oq.end(), 0.0);
        for (int64_t t = 0; t <= sq; ++t) {
          const float* vt = (t >= sink && t <= last_quantized) ? Vq + t * d : V + t * d;
          const double p = l[t] / z, pq = lq[t] / zq;
          for (int64_t j = 0; j < d; ++j) {
            o[j] += p * V[t * d + j];
            oq[j] += pq * vt[j];
          }
        }
        for (int64_t j = 0; j < d; ++j) {
          acc.error += (oq[j] - o[j]) * (oq[j] - o[j]);
          acc.energy += o[j] * o[j];
        }
      }
      per_head[i] = acc;
    });
    for (const auto& a : per_head) {
      total.error += a.error;
      total.energy += a.energy;
    }
  }
  return total;
}

int64_t spectral_align(int64_t head_dim) { return head_dim % 16 == 0 ? 16 : head_dim; }

void validate_spectral_options(const SpectralCalibrationOptions& o, int64_t d) {
  const SpectralOptions& s = o.spectral;
  if (!std::isfinite(s.budget_bits_per_element) || s.budget_bits_per_element <= 0)
    throw Error("--budget-bits", ::fmt::format("must be a positive number, got {}", s.budget_bits_per_element));
  if (s.widths.empty()) throw Error("--widths", "needs at least one width");
  std::set<int32_t> seen;
  int32_t min_positive = 0;
  for (int32_t w : s.widths) {
    if (w < 0 || w > 8) throw Error("--widths", ::fmt::format("width {} is outside 0..8", w));
    if (!seen.insert(w).second) throw Error("--widths", ::fmt::format("width {} is listed twice", w));
    if (w > 0 && (min_positive == 0 || w < min_positive)) min_positive = w;
  }
  if (min_positive == 0) throw Error("--widths", "needs a positive width (0 alone stores nothing)");
  if (s.align <= 0 || d % s.align != 0)
    throw Error("--widths", ::fmt::format("segment alignment {} does not divide head_dim {}", s.align, d));
  const int64_t need = 2 * (s.align * min_positive + 32);
  if (budget_bits(2.0 * s.budget_bits_per_element, d) < need)
    throw Error("--budget-bits",
                ::fmt::format("{} bits/element is below the smallest spectral layout at head_dim {} ({:.4g} bits/element: "
                              "one {}-dim segment of {} bit(s) plus its fp16 scale and zero, for K and for V); use "
                              "--method published or raise --budget-bits",
                              s.budget_bits_per_element, d, static_cast<double>(need) / (2.0 * d), s.align,
                              min_positive));
  if (o.k_weight < 0 || !std::isfinite(o.k_weight))
    throw Error("--k-weight", ::fmt::format("must be a positive number or auto, got {}", o.k_weight));
  if (o.k_weight == 0) {
    if (o.k_weight_grid.empty()) throw Error("--k-weight-grid", "needs at least one value");
    for (double w : o.k_weight_grid)
      if (!(w > 0) || !std::isfinite(w)) throw Error("--k-weight-grid", ::fmt::format("value {} is not positive", w));
  }
  if (o.layer_candidates.empty()) throw Error("--candidates", "needs at least one candidate");
  for (size_t i = 0; i < o.layer_candidates.size(); ++i)
    for (size_t j = 0; j < i; ++j)
      if (o.layer_candidates[i] == o.layer_candidates[j])
        throw Error("--candidates", ::fmt::format("{} is listed twice", layer_candidate_name(o.layer_candidates[i])));
  if (std::find(o.layer_candidates.begin(), o.layer_candidates.end(), LayerCandidate::Spectral) ==
      o.layer_candidates.end())
    throw Error("--candidates", "must include spectral (use --method published for whole-head INT2 only)");
  if (!std::isfinite(o.whole_head_tolerance) || o.whole_head_tolerance < 0)
    throw Error("--whole-head-tolerance", ::fmt::format("must be a number >= 0, got {}", o.whole_head_tolerance));
  if (o.fit_tokens < 1) throw Error("--spectral-fit-tokens", "must be >= 1");
  if (o.kl_seqs < 0) throw Error("--kl-seqs", ::fmt::format("must be >= 0 (0 = every selection sequence), got {}", o.kl_seqs));
  if (o.kl_tokens < 0) throw Error("--kl-tokens", ::fmt::format("must be >= 0 (0 = whole sequences), got {}", o.kl_tokens));
  if (o.candidate_metric == CandidateMetric::Kl && o.layer_candidates.size() > 1 && !o.kl_model)
    throw Error("--candidate-metric kl", "needs the CPU reference model (SpectralCalibrationOptions::kl_model)");
  if (o.proxy_queries < 1) throw Error("--proxy-queries", "must be >= 1");
}

SpectralCalibration spectral_calibration(const std::vector<HeldoutLayer>& fit,
                                         const std::vector<std::vector<AttentionSequence>>& select, int64_t num_heads,
                                         const fmt::KvQuantSpec& windows, const SpectralCalibrationOptions& o,
                                         const std::vector<std::vector<AttentionSequence>>& clip) {
  const int64_t L = static_cast<int64_t>(fit.size());
  if (L == 0) throw Error("spectral_calibration", "no layers");
  const int64_t d = fit[0].head_dim, Hkv = fit[0].num_kv_heads;
  validate_spectral_options(o, d);
  const std::vector<double> grid = o.k_weight > 0 ? std::vector<double>{o.k_weight} : o.k_weight_grid;
  if (grid.size() > 1 && (static_cast<int64_t>(select.size()) != L || select[0].empty()))
    throw Error("spectral_calibration", "choosing --k-weight needs selection sequences");
  SpectralCalibration out;
  out.candidates.resize(grid.size());
  for (size_t c = 0; c < grid.size(); ++c) {
    out.candidates[c].k_weight = grid[c];
    out.candidates[c].layers.resize(static_cast<size_t>(L));
    out.candidates[c].proxy.assign(static_cast<size_t>(L), 0.0);
  }
  fmt::KvQuantSpec global = windows;
  for (int64_t l = 0; l < L; ++l) {
    LayerSamples ls;
    ls.base = fit[l];
    const ObjectiveSamples keys = key_objective_samples(ls, false, {}, o.fit_tokens);
    const ObjectiveSamples values = value_objective_samples(ls, o.fit_tokens);
    const SpectralLayerSearch search(keys, values, o.spectral);
    // Candidates often share a K or V layout (same basis, segments): its attention-tuned ratio is computed once.
    std::vector<std::pair<const TensorChoice*, float>> k_done, v_done;
    auto same = [](const TensorChoice& a, const TensorChoice& b) {
      return a.spec.segments == b.spec.segments && a.rotation == b.rotation;
    };
    for (size_t c = 0; c < grid.size(); ++c) {
      SpectralCandidate& cand = out.candidates[c];
      cand.layers[l] = search.choose(grid[c], o.spectral.v_weight);
      LayerChoice& lc = cand.layers[l];
      if (!o.tune_clip) {
        lc.k.spec.clip_ratio = o.k_reference;
        lc.v.spec.clip_ratio = o.v_reference;
      } else if (o.clip_objective == ClipObjective::Attention) {
        if (static_cast<int64_t>(clip.size()) != L)
          throw Error("spectral_calibration", "the attention clip objective needs held-out sequences of every layer");
        float kr = -1, vr = -1;
        for (const auto& [t, r] : k_done)
          if (same(*t, lc.k)) kr = r;
        for (const auto& [t, r] : v_done)
          if (same(*t, lc.v)) vr = r;
        if (kr < 0 || vr < 0) {
          const std::vector<float> rk(lc.k.rotation.begin(), lc.k.rotation.end());
          const std::vector<float> rv(lc.v.rotation.begin(), lc.v.rotation.end());
          const AttentionClipScorer scorer(clip[l], num_heads, Hkv, d, rk, rv, 1, lc.k.spec, lc.v.spec,
                                           windows.sink_tokens, windows.recent_tokens, o.clip_queries);
          const std::vector<float> ratios = o.clip_grid.ratios();
          // Only the tensor(s) not already known are scored (ties to the larger ratio, as tune_clip).
          auto search_ratio = [&](bool key) {
            float best = 1.0f;
            double best_err = INFINITY;
            for (auto it = ratios.rbegin(); it != ratios.rend(); ++it) {
              const double e = key ? scorer.key_error(*it) : scorer.value_error(*it);
              if (e < best_err) {
                best_err = e;
                best = *it;
              }
            }
            return best;
          };
          if (kr < 0) kr = search_ratio(true);
          if (vr < 0) vr = search_ratio(false);
        }
        lc.k.spec.clip_ratio = kr;
        lc.v.spec.clip_ratio = vr;
        k_done.emplace_back(&lc.k, kr);
        v_done.emplace_back(&lc.v, vr);
      }
      if (!select.empty() && !select[l].empty()) {
        const fmt::LayerCalibration lc = to_layer_calibration(cand.layers[l], global);
        cand.proxy[l] = attention_output_error(select[l], num_heads, Hkv, d, layer_quantization(lc, global, 1),
                                               windows.sink_tokens, windows.recent_tokens, o.proxy_queries)
                            .relative();
      }
    }
  }
  for (size_t c = 0; c < grid.size(); ++c) {
    auto& cand = out.candidates[c];
    for (double p : cand.proxy) cand.proxy_mean += p / static_cast<double>(L);
    if (cand.proxy_mean < out.candidates[out.chosen].proxy_mean) out.chosen = c;
  }
  return out;
}

std::string_view candidate_metric_name(CandidateMetric m) { return m == CandidateMetric::Kl ? "kl" : "proxy"; }

CandidateMetric parse_candidate_metric(std::string_view name, const std::string& where) {
  if (name == "proxy") return CandidateMetric::Proxy;
  if (name == "kl") return CandidateMetric::Kl;
  throw Error(where, ::fmt::format("unknown metric \"{}\" (proxy, kl)", name));
}

std::string_view layer_candidate_name(LayerCandidate c) {
  switch (c) {
    case LayerCandidate::Spectral: return "spectral";
    case LayerCandidate::Published: return "published";
    case LayerCandidate::Hadamard: return "hadamard";
  }
  return "spectral";
}

std::vector<LayerCandidate> parse_layer_candidates(std::string_view csv, const std::string& where) {
  std::vector<LayerCandidate> out;
  size_t start = 0;
  while (start <= csv.size()) {
    const size_t end = std::min(csv.find(',', start), csv.size());
    const std::string_view item = csv.substr(start, end - start);
    bool known = false;
    for (LayerCandidate c : {LayerCandidate::Spectral, LayerCandidate::Published, LayerCandidate::Hadamard})
      if (item == layer_candidate_name(c)) {
        if (std::find(out.begin(), out.end(), c) != out.end())
          throw Error(where, ::fmt::format("{} is listed twice", item));
        out.push_back(c);
        known = true;
      }
    if (!known)
      throw Error(where, ::fmt::format("unknown candidate \"{}\" (spectral, published, hadamard)", item));
    start = end + 1;
  }
  return out;
}

std::string join_layer_candidates(std::span<const LayerCandidate> cs) {
  std::string s;
  for (LayerCandidate c : cs) s += (s.empty() ? "" : ",") + std::string(layer_candidate_name(c));
  return s;
}

bool whole_head_int2(const fmt::KvQuantSpec& spec) {
  for (const fmt::TensorQuantSpec* t : {&spec.k, &spec.v})
    if (t->storage != fmt::KvStorage::Int || t->segments.size() != 1 || t->segments[0].begin != 0 ||
        t->segments[0].end != spec.head_dim || t->segments[0].bits != 2)
      return false;
  return true;
}

size_t choose_layer_candidate(std::span<const double> proxy, std::span<const char> whole_head, double tolerance) {
  if (proxy.empty() || proxy.size() != whole_head.size())
    throw Error("choose_layer_candidate", ::fmt::format("{} proxies for {} candidates", proxy.size(), whole_head.size()));
  size_t best = 0;
  for (size_t c = 1; c < proxy.size(); ++c)
    if (proxy[c] < proxy[best]) best = c;
  if (whole_head[best]) return best;
  size_t wh = proxy.size();
  for (size_t c = 0; c < proxy.size(); ++c)
    if (whole_head[c] && (wh == proxy.size() || proxy[c] < proxy[wh])) wh = c;
  return wh < proxy.size() && proxy[wh] <= (1.0 + tolerance) * proxy[best] ? wh : best;
}

LayerSelection select_layer_candidates(const std::vector<LayerCandidate>& candidates,
                                       const std::vector<std::vector<fmt::LayerCalibration>>& layers,
                                       const std::vector<std::vector<double>>& proxy_of,
                                       const std::vector<std::vector<AttentionSequence>>& select, int64_t num_heads,
                                       const fmt::KvQuantSpec& global, int64_t proxy_queries, double tolerance) {
  const size_t C = candidates.size();
  if (C == 0 || layers.size() != C || proxy_of.size() != C)
    throw Error("select_layer_candidates", ::fmt::format("{} candidates, {} layer sets, {} proxy sets", C,
                                                         layers.size(), proxy_of.size()));
  const size_t L = layers[0].size();
  if (select.size() != L)
    throw Error("select_layer_candidates", ::fmt::format("{} layers but selection sequences of {}", L, select.size()));
  LayerSelection out;
  out.candidates = candidates;
  out.proxy.assign(C, std::vector<double>(L, 0.0));
  out.whole_head.assign(C, std::vector<char>(L, 0));
  out.chosen.assign(L, 0);
  const int64_t d = global.head_dim;
  for (size_t c = 0; c < C; ++c) {
    if (layers[c].size() != L)
      throw Error("select_layer_candidates", ::fmt::format("candidate {} has {} layers, expected {}",
                                                           layer_candidate_name(candidates[c]), layers[c].size(), L));
    if (!proxy_of[c].empty() && proxy_of[c].size() != L)
      throw Error("select_layer_candidates", "known proxies do not cover every layer");
  }
  for (size_t l = 0; l < L; ++l) {
    if (select[l].empty()) throw Error("select_layer_candidates", "choosing a layer's candidate needs selection sequences");
    const int64_t Hkv = static_cast<int64_t>(select[l][0].k.size()) / std::max<int64_t>(1, select[l][0].tokens * d);
    std::vector<double> p(C);
    std::vector<char> wh(C);
    for (size_t c = 0; c < C; ++c) {
      const fmt::LayerCalibration& lc = layers[c][l];
      const LayerQuantization q = layer_quantization(lc, global, 1);
      fmt::KvQuantSpec spec = global;
      spec.k = q.k;
      spec.v = q.v;
      wh[c] = whole_head_int2(spec) ? 1 : 0;
      p[c] = !proxy_of[c].empty() ? proxy_of[c][l]
                                  : attention_output_error(select[l], num_heads, Hkv, d, q, global.sink_tokens,
                                                           global.recent_tokens, proxy_queries)
                                        .relative();
      out.proxy[c][l] = p[c];
      out.whole_head[c][l] = wh[c];
    }
    out.chosen[l] = choose_layer_candidate(p, wh, tolerance);
  }
  return out;
}

std::string layer_choice_text(const LayerSelection& s) {
  std::string out;
  for (size_t l = 0; l < s.chosen.size(); ++l)
    out += (l ? "," : "") + std::string(layer_candidate_name(s.chosen_kind(l)));
  return out;
}

std::string layer_proxy_text(const LayerSelection& s) {
  std::string out;
  for (size_t c = 0; c < s.candidates.size(); ++c) {
    out += ::fmt::format("{}{}=", c ? ";" : "", layer_candidate_name(s.candidates[c]));
    for (size_t l = 0; l < s.proxy[c].size(); ++l) out += ::fmt::format("{}{:.6g}", l ? "/" : "", s.proxy[c][l]);
  }
  return out;
}

std::string layer_kl_text(const LayerSelection& s) {
  std::string out;
  if (s.metric != CandidateMetric::Kl) return out;
  for (size_t c = 0; c < s.candidates.size(); ++c) {
    out += ::fmt::format("{}{}=", c ? ";" : "", layer_candidate_name(s.candidates[c]));
    for (size_t l = 0; l < s.kl[c].size(); ++l) out += ::fmt::format("{}{:.6g}", l ? "/" : "", s.kl[c][l]);
  }
  return out;
}

std::string join_numbers(std::span<const double> xs) {
  std::string s;
  for (double x : xs) s += (s.empty() ? "" : ",") + ::fmt::format("{:.6g}", x);
  return s;
}

std::string join_numbers(std::span<const int32_t> xs) {
  std::string s;
  for (int32_t x : xs) s += (s.empty() ? "" : ",") + std::to_string(x);
  return s;
}

}  // namespace oscar::calib
