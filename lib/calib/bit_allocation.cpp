#include "lib/calib/bit_allocation.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <numeric>

#include "formats/error.h"

namespace oscar::calib {

WaterFilling reverse_water_filling(std::span<const double> weights, double total_bits) {
  const int64_t n = static_cast<int64_t>(weights.size());
  if (!(total_bits >= 0) || !std::isfinite(total_bits))
    throw Error("reverse_water_filling", ::fmt::format("total_bits {} must be finite and >= 0", total_bits));
  for (double w : weights)
    if (!(w >= 0) || !std::isfinite(w))
      throw Error("reverse_water_filling", ::fmt::format("weight {} must be finite and >= 0", w));
  WaterFilling out;
  out.bits.assign(n, 0.0);
  out.distortion.assign(weights.begin(), weights.end());
  if (n == 0) return out;
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return weights[a] > weights[b]; });
  // Active set = the k largest weights; log-domain sums keep wide spectra (1e-12 .. 1e3) exact enough.
  int64_t active = 0;
  double level = weights[order[0]];
  double log_sum = 0;
  for (int64_t k = 1; k <= n; ++k) {
    const double w = weights[order[k - 1]];
    if (w <= 0) break;
    log_sum += std::log(w);
    const double theta = std::exp(log_sum / k - 2.0 * total_bits * std::log(2.0) / k);
    if (w > theta) {
      active = k;
      level = theta;
    }
  }
  if (active == 0) {
    // Every weight is zero (or no bits to give): all allocations are optimal; spread the bits evenly.
    if (weights[order[0]] <= 0) std::fill(out.bits.begin(), out.bits.end(), total_bits / n);
    out.level = weights[order[0]];
  } else {
    out.level = level;
    for (int64_t k = 0; k < active; ++k) {
      const int64_t i = order[k];
      out.bits[i] = 0.5 * std::log2(weights[i] / level);
      out.distortion[i] = level;
    }
  }
  out.total_distortion = std::accumulate(out.distortion.begin(), out.distortion.end(), 0.0);
  return out;
}

int64_t plan_bits(std::span<const fmt::QuantSegment> segments) {
  int64_t bits = 0;
  for (const auto& s : segments)
    if (s.bits > 0) bits += static_cast<int64_t>(s.end - s.begin) * s.bits + 32;
  return bits;
}

SegmentCostTable::SegmentCostTable(int64_t dim, int64_t align, std::vector<int32_t> widths)
    : dim_(dim), align_(align), units_(align > 0 ? dim / align : 0), widths_(std::move(widths)) {
  if (align <= 0 || dim <= 0 || dim % align != 0)
    throw Error("SegmentCostTable", ::fmt::format("align {} must divide dim {}", align, dim));
  if (widths_.empty()) throw Error("SegmentCostTable", "no candidate widths");
  for (int32_t w : widths_)
    if (w < 0 || w > 8) throw Error("SegmentCostTable", ::fmt::format("width {} is outside 0..8", w));
  const size_t n = static_cast<size_t>((units_ + 1) * (units_ + 1)) * widths_.size();
  cost_.assign(n, std::numeric_limits<double>::infinity());
  mixed_.assign(n, 0);
}

size_t SegmentCostTable::index(int64_t i, int64_t j, size_t w) const {
  return static_cast<size_t>(i * (units_ + 1) + j) * widths_.size() + w;
}

SegmentCostTable modeled_segment_costs(std::span<const double> weights, int64_t align, std::vector<int32_t> widths) {
  const int64_t d = static_cast<int64_t>(weights.size());
  SegmentCostTable table(d, align, std::move(widths));
  std::vector<double> prefix(d + 1, 0.0);
  for (int64_t i = 0; i < d; ++i) prefix[i + 1] = prefix[i] + weights[i];
  for (int64_t i = 0; i < table.units(); ++i)
    for (int64_t j = i + 1; j <= table.units(); ++j) {
      const double sum = prefix[j * align] - prefix[i * align];
      for (size_t w = 0; w < table.widths().size(); ++w)
        table.cost(i, j, w) = sum * std::exp2(-2.0 * table.widths()[w]);
    }
  return table;
}

std::vector<SegmentPlan> optimal_plans(const SegmentCostTable& table, int64_t max_bits) {
  if (max_bits < 0) throw Error("optimal_plans", ::fmt::format("max_bits {} must be >= 0", max_bits));
  const int64_t U = table.units(), A = table.align();
  const size_t W = table.widths().size();
  constexpr double kInf = std::numeric_limits<double>::infinity();
  // State (u, b): [0, u·align) tiled with exactly b bits. Back-pointers rebuild the tiling.
  struct Cell {
    double cost = kInf;
    int32_t segments = 0;
    int32_t prev_unit = -1;
    int32_t width = -1;
  };
  const int64_t B = max_bits + 1;
  std::vector<Cell> f(static_cast<size_t>((U + 1) * B));
  auto at = [&](int64_t u, int64_t b) -> Cell& { return f[static_cast<size_t>(u * B + b)]; };
  at(0, 0).cost = 0;
  for (int64_t j = 1; j <= U; ++j)
    for (int64_t i = 0; i < j; ++i)
      for (size_t w = 0; w < W; ++w) {
        const int32_t width = table.widths()[w];
        const int64_t seg_bits = width > 0 ? (j - i) * A * width + 32 : 0;
        const double c = table.cost(i, j, w);
        if (!std::isfinite(c)) continue;
        for (int64_t b = 0; b + seg_bits < B; ++b) {
          const Cell& from = at(i, b);
          if (!std::isfinite(from.cost)) continue;
          Cell& to = at(j, b + seg_bits);
          const double total = from.cost + c;
          if (total < to.cost || (total == to.cost && from.segments + 1 < to.segments)) {
            to.cost = total;
            to.segments = from.segments + 1;
            to.prev_unit = static_cast<int32_t>(i);
            to.width = static_cast<int32_t>(w);
          }
        }
      }
  std::vector<SegmentPlan> best(static_cast<size_t>(B));
  int64_t best_b = -1;
  for (int64_t b = 0; b < B; ++b) {
    const Cell& c = at(U, b);
    if (std::isfinite(c.cost) &&
        (best_b < 0 || c.cost < at(U, best_b).cost ||
         (c.cost == at(U, best_b).cost && c.segments < at(U, best_b).segments)))
      best_b = b;
    if (best_b < 0) continue;
    if (best_b != b && b > 0 && best[b - 1].bits == best_b) {
      best[b] = best[b - 1];
      continue;
    }
    SegmentPlan plan;
    plan.cost = at(U, best_b).cost;
    std::vector<std::pair<fmt::QuantSegment, bool>> rev;
    for (int64_t u = U, bits = best_b; u > 0;) {
      const Cell& c = at(u, bits);
      const int32_t width = table.widths()[c.width];
      rev.push_back({fmt::QuantSegment{static_cast<int32_t>(c.prev_unit * A), static_cast<int32_t>(u * A), width},
                     table.mixed(c.prev_unit, u, c.width)});
      bits -= width > 0 ? (u - c.prev_unit) * A * width + 32 : 0;
      u = c.prev_unit;
    }
    for (auto it = rev.rbegin(); it != rev.rend(); ++it) {
      // Adjacent dropped segments store nothing either way; one segment reads better.
      if (!plan.segments.empty() && plan.segments.back().bits == 0 && it->first.bits == 0) {
        plan.segments.back().end = it->first.end;
        continue;
      }
      plan.segments.push_back(it->first);
      plan.mixed.push_back(it->second);
    }
    plan.bits = plan_bits(plan.segments);
    best[b] = std::move(plan);
  }
  return best;
}

KvSplit choose_kv_split(const std::vector<SegmentPlan>& k, double k_energy, const std::vector<SegmentPlan>& v,
                        double v_energy, int64_t total_bits, double k_weight, double v_weight) {
  if (!(k_energy > 0) || !(v_energy > 0))
    throw Error("choose_kv_split", ::fmt::format("energies must be positive (k {}, v {})", k_energy, v_energy));
  KvSplit best;
  const int64_t kmax = std::min<int64_t>(total_bits, static_cast<int64_t>(k.size()) - 1);
  for (int64_t kb = 0; kb <= kmax; ++kb) {
    const int64_t vb = std::min<int64_t>(total_bits - kb, static_cast<int64_t>(v.size()) - 1);
    if (vb < 0 || !std::isfinite(k[kb].cost) || !std::isfinite(v[vb].cost)) continue;
    const double kr = k[kb].cost / k_energy, vr = v[vb].cost / v_energy;
    const double obj = k_weight * kr + v_weight * vr;
    if (obj < best.objective) {
      best.objective = obj;
      best.k_bits = k[kb].bits;
      best.v_bits = v[vb].bits;
      best.k_relative = kr;
      best.v_relative = vr;
    }
  }
  if (!std::isfinite(best.objective))
    throw Error("choose_kv_split", ::fmt::format("no K/V plan pair fits in {} bits", total_bits));
  return best;
}

int64_t budget_bits(double bits_per_element, int64_t dim) {
  return static_cast<int64_t>(std::floor(bits_per_element * static_cast<double>(dim) + 1e-9));
}

std::string segments_text(std::span<const fmt::QuantSegment> segments) {
  std::string out;
  for (const auto& s : segments) {
    if (!out.empty()) out += ' ';
    out += ::fmt::format("[{},{})@{}", s.begin, s.end, s.bits);
  }
  return out;
}

}  // namespace oscar::calib
