#include "lib/calib/statistics.h"

#include <fmt/format.h>
#include <tbb/parallel_for.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "formats/error.h"

namespace oscar::calib {

namespace {

constexpr char kMagic[8] = {'O', 'S', 'C', 'S', 'T', 'A', 'T', '1'};

// acc[d, d] += Σ_r w_r x_r x_rᵀ over the rows of x [n, d], in row order. Rows of acc are independent, so they run
// in parallel while every element still sums its terms in the same order (deterministic).
void accumulate_outer(std::span<const double> x, std::span<const double> w, int64_t n, int64_t d, double* acc) {
  tbb::parallel_for(int64_t{0}, d, [&](int64_t i) {
    double* row = acc + i * d;
    for (int64_t r = 0; r < n; ++r) {
      const double* xr = x.data() + r * d;
      const double a = (w.empty() ? 1.0 : w[r]) * xr[i];
      for (int64_t j = 0; j < d; ++j) row[j] += a * xr[j];
    }
  });
}

int64_t count_non_finite(const float* x, int64_t n) {
  int64_t bad = 0;
  for (int64_t i = 0; i < n; ++i) bad += !std::isfinite(x[i]);
  return bad;
}

// Copies head `h` of a [heads, T, d] fp32 tensor to fp64 rows.
void widen_head(const float* t, int64_t h, int64_t tokens, int64_t d, double* out) {
  const float* src = t + h * tokens * d;
  for (int64_t i = 0; i < tokens * d; ++i) out[i] = src[i];
}

template <typename T>
void put(std::string& out, const T& v) {
  out.append(reinterpret_cast<const char*>(&v), sizeof(T));
}

class ByteReader {
 public:
  ByteReader(std::string_view bytes, std::string where) : bytes_(bytes), where_(std::move(where)) {}
  template <typename T>
  T get() {
    T v;
    need(sizeof(T));
    std::memcpy(&v, bytes_.data() + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }
  void get_doubles(std::vector<double>& out, size_t n) {
    need(n * sizeof(double));
    out.resize(n);
    // An empty vector's data() may be null, and memcpy(nullptr, p, 0) is still undefined (UBSan, sanitize.sh).
    if (n > 0) std::memcpy(out.data(), bytes_.data() + pos_, n * sizeof(double));
    pos_ += n * sizeof(double);
  }
  void need(size_t n) const {
    if (bytes_.size() - pos_ < n) throw Error(where_, "statistics checkpoint is truncated");
  }
  bool done() const { return pos_ == bytes_.size(); }

 private:
  std::string_view bytes_;
  std::string where_;
  size_t pos_ = 0;
};

}  // namespace

std::string_view value_weighting_name(ValueWeighting w) {
  switch (w) {
    case ValueWeighting::QueryEnergy: return "query";
    case ValueWeighting::AttentionMass: return "attention_mass";
    case ValueWeighting::Uniform: return "uniform";
  }
  return "unknown";
}

ValueWeighting parse_value_weighting(std::string_view name, const std::string& where) {
  if (name == "query") return ValueWeighting::QueryEnergy;
  if (name == "attention_mass") return ValueWeighting::AttentionMass;
  if (name == "uniform") return ValueWeighting::Uniform;
  throw Error(where, "unknown value weighting \"" + std::string(name) + "\" (query, attention_mass, uniform)");
}

StatisticsShape StatisticsShape::from_config(const fmt::ModelConfig& cfg) {
  return {cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim};
}

void attention_mass(const model::AttentionInputs& in, int64_t kv_head, std::span<double> mass) {
  const int64_t T = in.num_tokens, d = in.head_dim;
  if (in.pos0 != 0)
    throw Error("attention_mass", ::fmt::format("layer {}: needs the whole sequence in one call (pos0 = {})",
                                                in.layer, in.pos0));
  if (static_cast<int64_t>(mass.size()) != T) throw Error("attention_mass", "mass must hold num_tokens values");
  const int64_t group = in.num_heads / in.num_kv_heads;
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  std::vector<double> k(static_cast<size_t>(T * d));
  widen_head(in.k, kv_head, T, d, k.data());
  std::vector<std::vector<double>> per_head(static_cast<size_t>(group), std::vector<double>(T, 0.0));
  tbb::parallel_for(int64_t{0}, group, [&](int64_t g) {
    const float* q = in.q + (kv_head * group + g) * T * d;
    std::vector<double> p(static_cast<size_t>(T));
    auto& acc = per_head[g];
    for (int64_t s = 0; s < T; ++s) {
      double mx = -INFINITY;
      for (int64_t t = 0; t <= s; ++t) {
        double dot = 0;
        for (int64_t c = 0; c < d; ++c) dot += static_cast<double>(q[s * d + c]) * k[t * d + c];
        p[t] = dot * scale;
        mx = std::max(mx, p[t]);
      }
      double z = 0;
      for (int64_t t = 0; t <= s; ++t) z += (p[t] = std::exp(p[t] - mx));
      for (int64_t t = 0; t <= s; ++t) acc[t] += p[t] / z;
    }
  });
  std::fill(mass.begin(), mass.end(), 0.0);
  for (const auto& h : per_head)
    for (int64_t t = 0; t < T; ++t) mass[t] += h[t];
}

StatisticsCollector::StatisticsCollector(const StatisticsShape& shape, ValueWeighting weighting)
    : shape_(shape), weighting_(weighting) {
  if (shape.num_layers <= 0 || shape.num_heads <= 0 || shape.num_kv_heads <= 0 || shape.head_dim <= 0 ||
      shape.num_heads % shape.num_kv_heads != 0)
    throw Error("StatisticsCollector",
                ::fmt::format("invalid shape: layers {}, heads {}, kv heads {}, head_dim {}", shape.num_layers,
                              shape.num_heads, shape.num_kv_heads, shape.head_dim));
}

bool StatisticsCollector::contains_sequence(int64_t index) const {
  auto it = blocks_.upper_bound(BlockKey{index, 0});
  if (it == blocks_.begin()) return false;
  --it;
  return index < it->first.start + (int64_t{1} << it->first.level);
}

void StatisticsCollector::begin_sequence(int64_t index) {
  finish_sequence();
  if (index < 0) throw Error("StatisticsCollector", ::fmt::format("negative sequence index {}", index));
  if (contains_sequence(index))
    throw Error("StatisticsCollector", ::fmt::format("sequence {} was already collected in this pass", index));
  open_index_ = index;
  open_.assign(static_cast<size_t>(payload_size()), 0.0);
}

void StatisticsCollector::finish_sequence() {
  if (open_index_ < 0) return;
  insert_block(BlockKey{open_index_, 0}, std::move(open_));
  open_index_ = -1;
  open_.clear();
}

void StatisticsCollector::insert_block(BlockKey key, std::vector<double> payload) {
  for (;;) {
    const int64_t size = int64_t{1} << key.level;
    const int64_t sibling_start = key.start ^ size;
    auto it = blocks_.find(BlockKey{sibling_start, key.level});
    if (it == blocks_.end() || it->first.level != key.level) break;
    // Left + right in index order (IEEE addition is commutative, the order is for the reader).
    std::vector<double> parent = sibling_start < key.start ? std::move(it->second) : std::move(payload);
    const std::vector<double>& right = sibling_start < key.start ? payload : it->second;
    for (size_t i = 0; i < parent.size(); ++i) parent[i] += right[i];
    blocks_.erase(it);
    key = BlockKey{std::min(key.start, sibling_start), key.level + 1};
    payload = std::move(parent);
  }
  blocks_.emplace(key, std::move(payload));
  totals_.clear();
}

std::vector<double> StatisticsCollector::reduced() const {
  std::vector<double> total(static_cast<size_t>(payload_size()), 0.0);
  for (const auto& [key, payload] : blocks_)
    for (size_t i = 0; i < total.size(); ++i) total[i] += payload[i];
  return total;
}

int64_t StatisticsCollector::num_sequences() const {
  int64_t n = open_index_ >= 0 ? 1 : 0;
  for (const auto& [key, payload] : blocks_) n += int64_t{1} << key.level;
  return n;
}

void StatisticsCollector::on_attention_inputs(const model::AttentionInputs& in) {
  const std::string where = ::fmt::format("StatisticsCollector (layer {})", in.layer);
  if (open_index_ < 0) throw Error(where, "no open sequence: call begin_sequence() before the forward pass");
  if (in.layer < 0 || in.layer >= shape_.num_layers || in.num_heads != shape_.num_heads ||
      in.num_kv_heads != shape_.num_kv_heads || in.head_dim != shape_.head_dim)
    throw Error(where, ::fmt::format("attention inputs of shape heads {}, kv heads {}, head_dim {} do not match the "
                                     "collector's {}, {}, {}",
                                     in.num_heads, in.num_kv_heads, in.head_dim, shape_.num_heads,
                                     shape_.num_kv_heads, shape_.head_dim));
  const int64_t T = in.num_tokens, d = shape_.head_dim, group = shape_.num_heads / shape_.num_kv_heads;
  if (T <= 0) return;
  // One overflowed activation would poison the whole layer's covariance (and every later sequence's sum), so a
  // non-finite input stops the calibration here, naming the layer, rather than as an eigensolver failure later.
  const int64_t bad = count_non_finite(in.q, shape_.num_heads * T * d) +
                      count_non_finite(in.k, shape_.num_kv_heads * T * d) +
                      count_non_finite(in.v, shape_.num_kv_heads * T * d);
  if (bad > 0)
    throw Error(where, ::fmt::format("{} non-finite (NaN/Inf) values in the attention inputs q/k/v of {} tokens at "
                                     "position {}",
                                     bad, T, in.pos0));
  const bool collect_queries = pass_ == Pass::Queries;
  const bool collect_values = weighting_ != ValueWeighting::QueryEnergy || pass_ == Pass::Values;
  scratch_.resize(static_cast<size_t>(std::max(group, int64_t{2}) * T * d));
  std::vector<double> w;

  for (int64_t h = 0; h < shape_.num_kv_heads; ++h) {
    double* slot = open_.data() + slot_offset(in.layer, h);
    double* qq = slot;
    double* vv = slot + d * d + 1;
    if (collect_queries) {
      // The group's query heads stacked as rows [group * T, d], head-major: one fixed order.
      for (int64_t g = 0; g < group; ++g) widen_head(in.q, h * group + g, T, d, scratch_.data() + g * T * d);
      accumulate_outer(std::span<const double>(scratch_.data(), group * T * d), {}, group * T, d, qq);
      slot[d * d] += static_cast<double>(group * T);
    }
    if (!collect_values) continue;
    w.assign(static_cast<size_t>(T), 1.0);
    if (weighting_ == ValueWeighting::AttentionMass) {
      attention_mass(in, h, w);
    } else if (weighting_ == ValueWeighting::QueryEnergy) {
      const double* sq = frozen_sigma_q_.data() + (in.layer * shape_.num_kv_heads + h) * d * d;
      double* k = scratch_.data();
      widen_head(in.k, h, T, d, k);
      for (int64_t t = 0; t < T; ++t) {
        const double* kt = k + t * d;
        double e = 0;
        for (int64_t i = 0; i < d; ++i) {
          double row = 0;
          for (int64_t j = 0; j < d; ++j) row += sq[i * d + j] * kt[j];
          e += kt[i] * row;
        }
        w[t] = e;
      }
    }
    double* v = scratch_.data() + T * d;
    widen_head(in.v, h, T, d, v);
    accumulate_outer(std::span<const double>(v, T * d), w, T, d, vv);
    double wsum = 0;
    for (int64_t t = 0; t < T; ++t) wsum += w[t];
    slot[2 * d * d + 1] += wsum;
    slot[2 * d * d + 2] += static_cast<double>(T);
  }
}

void StatisticsCollector::start_value_pass() {
  if (!needs_value_pass())
    throw Error("StatisticsCollector", ::fmt::format("start_value_pass() is only for the query pass of \"query\" "
                                                     "weighting (weighting {}, pass {})",
                                                     value_weighting_name(weighting_), static_cast<int>(pass_)));
  finish_sequence();
  if (blocks_.empty()) throw Error("StatisticsCollector", "start_value_pass() before any sequence was collected");
  query_result_ = reduced();
  const int64_t d = shape_.head_dim;
  frozen_sigma_q_.assign(static_cast<size_t>(shape_.num_layers * shape_.num_kv_heads * d * d), 0.0);
  for (int64_t l = 0; l < shape_.num_layers; ++l)
    for (int64_t h = 0; h < shape_.num_kv_heads; ++h) {
      const double* slot = query_result_.data() + slot_offset(l, h);
      const double n = slot[d * d];
      if (!(n > 0)) throw Error("StatisticsCollector", ::fmt::format("layer {} saw no queries", l));
      double* out = frozen_sigma_q_.data() + (l * shape_.num_kv_heads + h) * d * d;
      for (int64_t i = 0; i < d * d; ++i) out[i] = slot[i] / n;
    }
  blocks_.clear();
  totals_.clear();
  pass_ = Pass::Values;
}

void StatisticsCollector::merge(const StatisticsCollector& other) {
  if (&other == this) throw Error("StatisticsCollector::merge", "cannot merge a collector with itself");
  if (!(other.shape_ == shape_) || other.weighting_ != weighting_ || other.pass_ != pass_)
    throw Error("StatisticsCollector::merge", "collectors differ in shape, weighting or pass");
  if (other.open_index_ >= 0)
    throw Error("StatisticsCollector::merge", "the other collector has an open sequence (call finish_sequence())");
  if (pass_ == Pass::Values && other.query_result_ != query_result_)
    throw Error("StatisticsCollector::merge", "the collectors froze different query statistics for the value pass");
  finish_sequence();
  for (const auto& [key, payload] : other.blocks_) {
    for (const auto& [mine, unused] : blocks_) {
      const int64_t a0 = mine.start, a1 = mine.start + (int64_t{1} << mine.level);
      const int64_t b0 = key.start, b1 = key.start + (int64_t{1} << key.level);
      if (a0 < b1 && b0 < a1)
        throw Error("StatisticsCollector::merge",
                    ::fmt::format("both collectors hold sequences in [{}, {})", std::max(a0, b0), std::min(a1, b1)));
    }
    insert_block(key, payload);
  }
}

const std::vector<double>& StatisticsCollector::totals() {
  finish_sequence();
  if (weighting_ == ValueWeighting::QueryEnergy && pass_ == Pass::Queries)
    throw Error("StatisticsCollector", "value statistics need the second pass (start_value_pass())");
  if (blocks_.empty()) throw Error("StatisticsCollector", "no sequences were collected");
  if (totals_.empty()) totals_ = reduced();
  return totals_;
}

HeadMoments StatisticsCollector::head_moments(int64_t layer, int64_t kv_head) {
  if (layer < 0 || layer >= shape_.num_layers || kv_head < 0 || kv_head >= shape_.num_kv_heads)
    throw Error("StatisticsCollector", ::fmt::format("no layer {} / kv head {}", layer, kv_head));
  const int64_t d = shape_.head_dim;
  const std::vector<double>& values = totals();
  const std::vector<double>& queries = pass_ == Pass::Values ? query_result_ : values;
  const double* qs = queries.data() + slot_offset(layer, kv_head);
  const double* vs = values.data() + slot_offset(layer, kv_head);
  HeadMoments m;
  m.query_vectors = qs[d * d];
  m.value_weight = vs[2 * d * d + 1];
  m.value_tokens = vs[2 * d * d + 2];
  const std::string where = ::fmt::format("StatisticsCollector (layer {}, kv head {})", layer, kv_head);
  if (!(m.query_vectors > 0) || !(m.value_tokens > 0)) throw Error(where, "no tokens were collected");
  if (!(m.value_weight > 0)) throw Error(where, "the value weights sum to zero");
  m.sigma_q.resize(static_cast<size_t>(d * d));
  m.sigma_v.resize(static_cast<size_t>(d * d));
  for (int64_t i = 0; i < d * d; ++i) {
    m.sigma_q[i] = qs[i] / m.query_vectors;
    m.sigma_v[i] = vs[d * d + 1 + i] / m.value_weight;
  }
  return m;
}

HeadMoments StatisticsCollector::layer_moments(int64_t layer) {
  return mean_head_moments(shape_.num_kv_heads, [&](int64_t h) { return head_moments(layer, h); });
}

std::string StatisticsCollector::serialize() {
  finish_sequence();
  std::string out(kMagic, sizeof(kMagic));
  put(out, shape_.num_layers);
  put(out, shape_.num_heads);
  put(out, shape_.num_kv_heads);
  put(out, shape_.head_dim);
  put(out, static_cast<uint8_t>(weighting_));
  put(out, static_cast<uint8_t>(pass_));
  put(out, static_cast<uint64_t>(query_result_.size()));
  out.append(reinterpret_cast<const char*>(query_result_.data()), query_result_.size() * sizeof(double));
  put(out, static_cast<uint64_t>(blocks_.size()));
  for (const auto& [key, payload] : blocks_) {
    put(out, key.start);
    put(out, key.level);
    out.append(reinterpret_cast<const char*>(payload.data()), payload.size() * sizeof(double));
  }
  return out;
}

StatisticsCollector StatisticsCollector::deserialize(std::string_view bytes, const std::string& where) {
  if (bytes.size() < sizeof(kMagic) || std::memcmp(bytes.data(), kMagic, sizeof(kMagic)) != 0)
    throw Error(where, "not an OSCAR statistics checkpoint (bad magic)");
  ByteReader r(bytes.substr(sizeof(kMagic)), where);
  StatisticsShape shape;
  shape.num_layers = r.get<int64_t>();
  shape.num_heads = r.get<int64_t>();
  shape.num_kv_heads = r.get<int64_t>();
  shape.head_dim = r.get<int64_t>();
  if (shape.num_layers <= 0 || shape.num_layers > 100000 || shape.head_dim <= 0 || shape.head_dim > 4096 ||
      shape.num_kv_heads <= 0 || shape.num_kv_heads > 4096)
    throw Error(where, "statistics checkpoint has an implausible shape");
  const uint8_t weighting = r.get<uint8_t>();
  const uint8_t pass = r.get<uint8_t>();
  if (weighting > 2 || pass > 1) throw Error(where, "statistics checkpoint has an unknown weighting or pass");
  StatisticsCollector c(shape, static_cast<ValueWeighting>(weighting));
  c.pass_ = static_cast<Pass>(pass);
  const uint64_t query_size = r.get<uint64_t>();
  const uint64_t payload = static_cast<uint64_t>(c.payload_size());
  if (query_size != (c.pass_ == Pass::Values ? payload : 0))
    throw Error(where, "statistics checkpoint: query statistics of the wrong size");
  r.get_doubles(c.query_result_, query_size);
  if (c.pass_ == Pass::Values) {
    // Rebuild the frozen weighting exactly as start_value_pass() derived it.
    c.pass_ = Pass::Queries;
    c.blocks_.emplace(BlockKey{0, 0}, c.query_result_);
    c.start_value_pass();
  }
  const uint64_t blocks = r.get<uint64_t>();
  for (uint64_t i = 0; i < blocks; ++i) {
    const int64_t start = r.get<int64_t>();
    const int32_t level = r.get<int32_t>();
    if (start < 0 || level < 0 || level > 62 || (start & ((int64_t{1} << level) - 1)) != 0)
      throw Error(where, "statistics checkpoint: invalid sequence block");
    std::vector<double> data;
    r.get_doubles(data, payload);
    if (c.contains_sequence(start)) throw Error(where, "statistics checkpoint: overlapping sequence blocks");
    c.blocks_.emplace(BlockKey{start, level}, std::move(data));
  }
  if (!r.done()) throw Error(where, "statistics checkpoint has trailing bytes");
  return c;
}

}  // namespace oscar::calib
