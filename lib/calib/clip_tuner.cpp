#include "lib/calib/clip_tuner.h"

#include <Eigen/Dense>
#include <fmt/format.h>
#include <tbb/parallel_for.h>

#include <algorithm>
#include <cmath>
#include <string>

#include "formats/error.h"
#include "lib/calib/quantizer_ref.h"
#include "lib/calib/spectral_calibration.h"

namespace oscar::calib {

std::vector<float> ClipGrid::ratios() const {
  if (!(min_ratio > 0.0f && min_ratio <= max_ratio && max_ratio <= 1.0f && step > 0.0f))
    throw Error("clip grid", ::fmt::format("need 0 < min ({}) <= max ({}) <= 1 and step ({}) > 0", min_ratio,
                                           max_ratio, step));
  // The flags are decimal numbers: widen each float to its shortest decimal spelling ("0.8", not 0.800000011...)
  // and count steps in double, so 0.80 + 16 * 0.01 lands on 0.96f exactly as a user typing 0.96 would get.
  auto decimal = [](float f) { return std::stod(::fmt::format("{}", f)); };
  const double lo = decimal(min_ratio), hi = decimal(max_ratio), st = decimal(step);
  const auto count = static_cast<int64_t>(std::llround((hi - lo) / st));
  std::vector<float> out;
  for (int64_t i = 0; i <= count; ++i) out.push_back(static_cast<float>(std::min(hi, lo + static_cast<double>(i) * st)));
  return out;
}

std::string_view clip_objective_name(ClipObjective o) {
  return o == ClipObjective::LogitMse ? "logit_mse" : "attention";
}

ClipObjective parse_clip_objective(std::string_view name, const std::string& where) {
  if (name == "attention") return ClipObjective::Attention;
  if (name == "logit_mse") return ClipObjective::LogitMse;
  throw Error(where, ::fmt::format("unknown clip objective \"{}\" (attention, logit_mse)", name));
}

namespace {

// Grid search over two independent error curves; scanning from the largest ratio with a strict comparison
// resolves ties toward less clipping.
template <class KeyFn, class ValueFn>
ClipChoice grid_search(const ClipGrid& grid, float k_reference, float v_reference, KeyFn key, ValueFn value) {
  const std::vector<float> ratios = grid.ratios();
  ClipChoice best;
  best.k_error = INFINITY;
  best.v_error = INFINITY;
  for (auto it = ratios.rbegin(); it != ratios.rend(); ++it) {
    const double ke = key(*it);
    const double ve = value(*it);
    if (ke < best.k_error) {
      best.k_error = ke;
      best.k_ratio = *it;
    }
    if (ve < best.v_error) {
      best.v_error = ve;
      best.v_ratio = *it;
    }
  }
  best.k_error_reference = key(k_reference);
  best.v_error_reference = value(v_reference);
  return best;
}

using RowMatD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using RowMatF = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// Row-wise causal softmax of logits L [nq, T]: row r covers keys 0 .. query[r] (the rest get probability 0).
void causal_softmax(const RowMatD& logits, const std::vector<int64_t>& query, RowMatD& p) {
  p.setZero(logits.rows(), logits.cols());
  for (Eigen::Index r = 0; r < logits.rows(); ++r) {
    const int64_t n = query[r] + 1;
    const double m = logits.row(r).head(n).maxCoeff();
    double z = 0;
    for (int64_t t = 0; t < n; ++t) {
      const double e = std::exp(logits(r, t) - m);
      p(r, t) = e;
      z += e;
    }
    p.row(r).head(n) /= z;
  }
}

}  // namespace

ClipChoice tune_clip(const RotatedHeldout& rotated, const ClipGrid& grid, float k_reference, float v_reference) {
  return grid_search(
      grid, k_reference, v_reference, [&](float r) { return rotated.key_error(r); },
      [&](float r) { return rotated.value_error(r); });
}

ClipChoice tune_clip(const AttentionClipScorer& scorer, const ClipGrid& grid, float k_reference, float v_reference) {
  return grid_search(
      grid, k_reference, v_reference, [&](float r) { return scorer.key_error(r); },
      [&](float r) { return scorer.value_error(r); });
}

// One (sequence, query head): the scored queries and the exact attention of each.
struct ScoredHead {
  int64_t sequence = 0, head = 0, kv_head = 0;
  RowMatD q;       // [nq, d], pre-scaled by 1/√d
  RowMatD logits;  // [nq, T] exact, scaled
  RowMatD mask;    // [nq, T] 1 where the cache reads key/value t quantized for this query
  RowMatD out;     // [nq, d] exact output
};

struct AttentionClipScorer::Impl {
  const std::vector<AttentionSequence>& sequences;
  int64_t heads = 0, kv_heads = 0, d = 0, groups = 1;
  std::vector<float> k_rotation, v_rotation;
  HeadQuantizer kq, vq;
  std::vector<std::vector<int64_t>> queries;  // per sequence
  std::vector<ScoredHead> scored;             // sequence-major, then query head
  double energy = 0;

  Impl(const std::vector<AttentionSequence>& s, const fmt::TensorQuantSpec& k_spec,
       const fmt::TensorQuantSpec& v_spec, int64_t head_dim)
      : sequences(s), kq(k_spec, head_dim, "clip objective (k)"), vq(v_spec, head_dim, "clip objective (v)") {}

  RowMatD keys(int64_t seq, int64_t h) const {
    const AttentionSequence& s = sequences[seq];
    return Eigen::Map<const RowMatF>(s.k.data() + h * s.tokens * d, s.tokens, d).cast<double>();
  }
  RowMatD values(int64_t seq, int64_t h) const {
    const AttentionSequence& s = sequences[seq];
    return Eigen::Map<const RowMatF>(s.v.data() + h * s.tokens * d, s.tokens, d).cast<double>();
  }
  // k̂ − k (or v̂ − v) of every token of every KV head of every sequence at one clip ratio: [seq][kv_head] [T, d].
  std::vector<std::vector<RowMatD>> residuals(bool key, float ratio) const {
    std::vector<std::vector<RowMatD>> out(sequences.size(), std::vector<RowMatD>(static_cast<size_t>(kv_heads)));
    tbb::parallel_for(int64_t{0}, static_cast<int64_t>(sequences.size()) * kv_heads, [&](int64_t i) {
      const int64_t seq = i / kv_heads, h = i % kv_heads;
      const AttentionSequence& s = sequences[seq];
      if (queries[seq].empty()) return;
      const int64_t T = s.tokens, g = groups == 1 ? 0 : h;
      const auto& rot = key ? k_rotation : v_rotation;
      const auto x = std::span<const float>(key ? s.k : s.v).subspan(h * T * d, T * d);
      std::vector<float> xq(x.size());
      (key ? kq : vq)
          .fake_quantize(x, T, std::span<const float>(rot).subspan(g * d * d, d * d), ratio, Basis::Original, xq);
      // The residual in fp64: x̂ − x in fp32 would round away the small errors the objective is about.
      RowMatD e(T, d);
      for (int64_t t = 0; t < T; ++t)
        for (int64_t c = 0; c < d; ++c) e(t, c) = static_cast<double>(xq[t * d + c]) - x[t * d + c];
      out[seq][h] = std::move(e);
    });
    return out;
  }
  double sum_in_order(const std::vector<double>& parts) const {
    double total = 0;
    for (double x : parts) total += x;
    return energy > 0 ? total / energy : 0.0;
  }
};

AttentionClipScorer::AttentionClipScorer(const std::vector<AttentionSequence>& sequences, int64_t num_heads,
                                         int64_t num_kv_heads, int64_t head_dim, std::span<const float> k_rotation,
                                         std::span<const float> v_rotation, int64_t groups,
                                         const fmt::TensorQuantSpec& k_spec, const fmt::TensorQuantSpec& v_spec,
                                         int64_t sink, int64_t recent, int64_t max_queries)
    : impl_(std::make_unique<Impl>(sequences, k_spec, v_spec, head_dim)) {
  Impl& m = *impl_;
  if (num_kv_heads <= 0 || num_heads % num_kv_heads != 0)
    throw Error("clip objective", ::fmt::format("{} heads over {} KV heads", num_heads, num_kv_heads));
  if (groups != 1 && groups != num_kv_heads)
    throw Error("clip objective", ::fmt::format("groups {} is neither 1 nor num_kv_heads {}", groups, num_kv_heads));
  const int64_t d = head_dim;
  if (static_cast<int64_t>(k_rotation.size()) != groups * d * d || static_cast<int64_t>(v_rotation.size()) != groups * d * d)
    throw Error("clip objective", ::fmt::format("rotations must hold [{}, {}, {}] values", groups, d, d));
  if (max_queries < 1) throw Error("clip objective", "max_queries must be >= 1");
  m.heads = num_heads;
  m.kv_heads = num_kv_heads;
  m.d = d;
  m.groups = groups;
  m.k_rotation.assign(k_rotation.begin(), k_rotation.end());
  m.v_rotation.assign(v_rotation.begin(), v_rotation.end());
  const int64_t g = num_heads / num_kv_heads;
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  for (size_t si = 0; si < sequences.size(); ++si) {
    const AttentionSequence& s = sequences[si];
    const int64_t T = s.tokens;
    const int64_t q_rows = s.query_positions.empty() ? T : static_cast<int64_t>(s.query_positions.size());
    if (static_cast<int64_t>(s.q.size()) != num_heads * q_rows * d ||
        static_cast<int64_t>(s.k.size()) != num_kv_heads * T * d || static_cast<int64_t>(s.v.size()) != num_kv_heads * T * d)
      throw Error("clip objective", ::fmt::format("held-out sequence {} does not match the layer shape", si));
    std::vector<int64_t> qs = scored_query_positions(T, sink, recent, max_queries);
    // A collector that kept only some rows must have kept these (same rule, same arguments).
    if (!s.query_positions.empty() && s.query_positions != qs)
      throw Error("clip objective", ::fmt::format("held-out sequence {} kept other query positions than the objective "
                                                  "scores (sink {}, recent {}, {} queries)",
                                                  si, sink, recent, max_queries));
    m.queries.push_back(std::move(qs));
    if (m.queries.back().empty()) continue;
    for (int64_t i = 0; i < num_heads; ++i) {
      ScoredHead sh;
      sh.sequence = static_cast<int64_t>(si);
      sh.head = i;
      sh.kv_head = i / g;
      m.scored.push_back(std::move(sh));
    }
  }
  std::vector<double> energy(m.scored.size());
  tbb::parallel_for(size_t{0}, m.scored.size(), [&](size_t j) {
    ScoredHead& sh = m.scored[j];
    const AttentionSequence& s = sequences[sh.sequence];
    const std::vector<int64_t>& qs = m.queries[sh.sequence];
    const int64_t T = s.tokens, nq = static_cast<int64_t>(qs.size());
    sh.q.resize(nq, d);
    const bool all_rows = s.query_positions.empty();
    for (int64_t r = 0; r < nq; ++r) {
      const int64_t row = all_rows ? sh.head * T + qs[r] : sh.head * nq + r;
      for (int64_t c = 0; c < d; ++c) sh.q(r, c) = scale * s.q[row * d + c];
    }
    sh.logits = sh.q * m.keys(sh.sequence, sh.kv_head).transpose();
    sh.mask.setZero(nq, T);
    for (int64_t r = 0; r < nq; ++r)
      for (int64_t t = sink; t <= qs[r] - recent; ++t) sh.mask(r, t) = 1.0;
    RowMatD p;
    causal_softmax(sh.logits, qs, p);
    sh.out = p * m.values(sh.sequence, sh.kv_head);
    energy[j] = sh.out.squaredNorm();
  });
  for (double e : energy) m.energy += e;
}

AttentionClipScorer::~AttentionClipScorer() = default;

bool AttentionClipScorer::reads_quantized() const { return impl_->energy > 0; }

double AttentionClipScorer::key_error(float clip_ratio) const {
  const Impl& m = *impl_;
  const auto e = m.residuals(true, clip_ratio);
  std::vector<double> err(m.scored.size());
  tbb::parallel_for(size_t{0}, m.scored.size(), [&](size_t j) {
    const ScoredHead& sh = m.scored[j];
    // Only the quantized keys move: logits + mask ⊙ (q · (k̂ − k)ᵀ).
    const RowMatD logits = sh.logits + (sh.q * e[sh.sequence][sh.kv_head].transpose()).cwiseProduct(sh.mask);
    RowMatD p;
    causal_softmax(logits, m.queries[sh.sequence], p);
    err[j] = (p * m.values(sh.sequence, sh.kv_head) - sh.out).squaredNorm();
  });
  return m.sum_in_order(err);
}

double AttentionClipScorer::value_error(float clip_ratio) const {
  const Impl& m = *impl_;
  const auto e = m.residuals(false, clip_ratio);
  std::vector<double> err(m.scored.size());
  tbb::parallel_for(size_t{0}, m.scored.size(), [&](size_t j) {
    const ScoredHead& sh = m.scored[j];
    RowMatD p;
    causal_softmax(sh.logits, m.queries[sh.sequence], p);
    // ô − o = Σ_t p_t (v̂_t − v_t) over the quantized tokens.
    err[j] = (p.cwiseProduct(sh.mask) * e[sh.sequence][sh.kv_head]).squaredNorm();
  });
  return m.sum_in_order(err);
}

}  // namespace oscar::calib
